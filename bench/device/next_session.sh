#!/usr/bin/env bash
# Next session's device calls (one H100 unless named; .anchors copied in, carry [".anchors", ".work/kv"]).
# Issue 28 is what is open: batch-1 generation at <= 3.5 ms a token (4.32 unrolled, 6.42 scanned on
# 2026-12-06), the decode kernel >= 70% of the copy rate, the training kernels >= 95% of cuBLAS.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=.
A="--model llama3-8b --short 8 --long 520 --repeats 3"   # a longer cache: the KV copies grow with it
case "$1" in
  kv)  # ~6 min: decode_kv_in_place.patch (each layer's keys/values written into the whole cache in
       # place; branch decode-kv-in-place) against main, unrolled and scanned. .work/kv (carried):
       #   mkdir -p .work/kv && git archive HEAD qlora_jax pallas_kernels bench | tar -x -C .work/kv \
       #     && (cd .work/kv && patch -p1 < ../../bench/device/decode_kv_in_place.patch)
    timeout 150 python bench/generate.py $A --worker ours:scan | grep '^{' | cut -c1-160
    (cd .work/kv && timeout 150 python bench/generate.py $A --worker ours:scan | grep '^{' | cut -c1-160)
    timeout 120 python bench/generate.py $A --worker ours:auto | grep '^{' | cut -c1-160
    (cd .work/kv && timeout 120 python bench/generate.py $A --worker ours:auto | grep '^{' | cut -c1-160) ;;
  lora_cost)  # ~3 min: what the adapters cost a token (unrolled, r=64 against none): the most that
       # folding the LoRA B products into the decode kernel's epilogue could save
    timeout 120 python bench/generate.py $A --worker ours:auto | grep '^{' | cut -c1-160
    timeout 120 python bench/generate.py $A --rank 0 --worker ours:auto | grep '^{' | cut -c1-160 ;;
  lora_epilogue)  # ~5 min: decode_lora_epilogue.patch (the decode kernel adds each layer's LoRA
       # update: no B product launched) on the GPU: its kernel tests, then generation against main.
       # .work/le (carried): mkdir -p .work/le && git archive HEAD | tar -x -C .work/le \
       #   && (cd .work/le && patch -p1 < ../../bench/device/decode_lora_epilogue.patch)
    (cd .work/le && timeout 200 python -m pytest -x -q tests/test_kernels.py -k "lora or decode" 2>&1 | tail -3)
    timeout 120 python bench/generate.py $A --worker ours:auto | grep '^{' | cut -c1-160
    (cd .work/le && timeout 120 python bench/generate.py $A --worker ours:auto | grep '^{' | cut -c1-160) ;;
  profile_scan)  # ~3 min: where the scanned model's extra 2 ms a token go (the per-layer weight slices
       # copied for the decode kernel's custom call? the profile names the copies)
    timeout 280 python bench/generate.py --model llama3-8b --short 8 --long 40 --systems ours:scan --profile \
        --json $OUT/generate_profile_scan.json | tail -25 ;;
  h200)  # (kind nvidia-h200, when no H100 is held) auto's training-kernel rule and generation on H200
    bash bench/device/ours_runs.sh "llama3-8b 4 2048 offload cudnn --lora-dtype bfloat16 --embedding host" \
                                   "llama3-8b 4 2048 offload cudnn --lora-dtype bfloat16 --embedding host --backend xla"
    timeout 200 python bench/generate.py --model llama3-8b --short 8 --long 40 --systems ours:auto,ours:scan | tail -3 ;;
  *) echo "usage: $0 kv|lora_cost|lora_epilogue|profile_scan|h200"; exit 2 ;;
esac
