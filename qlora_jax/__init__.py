"""qlora_jax: QLoRA fine-tuning in JAX/Flax with 4-bit NF4 base weights."""

from qlora_jax.bnb_format import from_bnb_state, to_bnb_state
from qlora_jax.lora import LoraConfig, QLoRALinear, apply_qlora
from qlora_jax.base_matmul import qmatmul
from qlora_jax.quantization import (QuantConfig, QuantizedArray, dequantize, quantize,
                                    zeros_quantized)
from qlora_jax.model import CausalLM, ModelOptions
from qlora_jax.model_config import ModelConfig
from qlora_jax.variables import FrozenParam, QuantWeight
from qlora_jax.weights import load_model

__all__ = [
    "CausalLM", "ModelConfig", "ModelOptions", "load_model",
    "FrozenParam", "LoraConfig", "QLoRALinear", "QuantConfig", "QuantWeight", "QuantizedArray",
    "apply_qlora", "dequantize", "from_bnb_state", "qmatmul", "quantize", "to_bnb_state",
    "zeros_quantized",
]
