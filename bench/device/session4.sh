#!/usr/bin/env bash
# This session's device calls (2026-12-06, fourth session; .anchors copied in, carry [".anchors"]).
#   rules_h100   ~6 min, one H100: `auto` (the fused training kernels for in-features >= 4096 on
#                one Hopper device) against `--backend xla` on llama3-1b, Qwen3-8B, Gemma-3-12B
#   rules_h200   (kind nvidia-h200) the same rule on llama3-8b, and batch-1 generation, ours only
#                (ran on the warm H100 this session: a call may take the machine it holds)
#   generate     one H100: batch-1 generation of llama3-8b, ours beside transformers + bnb + PEFT
#                and Unsloth's for_inference generate (bench/generate.py); with --profile it ran
#                past the call's limit after ours:auto (the unrolled model's CUPTI pass is slow)
#   generate_ab  the same with short generations, ours before and after, no profile (~4 min)
#   compile      ours scanned and unrolled, first-call (compile) time and speed (~4 min)
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=.
H="--lora-dtype bfloat16 --embedding host"
wheels() {  # the anchors' wheels (Unsloth, bitsandbytes, ...) into /tmp/site, as .anchors/run.sh does
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .anchors/wheels/*.whl && export PYTHONPATH=.:/tmp/site
}
case "$1" in
  rules_h100)
    bash bench/device/ours_runs.sh "llama3-1b 4 2048 full cudnn --lora-dtype bfloat16 --offload yes" \
                                   "llama3-1b 4 2048 full cudnn --lora-dtype bfloat16 --offload yes --backend xla" \
                                   "qwen3-8b 4 2048 offload cudnn $H" \
                                   "qwen3-8b 4 2048 offload cudnn $H --backend xla" \
                                   "gemma3-12b 4 2048 offload auto --lora-dtype bfloat16" \
                                   "gemma3-12b 4 2048 offload auto --lora-dtype bfloat16 --backend xla" ;;
  rules_h200)
    bash bench/device/ours_runs.sh "llama3-8b 4 2048 offload cudnn $H" "llama3-8b 4 2048 offload cudnn $H --backend xla"
    timeout 150 python bench/generate.py --model llama3-8b --short 8 --long 40 --systems ours:scan --json $OUT/generate_h200.json | tail -2 ;;
  generate)
    wheels || exit 1
    timeout 580 python bench/generate.py --model llama3-8b --systems ours:auto,ours:scan,bnb,unsloth --profile \
        --json $OUT/generate_llama3-8b_h100.json 2>$OUT/generate_err.txt | tail -8 ;;
  generate_ab)  # ours:scan before this session's generation changes and after; bnb; Unsloth. .work/old (carried):
    # mkdir -p .work/old && git archive a8d095a qlora_jax pallas_kernels bench | tar -x -C .work/old
    wheels || exit 1
    A="--model llama3-8b --short 8 --long 40 --repeats 3"
    (cd .work/old && PYTHONPATH=. timeout 150 python bench/generate.py $A --systems ours:scan --json $OUT/generate_before.json 2>/dev/null | tail -1)
    timeout 400 python bench/generate.py $A --systems ours:scan,bnb,unsloth --json $OUT/generate_llama3-8b_h100.json 2>$OUT/generate_err.txt | tail -5 ;;
  compile)  # the first generation call (compile + prefill + 40 tokens), scanned layers and unrolled
    A="--model llama3-8b --short 8 --long 40 --repeats 3"
    timeout 150 python bench/generate.py $A --worker ours:scan | grep '^{' | tee -a $OUT/generate_compile.jsonl | cut -c1-200
    timeout 280 python bench/generate.py $A --worker ours:auto | grep '^{' | tee -a $OUT/generate_compile.jsonl | cut -c1-200
    echo "rc $?" ;;
  *) echo "usage: $0 rules_h100|rules_h200|generate"; exit 2 ;;
esac
