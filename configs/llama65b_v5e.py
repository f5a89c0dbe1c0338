"""QLoRA of LLaMA-65B on one TPU v5e host (8 chips x 16 GiB): the H100 recipe with the 4-bit
base, the LoRA adapters and their AdamW moments split FSDP-style over the 8 chips (nn/sharding.py),
one 2048-token row per chip and step, the optimizer state kept on the chips. The start-up
estimate is 12.6 GiB a chip (docs/SHARDING.md); the same config with a tiny model_dir runs on
8 simulated CPU devices (tests/test_sharding.py)."""

from qlora_jax.train.config_files import load_config

config = load_config("llama65b_h100").replace(
    batch_size=8,  # one row per chip
    grad_accum=2,  # effective batch 16, as on the H100
    offload_optimizer=False,
    mesh=(("data", 1), ("fsdp", 8)),
    lora_sharding="fsdp",
    output_dir="runs/llama65b_v5e_guanaco",
)
