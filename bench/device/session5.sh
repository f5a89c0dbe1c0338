#!/usr/bin/env bash
# Fifth session's device calls (H100; carry [".anchors", ".work/le", ".work/kv"]). See next_session.sh
# for what each step measures.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=.
A="--model llama3-8b --short 8 --long 520 --repeats 3"
B="--model llama3-8b --short 8 --long 72 --repeats 3"
case "$1" in
  le)  # the LoRA-epilogue decode kernel against main (unrolled), its GPU tests; then scanned with
       # and without XLA's dynamic-slice fusion (the layer's weight slices copied for the decode
       # kernel's custom call: the suspected cause of scanned being 1.5x slower)
    for d in .work/le .; do
      (cd $d && SECONDS=0 && timeout 130 python bench/generate.py $B --worker ours:auto 2>>$OUT/le_gen_err.txt | grep '^{' | cut -c1-150; echo "$d ${SECONDS}s")
    done
    (cd .work/le && timeout 80 python -m pytest -x -q tests/test_kernels.py -k "lora or decode" > $OUT/le_tests.txt 2>&1; tail -2 $OUT/le_tests.txt)
    timeout 100 python bench/generate.py $B --worker ours:scan 2>/dev/null | grep '^{' | cut -c1-150
    XLA_FLAGS=--xla_gpu_enable_dynamic_slice_fusion=true timeout 100 python bench/generate.py $B --worker ours:scan 2>&1 | grep '^{\|Error' | cut -c1-150 ;;
  ab)  # the A/B alone (a short device budget): patch, main, patch
    for d in .work/le . .work/le; do
      (cd $d && SECONDS=0 && timeout 110 python bench/generate.py $B --worker ours:auto 2>>$OUT/le_gen_err.txt | grep '^{' | cut -c1-150; echo "$d ${SECONDS}s")
    done ;;
  kv)
    bash bench/device/next_session.sh kv ;;
  profile_scan)
    bash bench/device/next_session.sh profile_scan ;;
  *) echo "usage: $0 le|kv|profile_scan"; exit 2 ;;
esac
