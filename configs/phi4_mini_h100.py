"""QLoRA of Phi-4-mini (3.8B) on one H100 80 GB: llama3_8b_h100's recipe (r=64, alpha=16, all
linear layers, Guanaco, each layer's saved input in host memory). Its fused qkv_proj and
gate_up_proj are split at conversion; exported adapters use PEFT's fused names."""

from qlora_jax.train.config_files import load_config

config = load_config("llama3_8b_h100").replace(
    model_dir="models/phi4-mini-nf4",
    model_source="microsoft/Phi-4-mini-instruct",
    output_dir="runs/phi4_mini_guanaco",
)
