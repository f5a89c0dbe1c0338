"""How the decode kernel (gpu_decode) reads a weight's block scales: bitsandbytes' stored absmax
(uint8 codes with double quantization, else float32) loaded per row straight from device memory
a pipeline step ahead, and decoded as bitsandbytes decodes them, in a few PTX instructions a
block (inline assembly over a warpgroup's ROW arrays); interpreted, the same values from whole
arrays."""

from __future__ import annotations

import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
import numpy as np
from jax._src.lib.mlir import ir
from jax._src.lib.mlir.dialects import llvm, vector
from jax.experimental.mosaic import gpu as mgpu
from jax.experimental.mosaic.gpu import utils as mgpu_utils

from pallas_kernels.gpu import address
from pallas_kernels.gpu_widen import ROWS
from qlora_jax.format.codebooks import NESTED_BLOCKSIZE as NESTED
from qlora_jax.format.ieee import rounded
from qlora_jax.format.quantization import QuantizedArray

ROW = plgpu.Layout.WGMMA.reduce(1)  # a [64] array per warpgroup: a thread holds its two rows


def _row_asm(rows_fas, operands, asm: str, constraints: str, types) -> tuple:
  """Run `asm` once per register of the ROW-layout arrays `rows_fas` (a thread's two rows): its
  inputs are those registers' scalars, then `operands`; its outputs (`types`) come back as ROW
  arrays."""
  shape = rows_fas[0].registers.shape
  outs = [np.empty(shape, dtype=object) for _ in types]
  for idx in np.ndindex(shape):
    args = [vector.extract(fa.registers[idx], dynamic_position=[],
                           static_position=ir.DenseI64ArrayAttr.get([0])) for fa in rows_fas]
    res = llvm.inline_asm(llvm.StructType.get_literal(list(types)), [*args, *operands], asm,
                          constraints)
    for o, t in enumerate(types):
      outs[o][idx] = vector.broadcast(ir.VectorType.get([1], t), llvm.extractvalue(t, res, [o]))
  return tuple(mgpu.FragmentedArray(_registers=out, _layout=ROW.to_mgpu(),
                                    _is_signed=True if isinstance(t, ir.IntegerType) else None)
               for out, t in zip(outs, types))


def load_scales(first, absmax_gmem, dq, blocks: int, *, hints: bool) -> tuple:
  """The stored absmax of a step's blocks, per row, as loaded: (uint8 codes of the `blocks` blocks
  packed in an int32, nested absmax float32) with double quantization (dq = (qmap in shared memory,
  nested in device memory)), else `blocks` float32; [64] ROW arrays. first: int32 [64], each row's
  index of the step's first block in bitsandbytes' flat absmax array. One load of each per thread,
  straight from device memory: issued a step ahead, they are in flight while a step is computed."""
  if not hints:  # interpreted: the same values from whole arrays (it indexes refs by scalars)
    codes = [jnp.take(absmax_gmem[...], first + b) for b in range(blocks)]
    if not dq:
      return tuple(codes)
    word = sum(c.astype(jnp.int32) << (8 * b) for b, c in enumerate(codes))
    return word, jnp.take(dq[1][...], first // NESTED)
  dtypes = (jnp.int32, jnp.float32) if dq else (jnp.float32,) * blocks
  if dq:
    load = {1: "u8", 2: "u16", 4: "u32"}[blocks]
    asm = f"""{{ .reg .b64 pa; .reg .b32 v;
      cvt.u64.u32 pa, $2; add.u64 pa, pa, $3; ld.global.nc.{load} $0, [pa];
      shr.u32 v, $2, {NESTED.bit_length() - 1}; mul.wide.u32 pa, v, 4; add.u64 pa, pa, $4;
      ld.global.nc.f32 $1, [pa]; }}"""
    constraints = "=r,=f,r,l,l"
  else:
    vec = {1: "", 2: ".v2", 4: ".v4"}[blocks]
    fs = ", ".join(f"${b}" for b in range(blocks))
    asm = (f"{{ .reg .b64 pa; mul.wide.u32 pa, ${blocks}, 4; add.u64 pa, pa, ${blocks + 1}; "
           f"ld.global.nc{vec}.f32 {'{' + fs + '}' if vec else fs}, [pa]; }}")
    constraints = ",".join(["=f"] * blocks + ["r", "l"])

  @plgpu.inline_mgpu(arg_types=(ROW, plgpu.RefType(), *(plgpu.RefType() for _ in dq[1:2])),
                     return_type=tuple(plgpu.ShapeDtypeStruct((ROWS,), t, layout=ROW)
                                       for t in dtypes))
  def load(_, first_fa, *refs):
    types = [mgpu_utils.dtype_to_ir_type(t) for t in dtypes]
    return _row_asm([first_fa], [address(ref) for ref in refs], asm, constraints, types)

  return load(plgpu.layout_cast(first, ROW), absmax_gmem, *dq[1:2])


def load_offset(rows, offset_gmem, *, hints: bool):
  """The double quantization's offset (float32 [1] in device memory), loaded once per CTA outside
  the pipeline (a load at every step stalls it): a [64] ROW array (`rows`, any ROW array, gives it
  its layout), or the stored [1] array when interpreted."""
  if not hints:
    return offset_gmem[...]

  @plgpu.inline_mgpu(arg_types=(ROW, plgpu.RefType()),
                     return_type=plgpu.ShapeDtypeStruct((ROWS,), jnp.float32, layout=ROW))
  def load(_, rows_fa, offset):
    return _row_asm([rows_fa], [address(offset)], "ld.global.nc.f32 $0, [$2];", "=f,r,l",
                    [ir.F32Type.get()])[0]

  return load(rows, offset_gmem)


def decode_scales(loaded: tuple, dq, blocks: int, *, offset, hints: bool) -> list:
  """bf16 [64] per block (ROW arrays) from load_scales' values, as bitsandbytes decodes the absmax:
  qmap[code] * nested, rounded to float32, + offset (from load_offset); then rounded to bf16."""
  if not dq:
    return [v.astype(jnp.bfloat16) for v in loaded]
  word, nested = loaded
  if not hints:
    qmap = dq[0][...]
    # the product rounded before the add, as mul.rn, add.rn below (an FMA's f32 sum rounds to
    # another bf16 now and then: 1 block in ~10^4)
    return [(rounded(jnp.take(qmap, (word >> (8 * b)) & 0xFF) * nested) + offset[0])
            .astype(jnp.bfloat16) for b in range(blocks)]
  decode = "".join(
      f"bfe.u32 v, ${blocks}, {8 * b}, 8; mad.lo.u32 v, v, 4, ${blocks + 3}; ld.shared.f32 f, [v]; "
      f"mul.rn.f32 f, f, ${blocks + 1}; add.rn.f32 f, f, ${blocks + 2}; "
      f"cvt.rn.bf16.f32 ${b}, f; " for b in range(blocks))
  asm = f"{{ .reg .b32 v; .reg .f32 f; {decode}}}"
  constraints = ",".join(["=h"] * blocks + ["r", "f", "f", "r"])

  @plgpu.inline_mgpu(arg_types=(ROW, ROW, ROW, plgpu.RefType()),
                     return_type=tuple(plgpu.ShapeDtypeStruct((ROWS,), jnp.bfloat16, layout=ROW)
                                       for _ in range(blocks)))
  def scales(_, word_fa, nested_fa, offset_fa, qmap):
    bits = _row_asm([word_fa, nested_fa, offset_fa], [address(qmap, 32)], asm, constraints,
                    [ir.IntegerType.get_signless(16)] * blocks)
    return tuple(b.bitcast(ir.BF16Type.get()) for b in bits)

  return list(scales(word, nested, offset, dq[0]))


def absmax_operands(qw: QuantizedArray) -> tuple:
  """(flat absmax, dq) as _call takes them: bitsandbytes' stored arrays, no pass over them."""
  if qw.double_quant:
    return qw.absmax, (qw.nested_quant_map, qw.nested_absmax, qw.offset.reshape(1))
  return qw.absmax.astype(jnp.float32), ()
