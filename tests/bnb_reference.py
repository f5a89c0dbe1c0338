"""bitsandbytes as the reference (needs torch and bitsandbytes; imported only by tests that do).

Dequantization uses bnb's own flat-index implementation (the semantics of its CUDA kernel and
of `backends/default`), not its CPU C++ kernel: bnb 0.50's CPU kernel indexes scales per row,
as row * (cols // blocksize) + col // blocksize, which is wrong whenever a row's length is not a
multiple of the blocksize (it reads a neighbouring block's absmax).
"""

import bitsandbytes.functional as F
import numpy as np
import torch
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute


def dequantize_4bit(packed: torch.Tensor, state) -> np.ndarray:
  """float32 numpy dequantization of a bnb (packed, QuantState) with flat block indexing."""
  absmax = state.absmax
  if state.nested:
    absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
  code = F.get_4bit_type(state.quant_type, device="cpu")
  plain = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)
  out = plain(packed.reshape(-1), absmax.float(), code, state.blocksize, state.shape, torch.float32)
  return out.numpy()
