"""The 4-bit matmul backends by name, the one registry `backend=` is resolved against.

  xla     dequantize + one dot (pallas_kernels/xla.py): the reference, and the path on CPU.
  pallas  the Pallas kernel wherever the platform has one and the shape suits it, else xla.
  auto    (the default) the fastest measured path per platform and shape (dispatch.py).

A name becomes a `Backend` once, where a config is turned into a model; layers and `qmatmul`
receive the object.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from pallas_kernels import dispatch, xla
from qlora_jax.format.quantization import QuantizedArray

# forward(x [M, K], qw [N, K], compute_dtype) -> y [M, N] (float32 or compute_dtype)
# backward(dy [M, N], qw [N, K], compute_dtype) -> dx [M, K] (float32 or compute_dtype)
MatmulFn = Callable[[jax.Array, QuantizedArray, jnp.dtype], jax.Array]


@dataclasses.dataclass(frozen=True)
class Backend:
  """A named pair of implementations of the two products a 4-bit layer needs."""

  name: str
  forward: MatmulFn
  backward: MatmulFn
  # (fuses, forward) of one launch for the layers sharing an input (one or more, each with its
  # LoRA update: dispatch.group_fusion), or None
  group_fusion: tuple | None = None

  def __repr__(self) -> str:
    return f"Backend({self.name!r})"


_BACKENDS = {
    "xla": Backend("xla", xla.forward, xla.backward),
    **{policy: Backend(policy, dispatch.product_fn(policy, "forward"),
                      dispatch.product_fn(policy, "backward"), dispatch.group_fusion(policy))
       for policy in dispatch.POLICIES},
}
NAMES: tuple[str, ...] = tuple(_BACKENDS)
DEFAULT = "auto"


def get_backend(name: str) -> Backend:
  """The backend called `name`; ValueError naming the choices for any other name."""
  if name not in _BACKENDS:
    raise ValueError(f"unknown 4-bit matmul backend {name!r}; choose one of {NAMES}")
  return _BACKENDS[name]
