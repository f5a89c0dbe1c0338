#!/usr/bin/env bash
# Next session's device calls (one H100 unless named; .anchors copied in, carry [".anchors"]).
# Since 2026-12-06 (third session) `auto` takes the fused training kernels for weights with
# >= 4096 in-features on one Hopper device; only llama3-8b 4 x 2048 was measured that way.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=.
H="--lora-dtype bfloat16 --embedding host"
case "$1" in
  h100)  # ~8 min: the new auto on the rows measured before it, each against --backend xla
    bash bench/device/ours_runs.sh "llama3-1b 4 2048 full cudnn --lora-dtype bfloat16 --offload yes" \
                                   "llama3-1b 4 2048 full cudnn --lora-dtype bfloat16 --offload yes --backend xla" \
                                   "qwen3-8b 4 2048 offload cudnn $H" \
                                   "gemma3-12b 4 2048 offload auto --lora-dtype bfloat16" \
                                   "gemma3-12b 4 2048 offload auto --lora-dtype bfloat16 --backend xla"
    bash bench/device/unsloth_row.sh llama3-1b "--system unsloth --shape llama3-1b --batch 4 --seq 2048 --steps 3" ;;
  h200)  # ~4 min (run with kind nvidia-h200): issue 28 asks for the rule on H200 too
    bash bench/device/ours_runs.sh "llama3-8b 4 2048 offload cudnn $H" "llama3-8b 4 2048 offload cudnn $H --backend xla" ;;
  gemma_memory)  # ~3 min: what XLA keeps at Gemma-3-12B's peak (the estimate misses 1.2 GiB: tests/test_sharding.py)
    XLA_FLAGS="--xla_dump_to=/tmp/dump --xla_dump_hlo_as_text" \
      timeout 300 python bench/step_memory.py --model gemma3-12b --batch 4 --seq 2048 --remat offload --attention cudnn \
      | tail -3
    f=$(ls -S /tmp/dump/*buffer-assignment* | head -1); echo "$f"; head -c 4000000 "$f" > $OUT/gemma3_buffer_assignment.txt ;;
  *) echo "usage: $0 h100|h200|gemma_memory"; exit 2 ;;
esac
