#!/usr/bin/env bash
# Next session's device calls (one H100 unless named). Issue 28 is what is open: batch-1
# generation at <= 3.5 ms a token (4.90-5.05 on 2026-12-07's eleventh-session H100, with q/k/v
# and gate/up as one decode launch each, merged that day; 1,164 launches a token, 4.27 ms of
# kernels), the decode kernel >= 70% of the copy rate (1.57 TB/s in a model), the training
# kernels >= 95% of cuBLAS, H200 rows, the side-by-side with bnb + PEFT and Unsloth on today's
# main (`anchors`).
# First: `hplace` (carry [".work/hp"]), the branch decode-hplace built on the eleventh session's
# CPU (untimed, its compiled kernel unchecked): h goes from its A product into the decode kernel
# with no kernel between (7 slice-and-scale kernels a layer, 224 a token, gone). Its tree:
#   mkdir -p .work/hp && git archive HEAD | tar -x -C .work/hp \
#     && (cd .work/hp && patch -p1 < ../../bench/device/decode_hplace.patch)
# If its GPU tests pass and its rows beat main's, merge the branch (or apply the patch).
# A device session can end after one call (2026-12-06/07: starts failed for ~40 minutes at a
# time, and each refused start cost 15 s to 4 minutes of device time).
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=.
A="--model llama3-8b --short 8 --long 136 --repeats 3"  # 40 and 520 tokens cost the same a token (2026-12-06)
. bench/device/rows.sh  # row DIR WORKER [env...]
wheels() {  # the anchors' wheels (Unsloth, bitsandbytes, ...) into /tmp/site, as .anchors/run.sh does
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .anchors/wheels/*.whl && export PYTHONPATH=.:/tmp/site
}
case "$1" in
  hplace)  # ~6 min: the branch's GPU tests (the decode kernel's outputs compiled against the
           # references), then rows of main and it, twice, 136 tokens; no rows if a test fails
    (cd .work/hp && timeout 330 python -m pytest -q tests/test_kernels.py \
        -k "lora or decode or sharing_an_input" > $OUT/gpu_tests_hplace.txt 2>&1)
    echo "hplace: $(tail -1 $OUT/gpu_tests_hplace.txt)"
    if ! tail -1 $OUT/gpu_tests_hplace.txt | grep " passed" | grep -qv failed; then
      grep -m3 -E "^E  |^FAILED" $OUT/gpu_tests_hplace.txt | cut -c1-300; exit 1
    fi
    for i in 1 2; do row . ours:auto; row .work/hp ours:auto; done ;;
  hplace_profile)  # ~4 min: where the branch's token goes (kernels a token by name: h's 224
                   # slice-and-scale launches should be gone)
    (cd .work/hp && timeout 280 python bench/generate.py --model llama3-8b --short 8 --long 40 \
        --systems ours:auto --profile --json $OUT/generate_profile_hplace.json | tail -25) ;;
  graphs)  # ~5 min: the unrolled model under XLA's command buffers widened to the Mosaic kernel and
           # to the chunk's loop (2026-12-06 only the scanned one compiled in time: 8.53 against
           # 6.67 ms), beside the default flags
    row . ours:auto
    ROW_TIMEOUT=300 row . ours:auto XLA_FLAGS="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN --xla_gpu_graph_min_graph_size=1"
    ROW_TIMEOUT=300 row . ours:auto XLA_FLAGS="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL --xla_gpu_graph_min_graph_size=1" ;;
  tune_groups)  # ~3 min: the decode kernel alone, q/k/v and gate/up in one launch against one each
    timeout 250 python bench/kernels.py --tune decode_groups ;;
  anchors)  # ~6 min: the side-by-side: ours (unrolled and scanned), bnb + PEFT, Unsloth in one run
    wheels || exit 1
    timeout 500 python bench/generate.py --model llama3-8b --short 8 --long 40 --repeats 3 \
        --systems ours:auto,ours:scan,bnb,unsloth --json $OUT/generate_anchors.json 2>$OUT/generate_err.txt | tail -6 ;;
  profile)  # ~4 min: where an unrolled token's time goes (the kernels a token, by name)
    timeout 280 python bench/generate.py --model llama3-8b --short 8 --long 40 --systems ours:auto --profile \
        --json $OUT/generate_profile.json | tail -25 ;;
  lora_cost)  # ~2 min: what the adapters still cost a token (unrolled, r=64 against none)
    row . ours:auto; A="$A --rank 0" row . ours:auto ;;
  h200)  # (kind nvidia-h200, when no H100 is held) auto's training-kernel rule and generation on H200
    bash bench/device/ours_runs.sh "llama3-8b 4 2048 offload cudnn --lora-dtype bfloat16 --embedding host" \
                                   "llama3-8b 4 2048 offload cudnn --lora-dtype bfloat16 --embedding host --backend xla"
    timeout 200 python bench/generate.py --model llama3-8b --short 8 --long 40 --systems ours:auto,ours:scan | tail -3 ;;
  *) echo "usage: $0 hplace|hplace_profile|graphs|tune_groups|anchors|profile|lora_cost|h200"; exit 2 ;;
esac
