"""Model options that need no reference library."""

import jax
import pytest

from qlora_jax.model import ModelOptions, attention_implementation


def test_attention_auto_picks_cudnn_on_gpu_only_and_respects_explicit_choices():
  on_gpu = "cudnn" if jax.default_backend() == "gpu" else "xla"
  assert attention_implementation("auto", "bfloat16", 128) == on_gpu
  assert attention_implementation("auto", "float32", 128) == "xla"  # cuDNN's is 16-bit only
  assert attention_implementation("auto", "bfloat16", 160) == "xla"  # head_dim > 128
  assert attention_implementation("cudnn", "float32", 64) == "cudnn"
  assert attention_implementation("xla", "bfloat16", 64) == "xla"


@pytest.mark.parametrize("kw, match", [(dict(remat="sometimes"), "remat"), (dict(attention="flash"), "attention"),
                                       (dict(lora_targets=("qkv",)), "lora_targets")])
def test_bad_model_options(kw, match):
  with pytest.raises(ValueError, match=match):
    ModelOptions(**kw)


def test_sampling_greedy_temperature_and_top_p():
  import jax
  import jax.numpy as jnp
  import numpy as np

  from qlora_jax.generate import sample_token

  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  key = jax.random.key(0)
  assert int(sample_token(logits, key, 0.0, 1.0)[0]) == 0
  draws = np.asarray([int(sample_token(logits, k, 1.0, 1.0)[0]) for k in jax.random.split(key, 400)])
  assert set(draws) == {0, 1, 2, 3} and abs((draws == 0).mean() - 0.5) < 0.1
  # top_p = 0.75: the smallest set with >= 75% of the mass is {0, 1} (0.5 + 0.3).
  nucleus = {int(sample_token(logits, k, 1.0, 0.75)[0]) for k in jax.random.split(key, 200)}
  assert nucleus == {0, 1}
