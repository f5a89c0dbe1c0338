"""Write tests/golden/bnb_4bit.safetensors: inputs and real bitsandbytes 0.50 outputs.

Run with torch (CPU) and bitsandbytes installed:  python scripts/make_bnb_golden.py
The parity test reads this file, so the check also runs where torch is absent.
"""

import json
import pathlib
import sys

import bitsandbytes
import bitsandbytes.functional as F
import numpy as np
import torch
from safetensors.numpy import save_file

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "golden" / "bnb_4bit.safetensors"
sys.path.insert(0, str(ROOT))
from tests.bnb_reference import dequantize_4bit  # noqa: E402


def inputs(rng: np.random.Generator) -> dict[str, np.ndarray]:
  """Small tensors of the kinds the acceptance names: normal, heavy-tailed, row-scaled, odd."""
  row_scaled = rng.standard_normal((96, 200)) * np.exp(rng.uniform(-4, 2, (96, 1)))
  with_zero_block = rng.standard_normal((40, 64)) * 0.02
  with_zero_block[3] = 0.0
  return {
      "normal": rng.standard_normal((288, 64)) * 0.02,          # 288 blocks: a 2nd nested block
      "heavy": rng.standard_t(2.0, (160, 96)),
      "row_scaled": row_scaled,
      "odd": rng.standard_normal((1001,)),                     # odd length, partial last block
      "zero_block": with_zero_block,
      "wide": rng.standard_normal((17, 1031)) * 0.1,           # 17527 elements: partial blocks
  }


def main() -> None:
  torch.set_num_threads(1)  # the offset's float32 sum order (see qlora_jax/format/reduction.py)
  rng = np.random.default_rng(20231123)
  tensors: dict[str, np.ndarray] = {}
  cases = []
  for name, x in inputs(rng).items():
    x32 = x.astype(np.float32)
    tensors[f"{name}.input"] = x32
    for qt in ("nf4", "fp4"):
      for bs in (32, 64, 128):
        for dq in (True, False):
          key = f"{name}.{qt}.{bs}.{'dq' if dq else 'nodq'}"
          packed, state = F.quantize_4bit(torch.from_numpy(x32), blocksize=bs, quant_type=qt,
                                          compress_statistics=dq)
          tensors[f"{key}.codes"] = packed.numpy().reshape(-1)
          tensors[f"{key}.absmax"] = state.absmax.numpy()
          if dq:
            tensors[f"{key}.nested_absmax"] = state.state2.absmax.numpy()
            tensors[f"{key}.offset"] = state.offset.reshape(1).numpy()
          if bs == 64:  # dequantized values for the default blocksize keep the file small
            tensors[f"{key}.dequant"] = dequantize_4bit(packed, state)
          cases.append(key)
  tensors["dynamic_map"] = F.create_dynamic_map(signed=True).numpy()
  meta = {"bitsandbytes": bitsandbytes.__version__, "torch": torch.__version__,
          "cases": json.dumps(cases)}
  OUT.parent.mkdir(parents=True, exist_ok=True)
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(OUT), metadata=meta)
  print(f"wrote {len(cases)} cases to {OUT} ({OUT.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
  main()
