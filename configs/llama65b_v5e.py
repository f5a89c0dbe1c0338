"""QLoRA of LLaMA-65B on one TPU v5e host (8 chips x 16 GiB): the 4-bit base sharded FSDP-style
over the 8 chips (the sharding itself arrives with the multi-device work)."""

from qlora_jax.train_config import TrainConfig

config = TrainConfig(
    model_dir="models/llama-65b-nf4",
    model_source="huggyllama/llama-65b",
    dataset="timdettmers/openassistant-guanaco",
    dataset_format="oasst1",
    source_max_len=16,
    target_max_len=2032,
    packing=True,
    lora_rank=64,
    lora_alpha=16.0,
    lora_dropout=0.05,
    batch_size=8,
    grad_accum=2,
    steps=1875,
    learning_rate=1e-4,
    remat="full",
    mesh=(("data", 1), ("fsdp", 8)),
    output_dir="runs/llama65b_v5e_guanaco",
    eval_every=250,
    save_every=250,
)
