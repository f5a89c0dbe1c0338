"""Reading and writing bitsandbytes' serialized 4-bit state without requantizing."""

import jax.numpy as jnp
import numpy as np
import pytest

import qlora_jax as q
from tests.conftest import needs_bnb


def _leaves_equal(a: q.QuantizedArray, b: q.QuantizedArray) -> None:
  for name in ("codes", "absmax", "quant_map", "nested_absmax", "nested_quant_map", "offset"):
    x, y = getattr(a, name), getattr(b, name)
    assert (x is None) == (y is None), name
    if x is not None:
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)
  assert (a.shape, a.dtype, a.quant_type, a.blocksize) == (b.shape, b.dtype, b.quant_type, b.blocksize)


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
def test_round_trip(double_quant, quant_type):
  w = np.random.default_rng(0).standard_normal((70, 130)).astype(np.float32)
  qw = q.quantize(jnp.asarray(w, jnp.bfloat16), quant_type, 64, double_quant)
  _leaves_equal(q.from_bnb_state(q.to_bnb_state(qw, "layer.weight"), "layer.weight"), qw)


@needs_bnb
@pytest.mark.parametrize("double_quant", [True, False])
def test_same_bytes_as_bitsandbytes(double_quant):
  import bitsandbytes.functional as F
  import torch

  w = np.random.default_rng(1).standard_normal((300, 200)).astype(np.float32)
  packed, state = F.quantize_4bit(torch.from_numpy(w).to(torch.bfloat16), blocksize=64,
                                  quant_type="nf4", compress_statistics=double_quant)
  theirs = {"w": packed.numpy(), **{f"w.{k}": v.numpy() for k, v in state.as_dict(packed=True).items()}}
  ours = q.to_bnb_state(q.quantize(jnp.asarray(w, jnp.bfloat16), "nf4", 64, double_quant), "w")
  assert sorted(ours) == sorted(theirs)
  for key in theirs:
    np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
  loaded = q.from_bnb_state(theirs, "w")
  ref = F.dequantize_4bit(packed, state).float().numpy()
  np.testing.assert_array_equal(np.asarray(q.dequantize(loaded, jnp.bfloat16), np.float32), ref)


def test_corrupt_or_incomplete_state_is_named():
  state = q.to_bnb_state(q.quantize(jnp.ones((4, 64))), "w")
  missing = {k: v for k, v in state.items() if not k.endswith(".absmax")}
  with pytest.raises(ValueError, match=r"missing tensor 'w\.absmax'"):
    q.from_bnb_state(missing, "w")
  short = dict(state, w=state["w"][:-1])
  with pytest.raises(ValueError, match="elements"):
    q.from_bnb_state(short, "w")
  bad_json = dict(state, **{"w.quant_state.bitsandbytes__nf4": np.frombuffer(b"{oops", np.uint8)})
  with pytest.raises(ValueError, match="corrupt"):
    q.from_bnb_state(bad_json, "w")
  with pytest.raises(ValueError, match="bitsandbytes 4-bit checkpoint"):
    q.from_bnb_state({}, "w")
