#!/usr/bin/env bash
export XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name --format=csv,noheader
run() { tag=$1; shift; echo "== $tag"; timeout 150 python bench/step_profile.py --model llama3-8b --layers 4 --top 4 --json $OUT/$tag.json --trace /tmp/tr_$tag "$@" 2>$OUT/err_$tag.txt | grep -v "^  " ; tail -2 $OUT/err_$tag.txt | grep -i error; }
LHS=--xla_gpu_enable_latency_hiding_scheduler=true
run a2k_off --batch 4 --seq 2048 --remat offload --hlo $OUT/a2k_off.hlo
run c2k_full --batch 4 --seq 2048 --remat full
XLA_FLAGS=$LHS run b2k_off_lhs --batch 4 --seq 2048 --remat offload
run h2k_off_u2 --batch 4 --seq 2048 --remat offload --scan-unroll 2 --hlo $OUT/h2k_off_u2.hlo
XLA_FLAGS=$LHS run i2k_off_u2_lhs --batch 4 --seq 2048 --remat offload --scan-unroll 2
XLA_FLAGS="$LHS --xla_gpu_enable_while_loop_double_buffering=true" run f2k_off_db --batch 4 --seq 2048 --remat offload
run d32k_oa --batch 1 --seq 32768 --remat offload_attention --mlp-chunk 4096
run j32k_oa_u2 --batch 1 --seq 32768 --remat offload_attention --mlp-chunk 4096 --scan-unroll 2
XLA_FLAGS=$LHS run e32k_oa_lhs --batch 1 --seq 32768 --remat offload_attention --mlp-chunk 4096
