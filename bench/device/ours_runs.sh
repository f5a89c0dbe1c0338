#!/usr/bin/env bash
# usage: bash bench/device/ours_runs.sh "MODEL BATCH SEQ REMAT ATTN [extra]" ...
export XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name --format=csv,noheader
python -c "import jax; print('jax', jax.__version__)"
for spec in "$@"; do
  set -- $spec
  m=$1; b=$2; s=$3; r=$4; a=$5; shift 5
  line=$(timeout 240 python bench/train_step.py --model $m --batch $b --seq $s --remat $r --attention $a --steps 3 "$@" 2>$OUT/err_${m}_${b}_${s}_${r}_${a}.txt | grep '^{')
  if [ -n "$line" ]; then echo "$line" >> $OUT/ours.jsonl; echo "$line" | python -c "import json,sys; r=json.loads(sys.stdin.read()); print(r['model'], r['batch'], r['seq'], r['remat'], r['attention'], r['lora_dtype'], r['offload'], r['backend'], round(r['tokens_per_s']), round(r['peak_gib'],2), round(r['first_step_s'],1))";
  else echo "FAILED $spec"; tail -3 $OUT/err_${m}_${b}_${s}_${r}_${a}.txt; fi
done
