#!/usr/bin/env bash
# Issue 28's decode: batch-1 llama3-8b generation with XLA's command buffers (CUDA graphs) widened
# to the whole decode chunk (custom calls = the Mosaic decode kernel, while loops, cuDNN) against
# the default flags, one call, same machine. ~2 ms of gaps between ~1,100 launches a token is
# what a graph would remove.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name --format=csv,noheader
CB="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL --xla_gpu_graph_min_graph_size=1"
for run in "default|ours:auto" "graphs|ours:auto" "graphs|ours:scan" "default|ours:scan"; do
  name=${run%%|*}; sys=${run#*|}; flags=""; [ $name = graphs ] && flags="$CB"
  for _ in 1; do
    XLA_FLAGS="$flags" timeout 150 python bench/generate.py --model llama3-8b --systems $sys --repeats 3 --json $OUT/gen_${name}_${sys#ours:}.json > $OUT/gen_${name}_${sys#ours:}.txt 2>&1
    echo "$name $sys rc=$? $(grep -i 'ms' $OUT/gen_${name}_${sys#ours:}.txt | grep -v Warn | tail -2 | tr '\n' ' ' | cut -c1-300)"
  done
done
