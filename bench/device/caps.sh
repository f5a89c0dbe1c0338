#!/usr/bin/env bash
# usage: CAP_GIB=24 bash bench/device/caps.sh "ours SEQ [train_step flags]" "unsloth SEQ" ...
# Each run under a device-memory cap: XLA_PYTHON_CLIENT_MEM_FRACTION for ours, torch's
# set_per_process_memory_fraction (through a sitecustomize on PYTHONPATH) for Unsloth.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
TOTAL_MIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
FRAC=$(python -c "print(round($CAP_GIB * 1024 / $TOTAL_MIB, 4))")
echo "cap $CAP_GIB GiB of $TOTAL_MIB MiB: fraction $FRAC"
mkdir -p /tmp/site
cat > /tmp/site/sitecustomize.py <<'P'
import os
if os.environ.get("TORCH_MEM_FRACTION"):
    import torch
    torch.cuda.set_per_process_memory_fraction(float(os.environ["TORCH_MEM_FRACTION"]))
P
for spec in "$@"; do
  set -- $spec
  sys=$1; seq=$2; shift 2
  if [ "$sys" = ours ]; then
    line=$(XLA_PYTHON_CLIENT_PREALLOCATE=true XLA_PYTHON_CLIENT_MEM_FRACTION=$FRAC timeout 420 python bench/train_step.py --model llama3-8b --batch 1 --seq $seq --attention cudnn --steps 0 "$@" 2>$OUT/cap_err_ours_$seq.txt | grep '^{')
    if [ -n "$line" ]; then echo "$line" | python -c "import json,sys; r=json.loads(sys.stdin.read()); r['cap_gib']=$CAP_GIB; print(json.dumps(r))" >> $OUT/caps.jsonl; echo "ours $seq OK $(echo $line | python -c 'import json,sys; r=json.loads(sys.stdin.read()); print(round(r["tokens_per_s"]), round(r["peak_gib"],2))')";
    else echo "ours $seq FAILED"; grep -i -m2 "resource\|memory" $OUT/cap_err_ours_$seq.txt | cut -c1-300; fi
  else
    OUT2=$OUT/unsloth_$seq; mkdir -p $OUT2
    OUT=$OUT2 TORCH_MEM_FRACTION=$FRAC PER_RUN_TIMEOUT=420 bash -c 'bash .anchors/run.sh "--system unsloth --shape llama3-8b --batch 1 --seq '$seq' --steps 1 --warmup 1"' > $OUT2/stdout.txt 2>&1
    echo "unsloth $seq: $(tail -1 $OUT2/anchor_fast.jsonl | cut -c1-400)"
  fi
done
