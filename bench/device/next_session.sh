#!/usr/bin/env bash
# Next session's device calls (one H100 unless named). Issue 28 is what is open: batch-1
# generation at <= 3.5 ms a token (3.70 in generate.py's row beside Unsloth's 43.17 and bnb +
# PEFT's 91.20, 3.88 in variants.py's chunk timing, 2026-12-07's fourteenth-session H100s; 27
# kernels a layer, 4 of them decode launches at 3.8 µs each + 2.05 TB/s; since then the pre-norms
# after the products, -1.5% as a variant in the sixteenth session), the decode kernel >= 70% of the
# copy rate, the training kernels >= 95% of cuBLAS, H200 rows (`h200`: a call asked as nvidia-h200
# may still get an H100). First: `model` (the attention kernel's first GPU compile and its A/B in
# the model); a change's A/B through bench/device/variants.py (a variant that changes the kernel
# must change its static Config, never a module flag: decode_group's trace is cached). Before a
# call, lower the kernels with the device's JAX on CPU (a venv of jax/jaxlib 0.11.2 for Python
# 3.12: `pip download` them; tests/test_kernels.py -k "lowers or decoding_chunk" runs there).
# If fused_attention wins at 256 and 8,192 slots: branch decode-attention-auto makes it generation's
# attention on a Hopper GPU (attend's "decode", the cache in whole 64-slot blocks; CPU-tested,
# rebased on the seventeenth session's main): merge it, then time base (now the kernel) against
# the XLA attention in one process. If reduce_lora_a_parts wins: branch decode-h-reduce is its
# library form (one-row A products as reductions, qmatmul_group takes the h_i apart with their
# gradients; CPU-tested): merge it. If pdl wins: make Config.pdl's default True.
# Launch structure without a GPU, before a call: bench/device/launches.py (kernels a layer).
# Not worth another call (measured 2026-12-07): prefetching a launch's weights into L2 (1-12%
# a launch at best), the LoRA h in K-slices (+4%), XLA's split-K off (no such option), graphs
# (the step is one command buffer already).
# A device session can end after one call (2026-12-06/07: starts failed for ~40 minutes at a
# time, and each refused start cost 15 s to 5 minutes of device time).
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=.
A="--model llama3-8b --short 8 --long 136 --repeats 3"  # 40 and 520 tokens cost the same a token (2026-12-06)
. bench/device/rows.sh  # row DIR WORKER [env...]
wheels() {  # the anchors' wheels (Unsloth, bitsandbytes, ...) into /tmp/site, as .anchors/run.sh does
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .anchors/wheels/*.whl && export PYTHONPATH=.:/tmp/site
}
case "$1" in
  model)  # ~9 min, first: the decode GPU tests (the attention kernel's first GPU compile: on
           # 2026-12-07 JAX 0.11.2's layout inference refused q's TMA copy at a row offset of 4,
           # fixed; it now lowers with 0.11.2 from CPU; the pre-norm after the products: the
           # sharing test's norm cases; each h_i apart), then in the model (one process,
           # alternated): base (the pre-norms after the products: -1.5% against before, as the
           # sixteenth session measured), fused_attention, reduce_lora_a_parts
           # (each one-row LoRA A product a multiply-reduction, each h_i read by the decode kernel
           # as an array of its own, not a GEMM and its split-K reduction) and pdl (the decode
           # kernel as a programmatic dependent launch), norm_in_launch_parts (the pre-norm's
           # 1 / rms reduced inside the decode launch too). Kernels a layer compiled for an H100
           # on CPU (bench/device/launches.py): base 26, fused_attention 23, reduce_lora_a_parts
           # 23, with norm_in_launch_parts 21, all three 19 (620 a token against 843); pdl
           # launches as many
    timeout 150 python -m pytest -q tests/test_kernels.py -k "decode_attention or sharing or group_computes" 2>&1 | tail -3
    timeout 420 python bench/device/variants.py base fused_attention reduce_lora_a_parts pdl \
        reduce_lora_a_parts+norm_in_launch_parts fused_attention+reduce_lora_a_parts+norm_in_launch_parts+pdl \
        --slots 256 --rounds 4 --profile 2>&1 | grep -v -i warn | tail -16 ;;
  long)  # ~3 min: the attention kernel at a long context (8,192 slots: attention reads every slot)
    timeout 170 python bench/device/variants.py base fused_attention --slots 8192 --rounds 3 2>&1 | grep -v -i warn | tail -3 ;;
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
