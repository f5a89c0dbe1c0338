"""qlora_jax: QLoRA fine-tuning in JAX/Flax with 4-bit NF4 base weights.

The package reads as the pipeline: format (4-bit codes, the folder on disk) -> pallas_kernels
(the 4-bit matmul's backends, a top-level package) -> nn (layers, model) -> io (conversion,
loading) -> data -> train (config, step, loop) -> export / chat. The public names below are
imported on first use, so `import qlora_jax` stays light.
"""

import importlib

_PUBLIC = {
    "from_bnb_state": "qlora_jax.format.bnb_format", "to_bnb_state": "qlora_jax.format.bnb_format",
    "QuantConfig": "qlora_jax.format.quantization", "QuantizedArray": "qlora_jax.format.quantization",
    "dequantize": "qlora_jax.format.quantization", "quantize": "qlora_jax.format.quantization",
    "zeros_quantized": "qlora_jax.format.quantization",
    "get_backend": "pallas_kernels.backends",
    "qmatmul": "qlora_jax.nn.qmatmul",
    "LoraConfig": "qlora_jax.nn.lora", "QLoRALinear": "qlora_jax.nn.lora", "apply_qlora": "qlora_jax.nn.lora",
    "CausalLM": "qlora_jax.nn.model", "ModelOptions": "qlora_jax.nn.model",
    "ModelConfig": "qlora_jax.nn.model_config",
    "FrozenParam": "qlora_jax.nn.variables", "QuantWeight": "qlora_jax.nn.variables",
    "load_model": "qlora_jax.io.loading",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
  if name not in _PUBLIC:
    raise AttributeError(f"module 'qlora_jax' has no attribute {name!r}")
  value = getattr(importlib.import_module(_PUBLIC[name]), name)
  globals()[name] = value
  return value


def __dir__():
  return sorted([*globals(), *_PUBLIC])
