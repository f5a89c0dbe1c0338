"""What the Mosaic GPU kernels (gpu_matmul.py: training shapes, gpu_decode.py: decoding) share:
shared-memory swizzling, the SM count, whether the device is a Hopper, and what running them
interpreted on CPU needs."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import jax.experimental.pallas.mosaic_gpu as plgpu
from jax._src.lib.mlir import ir
from jax._src.lib.mlir.dialects import llvm
from jax.experimental.mosaic.gpu import utils as mgpu_utils

# Interpreted, each warpgroup is a thread whose barrier waits sit in host callbacks. XLA:CPU's
# concurrency-optimized scheduler runs independent callbacks at once on its few worker threads,
# where the waiting ones can starve the warpgroups that would release them (a reliable hang on 2
# cores); its plain schedule runs them on their warpgroups' own threads.
SERIAL_XLA_CPU = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def interpret_params(interpret: bool):
  """Mosaic GPU's interpreter settings (unwritten outputs stay NaN), or None to compile."""
  if not interpret:
    return None
  if SERIAL_XLA_CPU not in os.environ.get("XLA_FLAGS", ""):
    raise RuntimeError(f"interpreting the warp-specialized kernels needs XLA_FLAGS={SERIAL_XLA_CPU} "
                       "set before JAX starts (tests/conftest.py sets it): otherwise they hang")
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # not public in 0.10
  return InterpretGPUParams(uninitialized_memory="nan")


def swizzled(cols: int, dtype) -> tuple:
  """The tiling and swizzle transforms of a shared-memory tile `cols` elements wide."""
  swizzle = plgpu.find_swizzle(cols * jnp.dtype(dtype).itemsize * 8)
  return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
          plgpu.SwizzleTransform(swizzle))


def is_hopper() -> bool:
  """Whether the first device is an NVIDIA GPU of compute capability 9.0 or later (Hopper: the
  wgmma the kernels issue, cuDNN's 256-wide attention heads)."""
  capability = getattr(jax.devices()[0], "compute_capability", None)
  return capability is not None and float(capability) >= 9.0


def sm_count(interpret: bool) -> int:
  """CTAs of a persistent kernel: one per SM (2 when interpreted)."""
  return 2 if interpret else jax.devices()[0].core_count


def register_wgmma(acc_ref, w, rhs_smem, *, wg, staging, interpret: bool):
  """acc_ref += w @ rhs_smem^T: w [64, C] bf16 in registers (wgmma's A), rhs_smem [M, C].

  The interpreter (JAX 0.10) takes neither register nor transposed operands: interpreted, both go
  through this warpgroup's slices of `staging` (from `interpret_staging`) in shared memory."""
  rhs = rhs_smem.transpose((1, 0))
  if interpret:
    w_smem, rhs_T_smem = staging
    w_smem[wg] = w
    rhs_T_smem[wg] = rhs_smem[...].T
    plgpu.commit_smem()
    w, rhs = w_smem.at[wg], rhs_T_smem.at[wg]
  plgpu.wgmma(acc_ref, w, rhs)


def interpret_staging(warpgroups: int, rows: int, k: int, m: int, interpret: bool) -> list:
  """register_wgmma's shared-memory staging when interpreted (nothing when compiled)."""
  if not interpret:
    return []
  return [plgpu.SMEM((warpgroups, rows, k), jnp.bfloat16, transforms=swizzled(k, jnp.bfloat16)),
          plgpu.SMEM((warpgroups, k, m), jnp.bfloat16, transforms=swizzled(m, jnp.bfloat16))]


def address(ref, bits: int = 64):
  """A memref's address as an integer: 32 bits in shared memory, 64 in device memory."""
  return llvm.ptrtoint(ir.IntegerType.get_signless(bits), mgpu_utils.memref_ptr(ref))
