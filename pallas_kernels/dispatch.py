"""The policies behind the backends 'pallas' and 'auto': a kernel per platform and shape, chosen
at trace time.

  pallas  the Pallas kernel wherever the platform has one and the shape suits it, else XLA.
  auto    (the default) the fastest measured path: on TPU the same as 'pallas'; on GPU the
          decode kernel (gpu_decode) for up to 64 rows, several times XLA's path, and XLA's
          dequantize + cuBLAS for training shapes, where the fused kernels (gpu_matmul) measured
          about even with XLA's path and a whole step slower (docs/kernels.md); on CPU, XLA.

Shapes are static under jit, so the choice happens once per traced shape; which backend a run
uses is printed once, at the first trace, never per call. Under a mesh of several devices (a
sharded step) both take XLA's path: a Pallas call is one device's program, and GSPMD would
replicate its operands (a whole 4-bit weight per device) rather than split it.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp

from pallas_kernels import gpu_decode, gpu_matmul, layout, tpu, xla
from qlora_jax.format.quantization import QuantizedArray

POLICIES = ("pallas", "auto")

INTERPRET = False  # tests: run the chosen kernels in interpret mode (on CPU)
_ANNOUNCED: set[tuple[str, str]] = set()


def _announce(policy: str, platform: str) -> None:
  if (policy, platform) in _ANNOUNCED:
    return
  _ANNOUNCED.add((policy, platform))
  what = {
      ("auto", "gpu"): "Pallas Mosaic GPU decode kernel for <= 64 rows, XLA dequantize + cuBLAS "
                       "for training shapes",
      ("pallas", "gpu"): "Pallas Mosaic GPU kernels (decode for <= 64 rows, warp-specialized "
                         "wgmma for training shapes) where the shape suits them, else XLA",
      ("auto", "tpu"): "Pallas Mosaic TPU kernels where the shape suits them, else XLA",
      ("pallas", "tpu"): "Pallas Mosaic TPU kernels where the shape suits them, else XLA",
  }.get((policy, platform), f"XLA dequantize + dot (no Pallas kernels on {platform})")
  print(f"qlora_jax: 4-bit matmul backend {policy!r} on {platform}: {what}", file=sys.stderr,
        flush=True)


def product_fn(policy: str, product: str):
  """The function computing `product` ("forward" | "backward") under `policy`."""
  fallback = getattr(xla, product)

  def run(a, qw: QuantizedArray, compute_dtype):
    platform = jax.default_backend()
    _announce(policy, platform)
    if (not isinstance(qw, QuantizedArray) or jnp.dtype(compute_dtype) != jnp.bfloat16
        or jax.sharding.get_abstract_mesh().size > 1):
      return fallback(a, qw, compute_dtype)
    a, table = a.astype(jnp.bfloat16), layout.codebook(qw.quant_type)
    if platform == "gpu":
      if product == "forward" and gpu_decode.unsupported_reason(a.shape[0], qw) is None:
        return gpu_decode.decode(a, qw, interpret=INTERPRET)
      if (policy == "pallas" and layout.unsupported_reason(qw) is None
          and gpu_matmul.supported(*qw.shape)):
        operands = layout.gpu_operands(qw, product)
        return getattr(gpu_matmul, product)(a, *operands, table=table, interpret=INTERPRET)
    if platform == "tpu" and layout.unsupported_reason(qw) is None and tpu.supported(*qw.shape):
      operands = layout.kernel_operands(qw, transposed=True)
      return getattr(tpu, product)(a, *operands, table=table, interpret=INTERPRET)
    return fallback(a, qw, compute_dtype)

  return run

