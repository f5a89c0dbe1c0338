"""QLoRA of Gemma-3-12B on one H100 80 GB: llama3_8b_h100's recipe (r=64, alpha=16, all linear
layers, Guanaco, each layer's saved input in host memory) on Gemma 3. The hub checkpoint is the
image-text model: conversion keeps its language model (Gemma3ForCausalLM) and leaves the vision
tower out. Its tied 262k x 3840 embedding stays on the device (it is the lm_head too); head_dim
256 takes cuDNN's attention on Hopper (XLA's on earlier GPUs)."""

from qlora_jax.train.config_files import load_config

config = load_config("llama3_8b_h100").replace(
    model_dir="models/gemma3-12b-nf4",
    model_source="google/gemma-3-12b-pt",
    output_dir="runs/gemma3_12b_guanaco",
)
