"""Variable types, one per parameter role: what trains is `nnx.LoRAParam`, nothing else.

The frozen types subclass `nnx.Variable`, not `nnx.Param`, so no `wrt=nnx.Param` or
`wrt=nnx.LoRAParam` filter (optimizer, gradient, checkpoint of trainable state) can reach them.
"""

from flax import nnx


class QuantWeight(nnx.Variable):
  """A frozen 4-bit base weight: its value is a `QuantizedArray` pytree (codes + scales)."""


class FrozenParam(nnx.Variable):
  """A frozen full-precision base parameter (bias, norm scale, embedding, lm_head)."""
