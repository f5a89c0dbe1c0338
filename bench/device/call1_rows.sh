#!/usr/bin/env bash
# Issue 27's and 29's remaining Unsloth rows with ours beside them, one call (~8 min, H100):
# Qwen3-30B-A3B (MoE, LoRA on attention and experts) and Gemma-3-12B.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
bash bench/device/moe_row.sh
bash bench/device/ours_runs.sh "gemma3-12b 4 2048 offload cudnn --lora-dtype bfloat16"
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 TOKENIZERS_PARALLELISM=false
rm -rf /tmp/anchor_fast_models/*
timeout 240 python bench/anchor_families.py --system unsloth --shape gemma3-12b --batch 4 --seq 2048 --steps 3 > $OUT/unsloth_gemma3-12b.txt 2>&1
echo "unsloth gemma3-12b rc=$?: $(grep '^{' $OUT/unsloth_gemma3-12b.txt | tail -1 | cut -c1-400)"
tail -n 3 $OUT/unsloth_gemma3-12b.txt | cut -c1-300
