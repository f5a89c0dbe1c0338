#!/usr/bin/env bash
# Next session's device calls (one H100 unless named). Issue 28 is what is open: batch-1
# generation at <= 3.5 ms a token (2026-12-08, eighteenth session, one H100: base 3.76, the
# attention kernel with a dependent launch 3.72 in variants.py's chunk timing; 3.70 in
# generate.py's row beside Unsloth's 43.17 on the fourteenth session's machine), the decode kernel
# >= 70% of the copy rate (~51% in the model: 2.28 ms of decode launches a token for ~3.5 GB), the
# training kernels >= 95% of cuBLAS, H200 rows (`h200`: a call asked as nvidia-h200 may still get
# an H100). First: `git checkout decode-launch-cuts` here (the device runs this checkout), then
# `model`: that branch's two launch cuts against main's paths in one process (generation's LoRA A
# copies as A^T, a one-row A product one row reduction instead of a split-K GEMM and its
# reduction; the pre-norm's 1 / rms reduced inside the decode launch): 17 kernels a layer against
# main's 23, counted deviceless. Merge what wins (variant a_columns / norm_after put main's path
# back; each cut is its own commit on the branch), then `anchors` on the merged tree. A change's
# A/B through bench/device/variants.py (a variant that changes the kernel must change its static
# Config, never a module flag: decode_group's trace is cached).
# Before a call, lower the kernels with the device's JAX on CPU (bench/device/lower_check.sh).
# Launch structure without a GPU: bench/device/launches.py (kernels a layer: base 23 now).
# Not worth another call (measured): prefetching a launch's weights into L2 (1-12% a launch at
# best), the LoRA h in K-slices (+4%), graphs (the step is one command buffer already), the
# decode kernel as a dependent launch (Config.pdl: +0.5%, 2026-12-08), one-row A products as
# XLA column reductions over A [K, r] (+40%: ~30 µs each, 2026-12-08).
# A device session can end after one call (starts fail for long stretches; each refused start
# costs 15 s to 3 minutes of device time; the machine goes back 30 s after a call).
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=.
A="--model llama3-8b --short 8 --long 136 --repeats 3"  # 40 and 520 tokens cost the same a token (2026-12-06)
. bench/device/rows.sh  # row DIR WORKER [env...]
wheels() {  # the anchors' wheels (Unsloth, bitsandbytes, ...) into /tmp/site, as .anchors/run.sh does
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .anchors/wheels/*.whl && export PYTHONPATH=.:/tmp/site
}
case "$1" in
  model)  # ~8 min, on branch decode-launch-cuts: the decode GPU tests, then in the model (one
           # process, alternated): base (both cuts), a_columns (A [K, r]: split-K GEMM + reduction),
           # norm_after (the 1 / rms by XLA after the launch), both (main's paths). Kernels a
           # layer counted deviceless: 17, 21, 19, 23. The one-row A products as XLA column
           # reductions over A [K, r] cost ~30 µs each (2026-12-08): watch input_reduce_fusion
    grep -q "def a_columns" bench/device/variants.py || { echo "check out branch decode-launch-cuts first"; exit 2; }
    timeout 240 python -m pytest -q tests/test_kernels.py -k "decode_attention or sharing or group_computes" 2>&1 | tail -3
    timeout 330 python bench/device/variants.py base a_columns norm_after a_columns+norm_after \
        --slots 256 --rounds 4 --profile 2>&1 | grep -v -i warn | tail -8 ;;
  long)  # ~3 min: the attention kernel at a long context (8,192 slots: attention reads every slot)
    timeout 170 python bench/device/variants.py base xla_attention --slots 8192 --rounds 3 2>&1 | grep -v -i warn | tail -3 ;;
  attention)  # ~2 min: the attention kernel alone against XLA's at 256-8,192 slots (CUPTI)
    timeout 150 python bench/device/attention_ab.py 2>&1 | grep -v -i warn | tail -6 ;;
  l2)  # ~2 min: a decode launch's kernel time, tables first or under the pipeline, L2-warm or cold
    timeout 150 python bench/device/l2_warm.py 2>&1 | grep -v -i warn | tail -5 ;;
  dump)  # ~1 min: the optimized HLO and thunk sequence of a 2-layer chunk (which fusions a layer runs)
    XLA_FLAGS="--xla_dump_to=/tmp/dump --xla_dump_hlo_as_text" \
      timeout 100 python bench/device/variants.py base --layers 2 --rounds 1 2>&1 | grep -v -i warn | tail -2
    mkdir -p $OUT/dump && cp $(ls -S /tmp/dump/*after_optimizations.txt | head -2) $(ls -S /tmp/dump/*thunk* | head -2) $OUT/dump/ 2>/dev/null; ls $OUT/dump ;;
  check)  # ~1 min: generation's decode path at llama3-8b's widths against XLA's (exit 1 past 5%)
    timeout 150 python bench/device/decode_check.py ;;
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
  *) echo "usage: $0 model|long|attention|l2|dump|check|tune_groups|anchors|profile|lora_cost|h200"; exit 2 ;;
esac
