#!/usr/bin/env bash
# Issue 27's Gemma-3-12B Unsloth row (cut off by the 600 s limit in call 1), then issue 25's
# per-kernel profile (XLA dequantize + cuBLAS against the fused 4-bit kernels) and the
# fused-projection probe, one call.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name --format=csv,noheader
( python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .anchors/wheels/*.whl
  export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 TOKENIZERS_PARALLELISM=false
  timeout 280 python bench/anchor_families.py --system unsloth --shape gemma3-12b --batch 4 --seq 2048 --steps 3 > $OUT/unsloth_gemma3-12b.txt 2>&1
  echo "unsloth gemma3-12b rc=$?: $(grep '^{' $OUT/unsloth_gemma3-12b.txt | tail -1 | cut -c1-300)" )
timeout 100 python bench/fused_projections_probe.py --tokens 8192 2>&1 | grep -v Warn | tail -3
for be in auto pallas; do
  timeout 90 python bench/step_profile.py --model llama3-8b --layers 4 --batch 4 --seq 2048 --remat offload --backend $be --top 30 --json $OUT/profile_$be.json > $OUT/profile_$be.txt 2>&1
  echo "profile $be rc=$?"; head -5 $OUT/profile_$be.txt
done
