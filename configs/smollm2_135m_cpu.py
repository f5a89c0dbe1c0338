"""The default run: the embedded SmolLM2-135M-Instruct learns the "Answer:/Reason:" reply format
of the shipped demo set, on a laptop-class CPU in a few minutes."""

from qlora_jax.nn.lora import LoraConfig
from qlora_jax.train.config import DataConfig, LoopConfig, ModelSetup, OptimConfig, TrainConfig

config = TrainConfig(
    model=ModelSetup(
        model_dir="models/smollm2-135m-instruct-nf4",
        model_source="default",
        remat="none",
    ),
    lora=LoraConfig(
        rank=16,
        alpha=32.0,
        dropout=0.05,
    ),
    data=DataConfig(
        dataset="data/answer_reason.jsonl",
        dataset_format="chat",
        eval_size=40,
        source_max_len=96,
        target_max_len=48,
        packing=True,
    ),
    optim=OptimConfig(
        batch_size=4,
        steps=40,
        learning_rate=1e-3,
        warmup_ratio=0.05,
    ),
    loop=LoopConfig(
        output_dir="runs/smollm2_135m_cpu",
        log_every=5,
        eval_every=20,
        save_every=20,
        sample_prompts=("What is the capital of Italy?", "What is 12 + 30?"),
        sample_max_new_tokens=32,
    ),
)
