"""QLoRA of Llama-3-8B on one H100 80 GB, the paper's recipe (r=64, alpha=16, all linear layers)."""

from qlora_jax.nn.lora import LoraConfig
from qlora_jax.train.config import DataConfig, LoopConfig, ModelSetup, OptimConfig, TrainConfig

config = TrainConfig(
    model=ModelSetup(
        model_dir="models/llama3-8b-nf4",
        model_source="meta-llama/Meta-Llama-3-8B",
        remat="offload",  # layer inputs in host memory: faster than Unsloth in less memory (docs/BENCHMARKS.md)
    ),
    lora=LoraConfig(
        rank=64,
        alpha=16.0,
        dropout=0.1,
    ),
    data=DataConfig(
        dataset="timdettmers/openassistant-guanaco",
        dataset_format="oasst1",
        source_max_len=16,  # guanaco rows are the whole conversation in the target
        target_max_len=2032,
        packing=True,
    ),
    optim=OptimConfig(
        batch_size=4,
        grad_accum=4,  # effective batch 16
        steps=1875,
        learning_rate=2e-4,
    ),
    loop=LoopConfig(
        output_dir="runs/llama3_8b_guanaco",
        eval_every=200,
        save_every=250,
        sample_prompts=("Explain the difference between a list and a tuple in Python.",),
    ),
)
