"""The Pallas kernels against the XLA reference path, on fresh random inputs.

On CPU every kernel runs in interpret mode (Mosaic GPU's interpreter; pltpu.InterpretParams for
TPU), with unwritten output memory poisoned to NaN by the interpreter. On a GPU the same GPU
checks run on the hardware, at larger shapes. Reference: XLA's dequantize (checked against
bitsandbytes in test_quantization.py) then a bf16 dot with a float32 result, the kernels' own
output dtype; the dispatch test compares whole qmatmul calls, whose results are bf16.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import dispatch, gpu, gpu_decode, gpu_matmul, gpu_widen, layout, tpu
from pallas_kernels.backends import get_backend
from pallas_kernels.xla import compute_dot
from qlora_jax.nn.qmatmul import qmatmul
from qlora_jax.format.quantization import dequantize, quantize, scales, unpack
from tests.jaxprs import equations

ON_GPU = jax.default_backend() == "gpu"
# Interpreted (CPU): the same bf16 operands and f32 accumulation as the reference, only the
# summation order differs. GPU: the byte-permute lookup multiplies by the scale in bf16, one
# rounding more per weight than the reference (<= 1 bf16 ulp), so bf16-operand tolerance.
TOL = 5e-3 if ON_GPU else 1e-5
BF16_TOL = 2**-7  # two bf16 roundings of nearly equal float32 sums: one ulp apart at most,
                  # 2^-7 of the value at the bottom of a binade (2^-8 was too tight: 4.0e-3 seen)
# The decode kernel multiplies each bf16 code value by the block scale rounded to bf16, in bf16,
# interpreted as on the GPU: the scale's rounding (<= 2^-9, one per block) on top of TOL's.
DECODE_TOL = 5e-3
# The same bf16 products and float32 sums in another order. On the GPU (wgmma's float32
# accumulation, stream-K partial sums) with headroom (passed on the H100, 2026-11-23).
EXACT_TOL = 1e-4 if ON_GPU else 1e-5


def _ref_forward(x_MxK, qw):
  return jnp.einsum("mk,nk->mn", x_MxK.astype(jnp.bfloat16), dequantize(qw, jnp.bfloat16),
                    preferred_element_type=jnp.float32)


def _ref_forward_bf16_scales(x_MxK, qw):
  """x @ W^T where each weight is bf16(code value) * bf16(block scale), rounded to bf16: the
  decode kernel's specified numerics, from quantization's codes and scales (checked against
  bitsandbytes in test_quantization.py), not from the kernels' layout helpers."""
  n, k = qw.shape
  bf16 = lambda a: a.astype(jnp.bfloat16).astype(jnp.float32)  # noqa: E731
  values_NxK = bf16(qw.quant_map[unpack(qw.codes, qw.size)]).reshape(n, k)
  scales_NxB = bf16(scales(qw)).reshape(n, k // qw.blocksize)
  w_NxK = (values_NxK * jnp.repeat(scales_NxB, qw.blocksize, axis=1)).astype(jnp.bfloat16)
  return jnp.einsum("mk,nk->mn", x_MxK.astype(jnp.bfloat16), w_NxK,
                    preferred_element_type=jnp.float32)


def _ref_backward(dy_MxN, qw):
  return jnp.einsum("mn,nk->mk", dy_MxN.astype(jnp.bfloat16), dequantize(qw, jnp.bfloat16),
                    preferred_element_type=jnp.float32)


def _fresh(shape_mn_k, quant_type, double_quant=True):
  """Fresh random inputs each run (the seed is printed when a check fails)."""
  seed = int(np.random.default_rng().integers(2**31))
  rng = np.random.default_rng(seed)
  m, n, k = shape_mn_k
  w = rng.standard_normal((n, k)) * rng.uniform(0.005, 0.05, (n, 1))
  qw = quantize(jnp.asarray(w, jnp.float32), quant_type, double_quant=double_quant)
  x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
  dy = jnp.asarray(rng.standard_normal((m, n)), jnp.bfloat16)
  return seed, qw, x, dy


def _check(out, ref, seed, tol=TOL):
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  assert out.shape == ref.shape
  assert np.isfinite(out).all(), f"unwritten or non-finite output (seed {seed})"
  err = np.linalg.norm(out - ref) / np.linalg.norm(ref)
  assert err < tol, f"relative error {err:.2e} (seed {seed})"


CPU_SHAPES = [(128, 128, 256), (37, 256, 384), (300, 128, 128)]  # ragged M: 37, 300
CHAINED = (512, 256, 256)  # 2 tiles per CTA interpreted: each tile's pipeline runs on into the next
GPU_SHAPES = [(1024, 1024, 2048), (1000, 2048, 1024), (4096, 1536, 4096), (8192, 22016, 8192)]


# every shape with every codebook on the GPU; interpreted on CPU, each shape with one codebook
# (the codebook is a table lookup the shapes do not change)
@pytest.mark.parametrize("shape, quant_type", [
    *(((s, q) for s in GPU_SHAPES for q in ("nf4", "fp4", "int4")) if ON_GPU
      else zip(CPU_SHAPES, ("nf4", "fp4", "int4"))),
    (CHAINED, "nf4")])
def test_gpu_forward_backward(shape, quant_type):
  """The training kernels (bf16 results: bf16 rounding on top of the kernels' own tolerance)."""
  seed, qw, x, dy = _fresh(shape, quant_type)
  table, interpret = layout.codebook(qw.quant_type), not ON_GPU
  y = gpu_matmul.forward(x, *layout.gpu_operands(qw, "forward"), table=table, interpret=interpret)
  _check(y, _ref_forward(x, qw), seed, TOL + BF16_TOL)
  dx = gpu_matmul.backward(dy, *layout.gpu_operands(qw, "backward"), table=table,
                           interpret=interpret)
  _check(dx, _ref_backward(dy, qw), seed, TOL + BF16_TOL)


# rows: x tiles of 16, 32 and 64 rows (all on CPU; more row counts on the GPU)
@pytest.mark.parametrize("rows", [1, 5, 16, 20, 33, 64] if ON_GPU else [1, 20, 64])
@pytest.mark.parametrize("nk", [(4096, 4096), (1536, 14336)] if ON_GPU
                         else [(384, 768), (256, 640)])
def test_gpu_decode(rows, nk):
  """The decode kernel, bitsandbytes' stored arrays as they are (K = 640: two blocks a step;
  384 x 768 on CPU: 3 row tiles of 3 steps on 2 CTAs of 5, the middle tile split between them,
  the last CTA's fifth step past the end)."""
  n, k = nk
  seed, qw, x, _ = _fresh((rows, n, k), "nf4")
  y = gpu_decode.decode(x, qw, interpret=not ON_GPU)
  _check(y, _ref_forward(x, qw), seed, DECODE_TOL)
  _check(y, _ref_forward_bf16_scales(x, qw), seed, EXACT_TOL)  # the same products: order only


@pytest.mark.parametrize("quant_type", ["fp4", "int4"])
def test_gpu_decode_without_double_quant(quant_type):
  """float32 absmax (no double quantization) and the other codebooks."""
  seed, qw, x, _ = _fresh((3, 256, 4096 if ON_GPU else 512), quant_type, double_quant=False)
  y = gpu_decode.decode(x, qw, interpret=not ON_GPU)
  _check(y, _ref_forward_bf16_scales(x, qw), seed, EXACT_TOL)


def test_gpu_decode_refuses_what_it_cannot_cover():
  _, qw, x, _ = _fresh((65, 192, 256), "nf4")
  for rows in (x, x[:1]):  # 65 rows; N = 192 not a multiple of the 128-row CTA tile
    with pytest.raises(ValueError, match="at most 64 rows, N divisible by 128"):
      gpu_decode.decode(rows, qw, interpret=True)


def test_decode_column_order_is_the_widened_tiles():
  """x's permutation matches how a thread's code register widens (see gpu_decode's docstring)."""
  order = np.asarray(gpu_widen.column_order(jnp.arange(64)))
  for h, t, j, e in np.ndindex(2, 4, 4, 2):
    byte = 16 * h + 4 * t + j  # byte j of lane t's word in half block h, widened into ...
    column = 8 * (4 * h + j) + 2 * t + e  # ... its column pair of 8-column group 4 h + j
    assert order[column] == 2 * byte + e  # holds elements 2 byte + e


def _prmt(a, b, selector):
  """PTX prmt.b32 (default mode, selector nibbles 0..7): byte k = byte selector[k] of (b:a)."""
  a, b = np.broadcast_arrays(np.uint64(a), np.uint64(b))
  pool = np.stack([(v >> np.uint64(8 * i)) & np.uint64(0xFF) for v in (a, b) for i in range(4)])
  return sum(pool[(selector >> (4 * k)) & 7] << np.uint64(8 * k) for k in range(4))


def test_wide_pair_table_lookup_addresses():
  """The decode kernel's lookup address, lut + prmt(word, 4 lane, 0x7604 | j << 4), reads each
  lane's own copy (bank = lane) of entry `byte j of the word` in the wide table."""
  table = layout.codebook("nf4")
  narrow, wide = gpu_widen.pair_table(table), gpu_widen.pair_table(table, wide=True)
  words = np.random.default_rng(0).integers(0, 2**32, 64, dtype=np.uint64)
  for lane, j in np.ndindex(gpu_widen.LANES, 4):
    address = _prmt(words, 4 * lane, 0x7604 | j << 4)
    assert np.all(address // 4 % 32 == lane)
    code_byte = (words >> np.uint64(8 * j)) & np.uint64(0xFF)
    np.testing.assert_array_equal(wide.reshape(-1)[address // 4], narrow[code_byte, lane])
  assert np.all(narrow[:, 0].view(np.uint32) >> 16 == np.asarray(
      np.asarray(table, np.float32).astype(jnp.bfloat16).view(np.uint16))[np.arange(256) & 15])


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", [(64, 256, 512), (45, 384, 1024)])
def test_tpu_forward_backward_interpret(shape, quant_type):
  seed, qw, x, dy = _fresh(shape, quant_type)
  codes_T, scales_T = layout.kernel_operands(qw, transposed=True)
  _check(tpu.forward(x, codes_T, scales_T, table=layout.codebook(qw.quant_type), interpret=True),
         _ref_forward(x, qw), seed)
  _check(tpu.backward(dy, codes_T, scales_T, table=layout.codebook(qw.quant_type), interpret=True),
         _ref_backward(dy, qw), seed)


def test_split_layout_round_trip():
  """The split packing holds the same codes as bitsandbytes' packing, moved."""
  _, qw, _, _ = _fresh((1, 64, 384), "nf4")
  split = np.asarray(layout.split_codes(qw))
  codes = np.stack([split >> 4, split & 15], 1)  # [N, 2, K/2]
  codes = codes.reshape(64, 2, 3, 64).transpose(0, 2, 1, 3).reshape(64, 384)
  bnb = np.asarray(qw.codes).reshape(64, 192)
  np.testing.assert_array_equal(codes, np.stack([bnb >> 4, bnb & 15], -1).reshape(64, 384))


def test_interpreted_training_kernels_say_what_they_need(monkeypatch):
  """Without XLA:CPU's plain scheduler the interpreted kernels would hang: they say so instead."""
  _, qw, x, _ = _fresh((8, 128, 128), "nf4")  # a shape no other test traces (a fresh trace)
  monkeypatch.setenv("XLA_FLAGS", "")
  with pytest.raises(RuntimeError, match=gpu.SERIAL_XLA_CPU):
    gpu_matmul.forward(x, *layout.gpu_operands(qw, "forward"), table=layout.codebook("nf4"),
                       interpret=True)


def test_fragment_layout_round_trip():
  """gpu_matmul's packing holds W's (forward) and W^T's (backward) codes in the order the pair
  table widens them: byte j of lane t's word in half block h becomes columns 8 (4h + j) + 2t, +1
  (gpu_widen.column_order), so those columns must hold the elements of that byte."""
  _, qw, _, _ = _fresh((1, 192, 256), "nf4")
  bnb = np.asarray(qw.codes).reshape(192, 128)
  codes = np.stack([bnb >> 4, bnb & 15], -1).reshape(192, 256)
  for transposed, want in ((False, codes), (True, codes.T)):
    packed = np.asarray(layout.fragment_codes(qw, transposed))
    order = np.asarray(gpu_widen.column_order(jnp.arange(want.shape[1])))
    widened = np.stack([packed >> 4, packed & 15], -1).reshape(want.shape)[:, order]
    np.testing.assert_array_equal(widened, want)


def test_unsupported_shapes_are_named():
  _, qw, _, _ = _fresh((1, 64, 576), "nf4")
  assert "not a multiple of 128" in layout.unsupported_reason(qw)
  assert not tpu.supported(128, 576) and tpu.supported(384, 1024)


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_dispatch_through_custom_vjp(platform, monkeypatch, capsys):
  """qmatmul with backend 'pallas' runs the platform's kernels (interpreted here) in forward and
  backward and matches the XLA backend's value and gradient; it says which once, not per call."""
  if ON_GPU and platform == "tpu":
    pytest.skip("TPU kernels are interpreted on CPU only")
  monkeypatch.setattr(dispatch, "INTERPRET", not ON_GPU)
  monkeypatch.setattr(dispatch.jax, "default_backend", lambda: platform)
  monkeypatch.setattr(dispatch, "_ANNOUNCED", set())
  seed, qw, x, _ = _fresh((130, 256, 512), "nf4")
  x = x.astype(jnp.float32)

  # A fixed cotangent (bf16 values), so dX compares the backward product alone: with a
  # cotangent computed from y, a last-bit difference in y could flip a bf16 rounding of dy.
  g = jnp.asarray(np.random.default_rng(seed).standard_normal((130, 256)), jnp.bfloat16)

  def loss(x_, backend):
    y = qmatmul(x_, qw, backend)
    return jnp.sum(y * g[: y.shape[0]].astype(jnp.float32))

  # Each as one jitted program: eager ops dispatched while interpreted kernels' callbacks still
  # run could starve a 2-core CPU client's threads (a hang seen once under load).
  value = jax.jit(qmatmul, static_argnums=2)
  grad = jax.jit(jax.grad(loss), static_argnums=1)
  pallas, xla = get_backend("pallas"), get_backend("xla")
  # training kernels, then (GPU) the decode kernel; interpreted, 3 rows would take the same
  # paths as 1 (x padded to 16 rows forward, to the tile backward): the GPU runs both
  for rows in (130, 3, 1) if ON_GPU else (130, 1):
    xs = x[:rows]
    decoding = platform == "gpu" and rows <= gpu_decode.MAX_ROWS
    tol = DECODE_TOL + BF16_TOL if decoding else max(TOL, BF16_TOL)
    _check(value(xs, qw, pallas), value(xs, qw, xla), seed, tol)
    _check(grad(xs, pallas), grad(xs, xla), seed, max(TOL, BF16_TOL))
  announced = capsys.readouterr().err
  assert announced.count("4-bit matmul backend 'pallas'") == 1, announced


def test_auto_on_gpu_takes_the_training_kernels_for_wide_weights(monkeypatch):
  """'auto' on a GPU, training rows (more than the decode kernel's 64): the fused kernels in the
  forward and the backward product for a weight with >= AUTO_TRAINING_MIN_K in-features, XLA's
  dequantize + dot for a narrower one, under a mesh and with several devices visible (traced
  only: no kernel runs)."""
  monkeypatch.setattr(dispatch, "INTERPRET", not ON_GPU)
  monkeypatch.setattr(dispatch.jax, "default_backend", lambda: "gpu")
  auto = get_backend("auto")
  for k in (dispatch.AUTO_TRAINING_MIN_K, dispatch.AUTO_TRAINING_MIN_K // 2):
    _, qw, x, _ = _fresh((130, 256, k), "nf4")

    def loss(x_):
      return jnp.sum(qmatmul(x_, qw, auto).astype(jnp.float32))

    text = str(jax.make_jaxpr(jax.value_and_grad(loss))(x))
    kernel = "pallas_call" in text or "wgmma" in text  # interpreted, the kernel is discharged into ops
    if k >= dispatch.AUTO_TRAINING_MIN_K:  # both products in the kernels: no XLA dot anywhere
      assert kernel and "dot_general" not in text, k
    else:
      assert not kernel and text.count("dot_general") == 2, k
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((2,), ("data",))):
      text = str(jax.make_jaxpr(jax.value_and_grad(loss))(x))
    assert "pallas_call" not in text and "wgmma" not in text and text.count("dot_general") == 2, k
    with monkeypatch.context() as m:  # several devices visible, no mesh in scope
      m.setattr(dispatch.jax, "device_count", lambda: 2)
      text = str(jax.make_jaxpr(jax.value_and_grad(loss))(x))
    assert "pallas_call" not in text and "wgmma" not in text and text.count("dot_general") == 2, k


def test_auto_on_cpu_is_xla(capsys, monkeypatch):
  monkeypatch.setattr(dispatch, "_ANNOUNCED", set())
  _, qw, x, _ = _fresh((8, 128, 256), "nf4")
  if ON_GPU:
    pytest.skip("CPU dispatch")
  np.testing.assert_array_equal(qmatmul(x, qw, get_backend("auto")), qmatmul(x, qw, get_backend("xla")))
  assert "XLA dequantize + dot" in capsys.readouterr().err


def test_a_gpu_without_wgmma_takes_xla_or_says_pallas_needs_hopper(monkeypatch, capsys):
  """On a GPU before Hopper (an A100, L4, RTX card: no wgmma) 'auto' takes XLA's path for every
  product, decode-sized ones included, and says so once; 'pallas' refuses with one line naming
  the GPU and the fix; JAX's Mosaic grouped kernels (MoE) are not taken either."""
  from pallas_kernels import grouped

  class Ampere:
    device_kind, compute_capability = "NVIDIA A100-SXM4-80GB", "8.0"

  monkeypatch.setattr(dispatch, "INTERPRET", False)
  monkeypatch.setattr(dispatch, "_ANNOUNCED", set())
  monkeypatch.setattr(dispatch.jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(dispatch.jax, "devices", lambda *a: [Ampere()])
  _, qw, x, _ = _fresh((1, 256, 4096), "nf4")
  auto = jax.make_jaxpr(lambda a: qmatmul(a, qw, get_backend("auto")))(x)
  assert "pallas_call" not in str(auto) and "dot_general" in str(auto)
  assert "XLA dequantize + dot (no Pallas kernels on gpu before Hopper" in capsys.readouterr().err
  with pytest.raises(ValueError, match="backend 'pallas' runs Hopper kernels.*A100.*backend=auto"):
    jax.make_jaxpr(lambda a: qmatmul(a, qw, get_backend("pallas")))(x)
  lhs = jnp.zeros((8, 64), jnp.bfloat16)
  assert not grouped._on_gpu_kernels(lhs, lhs)


@pytest.mark.parametrize("rows, rank, tables_under_pipeline",  # 80: two blocks, one padded
                         [(1, 64, True), (20, 80, True), (64, 64, True), (1, 64, False)])
def test_gpu_decode_adds_a_lora_update(rows, rank, tables_under_pipeline):
  """The decode kernel with a LoRA update: x @ W^T + h @ b, the update added by the CTA that runs
  each row tile's first step (384 x 768 on CPU: tiles split between CTAs); the tables (pair
  table, qmap, h) waited for by the compute warpgroups alone (the memory one's first copies fly
  meanwhile) or by all before the pipeline."""
  n, k = (4096, 4096) if ON_GPU else (384, 768)
  seed, qw, x, _ = _fresh((rows, n, k), "nf4")
  rng = np.random.default_rng(seed)
  h = jnp.asarray(rng.standard_normal((rows, rank)), jnp.bfloat16)
  b = jnp.asarray(rng.standard_normal((rank, n)) * 0.1, jnp.bfloat16)
  config = dataclasses.replace(gpu_decode.config_for(rows, k, rank),
                               tables_under_pipeline=tables_under_pipeline)
  y = gpu_decode.decode(x, qw, (h, b), config=config, interpret=not ON_GPU)
  update = jnp.einsum("mr,rn->mn", h, b, preferred_element_type=jnp.float32)
  _check(y, _ref_forward(x, qw) + update, seed, DECODE_TOL)
  _check(y, _ref_forward_bf16_scales(x, qw) + update, seed, EXACT_TOL)


@pytest.mark.parametrize("rank", [64, 0])
def test_gpu_decode_group_computes_each_weight_in_one_launch(rank, monkeypatch):
  """decode_group: weights sharing x (q, k, v: 4096, 1024, 1024 rows on a GPU) in one launch, the
  SMs dealt among them; each output as x @ W_i^T (+ h_i @ b_i) from quantization's codes and
  scales, each weight's double-quant offset its own (three quantized apart), each h_i its
  columns of one h of 8 rows for x's one (rows past x's reach no output; they differ here); with
  x's pre-norm input, every output times its 1 / rms; one launch. Interpreted, 12 CTAs (6, 3, 3): every part's row tiles (3 steps)
  split between its CTAs."""
  ns, k = ((4096, 1024, 1024), 4096) if ON_GPU else ((512, 256, 256), 768)
  if not ON_GPU:
    monkeypatch.setattr(gpu_decode, "sm_count", lambda interpret: 12)
  seed, _, x, _ = _fresh((1, 128, k), "nf4")
  rng = np.random.default_rng(seed)
  qws = tuple(quantize(jnp.asarray(rng.standard_normal((n, k)) * rng.uniform(0.005, 0.05), jnp.float32),
                       "nf4") for n in ns)
  assert len({float(qw.offset) for qw in qws}) == len(ns)  # offsets differ: each must be its own
  h = jnp.asarray(rng.standard_normal((8, len(ns) * rank)), jnp.bfloat16)
  bs = tuple(jnp.asarray(rng.standard_normal((rank, n)) * 0.1, jnp.bfloat16) for n in ns)
  update = (h, bs) if rank else None
  fn = functools.partial(gpu_decode.decode_group, interpret=not ON_GPU)
  ys = fn(x, qws, update)
  for i, (y, qw) in enumerate(zip(ys, qws)):
    added = 0 if not rank else jnp.einsum("mr,rn->mn", h[:1, i * rank:(i + 1) * rank], bs[i],
                                          preferred_element_type=jnp.float32)
    _check(y, _ref_forward(x, qw) + added, seed, DECODE_TOL)
    _check(y, _ref_forward_bf16_scales(x, qw) + added, seed, EXACT_TOL)
  if rank or ON_GPU:  # the norm in the launch: x's pre-norm input r (x = r * weight), each
    # product and update times 1 / rms(r) (float64 here), the kernel's own reduction of r
    # (interpreted with the update only: one more launch a case is a minute of the CPU suite)
    r_in = jnp.asarray(rng.standard_normal((1, k)) * 3.0, jnp.bfloat16)
    inv = 1.0 / np.sqrt(np.mean(np.asarray(r_in, np.float64) ** 2) + 1e-5)
    for y, y_norm in zip(ys, gpu_decode.decode_group(x, qws, update, r_in, eps=1e-5,
                                                     interpret=not ON_GPU)):
      np.testing.assert_allclose(np.asarray(y_norm, np.float64), np.asarray(y, np.float64) * inv,
                                 rtol=1e-5, atol=1e-6 * float(np.abs(np.asarray(y)).max() * inv))
  # one launch: Mosaic GPU's kernel traces as an mpmd_map (traced, not lowered: on CPU too)
  traced = jax.make_jaxpr(functools.partial(gpu_decode.decode_group, interpret=False))(x, qws, update)
  names = [eqn.primitive.name for eqn in equations(traced)]
  assert names.count("mpmd_map") + names.count("pallas_call") == 1, sorted(set(names))
  # an H100's 132 SMs for llama3-8b's q, k, v: 512 + 128 + 128 steps in shares of 6
  parts = gpu_decode.parts_for((4096, 1024, 1024), 4096, gpu_decode.config_for(1, 4096, 64), 132)
  assert [(p.split.ctas, p.split.per_cta, p.first_cta) for p in parts] == [(86, 6, 0), (22, 6, 86),
                                                                          (22, 6, 108)]
  # lopsided: the fewest steps a CTA that fits (11, as 44 x 32 pairs over 132 CTAs allow), never
  # more CTAs than SMs; one weight: ceil(pairs / SMs) steps a CTA, then as few CTAs as take them
  parts = gpu_decode.parts_for((5504, 128, 128), 8192, gpu_decode.config_for(1, 8192, 64), 132)
  assert {p.split.per_cta for p in parts} == {11} and sum(p.split.ctas for p in parts) <= 132
  config = gpu_decode.config_for(1, 8192)
  (part,) = gpu_decode.parts_for((22016,), 8192, config, 132)
  tiles, tile_steps = 22016 // (config.compute_wgs * 64), 8192 // (64 * config.blocks)
  per_cta = -(-tiles * tile_steps // 132)
  assert part.split == gpu_decode.Split(ctas=-(-tiles * tile_steps // per_cta), per_cta=per_cta,
                                        tile_steps=tile_steps, tiles=tiles)
  assert gpu_decode.split_for(22016, 8192, config, 132) == part.split


@pytest.mark.parametrize("tokens", [3, 1])  # 1: one row (compute_dot's one-row path on a GPU)
def test_lora_layer_on_the_decode_kernel_equals_the_unfused_layer(monkeypatch, tokens):
  """A QLoRA layer (with a bias, scaling 1.5) at decoding size on a GPU ('auto'): the LoRA update
  goes into the decode kernel (no separate B product); output and gradients (x, A, B) equal
  XLA's unfused layer."""
  from flax import nnx
  import qlora_jax as q

  monkeypatch.setattr(dispatch, "INTERPRET", not ON_GPU)
  n, k, r = (4096, 4096, 64) if ON_GPU else (256, 640, 16)
  w = jax.random.normal(jax.random.key(0), (n, k)) * 0.05
  g = jax.random.normal(jax.random.key(9), (1, tokens, n))
  x = jax.random.normal(jax.random.key(5), (1, tokens, k), jnp.float32)
  bias = jax.random.normal(jax.random.key(7), (n,)) * 0.1

  def run(backend):
    layer = q.QLoRALinear.from_quantized(q.quantize(w), q.LoraConfig(rank=r, alpha=1.5 * r),
                                         bias=bias, backend=get_backend(backend), rngs=nnx.Rngs(2))
    layer.lora_b[...] = jax.random.normal(jax.random.key(3), (r, n)) * 0.1
    graphdef, lora, rest = nnx.split(layer, nnx.LoRAParam, ...)

    def forward(lora, x):
      return nnx.merge(graphdef, lora, rest)(x)

    def loss(lora, x):
      return jnp.sum(forward(lora, x).astype(jnp.float32) * g)

    text = str(jax.make_jaxpr(forward)(lora, x))
    return jax.jit(forward)(lora, x), jax.jit(jax.grad(loss, argnums=(0, 1)))(lora, x), text

  with monkeypatch.context() as m:
    m.setattr(dispatch.jax, "default_backend", lambda: "gpu")
    y, (d_state, dx), text = run("auto")
  assert "pallas_call" in text or "wgmma" in text
  assert text.count("dot_general") == 1  # the A product only: B's is in the kernel
  y_ref, (d_ref, dx_ref), _ = run("xla")
  _check(y, y_ref, 0, DECODE_TOL + BF16_TOL)
  _check(dx, dx_ref, 0, BF16_TOL)
  for name in ("lora_a", "lora_b"):
    _check(d_state[name][...], d_ref[name][...], 0, BF16_TOL)


def test_gpu_decode_group_lowers_for_cuda_from_cpu(monkeypatch):
  """The grouped kernel (a warp-specialized pipeline per weight under pl.when) goes through
  Pallas's Mosaic GPU lowering for CUDA on any machine (jax.export, platforms=("cuda",)): llama3-8b's
  q, k, v with LoRA updates (h in 8 K-slices; with the norm's reduction; as a programmatic
  dependent launch) on an H100's 132 SMs. (Mosaic's compile to PTX
  happens on a GPU.)"""
  from jax import export

  monkeypatch.setattr(gpu_decode, "sm_count", lambda interpret: 132)
  ns, k = (4096, 1024, 1024), 4096
  qws = tuple(jax.ShapeDtypeStruct((n, k), jnp.float32) for n in ns)
  qws = tuple(jax.eval_shape(quantize, w) for w in qws)
  x = jax.ShapeDtypeStruct((1, k), jnp.bfloat16)
  update = (jax.ShapeDtypeStruct((8, 64 * len(ns)), jnp.bfloat16),
            tuple(jax.ShapeDtypeStruct((64, n), jnp.bfloat16) for n in ns))
  text = export.export(jax.jit(gpu_decode.decode_group), platforms=("cuda",))(x, qws, update).mlir_module()
  assert "mosaic_gpu" in text and "griddepcontrol" not in text
  text = export.export(jax.jit(functools.partial(gpu_decode.decode_group, eps=1e-5)),  # the norm
                       platforms=("cuda",))(x, qws, update, x).mlir_module()
  assert "mosaic_gpu" in text
  config = dataclasses.replace(gpu_decode.config_for(1, k, 64), pdl=True)  # a dependent launch
  text = export.export(jax.jit(functools.partial(gpu_decode.decode_group, config=config)),
                       platforms=("cuda",))(x, qws, update).mlir_module()
  assert "griddepcontrol.wait" in text and "griddepcontrol.launch_dependents" in text


def test_decoding_chunk_lowers_for_a_hopper_gpu_with_four_decode_launches_a_layer(monkeypatch):
  """Generation's compiled chunk of a Llama (LoRA on the 7 projections) for a Hopper GPU, lowered
  for CUDA from any machine: each layer's products are 4 decode launches (q/k/v, o, gate/up, down)
  instead of 7, and its attention one launch of gpu_decode_attention (128 cache slots)."""
  from pallas_kernels import gpu_decode_attention
  from jax import export

  from qlora_jax.nn.generate import _decoder, greedy_chunk
  from qlora_jax.nn.lora import LoraConfig
  from qlora_jax.nn.model import ModelOptions
  from qlora_jax.nn.model_config import ModelConfig
  from qlora_jax.testing import random_model

  cfg = ModelConfig(model_type="llama", vocab_size=512, hidden_size=1024, intermediate_size=2048,
                    num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, head_dim=128,
                    max_position_embeddings=256)
  model = random_model(cfg, ModelOptions(lora=LoraConfig(rank=64)))
  launches, group = [], gpu_decode.decode_group
  monkeypatch.setattr(gpu_decode, "decode_group", lambda x, qws, *a, **kw: (
      launches.append(len(qws)), group(x, qws, *a, **kw))[1])
  attentions, attention = [], gpu_decode_attention.decode_attention
  monkeypatch.setattr(gpu_decode_attention, "decode_attention", lambda *a, **kw: (
      attentions.append(1), attention(*a, **kw))[1])
  monkeypatch.setattr(gpu_decode, "sm_count", lambda interpret: 132)
  monkeypatch.setattr(dispatch, "INTERPRET", False)
  monkeypatch.setattr(dispatch, "_hopper", lambda: True)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  try:
    chunk, args = greedy_chunk(model, 1, 128)
    export.export(chunk, platforms=("cuda",))(*args)
  finally:
    _decoder.cache_clear()  # no later test gets this GPU-traced chunk
  assert launches == [3, 1, 2, 1] * cfg.num_hidden_layers
  assert len(attentions) == cfg.num_hidden_layers


@pytest.mark.parametrize("tokens, rank, dropout, plus_one",  # plus_one None: no norm
                         [(1, 64, 0.0, None), (3, 0, 0.0, None), (1, 64, 0.25, True),
                          (1, 64, 0.0, False), (1, 64, 0.0, True)])
def test_layers_sharing_an_input_take_one_decode_launch(monkeypatch, tokens, rank, dropout,
                                                        plus_one):
  """q, k, v layers (with biases, scaling 1.5; rank 0: no adapters) at decoding size on a GPU
  ('auto'): shared_input runs the three in one decode_group launch; outputs and gradients (x,
  each A and B) equal XLA's layers one by one. With LoRA dropout active (each layer its own
  mask, as alone) the outputs, run eagerly (the layers' dropout counts its keys as they go).
  With a pre-norm (plus_one: Gemma's 1 + weight), the one launch applies it after the products
  (x * weight in, 1 / rms(x) times each product before its bias) and XLA's layers take norm(x)."""
  from flax import nnx
  import qlora_jax as q
  from qlora_jax.nn.lora import shared_input
  from qlora_jax.nn.model import RMSNorm

  monkeypatch.setattr(dispatch, "INTERPRET", not ON_GPU)
  ns, k, r = ((4096, 1024, 1024), 4096, rank) if ON_GPU else ((256, 128, 128), 640, rank)
  x = jax.random.normal(jax.random.key(5), (1, tokens, k), jnp.float32) * 3.0  # rms 3, not 1
  gs = [jax.random.normal(jax.random.key(9 + i), (1, tokens, n)) for i, n in enumerate(ns)]
  norm = None
  if plus_one is not None:
    norm = RMSNorm(k, 1e-5, "float32", plus_one)
    norm.weight[...] = 1.0 - plus_one + jax.random.normal(jax.random.key(40), (k,)) * 0.3
  launches = []
  group = gpu_decode.decode_group
  monkeypatch.setattr(gpu_decode, "decode_group", lambda x, qws, *a, **kw: (
      launches.append(len(qws)), group(x, qws, *a, **kw))[1])

  def run(backend):
    layers = []
    for i, n in enumerate(ns):
      w = jax.random.normal(jax.random.key(i), (n, k)) * 0.05
      bias = jax.random.normal(jax.random.key(20 + i), (n,)) * 0.1
      lora = q.LoraConfig(rank=r, alpha=1.5 * r, dropout=dropout) if r else None
      layer = q.QLoRALinear.from_quantized(q.quantize(w), lora, bias=bias,
                                           backend=get_backend(backend), rngs=nnx.Rngs(i))
      if r:
        layer.lora_b[...] = jax.random.normal(jax.random.key(30 + i), (r, n)) * 0.1
      layers.append(layer)
    graphdef, lora, rest = nnx.split(tuple(layers), nnx.LoRAParam, ...)

    def forward(lora, x):
      return shared_input(nnx.merge(graphdef, lora, rest), x, norm)

    def loss(lora, x):
      return sum(jnp.sum(y.astype(jnp.float32) * g) for y, g in zip(forward(lora, x), gs))

    if dropout:
      return forward(lora, x), None
    return jax.jit(forward)(lora, x), jax.jit(jax.grad(loss, argnums=(0, 1)))(lora, x)

  with monkeypatch.context() as m:
    m.setattr(dispatch.jax, "default_backend", lambda: "gpu")
    ys, grads = run("auto")
  ys_ref, grads_ref = run("xla")
  for y, y_ref in zip(ys, ys_ref):
    _check(y, y_ref, 0, DECODE_TOL + BF16_TOL)
  if dropout:
    assert launches == [3]
    return
  assert launches.count(3) == 2 and set(launches) == {3}  # forward and the gradient's forward
  (d_state, dx), (d_ref, dx_ref) = grads, grads_ref
  _check(dx, dx_ref, 0, BF16_TOL)
  for path, value in jax.tree_util.tree_leaves_with_path(d_state):
    ref = dict(jax.tree_util.tree_leaves_with_path(d_ref))[path]
    _check(value, ref, 0, BF16_TOL)


@pytest.mark.parametrize("rows, part", [(1, 1024), (2, 1024), (2, 64)])
def test_gpu_decode_attention_equals_float64_softmax(rows, part):
  """decode_attention (one CTA a batch row and KV head, 64-slot blocks, flash attention's online
  softmax) against float64: grouped queries (4 a KV head), a left-padded row, a row whose last
  block is all masked (its finite bias keeps the running max finite); the cache whole in each CTA
  or split among CTAs (`part` 64: 3 or 4 parts, combined by their log-sum-exp; one all masked);
  bf16 output (2^-8 of the output's size per element, well within BF16_TOL in the relative norm)."""
  from pallas_kernels.gpu_decode_attention import bias_of, decode_attention
  n, kv, h, s = (32, 8, 128, 256) if ON_GPU else (8, 2, 64, 192)
  rng = np.random.default_rng(rows)
  q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
             for shape in ((rows, 1, n, h), (rows, s, kv, h), (rows, s, kv, h)))
  mask = np.zeros((rows, 1, s), bool)
  mask[0, 0, 3:s - 40] = True
  if rows > 1:
    mask[1, 0, :70] = True
  out = decode_attention(q, k, v, bias_of(jnp.asarray(mask)), scale=h ** -0.5, part=part,
                         interpret=not ON_GPU)
  qf, kf, vf = (np.asarray(a, np.float64) for a in (q, k, v))
  kf, vf = np.repeat(kf, n // kv, axis=2), np.repeat(vf, n // kv, axis=2)  # each query head's
  scores = np.einsum("bnh,bsnh->bns", qf[:, 0], kf) * h ** -0.5
  scores = np.where(mask, scores, -np.inf)
  p = np.exp(scores - scores.max(-1, keepdims=True))
  ref = np.einsum("bns,bsnh->bnh", p / p.sum(-1, keepdims=True), vf)[:, None]
  _check(out, ref, rows, BF16_TOL)


def test_generation_step_attention_takes_the_kernel_on_a_hopper_gpu(monkeypatch):
  """attend's "decode" (generation's step): on a Hopper GPU (the decode path forced, interpreted
  on CPU) one gpu_decode_attention launch, equal to XLA's attention within bf16's rounding; where
  the kernel does not apply (a cache of 96 slots, a window), XLA's, the same numbers."""
  from pallas_kernels import gpu_decode_attention
  from qlora_jax.nn.attention import attend

  monkeypatch.setattr(dispatch, "INTERPRET", True)
  calls, kernel = [], gpu_decode_attention.decode_attention
  monkeypatch.setattr(gpu_decode_attention, "decode_attention",
                      lambda *a, **kw: (calls.append(1), kernel(*a, **kw))[1])
  rng = np.random.default_rng(0)
  for slots, window, launches in ((128, None, 1), (96, None, 0), (128, 64, 0)):
    q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
               for shape in ((1, 1, 8, 64), (1, slots, 2, 64), (1, slots, 2, 64)))
    mask = jnp.asarray(np.arange(slots) < slots - 20)[None, None]
    with monkeypatch.context() as m:
      m.setattr(dispatch.jax, "default_backend", lambda: "gpu")
      out = attend(q, k, v, mask, implementation="decode", scale=0.125, window=window)
    ref = attend(q, k, v, mask, implementation="xla", scale=0.125, window=window)
    assert len(calls) == launches, (slots, window)
    _check(out, ref, slots, BF16_TOL)
    calls.clear()


def test_gpu_decode_attention_lowers_for_cuda_from_cpu():
  """The attention kernel goes through Pallas's Mosaic GPU lowering for CUDA on any machine:
  llama3-8b's heads (32 queries, 8 KV heads of 128) over 256 cache slots."""
  from jax import export

  from pallas_kernels.gpu_decode_attention import decode_attention, unsupported_reason
  q = jax.ShapeDtypeStruct((1, 1, 32, 128), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((1, 256, 8, 128), jnp.bfloat16)
  bias = jax.ShapeDtypeStruct((1, 256), jnp.float32)
  fn = jax.jit(lambda q, k, v, bias: decode_attention(q, k, v, bias, scale=128 ** -0.5))
  assert "mosaic_gpu" in export.export(fn, platforms=("cuda",))(q, k, k, bias).mlir_module()
  assert unsupported_reason((1, 1, 32, 128), (1, 256, 8, 128), jnp.bfloat16) is None
  assert unsupported_reason((1, 1, 32, 128), (1, 208, 8, 128), jnp.bfloat16) is not None  # slots
  assert unsupported_reason((1, 2, 32, 128), (1, 256, 8, 128), jnp.bfloat16) is not None  # 2 queries
  assert "bf16" in unsupported_reason((1, 1, 32, 128), (1, 256, 8, 128), jnp.float32)
  # q's TMA copy starts at a whole 8-row tile: a group of 60 could span 67 rows of the 64
  assert unsupported_reason((1, 1, 64, 128), (1, 256, 1, 128), jnp.bfloat16) is None
  assert unsupported_reason((1, 1, 60, 128), (1, 256, 1, 128), jnp.bfloat16) is not None
  # Gemma 3's heads of 256: whole caches fit, a split one's float32 tiles would not
  assert unsupported_reason((1, 1, 16, 256), (1, 512, 8, 256), jnp.bfloat16) is None
  assert "shared memory" in unsupported_reason((1, 1, 16, 256), (1, 1024, 8, 256), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((1, 8192, 8, 128), jnp.bfloat16)  # 16 parts of 512 slots a KV head
  bias = jax.ShapeDtypeStruct((1, 8192), jnp.float32)
  assert "mosaic_gpu" in export.export(fn, platforms=("cuda",))(q, k, k, bias).mlir_module()


def test_gpu_decode_config_fits_shared_memory_or_is_refused():
  """config_for picks a pipeline and table within Hopper's shared memory for every decode size
  and LoRA rank (Mosaic GPU counted 238,680 bytes for x [64, K], a rank-64 update, three steps in
  flight and the narrow table: over, the error this accounting prevents); a rank that cannot fit
  is refused with the bytes it needs, and fuses_group then keeps the unfused layer."""
  assert gpu_decode.smem_bytes(gpu_decode.Config(cols=64, wide_table=False, stages=3), 64, 64) == 238680
  for rows in (1, 16, 17, 32, 33, 64):
    for k in (4096, 640, 192):  # the measured defaults without LoRA: 3 steps, wide table to 32 rows
      config = gpu_decode.config_for(rows, k)
      assert (config.stages, config.wide_table) == (gpu_decode.Config.stages, rows <= 32), (rows, k)
    for rank in (0, 8, 64, 80, 128):
      config = gpu_decode.config_for(rows, 4096, rank)
      assert gpu_decode.smem_bytes(config, rows, rank) <= gpu_decode.SMEM_LIMIT, (rows, rank, config)
  _, qw, _, _ = _fresh((1, 256, 4096), "nf4")
  assert gpu_decode.unsupported_reason(64, qw, 64) is None
  assert "bytes of shared memory" in gpu_decode.unsupported_reason(64, qw, 256)


def test_compute_dot_one_row_path_keeps_contracted_rows_summed(monkeypatch):
  """compute_dot's one-row path (a GPU's batch-1 products) broadcasts the row to 8 and keeps the
  first: right only where the row axis is in the result. h^T @ dy for one row (a LoRA B
  gradient) contracts it, so it takes the plain product: the same numbers as einsum."""
  h = jax.random.normal(jax.random.key(0), (1, 16), jnp.float32)
  dy = jax.random.normal(jax.random.key(1), (1, 24), jnp.float32)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  db = compute_dot("mr,mn->rn", h, dy, jnp.bfloat16)
  monkeypatch.undo()
  ref = np.einsum("mr,mn->rn", np.asarray(h.astype(jnp.bfloat16), np.float64),
                  np.asarray(dy.astype(jnp.bfloat16), np.float64))
  np.testing.assert_allclose(np.asarray(db, np.float64), ref, rtol=1e-2, atol=1e-2)
