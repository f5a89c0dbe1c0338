"""QLoRA of LLaMA-65B aimed at one H100 80 GB (Guanaco-65B recipe): batch 1 x 2048, bf16 LoRA,
optimizer state in pinned host memory (streamed through the device in chunks of layers), full
rematerialization. Its training step is measured in docs/BENCHMARKS.md (bench/train_step.py)."""

from qlora_jax.nn.lora import LoraConfig
from qlora_jax.train.config import DataConfig, LoopConfig, ModelSetup, OptimConfig, TrainConfig

config = TrainConfig(
    model=ModelSetup(
        model_dir="models/llama-65b-nf4",
        model_source="huggyllama/llama-65b",
        remat="full",
    ),
    lora=LoraConfig(
        rank=64,
        alpha=16.0,
        dropout=0.05,
        param_dtype="bfloat16",  # qlora.py's recipe: bf16 adapters and gradients, float32 AdamW moments
    ),
    data=DataConfig(
        dataset="timdettmers/openassistant-guanaco",
        dataset_format="oasst1",
        source_max_len=16,
        target_max_len=2032,
        packing=True,
    ),
    optim=OptimConfig(
        batch_size=1,
        grad_accum=16,
        steps=1875,
        learning_rate=1e-4,
        offload_optimizer=True,
    ),
    loop=LoopConfig(
        output_dir="runs/llama65b_guanaco",
        eval_every=250,
        save_every=250,
    ),
)
