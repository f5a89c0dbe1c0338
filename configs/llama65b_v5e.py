"""QLoRA of LLaMA-65B on one TPU v5e host (8 chips x 16 GiB): the H100 recipe with the 4-bit
base sharded FSDP-style over the 8 chips (the sharding itself arrives with the multi-device work)
and the optimizer state kept on the chips."""

import dataclasses

from qlora_jax.train_config import load_config

config = dataclasses.replace(
    load_config("llama65b_h100"),
    batch_size=8,
    grad_accum=2,
    offload_optimizer=False,
    mesh=(("data", 1), ("fsdp", 8)),
    output_dir="runs/llama65b_v5e_guanaco",
)
