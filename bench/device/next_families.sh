#!/usr/bin/env bash
# Issue 27's device rows: ours and Unsloth on the Qwen3-8B and Gemma-3-12B shapes, one call.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name --format=csv,noheader
bash bench/device/ours_runs.sh "qwen3-8b 4 2048 offload cudnn --lora-dtype bfloat16 --embedding host" "gemma3-12b 4 2048 offload cudnn --lora-dtype bfloat16"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .anchors/wheels/*.whl
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 TOKENIZERS_PARALLELISM=false
for shape in qwen3-8b gemma3-12b; do
  rm -rf /tmp/anchor_fast_models/*  # one bf16 model on the device's disk at a time (64 GiB)
  timeout 240 python bench/anchor_families.py --system unsloth --shape $shape --batch 4 --seq 2048 --steps 3 > $OUT/unsloth_$shape.txt 2>&1
  echo "unsloth $shape rc=$?: $(grep '^{' $OUT/unsloth_$shape.txt | tail -1 | cut -c1-400)"
  tail -n 3 $OUT/unsloth_$shape.txt | cut -c1-300
done
