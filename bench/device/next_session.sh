#!/usr/bin/env bash
# Next session's device calls (one H100 unless named; carry [".work/le", ".work/kv", ".work/both"], and
# ".anchors" for h200). Issue 28 is what is open: batch-1 generation at <= 3.5 ms a token (4.32
# unrolled, 6.42 scanned on 2026-12-06), the decode kernel >= 70% of the copy rate, the training
# kernels >= 95% of cuBLAS. Build the two patched trees first (both carried):
#   mkdir -p .work/le .work/kv && git archive HEAD | tar -x -C .work/le \
#     && (cd .work/le && patch -p1 < ../../bench/device/decode_lora_epilogue.patch) \
#     && git archive HEAD | tar -x -C .work/kv \
#     && (cd .work/kv && patch -p1 < ../../bench/device/decode_kv_in_place.patch) \
#     && cp -r .work/le .work/both && (cd .work/both && patch -p1 < ../../bench/device/decode_kv_in_place.patch)
# A device session can end after one call (2026-12-06: 6 of 30 minutes ran, the rest went to
# starts that did not come): `all` is that one call, the most telling rows first.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=.
A="--model llama3-8b --short 8 --long 520 --repeats 3"   # a longer cache: the KV copies grow with it
row() {  # row DIR WORKER [env...]: one fresh worker's JSON row, cut, with its wall time
  local d=$1 w=$2; shift 2
  (cd "$d" && SECONDS=0 && env "$@" timeout 200 python bench/generate.py $A --worker "$w" 2>>$OUT/errors.txt \
     | grep '^{' | tee -a $OUT/rows.jsonl | cut -c1-150; echo "  ($d $w $* ${SECONDS}s)")
}
case "$1" in
  all)  # ~8 min: main, the LoRA epilogue, the in-place KV cache, both patches (unrolled); main
        # again (the call's drift)
    (cd .work/le && timeout 100 python -m pytest -x -q tests/test_kernels.py -k "lora or decode" > $OUT/le_tests.txt 2>&1; tail -1 $OUT/le_tests.txt)
    # the GPU's compiled decoding chunk: no copy or re-stack of the whole cache (XLA:GPU fuses on its own terms)
    (cd .work/kv && timeout 100 python -m pytest -x -q tests/test_model.py -k in_place > $OUT/kv_tests.txt 2>&1; tail -1 $OUT/kv_tests.txt)
    row . ours:auto; row .work/le ours:auto; row .work/kv ours:auto; row .work/both ours:auto
    row . ours:auto ;;
  scan)  # ~5 min: scanned with and without XLA's dynamic-slice fusion (the layers' weight slices
         # copied for the decode kernel's custom call, the suspected 2 ms a token), both patches
    row . ours:scan; row . ours:scan XLA_FLAGS=--xla_gpu_enable_dynamic_slice_fusion=true
    row .work/both ours:scan; row . ours:scan ;;
  tune_decode)  # ~4 min: the decode kernel alone per configuration, now with one compute warpgroup
       # a CTA and two CTAs an SM (each warpgroup its own pipeline: the copy-rate lever
       # docs/kernels.md names); then the generation row again if one wins (set it in config_for)
    timeout 500 python bench/kernels.py --tune decode 2>&1 | grep -v "^qlora_jax" | tee $OUT/tune_decode.txt ;;
  kv)  # ~3 min: the in-place KV cache scanned (`all` times it unrolled)
    row . ours:scan; row .work/kv ours:scan ;;
  lora_cost)  # ~2 min: what the adapters cost a token (unrolled, r=64 against none): the most that
       # folding the LoRA B products into the decode kernel could save
    row . ours:auto; A="$A --rank 0" row . ours:auto ;;
  profile_scan)  # ~3 min: where the scanned model's extra 2 ms a token go (the per-layer weight slices
       # copied for the decode kernel's custom call? the profile names the copies)
    timeout 280 python bench/generate.py --model llama3-8b --short 8 --long 40 --systems ours:scan --profile \
        --json $OUT/generate_profile_scan.json | tail -25 ;;
  h200)  # (kind nvidia-h200, when no H100 is held) auto's training-kernel rule and generation on H200
    bash bench/device/ours_runs.sh "llama3-8b 4 2048 offload cudnn --lora-dtype bfloat16 --embedding host" \
                                   "llama3-8b 4 2048 offload cudnn --lora-dtype bfloat16 --embedding host --backend xla"
    timeout 200 python bench/generate.py --model llama3-8b --short 8 --long 40 --systems ours:auto,ours:scan | tail -3 ;;
  *) echo "usage: $0 all|scan|tune_decode|kv|lora_cost|profile_scan|h200"; exit 2 ;;
esac
