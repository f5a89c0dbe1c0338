"""Variable types, one per parameter role: what trains is `nnx.LoRAParam`, nothing else.

The frozen types subclass `nnx.Variable`, not `nnx.Param`, so no `wrt=nnx.Param` or
`wrt=nnx.LoRAParam` filter (optimizer, gradient, checkpoint of trainable state) can reach them.

Read with `get_value()` (or `[...]`), the split types give the value as a layer computes with
it: under a device mesh their storage is split FSDP-style and gathered here, once per use
(sharding.py says how); with no mesh (one device) the stored value, unchanged.
"""

from flax import nnx

from qlora_jax.nn.sharding import gather_for_use


class QuantWeight(nnx.Variable):
  """A frozen 4-bit base weight: its value is a `QuantizedArray` pytree (codes + scales)."""

  def get_value(self, **kwargs):
    return gather_for_use(super().get_value(**kwargs))


class LoRAWeight(nnx.LoRAParam):
  """A trainable LoRA matrix (A [in, r] or B [r, out]); every LoRAParam filter selects it."""

  IN_USE = "lora_in_use"  # its layout while a layer computes with it (sharding.RULES)

  def get_value(self, **kwargs):
    return gather_for_use(super().get_value(**kwargs), self.IN_USE)


class ExpertLoRAWeight(LoRAWeight):
  """A LoRA matrix of stacked experts (A [experts, in, r] or B [experts, r, out]): under an
  expert axis each device keeps and computes with its own experts' slices."""

  IN_USE = "expert_lora_in_use"


class FrozenParam(nnx.Variable):
  """A frozen full-precision base parameter (bias, norm scale, embedding, lm_head)."""
