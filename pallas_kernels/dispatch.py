"""The policies behind the backends 'pallas' and 'auto': a kernel per platform and shape, chosen
at trace time.

  pallas  the Pallas kernel wherever the platform has one and the shape suits it, else XLA.
  auto    (the default) the fastest measured path: on TPU the same as 'pallas'; on GPU the
          decode kernel (gpu_decode) for up to 64 rows, several times XLA's path; for training
          shapes the fused kernels (gpu_matmul) where the weight's contraction K is at least
          AUTO_TRAINING_MIN_K (a whole llama3-8b step as fast as XLA's dequantize + cuBLAS and
          leaner: no bf16 copy of a weight is written), XLA's path below it (a llama3-1b step,
          K = 2048, was slower with the kernels), under a mesh or with several devices visible
          (the kernels per device are not measured on several GPUs) and before Hopper; on CPU,
          XLA. Measurements: docs/kernels.md.

Shapes are static under jit, so the choice happens once per traced shape; which backend a run
uses is printed once, at the first trace, never per call.

Under a mesh of several devices (a sharded step) a Pallas call is one device's program, so the
training kernels run inside `shard_map` (`on_mesh`): the kernel operands are made from the
stored weight by XLA as on one device (GSPMD gathers the fsdp-split 4-bit codes and scales, as
XLA's own path does), then each device multiplies its rows of the batch (the batch axes) by its
output rows of the weight (the tensor axis): the forward product's output stays split along
the tensor axis, the backward product's partial sums over it are added (psum). The decode
kernel reads the stored weight itself and stays single-device: under a mesh decode-sized
products take XLA's path.
"""

from __future__ import annotations

import math
import sys

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pallas_kernels import gpu, gpu_decode, gpu_decode_attention, gpu_matmul, layout, tpu, xla
from qlora_jax.format.quantization import QuantizedArray

POLICIES = ("pallas", "auto")
AUTO_TRAINING_MIN_K = 4096  # 'auto' on GPU: the fused training kernels for weights this wide and wider

INTERPRET = False  # tests: run the chosen kernels in interpret mode (on CPU); "hlo": tpu._interpret
_ANNOUNCED: set[tuple[str, str]] = set()


def _announce(policy: str, platform: str) -> None:
  if (policy, platform) in _ANNOUNCED:
    return
  _ANNOUNCED.add((policy, platform))
  what = {
      ("auto", "gpu"): "Pallas Mosaic GPU decode kernel for <= 64 rows; for training shapes the "
                       f"fused kernels where the weight's in-features are >= {AUTO_TRAINING_MIN_K} "
                       "on one device, else XLA dequantize + cuBLAS",
      ("pallas", "gpu"): "Pallas Mosaic GPU kernels (decode for <= 64 rows on one device, "
                         "warp-specialized wgmma for training shapes, per device under a mesh) "
                         "where the shape suits them, else XLA",
      ("auto", "tpu"): "Pallas Mosaic TPU kernels (per device under a mesh) where the shape suits "
                       "them, else XLA",
      ("pallas", "tpu"): "Pallas Mosaic TPU kernels (per device under a mesh) where the shape suits "
                         "them, else XLA",
  }.get((policy, platform), f"XLA dequantize + dot (no Pallas kernels on {platform})")
  print(f"qlora_jax: 4-bit matmul backend {policy!r} on {platform}: {what}", file=sys.stderr,
        flush=True)


BATCH_AXES = ("data", "fsdp")  # the mesh axes that split a batch's rows (nn/sharding.py)
TENSOR_AXIS = "tensor"  # the mesh axis that splits a weight's output rows


def on_mesh(kernel, a, operands, n_dims, product: str, supported):
  """kernel(a, *operands) run per device under the current mesh: a's rows split over the batch
  axes where they divide them, the weight's output rows N (dimension n_dims[i] of operand i;
  for the forward product also a's result columns, for the backward a's columns) split over
  the tensor axis where supported(shards) says the kernel takes an N split that many ways.
  Returns the global result."""
  mesh = jax.sharding.get_abstract_mesh()
  sizes = dict(mesh.shape)
  rows = tuple(ax for ax in BATCH_AXES if sizes.get(ax, 1) > 1)
  if a.shape[0] % math.prod(sizes[ax] for ax in rows):
    rows = ()  # a decode-sized batch: every device takes all rows
  t = sizes.get(TENSOR_AXIS, 1)
  tensor = TENSOR_AXIS if t > 1 and supported(t) else None
  row_spec = rows or None

  def spec(ndim, dim):
    return P(*[tensor if d == dim else None for d in range(ndim)])

  operand_specs = tuple(spec(x.ndim, d) for x, d in zip(operands, n_dims))
  if product == "forward":
    in_specs, out_spec = (P(row_spec, None), *operand_specs), P(row_spec, tensor)
    body = kernel
  else:
    in_specs, out_spec = (P(row_spec, tensor), *operand_specs), P(row_spec, None)

    def body(a, *ops):
      out = kernel(a, *ops).astype(jnp.float32)
      return jax.lax.psum(out, TENSOR_AXIS) if tensor else out
  return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_spec, check_vma=False)(a, *operands)


def _hopper() -> bool:
  """Whether the GPU kernels can run: they issue wgmma, which needs compute capability 9.0
  (interpreted on CPU in tests: any)."""
  return bool(INTERPRET) or gpu.is_hopper()


PRE_HOPPER = "gpu before Hopper (no wgmma: compute capability < 9.0)"


def _platform(policy: str) -> str:
  """JAX's backend, where a GPU without wgmma (an A100, L4, RTX card) is PRE_HOPPER: a platform
  with no Pallas kernels, XLA's path for every product ('pallas' refuses it)."""
  platform = jax.default_backend()
  if platform != "gpu" or _hopper():
    return platform
  if policy == "pallas":
    raise ValueError(f"backend 'pallas' runs Hopper kernels (wgmma); this GPU is "
                     f"{jax.devices()[0].device_kind}: use backend=auto (XLA's path here) or xla")
  return PRE_HOPPER


def _decodes(policy: str, rows: int, qw, compute_dtype, lora_rank: int = 0) -> bool:
  """Whether x [rows, K] @ qw^T (+ a rank-`lora_rank` LoRA update) takes the decode kernel, under
  either policy: a Hopper GPU, no mesh (the kernel reads the whole stored weight), a 2-D weight
  in bf16 compute, a size and rank it covers."""
  return (_platform(policy) == "gpu" and jax.sharding.get_abstract_mesh().size <= 1
          and isinstance(qw, QuantizedArray) and len(qw.shape) == 2
          and jnp.dtype(compute_dtype) == jnp.bfloat16
          and gpu_decode.unsupported_reason(rows, qw, lora_rank) is None)


def _one_device(sharded: bool) -> bool:
  """Whether 'auto' may take the training kernels (on a Hopper GPU): a program on the machine's
  one device. Under a mesh, or with several devices visible (arrays may be spread over them
  without a mesh in scope), XLA's path: the kernels per device are unmeasured on several GPUs."""
  return not sharded and jax.device_count() == 1


def decode_attention(q, k, v, mask, scale: float):
  """A decoding step's attention as one kernel launch (gpu_decode_attention) where it applies: a
  Hopper GPU, no mesh, one query of bf16 over a cache it covers (slots a multiple of 64); None
  elsewhere (the caller's XLA attention then)."""
  if (_platform("auto") != "gpu" or jax.sharding.get_abstract_mesh().size > 1
      or gpu_decode_attention.unsupported_reason(q.shape, k.shape, q.dtype) is not None):
    return None
  return gpu_decode_attention.decode_attention(
      q, k.astype(q.dtype), v.astype(q.dtype), gpu_decode_attention.bias_of(mask), scale=scale,
      interpret=bool(INTERPRET))


def group_fusion(policy: str) -> tuple:
  """(fuses, forward) of the decode kernel over the weights that share an input (decode_group;
  one weight is a group of one), each with its LoRA update added in the kernel:

    fuses(rows, qws, compute_dtype, rank) -> bool: whether x [rows, K] @ each of qws^T (each with
      a rank-`rank` LoRA update, 0: none) takes one decode-kernel launch (a Hopper GPU, one
      device, bf16 compute, a decode-sized x, weights and a rank it covers; one K, codebook and
      double quantization)
    forward(x, qws, update) -> (x @ dequant(qw_i)^T (+ h_i @ b_i), ...) float32, update None or
      (h, (b_i, ...)), h [H, G * r] (the h_i side by side): one launch where the layers would
      launch one product each and their LoRA B products and adds after it."""
  def fuses(rows: int, qws, compute_dtype, rank: int) -> bool:
    return (all(_decodes(policy, rows, qw, compute_dtype, rank) for qw in qws)
            and gpu_decode.unshared_reason(qws) is None)

  def forward(x, qws, update):
    return gpu_decode.decode_group(x.astype(jnp.bfloat16), tuple(qws), update, interpret=INTERPRET)

  return fuses, forward


def product_fn(policy: str, product: str):
  """The function computing `product` ("forward" | "backward") under `policy`."""
  fallback = getattr(xla, product)

  def run(a, qw: QuantizedArray, compute_dtype):
    platform = _platform(policy)
    _announce(policy, platform)
    sharded = jax.sharding.get_abstract_mesh().size > 1
    if (not isinstance(qw, QuantizedArray) or len(qw.shape) != 2
        or jnp.dtype(compute_dtype) != jnp.bfloat16):
      return fallback(a, qw, compute_dtype)
    a, table = a.astype(jnp.bfloat16), layout.codebook(qw.quant_type)
    n, k = qw.shape
    if platform == "gpu":
      if product == "forward" and _decodes(policy, a.shape[0], qw, compute_dtype):
        return gpu_decode.decode(a, qw, interpret=INTERPRET)
      wanted = policy == "pallas" or (k >= AUTO_TRAINING_MIN_K and _one_device(sharded))
      if wanted and layout.unsupported_reason(qw) is None and gpu_matmul.supported(n, k):
        kernel = lambda a, codes, sc: getattr(gpu_matmul, product)(  # noqa: E731
            a, codes, sc, table=table, interpret=INTERPRET)
        operands = layout.gpu_operands(qw, product)
        if not sharded:
          return kernel(a, *operands)
        n_dims = (0, 1) if product == "forward" else (1, 1)  # codes [N, K/2] or W^T's [K, N/2]
        return on_mesh(kernel, a, operands, n_dims, product,
                       lambda t: n % t == 0 and gpu_matmul.supported(n // t, k))
    if platform == "tpu" and layout.unsupported_reason(qw) is None and tpu.supported(n, k):
      kernel = lambda a, codes, sc: getattr(tpu, product)(a, codes, sc, table=table, interpret=INTERPRET)  # noqa: E731
      operands = layout.kernel_operands(qw, transposed=True)  # [K/2, N], [K/64, N]
      if not sharded:
        return kernel(a, *operands)
      return on_mesh(kernel, a, operands, (1, 1), product, lambda t: n % t == 0 and tpu.supported(n // t, k))
    return fallback(a, qw, compute_dtype)

  return run

