"""QLoRA of Gemma-2-9B on one H100 80 GB: llama3_8b_h100's recipe (r=64, alpha=16, all linear
layers, Guanaco, each layer's saved input in host memory) on Gemma 2. Its attention-logit softcap
takes XLA's attention (cuDNN has none; the run says so); the tied 256k embedding stays on the
device."""

from qlora_jax.train.config_files import load_config

config = load_config("llama3_8b_h100").replace(
    model_dir="models/gemma2-9b-nf4",
    model_source="google/gemma-2-9b",
    output_dir="runs/gemma2_9b_guanaco",
)
