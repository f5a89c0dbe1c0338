"""float32 arithmetic rounded as IEEE 754 prescribes, on every XLA backend.

bitsandbytes' quantizer rounds each operation once, to nearest even. XLA keeps that promise for
add, subtract and multiply, but not for two things this project's bit-exactness rests on:
- XLA:GPU's float32 divide is not correctly rounded: on an H100 (JAX 0.11.2) 29% of random
  quotients and 14% of reciprocals are one ulp off, and a float64 round trip is simplified away.
- XLA contracts a multiply feeding an add into one fused multiply-add (one rounding, not two).
`divide` computes the quotient with integer long division, which every backend does exactly;
`rounded` stops the contraction.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_MANTISSA_BITS = 23
_HIDDEN = 1 << _MANTISSA_BITS
_MAX_BIASED_EXPONENT = 254
_SIGN = jnp.uint32(0x80000000)


def rounded(product: jax.Array) -> jax.Array:
  """product as a float32 value of its own: XLA contracts a multiply feeding an add into one FMA
  (no flag turns it off, and reduce_precision or an optimization barrier do not stop it), but
  not through a select (an identity here: NaN where product is NaN)."""
  return jnp.where(product == product, product, jnp.nan)


def _fields(x_u32: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Biased exponent and 24-bit significand (hidden bit set) of float32 bit patterns."""
  exponent = (x_u32 >> _MANTISSA_BITS) & 0xFF
  return exponent.astype(jnp.int32), (x_u32 & (_HIDDEN - 1)) | _HIDDEN


def divide(a: jax.Array, b: jax.Array) -> jax.Array:
  """a / b in float32, correctly rounded (to nearest, ties to even) on every backend.

  Exact where a, b and the quotient are normal numbers; zeros, infinities, NaNs, subnormals and
  quotients that overflow or underflow take XLA's own division (on CPU IEEE, but
  with subnormals flushed to zero).
  """
  a, b = jnp.broadcast_arrays(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
  a_u32 = jax.lax.bitcast_convert_type(a, jnp.uint32)
  b_u32 = jax.lax.bitcast_convert_type(b, jnp.uint32)
  exp_a, sig_a = _fields(a_u32)
  exp_b, sig_b = _fields(b_u32)
  # Scale sig_a so the quotient's leading bit is 1: sig_a / sig_b in [1, 2).
  below = sig_a < sig_b
  sig_a = jnp.where(below, sig_a << 1, sig_a)
  exponent = exp_a - exp_b + 127 - below.astype(jnp.int32)
  # Long division, 1 + 3 x 8 quotient bits: 23 kept below the leading one and one to round on
  # (rem < sig_b < 2^24, so rem << 8 fits in uint32). A quotient of two 24-bit significands is
  # never exactly halfway between two floats, so rounding to nearest is rounding on that bit.
  quotient = sig_a // sig_b
  rem = sig_a - quotient * sig_b
  for _ in range(3):
    rem = rem << 8
    digits = rem // sig_b
    quotient = (quotient << 8) | digits
    rem = rem - digits * sig_b
  # A carry out of the significand moves into the exponent field, as it should.
  magnitude = ((exponent.astype(jnp.uint32) << _MANTISSA_BITS) + ((quotient >> 1) - _HIDDEN)
               + (quotient & 1))
  sign = (a_u32 ^ b_u32) & _SIGN
  exact = jax.lax.bitcast_convert_type(sign | magnitude, jnp.float32)
  normal = ((exp_a >= 1) & (exp_a <= _MAX_BIASED_EXPONENT) & (exp_b >= 1)
            & (exp_b <= _MAX_BIASED_EXPONENT) & (exponent >= 1) & (exponent <= _MAX_BIASED_EXPONENT))
  return jnp.where(normal, exact, a / jnp.where(normal, 1.0, b))
