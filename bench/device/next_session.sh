#!/usr/bin/env bash
# Next session, call 1 (~6 min, H100): offload_prefetch on 4 layers (copy overlap from its trace), then the full 32 layers
# of ours (offload vs offload_prefetch) beside Unsloth at 4 x 2048, in one call.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name --format=csv,noheader
run() { tag=$1; shift; echo "== $tag"; timeout 90 python bench/step_profile.py --model llama3-8b --layers 4 --top 3 --json $OUT/$tag.json --trace /tmp/tr_$tag "$@" 2>$OUT/err_$tag.txt | grep -v "^  " | cut -c1-600; tail -2 $OUT/err_$tag.txt | grep -i error | cut -c1-300; }
run p2k_pf --batch 4 --seq 2048 --remat offload_prefetch
# (the 4-layer offload row of the same trace is in docs/results/diag3_h100/a2k_off.json;
#  bench/host_prefetch_probe.py isolates the pattern if the A/B needs explaining)
bash bench/device/ours_runs.sh "llama3-8b 4 2048 offload_prefetch cudnn --lora-dtype bfloat16 --embedding host" \
                           "llama3-8b 4 2048 offload cudnn --lora-dtype bfloat16 --embedding host"
bash .anchors/run.sh "--system unsloth --shape llama3-8b --batch 4 --seq 2048 --steps 3" 2>&1 | tail -2
# Call 2: CAP_GIB=24 bash bench/device/caps.sh "ours 98304 --remat offload_attention --mlp-chunk 4096 --lora-dtype bfloat16 --embedding host" "unsloth 65536"
# Call 3: bash bench/device/next_families.sh (issue 27's Qwen3-8B and Gemma-3-12B rows)
