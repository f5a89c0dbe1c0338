"""Conversion between QuantizedArray and bitsandbytes' serialized 4-bit state.

transformers saves a bnb 4-bit Linear `prefix` (= "...q_proj.weight") as these safetensors keys:
  prefix                                  uint8 [(n+1)//2, 1]   packed codes
  prefix.absmax                           uint8 (float32 without double quant)
  prefix.quant_map                        float32[16]
  prefix.nested_absmax                    float32 (double quant only)
  prefix.nested_quant_map                 float32[256] (double quant only)
  prefix.quant_state.bitsandbytes__nf4    uint8 bytes of a JSON object (quant_type, blocksize,
                                          dtype, shape, nested_blocksize, nested_dtype, nested_offset)
Both directions move bytes only: reading a bnb checkpoint never requantizes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from qlora_jax.format import codebooks
from qlora_jax.format.quantization import QuantizedArray

BNB_QUANT_TYPES = ("nf4", "fp4")  # what bitsandbytes itself reads; our format also stores int4
# The tensors stored beside a 4-bit weight's codes (they belong to that weight).
SIDE_KEY = re.compile(r"\.(absmax|quant_map|nested_absmax|nested_quant_map|quant_state\..*)$")


def quant_state_key(prefix: str, quant_type: str) -> str:
  return f"{prefix}.quant_state.bitsandbytes__{quant_type}"


def to_bnb_state(qw: QuantizedArray, prefix: str) -> dict[str, np.ndarray]:
  """The safetensors entries bitsandbytes/transformers write for this weight.

  int4 uses the same layout under `...bitsandbytes__int4`, which only qlora_jax reads.
  """
  out = {
      prefix: np.asarray(qw.codes, np.uint8).reshape(-1, 1),
      f"{prefix}.absmax": np.asarray(qw.absmax),
      f"{prefix}.quant_map": np.asarray(qw.quant_map, np.float32),
  }
  meta = {"quant_type": qw.quant_type, "blocksize": qw.blocksize, "dtype": qw.dtype,
          "shape": list(qw.shape)}
  if qw.double_quant:
    out[f"{prefix}.nested_absmax"] = np.asarray(qw.nested_absmax, np.float32)
    out[f"{prefix}.nested_quant_map"] = np.asarray(qw.nested_quant_map, np.float32)
    meta.update(nested_blocksize=qw.nested_blocksize, nested_dtype="float32",
                nested_offset=float(np.float32(qw.offset)))
  out[quant_state_key(prefix, qw.quant_type)] = np.frombuffer(
      json.dumps(meta).encode("utf-8"), np.uint8).copy()
  return out


def _read_meta(tensors: Mapping, prefix: str) -> dict:
  keys = [quant_state_key(prefix, t) for t in codebooks.QUANT_TYPES
          if quant_state_key(prefix, t) in tensors]
  if len(keys) != 1:
    raise ValueError(f"expected one {prefix}.quant_state.bitsandbytes__<nf4|fp4> entry, found "
                     f"{len(keys)}; is this a bitsandbytes 4-bit checkpoint?")
  try:
    return json.loads(bytes(np.asarray(tensors[keys[0]], np.uint8)).decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{keys[0]} is not valid JSON ({e}); the checkpoint is corrupt") from e


def _need(tensors: Mapping, key: str, dtype, length: int) -> np.ndarray:
  """Fetch a tensor, check its element count, view it with the expected dtype."""
  if key not in tensors:
    raise ValueError(f"missing tensor {key!r} in the bitsandbytes checkpoint")
  arr = np.asarray(tensors[key])
  if dtype == np.uint8 and arr.dtype != np.uint8:  # bnb quant_storage other than uint8
    arr = np.ascontiguousarray(arr).view(np.uint8)
  if arr.size != length:
    raise ValueError(f"{key} has {arr.size} elements, expected {length} for this weight's shape")
  return arr.reshape(-1).astype(dtype, copy=False)


def from_bnb_state(tensors: Mapping, prefix: str, on_host: bool = False) -> QuantizedArray:
  """The QuantizedArray stored under `prefix` in a bitsandbytes checkpoint (bytes kept as is);
  with numpy leaves when `on_host` (for a loader that places the arrays itself)."""
  xp = np if on_host else jnp
  meta = _read_meta(tensors, prefix)
  quant_type, blocksize = meta.get("quant_type"), meta.get("blocksize")
  if quant_type not in codebooks.QUANT_TYPES or not isinstance(blocksize, int) or blocksize <= 0:
    raise ValueError(f"{prefix}: unsupported quant_type/blocksize {quant_type!r}/{blocksize!r}")
  shape = tuple(int(d) for d in meta.get("shape") or ())
  n = int(np.prod(shape)) if shape else 0
  if n == 0:
    raise ValueError(f"{prefix}: quant_state has no usable shape ({meta.get('shape')!r})")
  nb = -(-n // blocksize)
  double_quant = "nested_offset" in meta
  fields = dict(
      codes=xp.asarray(_need(tensors, prefix, np.uint8, (n + 1) // 2)),
      absmax=xp.asarray(_need(tensors, f"{prefix}.absmax",
                              np.uint8 if double_quant else np.float32, nb)),
      quant_map=xp.asarray(_need(tensors, f"{prefix}.quant_map", np.float32, 16)),
      shape=shape, dtype=str(meta.get("dtype", "bfloat16")), quant_type=quant_type,
      blocksize=blocksize)
  if double_quant:
    nbs = int(meta.get("nested_blocksize", codebooks.NESTED_BLOCKSIZE))
    fields.update(
        nested_absmax=xp.asarray(_need(tensors, f"{prefix}.nested_absmax", np.float32, -(-nb // nbs))),
        nested_quant_map=xp.asarray(_need(tensors, f"{prefix}.nested_quant_map", np.float32, 256)),
        offset=xp.float32(meta["nested_offset"]), nested_blocksize=nbs)
  return QuantizedArray(**fields)
