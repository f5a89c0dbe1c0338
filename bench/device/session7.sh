#!/usr/bin/env bash
# Issue 28, 2026-12-06 (seventh session): the calls behind docs/results/h100_2026-12-06g/ (one H100).
#   call 1: bash bench/device/next_session.sh all       (carry [".work/bf16kv"])
#   call 2: bash bench/device/next_session.sh profile
#   call 3: bash bench/device/session7.sh h_rows        (carry [".work/hrows", ".work/head", ".work/c4"])
# Call 3's trees, built from a checkout that has this script:
#   mkdir -p .work/head .work/hrows .work/c4
#   git archive 8f6996a | tar -x -C .work/head                  # main before this session
#   git archive 8f6996a | tar -x -C .work/hrows && (cd .work/hrows && patch -p1 < ../../bench/device/decode_h_rows.patch)
#   git archive 51c3702 | tar -x -C .work/c4 && cp qlora_jax/testing.py .work/c4/qlora_jax/   # 4th session's tree
# decode_h_rows.patch: a one-row LoRA h computed in the decode kernel's 16 rows (copies of the row)
# so that no pad kernel runs between the A product and the kernel; timed equal to main, dropped.
# .work/c4 is the tree that gave 4.32 ms a token on 2026-12-06's fourth-session machine (with
# today's random_model, which builds the same weights faster): code or machine?
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=.
nvidia-smi --query-gpu=name --format=csv,noheader
A="--model llama3-8b --short 8 --long 40 --repeats 5"
ROW_TIMEOUT=120; . bench/device/rows.sh  # row DIR WORKER
case "$1" in
  h_rows)  # ~7.5 min: the patch's GPU tests, then hrows / head / c4 twice, interleaved
    (cd .work/hrows && timeout 150 python -m pytest -x -q tests/test_kernels.py -k "lora or decode" > $OUT/gpu_tests.txt 2>&1); tail -1 $OUT/gpu_tests.txt
    row .work/hrows ours:auto; row .work/head ours:auto; row .work/c4 ours:auto
    row .work/hrows ours:auto; row .work/c4 ours:auto; row .work/head ours:auto ;;
  *) echo "usage: $0 h_rows"; exit 2 ;;
esac
