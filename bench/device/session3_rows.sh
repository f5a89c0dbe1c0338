#!/usr/bin/env bash
# 2026-12-06, third session. Issue 25's no-regression rows (carry [".anchors"]):
#   bash bench/device/session3_rows.sh small   # llama3-1b beside Unsloth; the loss chunk at 1b and 8b
#   bash bench/device/session3_rows.sh large   # llama-65b 1 x 2048; Gemma-3-12B on the mask-free path
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=.
H="--lora-dtype bfloat16 --embedding host"
case "$1" in
  small)
    bash bench/device/ours_runs.sh "llama3-1b 4 2048 offload cudnn --lora-dtype bfloat16 --offload yes" \
                                   "llama3-1b 4 2048 offload cudnn --lora-dtype bfloat16 --offload yes --loss-chunk 256" \
                                   "llama3-8b 4 2048 offload cudnn $H" \
                                   "llama3-8b 4 2048 offload cudnn $H --loss-chunk 256"
    bash bench/device/unsloth_row.sh llama3-1b "--system unsloth --shape llama3-1b --batch 4 --seq 2048 --steps 3" ;;
  large)
    bash bench/device/ours_runs.sh "gemma3-12b 4 2048 offload auto --lora-dtype bfloat16" \
                                   "llama-65b 1 2048 full cudnn --lora-dtype bfloat16 --offload yes" ;;
esac
