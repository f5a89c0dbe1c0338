"""float32 division rounded as IEEE 754 on every backend, against numpy's (IEEE) division.

On the CPU, XLA's own division is already IEEE, so these tests check the integer long division
itself; on a GPU they also check that the result no longer depends on XLA:GPU's division.
"""

import jax
import numpy as np
import pytest

from qlora_jax.format import ieee

_divide = jax.jit(ieee.divide)


def _assert_bits_equal(actual, expected):
  actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
  nan = np.isnan(expected)
  np.testing.assert_array_equal(np.isnan(actual), nan)
  np.testing.assert_array_equal(actual.view(np.uint32)[~nan], expected.view(np.uint32)[~nan])


def _random(rng, n, max_exp):
  return (rng.standard_normal(n) * np.exp2(rng.integers(-max_exp, max_exp, n))).astype(np.float32)


@pytest.mark.parametrize("case", ["wide", "small_integers", "reciprocal", "by_count"])
def test_divide_matches_numpy_bit_for_bit(case):
  rng = np.random.default_rng(len(case))
  n = 1_000_000
  a, b = {
      "wide": lambda: (_random(rng, n, 50), _random(rng, n, 50)),  # quotients stay normal
      # Ratios of small integers land on exact ties and on FP4's code boundaries (7 / 12).
      "small_integers": lambda: (rng.integers(-4096, 4096, n).astype(np.float32),
                                 rng.integers(1, 4096, n).astype(np.float32)),
      "reciprocal": lambda: (np.ones(n, np.float32), _random(rng, n, 100)),
      "by_count": lambda: (_random(rng, n, 20), rng.integers(1, 1 << 20, n).astype(np.float32)),
  }[case]()
  with np.errstate(all="ignore"):
    _assert_bits_equal(_divide(a, b), a / b)


def test_divide_rounds_to_nearest_and_carries_into_the_exponent():
  one_minus_ulp = np.float32(np.nextafter(np.float32(1), np.float32(0)))
  two_minus_ulp = np.float32(np.nextafter(np.float32(2), np.float32(0)))
  a = np.array([1, 2, 7, two_minus_ulp, 1 + 2**-23, 3 * (1 + 2**-22)], np.float32)
  b = np.array([3, 3, 12, one_minus_ulp, 2, 3], np.float32)
  _assert_bits_equal(_divide(a, b), a / b)


def test_divide_special_values_follow_ieee():
  special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1.0, -2.5, 3e38], np.float32)
  a, b = np.meshgrid(special, special)
  with np.errstate(all="ignore"):
    expected = a / b
  keep = ~((expected != 0) & (np.abs(expected) < np.finfo(np.float32).tiny))  # XLA flushes those
  assert keep.sum() > 50
  _assert_bits_equal(np.asarray(_divide(a, b))[keep], expected[keep])
