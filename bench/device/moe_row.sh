#!/usr/bin/env bash
# Issue 29's device row: the Qwen3-30B-A3B shape (48 layers, 128 experts, top-8) at 4 x 2048,
# ours whole and with its first 8 layers, beside Unsloth with the same 8 layers (the whole bf16
# model would not fit the device's disk), in one call.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name --format=csv,noheader
# LoRA where Unsloth puts it on this family: the attention projections and the experts' parameters
T=q_proj,k_proj,v_proj,o_proj,experts.gate_up_proj,experts.down_proj
bash bench/device/ours_runs.sh "qwen3-30b-a3b 4 2048 offload cudnn --lora-dtype bfloat16 --embedding host --layers 8 --lora-targets $T" \
                               "qwen3-30b-a3b 4 2048 offload cudnn --lora-dtype bfloat16 --embedding host --lora-targets $T"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .anchors/wheels/*.whl
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 TOKENIZERS_PARALLELISM=false
rm -rf /tmp/anchor_fast_models/*
timeout 300 python bench/anchor_families.py --system unsloth --shape qwen3-30b-a3b --layers 8 --batch 4 --seq 2048 --steps 3 > $OUT/unsloth_moe.txt 2>&1
echo "unsloth qwen3-30b-a3b x8 rc=$?: $(grep '^{' $OUT/unsloth_moe.txt | tail -1 | cut -c1-400)"
tail -n 3 $OUT/unsloth_moe.txt | cut -c1-300
