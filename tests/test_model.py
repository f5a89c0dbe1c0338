"""Model options that need no reference library."""

import pytest

from qlora_jax.model import ModelOptions, attention_implementation


def test_attention_auto_picks_xla_off_gpu_and_respects_explicit_choices():
  assert attention_implementation("auto", "bfloat16", 128) == "xla"  # this machine has no GPU
  assert attention_implementation("cudnn", "float32", 64) == "cudnn"
  assert attention_implementation("xla", "bfloat16", 64) == "xla"


@pytest.mark.parametrize("kw, match", [(dict(remat="sometimes"), "remat"), (dict(attention="flash"), "attention"),
                                       (dict(lora_targets=("qkv",)), "lora_targets")])
def test_bad_model_options(kw, match):
  with pytest.raises(ValueError, match=match):
    ModelOptions(**kw)
