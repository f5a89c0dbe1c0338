"""QLoRA of Qwen3-30B-A3B (48 layers of 128 experts, 8 a token) on one H100 80 GB: llama3_8b_h100's
recipe (r=64, alpha=16, Guanaco, each layer's saved input in host memory) with the adapters on
the attention (the experts stay frozen 4-bit: LoRA on experts is not built yet)."""

from qlora_jax.train.config_files import load_config

config = load_config("llama3_8b_h100").replace(
    model_dir="models/qwen3-30b-a3b-nf4",
    model_source="Qwen/Qwen3-30B-A3B",
    output_dir="runs/qwen3_30b_a3b_guanaco",
    lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
)
