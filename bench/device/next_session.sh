#!/usr/bin/env bash
# Next session's device calls (one H100 unless named; carry [".work/bf16kv", ".anchors"]).
# Issue 28 is what is open: batch-1 generation at <= 3.5 ms a token, the decode kernel >= 70% of
# the copy rate (2,165 GB/s of 3,030 on 22016 x 8192 on 2026-12-06; 58-61% on llama3-8b's
# shapes), the training kernels >= 95% of cuBLAS. Main now has the LoRA epilogue and the in-place
# KV cache held as integer bits (the bf16 in-place write was timed on the GPU, the integer one
# not). `.work/bf16kv` is that timed tree (46bb297, main with the epilogue, plus the bf16
# in-place patch) for the A/B:
#   mkdir -p .work/bf16kv && git archive 46bb297 | tar -x -C .work/bf16kv \
#     && (cd .work/bf16kv && patch -p1 < ../../bench/device/decode_kv_in_place.patch)
# A device session can end after one call (2026-12-06: starts failed for ~40 minutes twice, and a
# start took ~9 of the 30 minutes): `all` is that one call, the most telling rows first.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=.
A="--model llama3-8b --short 8 --long 520 --repeats 3"   # a longer cache: the KV copies grow with it
row() {  # row DIR WORKER [env...]: one fresh worker's JSON row, cut, with its wall time
  local d=$1 w=$2; shift 2
  (cd "$d" && SECONDS=0 && env "$@" timeout 200 python bench/generate.py $A --worker "$w" 2>>$OUT/errors.txt \
     | grep '^{' | tee -a $OUT/rows.jsonl | cut -c1-150; echo "  ($d $w $* ${SECONDS}s)")
}
wheels() {  # the anchors' wheels (Unsloth, bitsandbytes, ...) into /tmp/site, as .anchors/run.sh does
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .anchors/wheels/*.whl && export PYTHONPATH=.:/tmp/site
}
case "$1" in
  all)  # ~8 min: the GPU tests of the epilogue and of the in-place cache (integer bits: does
        # XLA:GPU keep the write in place?), then main against the timed bf16 tree, unrolled and
        # scanned, and main at a short run (what the cache's length costs a token)
    timeout 150 python -m pytest -x -q tests/test_kernels.py tests/test_model.py -k "lora or decode or in_place" \
        > $OUT/gpu_tests.txt 2>&1; tail -1 $OUT/gpu_tests.txt
    row . ours:auto; row .work/bf16kv ours:auto; row . ours:scan; row .work/bf16kv ours:scan
    A="--model llama3-8b --short 8 --long 40 --repeats 3" row . ours:auto
    row . ours:auto ;;
  anchors)  # ~6 min: the side-by-side: ours (unrolled and scanned), bnb + PEFT, Unsloth in one run
    wheels || exit 1
    timeout 500 python bench/generate.py --model llama3-8b --short 8 --long 40 --repeats 3 \
        --systems ours:auto,ours:scan,bnb,unsloth --json $OUT/generate_anchors.json 2>$OUT/generate_err.txt | tail -6 ;;
  profile)  # ~4 min: where an unrolled token's time goes now (the kernels a token, by name)
    timeout 280 python bench/generate.py --model llama3-8b --short 8 --long 40 --systems ours:auto --profile \
        --json $OUT/generate_profile.json | tail -25 ;;
  lora_cost)  # ~2 min: what the adapters still cost a token (unrolled, r=64 against none)
    row . ours:auto; A="$A --rank 0" row . ours:auto ;;
  h200)  # (kind nvidia-h200, when no H100 is held) auto's training-kernel rule and generation on H200
    bash bench/device/ours_runs.sh "llama3-8b 4 2048 offload cudnn --lora-dtype bfloat16 --embedding host" \
                                   "llama3-8b 4 2048 offload cudnn --lora-dtype bfloat16 --embedding host --backend xla"
    timeout 200 python bench/generate.py --model llama3-8b --short 8 --long 40 --systems ours:auto,ours:scan | tail -3 ;;
  *) echo "usage: $0 all|anchors|profile|lora_cost|h200"; exit 2 ;;
esac
