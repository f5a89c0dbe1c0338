#!/usr/bin/env bash
# Next session, call 1 (~7 min, H100): issue 27's and 29's Unsloth rows that the 2026-12-06 calls
# could not take (Gemma-3-12B: the device's disk filled; Qwen3-30B-A3B: the anchors' check refused
# the MoE workload, now checked by bench/anchor_families.py), with ours again beside them.
bash bench/device/moe_row.sh
bash bench/device/next_families.sh
# Call 2 (issue 25): where the non-GEMM time of a 4 x 2048 step goes (kernels by name, fused
# 4-bit kernels against XLA's dequantize + cuBLAS):
#   python bench/step_profile.py --model llama3-8b --layers 4 --batch 4 --seq 2048 --remat offload --top 40
#   python bench/step_profile.py --model llama3-8b --layers 4 --batch 4 --seq 2048 --remat offload --backend pallas --top 40
#   python bench/fused_projections_probe.py --tokens 8192   # one GEMM per shared input: worth building?
# Call 3 (issue 30): bash bench/device/pretrain_quality.sh pretrain, then at once
#   bash bench/device/pretrain_quality.sh quality (same warm machine).
