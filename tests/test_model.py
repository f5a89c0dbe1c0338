"""Model options that need no reference library."""

import jax
import pytest

from qlora_jax.nn.lora import LoraConfig
from qlora_jax.nn.model import ModelOptions, attention_implementation


def test_attention_auto_picks_cudnn_on_gpu_only_and_respects_explicit_choices():
  on_gpu = "cudnn" if jax.default_backend() == "gpu" else "xla"
  assert attention_implementation("auto", "bfloat16", 128) == on_gpu
  assert attention_implementation("auto", "float32", 128) == "xla"  # cuDNN's is 16-bit only
  assert attention_implementation("auto", "bfloat16", 160) == "xla"  # head_dim > 128
  assert attention_implementation("cudnn", "float32", 64) == "cudnn"
  assert attention_implementation("xla", "bfloat16", 64) == "xla"


@pytest.mark.parametrize("kw, match", [(dict(remat="sometimes"), "remat"), (dict(attention="flash"), "attention"),
                                       (dict(lora=LoraConfig(targets=("qkv",))), "lora_targets"),
                                       (dict(backend="xla"), "backend must be a")])
def test_bad_model_options(kw, match):
  with pytest.raises(ValueError, match=match):
    ModelOptions(**kw)


def test_sampling_greedy_temperature_and_top_p():
  import jax
  import jax.numpy as jnp
  import numpy as np

  from qlora_jax.nn.generate import sample_token

  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  key = jax.random.key(0)
  assert int(sample_token(logits, key, 0.0, 1.0)[0]) == 0
  draws = np.asarray([int(sample_token(logits, k, 1.0, 1.0)[0]) for k in jax.random.split(key, 400)])
  assert set(draws) == {0, 1, 2, 3} and abs((draws == 0).mean() - 0.5) < 0.1
  # top_p = 0.75: the smallest set with >= 75% of the mass is {0, 1} (0.5 + 0.3).
  nucleus = {int(sample_token(logits, k, 1.0, 0.75)[0]) for k in jax.random.split(key, 200)}
  assert nucleus == {0, 1}


def _dot_precisions(jaxpr) -> list:
  """The precision of every dot_general in a jaxpr and the jaxprs nested in it."""
  from jax.extend import core

  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      found.append(eqn.params["precision"])
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, (core.ClosedJaxpr, core.Jaxpr)):
          found += _dot_precisions(getattr(sub, "jaxpr", sub))
  return found


def test_float32_models_ask_for_float32_products():
  """With dtype float32, every product of the training loss (base, LoRA, attention, lm_head; forward
  and backward, through the custom VJP, remat and scan) asks for full float32 precision, which a
  GPU would otherwise run in TF32; a bf16 model leaves the default."""
  import jax.numpy as jnp
  from flax import nnx

  from qlora_jax.nn.lora import LoraConfig
  from qlora_jax.train.loss import batch_loss
  from qlora_jax.nn.model_config import ModelConfig
  from qlora_jax.testing import random_model

  config = ModelConfig(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
  ids = jnp.zeros((2, 8), jnp.int32)
  batch = dict(input_ids=ids, labels=ids, positions=jnp.broadcast_to(jnp.arange(8), (2, 8)),
               segment_ids=jnp.ones_like(ids))
  highest = (jax.lax.Precision.HIGHEST,) * 2
  for dtype in ("float32", "bfloat16"):
    options = ModelOptions(dtype=dtype, lora=LoraConfig(rank=4), remat="full", scan_layers=True)
    graphdef, lora, rest = nnx.split(random_model(config, options), nnx.LoRAParam, ...)
    def loss(lora_, rest_):  # Variables rebuilt at this trace level, as train_step does
      model = nnx.merge(graphdef, *(jax.tree.map(lambda x: x, s) for s in (lora_, rest_)))
      return batch_loss(model, batch)[0]

    with jax.default_matmul_precision(None):  # tests/conftest.py sets "highest" on a GPU
      precisions = _dot_precisions(jax.make_jaxpr(jax.grad(loss))(lora, rest).jaxpr)
    assert len(precisions) >= 7 * 2 * 3 + 2  # 7 base products a layer, LoRA's, attention's, the head
    assert all(p == highest for p in precisions) == (dtype == "float32"), (dtype, set(precisions))
    assert any(p == highest for p in precisions) == (dtype == "float32")
