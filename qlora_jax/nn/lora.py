"""The QLoRA linear layer (frozen 4-bit base + trainable LoRA) and the helper that installs it.

y = x @ dequant(W)^T + scaling * dropout(x) @ A @ B (+ bias), as PEFT computes it: each product
with compute-dtype (bf16) operands and float32 accumulation, rounded to bf16, summed in bf16.
A [in, r] and B [r, out] are `nnx.LoRAParam`s (LoRAWeight), float32 master weights by default,
initialised as PEFT does: A kaiming-uniform (a = sqrt(5), i.e. U(±1/sqrt(in))), B zeros, so a
fresh layer computes exactly the base layer.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels.backends import DEFAULT, Backend, get_backend
from pallas_kernels.xla import broadcast_dot, compute_dot
from qlora_jax.nn.families import LINEAR_NAMES
from qlora_jax.nn.qmatmul import check_backend, fuses_group, qmatmul, qmatmul_group
from qlora_jax.format.quantization import QuantConfig, QuantizedArray, quantize, zeros_quantized
from qlora_jax.nn.variables import FrozenParam, LoRAWeight, QuantWeight


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
  """LoRA hyper-parameters (the QLoRA paper's: r=64, alpha=16)."""

  rank: int = 64
  alpha: float = 16.0
  dropout: float = 0.0
  targets: tuple[str, ...] = LINEAR_NAMES  # the decoder's linear layers that get an adapter
  use_rslora: bool = False
  param_dtype: str = "float32"  # bfloat16: adapters and their gradients in bf16 (qlora.py)

  def __post_init__(self):
    if not (isinstance(self.rank, int) and isinstance(self.alpha, (int, float))
            and isinstance(self.dropout, (int, float)) and isinstance(self.targets, tuple)):
      raise ValueError("LoRA rank must be an int, alpha and dropout numbers, targets a tuple of "
                       f"layer names; got {self!r}")
    if self.rank < 1:
      raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
    if not (math.isfinite(self.alpha) and self.alpha > 0):
      raise ValueError(f"LoRA alpha must be > 0 and finite, got {self.alpha}")
    if not self.targets:
      raise ValueError("LoRA targets must name at least one layer")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
    if self.param_dtype not in ("bfloat16", "float32"):
      raise ValueError(f"param_dtype must be bfloat16 or float32, got {self.param_dtype!r}")

  @property
  def scaling(self) -> float:
    """alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def lora_a_init(key: jax.Array, in_features: int, rank: int, dtype) -> jax.Array:
  """PEFT's init of A: kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in))."""
  bound = 1.0 / math.sqrt(in_features)
  return jax.random.uniform(key, (in_features, rank), dtype, -bound, bound)


class QLoRALinear(nnx.Module):
  """A Linear layer whose frozen weight is 4-bit and whose update is a trainable LoRA.

  Built from shapes (an all-zero 4-bit weight that a checkpoint is loaded into) or, with
  `from_quantized`, around an existing QuantizedArray. `lora=None` gives a frozen layer with no
  adapter (a linear layer that is not a LoRA target).
  """

  def __init__(self, in_features: int, out_features: int, *, lora: LoraConfig | None,
               quant: QuantConfig = QuantConfig(), use_bias: bool = False,
               compute_dtype: str = "bfloat16", backend: Backend = get_backend(DEFAULT),
               rngs: nnx.Rngs):
    self.in_features, self.out_features = in_features, out_features
    check_backend(backend)
    if compute_dtype not in ("bfloat16", "float16", "float32"):
      raise ValueError(f"compute_dtype must be bfloat16, float16 or float32, got {compute_dtype!r}")
    self.compute_dtype, self.backend = compute_dtype, backend
    self.weight = QuantWeight(zeros_quantized((out_features, in_features), quant, compute_dtype))
    self.bias = FrozenParam(jnp.zeros((out_features,), compute_dtype)) if use_bias else None
    self.lora = lora
    self.scaling_in_a = False  # A holds the scaling (generation's copy: scaling_in_a below)
    if lora is None:
      return
    self.lora_a = LoRAWeight(lora_a_init(rngs.params(), in_features, lora.rank, lora.param_dtype))
    self.lora_b = LoRAWeight(jnp.zeros((lora.rank, out_features), lora.param_dtype))
    self.dropout = nnx.Dropout(lora.dropout, rngs=rngs)

  @classmethod
  def from_quantized(cls, qweight: QuantizedArray, lora: LoraConfig | None, *,
                     bias: jax.Array | None = None, compute_dtype: str = "bfloat16",
                     backend: Backend = get_backend(DEFAULT), rngs: nnx.Rngs) -> "QLoRALinear":
    """The layer around an existing [out, in] quantized weight (and optional frozen bias)."""
    if len(qweight.shape) != 2:
      raise ValueError(f"QLoRALinear needs a 2-D [out, in] weight, got shape {qweight.shape}")
    out_features, in_features = qweight.shape
    quant = QuantConfig(quant_type=qweight.quant_type, blocksize=qweight.blocksize,
                        double_quant=qweight.double_quant)
    layer = cls(in_features, out_features, lora=lora, quant=quant, use_bias=bias is not None,
                compute_dtype=compute_dtype, backend=backend, rngs=rngs)
    layer.weight.set_value(qweight)
    if bias is not None:
      layer.bias[...] = jnp.asarray(bias, layer.bias.dtype)
    return layer

  def __call__(self, x_BxK: jax.Array) -> jax.Array:
    """[..., in] -> [..., out], in x's dtype."""
    cd = jnp.dtype(self.compute_dtype)
    qw = self.weight.get_value()
    if self.lora is None:
      y = qmatmul(x_BxK, qw, self.backend, cd)
    elif fuses_group(x_BxK, (qw,), self.lora.rank, self.backend, cd):
      # decoding on a GPU: the decode kernel adds the update (scaling in h) to the base product,
      # both accumulated in float32 and rounded once (the unfused layer rounds the update, then
      # the sum: the two differ by about one bf16 step, as a prompt over 64 rows shows)
      return _one_launch((self,), x_BxK)[0]
    else:  # PEFT's order: (dropout(x) @ A) @ B, then the scale
      h_BxR = compute_dot("...k,kr->...r", self.dropout(x_BxK), self.lora_a[...], cd)
      y = (qmatmul(x_BxK, qw, self.backend, cd)
           + compute_dot("...r,rn->...n", h_BxR, self.lora_b[...], cd) * self.update_scale)
    return self._finish(y, x_BxK)

  @property
  def update_scale(self) -> float:
    """The factor the update is multiplied by: the LoRA scaling, or 1 where A holds it."""
    return 1.0 if self.scaling_in_a else self.lora.scaling

  def _finish(self, y: jax.Array, x_BxK: jax.Array) -> jax.Array:
    """The product y (compute dtype) plus the bias, in x's dtype."""
    if self.bias is not None:
      y = y + self.bias[...].astype(self.compute_dtype)
    return y.astype(x_BxK.dtype)

  def _dropout_active(self) -> bool:
    return self.dropout.rate > 0 and not self.dropout.deterministic


def _update_input(x_BxK: jax.Array, a: jax.Array, scale: float, cd) -> jax.Array:
  """h [rows, r] = scale * x @ A, rounded to cd (the product, then the scale), as the decode kernel
  reads it: a one-row x's product as broadcast_dot's 8 equal rows, which the kernel reads in
  place (the first row sliced out would be a kernel of its own); no multiply where scale is 1."""
  x_MxK = x_BxK.reshape(-1, x_BxK.shape[-1])
  dot = broadcast_dot if x_MxK.shape[0] == 1 else compute_dot
  h = dot("mk,kr->mr", x_MxK, a, cd)
  return h if scale == 1.0 else (h * scale).astype(cd)


def scaling_in_a(model: nnx.Module) -> tuple[nnx.Module, dict[tuple, float]]:
  """(a copy of `model` whose LoRA layers with a power-of-two scaling (alpha / r of the usual
  configs) are marked to hold it in A and multiply no update by it, {path of each such A: its
  scaling}); the copy shares the model's arrays, and its A's are to be multiplied by the scaling
  by whoever reads them (generation's copy, generate.decode_state). The same products bit for
  bit (a power of two commutes with every rounding, barring subnormals), and a decoding layer's
  h goes from its A product into the decode kernel with no multiply kernel between."""
  model, scales = nnx.clone(model), {}
  for path, layer in nnx.iter_graph(model):
    if (isinstance(layer, QLoRALinear) and layer.lora is not None and not layer.scaling_in_a
        and math.frexp(layer.lora.scaling)[0] == 0.5):
      layer.scaling_in_a = True
      scales[(*path, "lora_a")] = layer.lora.scaling
  return model, scales


def shared_input(layers: tuple[QLoRALinear, ...], x_BxK: jax.Array,
                 norm=None) -> tuple[jax.Array, ...]:
  """Each layer applied to norm(x) (the layers that share an input: q, k, v; gate, up; norm: their
  pre-norm, or None), as one decode-kernel launch where the backend takes them together (decoding
  on a GPU: qmatmul_group), else layer by layer; the same products either way. In one launch the
  norm is applied by linearity (`RMSNorm.split`): the products take x * weight and their outputs
  are multiplied by 1 / rms(x) before any bias, so the norm's reduction is off the path from the
  residual add to the products and XLA runs two kernels a layer fewer."""
  if not one_launch_applies(layers, x_BxK):
    x_BxK = x_BxK if norm is None else norm(x_BxK)
    return tuple(layer(x_BxK) for layer in layers)
  return _one_launch(layers, *((x_BxK,) if norm is None else norm.split(x_BxK)))


def one_launch_applies(layers: tuple[QLoRALinear, ...], x_BxK: jax.Array) -> bool:
  """Whether shared_input runs the layers on x as one decode launch: alike (backend, compute
  dtype, LoRA rank and scale) and a group the backend fuses (fuses_group)."""
  first = layers[0]
  rank = 0 if first.lora is None else first.lora.rank
  alike = all(layer.backend is first.backend and layer.compute_dtype == first.compute_dtype
              and (layer.lora is None) == (first.lora is None)
              and (layer.lora is None or (layer.lora.rank == rank
                                          and layer.update_scale == first.update_scale))
              for layer in layers)
  return alike and fuses_group(x_BxK, tuple(layer.weight.get_value() for layer in layers), rank,
                               first.backend, jnp.dtype(first.compute_dtype))


def _one_launch(layers: tuple[QLoRALinear, ...], x_BxK: jax.Array,
                out_scale: jax.Array | None = None) -> tuple[jax.Array, ...]:
  """The layers (alike; fuses_group said yes) applied to x in one qmatmul_group launch, each
  product multiplied by out_scale [..., 1] (float32; None: 1) before its bias."""
  first = layers[0]
  cd = jnp.dtype(first.compute_dtype)
  h = bs = None
  rank = 0 if first.lora is None else first.lora.rank
  if rank:  # the updates' inputs side by side: one A product of the A side by side, one scale
    scale = first.update_scale
    if any(layer._dropout_active() for layer in layers):  # each layer's own dropout mask
      h = jnp.concatenate([_update_input(layer.dropout(x_BxK), layer.lora_a[...], scale, cd)
                           for layer in layers], axis=-1)
    else:
      h = _update_input(x_BxK, jnp.concatenate([layer.lora_a[...] for layer in layers], axis=1),
                        scale, cd)
    bs = tuple(layer.lora_b[...] for layer in layers)
  qws = tuple(layer.weight.get_value() for layer in layers)
  ys = qmatmul_group(x_BxK, h, qws, bs, first.backend, cd)
  if out_scale is not None:
    ys = tuple((y.astype(jnp.float32) * out_scale).astype(y.dtype) for y in ys)
  return tuple(layer._finish(y, x_BxK) for layer, y in zip(layers, ys))


def _matches(path: str, patterns: tuple[str, ...]) -> bool:
  """A glob matches the dotted path or its last part (PEFT's target_modules style)."""
  last = path.rsplit(".", 1)[-1]
  return any(fnmatch.fnmatchcase(path, p) or fnmatch.fnmatchcase(last, p) for p in patterns)


def _set_child(model: nnx.Module, path: tuple, value) -> None:
  parent = model
  for part in path[:-1]:
    parent = parent[part] if isinstance(part, int) else getattr(parent, part)
  if isinstance(path[-1], int):
    parent[path[-1]] = value
  else:
    setattr(parent, path[-1], value)


def apply_qlora(model: nnx.Module, lora: LoraConfig, quant: QuantConfig = QuantConfig(), *,
                targets: tuple[str, ...] = ("*",), exclude: tuple[str, ...] = ("lm_head",),
                compute_dtype: str = "bfloat16", backend: Backend = get_backend(DEFAULT),
                rngs: nnx.Rngs) -> list[str]:
  """Swap every `nnx.Linear` whose path matches `targets` (and not `exclude`) for a QLoRALinear.

  The Linear's kernel [in, out] is quantized as the [out, in] weight bitsandbytes would store.
  Returns the dotted paths replaced; raises ValueError if none matched.
  """
  found = [(p, m) for p, m in nnx.iter_modules(model) if isinstance(m, nnx.Linear)]
  chosen = [(p, m) for p, m in found
            if _matches(_dotted(p), targets) and not _matches(_dotted(p), exclude)]
  if not chosen:
    names = [_dotted(p) for p, _ in found]
    raise ValueError(f"no Linear layer matches targets={targets} (exclude={exclude}); "
                     f"linear layers in the model: {names}")
  for path, linear in chosen:
    qweight = quantize(linear.kernel[...].T, quant.quant_type, quant.blocksize, quant.double_quant)
    bias = linear.bias[...] if linear.bias is not None else None
    _set_child(model, path, QLoRALinear.from_quantized(
        qweight, lora, bias=bias, compute_dtype=compute_dtype, backend=backend, rngs=rngs))
  return [_dotted(p) for p, _ in chosen]


def _dotted(path: tuple) -> str:
  return ".".join(str(p) for p in path)
