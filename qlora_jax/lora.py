"""The QLoRA linear layer (frozen 4-bit base + trainable LoRA) and the helper that installs it.

y = x @ dequant(W)^T + scaling * dropout(x) @ A @ B (+ bias), operands in the compute dtype
(bf16) with float32 accumulation. A [in, r] and B [r, out] are `nnx.LoRAParam` in float32
(master weights), initialised as PEFT does: A kaiming-uniform (a = sqrt(5), i.e. U(±1/sqrt(in))),
B zeros, so a fresh layer computes exactly the base layer.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math

import jax
import jax.numpy as jnp
from flax import nnx

from qlora_jax.qmatmul import available_backends, qmatmul
from qlora_jax.quantization import QuantConfig, QuantizedArray, quantize
from qlora_jax.variables import FrozenParam, QuantWeight


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
  """LoRA hyper-parameters (the QLoRA paper's: r=64, alpha=16) and the compute settings."""

  rank: int = 64
  alpha: float = 16.0
  dropout: float = 0.0
  use_rslora: bool = False
  compute_dtype: str = "bfloat16"
  param_dtype: str = "float32"
  backend: str = "xla"

  def __post_init__(self):
    if self.rank < 1:
      raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
    if self.backend not in available_backends():
      raise ValueError(f"unknown backend {self.backend!r}; available: {available_backends()}")
    for name in ("compute_dtype", "param_dtype"):
      if getattr(self, name) not in ("bfloat16", "float16", "float32"):
        raise ValueError(f"{name} must be bfloat16, float16 or float32, got {getattr(self, name)!r}")

  @property
  def scaling(self) -> float:
    """alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


class QLoRALinear(nnx.Module):
  """A Linear layer whose frozen weight is 4-bit and whose update is a trainable LoRA."""

  def __init__(self, qweight: QuantizedArray, config: LoraConfig, *,
               bias: jax.Array | None = None, rngs: nnx.Rngs):
    if len(qweight.shape) != 2:
      raise ValueError(f"QLoRALinear needs a 2-D [out, in] weight, got shape {qweight.shape}")
    out_features, in_features = qweight.shape
    self.in_features, self.out_features = in_features, out_features
    self.config = config
    self.weight = QuantWeight(qweight)
    self.bias = FrozenParam(jnp.asarray(bias)) if bias is not None else None
    bound = 1.0 / math.sqrt(in_features)
    self.lora_a = nnx.LoRAParam(jax.random.uniform(
        rngs.params(), (in_features, config.rank), config.param_dtype, -bound, bound))
    self.lora_b = nnx.LoRAParam(jnp.zeros((config.rank, out_features), config.param_dtype))
    self.dropout = nnx.Dropout(config.dropout, rngs=rngs)

  def __call__(self, x_BxK: jax.Array) -> jax.Array:
    """[..., in] -> [..., out], in x's dtype."""
    cd = jnp.dtype(self.config.compute_dtype)
    y = qmatmul(x_BxK, self.weight.get_value(), self.config.backend, cd)
    h = jnp.dot(self.dropout(x_BxK).astype(cd), self.lora_a[...].astype(cd),
                preferred_element_type=jnp.float32)
    y = y + self.config.scaling * jnp.dot(h.astype(cd), self.lora_b[...].astype(cd),
                                          preferred_element_type=jnp.float32)
    if self.bias is not None:
      y = y + self.bias[...].astype(jnp.float32)
    return y.astype(x_BxK.dtype)


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
    _set_child(model, path, QLoRALinear(qweight, lora, bias=bias, rngs=rngs))
  return [_dotted(p) for p, _ in chosen]


def _dotted(path: tuple) -> str:
  return ".".join(str(p) for p in path)
