"""A smoke run of a few steps on the embedded model (tests point model_dir at a tiny model)."""

from qlora_jax.nn.lora import LoraConfig
from qlora_jax.train.config import DataConfig, LoopConfig, ModelSetup, OptimConfig, TrainConfig

config = TrainConfig(
    model=ModelSetup(
        model_dir="models/smollm2-135m-instruct-nf4",
        model_source="default",
        remat="none",
    ),
    lora=LoraConfig(
        rank=4,
        alpha=8.0,
        dropout=0.1,
    ),
    data=DataConfig(
        dataset="data/answer_reason.jsonl",
        dataset_format="chat",
        eval_size=8,
        source_max_len=64,
        target_max_len=32,
        packing=True,
    ),
    optim=OptimConfig(
        batch_size=2,
        grad_accum=2,
        steps=6,
        learning_rate=1e-3,
    ),
    loop=LoopConfig(
        output_dir="runs/tiny_test",
        log_every=1,
        eval_every=3,
        save_every=3,
        keep_checkpoints=2,
    ),
)
