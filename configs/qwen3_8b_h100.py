"""QLoRA of Qwen3-8B on one H100 80 GB: llama3_8b_h100's recipe (r=64, alpha=16, all linear
layers, Guanaco, each layer's saved input in host memory) on Qwen3-8B."""

from qlora_jax.train.config_files import load_config

config = load_config("llama3_8b_h100").replace(
    model_dir="models/qwen3-8b-nf4",
    model_source="Qwen/Qwen3-8B",
    output_dir="runs/qwen3_8b_guanaco",
)
