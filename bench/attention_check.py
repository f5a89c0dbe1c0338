"""Check cuDNN attention against XLA's on the model's masks (causal + packed segments), on GPU.

  python3 bench/attention_check.py
"""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from qlora_jax.nn.model import ModelOptions
from qlora_jax.nn.model_config import ModelConfig
from qlora_jax.testing import random_model


def main() -> None:
  cfg = ModelConfig(vocab_size=1024, hidden_size=1024, intermediate_size=2048, num_hidden_layers=2,
                    num_attention_heads=8, num_key_value_heads=2, head_dim=128)
  rs = np.random.default_rng(0)
  ids = jnp.asarray(rs.integers(0, 1024, (2, 512)), jnp.int32)
  seg = jnp.asarray(np.repeat(np.arange(1, 5), 128)[None].repeat(2, 0), jnp.int32)
  pos = jnp.asarray(np.tile(np.arange(128), 4)[None].repeat(2, 0), jnp.int32)
  outs = {}
  for impl in ("xla", "cudnn"):
    model = random_model(cfg, ModelOptions(attention=impl, scan_layers=True))
    try:
      outs[impl] = np.asarray(nnx.jit(lambda m: m(ids, positions=pos, segment_ids=seg))(model), np.float32)
    except Exception as e:  # report, do not hide: which masks cuDNN refuses
      print(f"{impl}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:300]}")
  if len(outs) == 2:
    err = np.abs(outs["xla"] - outs["cudnn"]).max() / np.abs(outs["xla"]).max()
    print(f"cudnn vs xla max relative logit difference: {err:.2e}")


if __name__ == "__main__":
  main()
