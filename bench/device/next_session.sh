#!/usr/bin/env bash
# Next session's device calls (one H100; .anchors copied in, carry [".anchors"]).
# Call 1 (~8 min): Gemma-3-12B on the mask-free path (each sliding-window layer in the attention
# kernel's window, cuDNN for its 256-wide heads) beside Unsloth again; the MoE row with the
# AdamW moments in host memory (Unsloth's paged moments are not in its peak either).
export XLA_PYTHON_CLIENT_PREALLOCATE=false
T=q_proj,k_proj,v_proj,o_proj,experts.gate_up_proj,experts.down_proj
bash bench/device/ours_runs.sh "gemma3-12b 4 2048 offload auto --lora-dtype bfloat16" \
                               "gemma3-12b 1 16384 offload_attention auto --lora-dtype bfloat16 --mlp-chunk 4096" \
                               "qwen3-30b-a3b 4 2048 offload cudnn --lora-dtype bfloat16 --embedding host --layers 8 --lora-targets $T --offload yes"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .anchors/wheels/*.whl
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 TOKENIZERS_PARALLELISM=false
timeout 280 python bench/anchor_families.py --system unsloth --shape gemma3-12b --batch 4 --seq 2048 --steps 3 > $OUT/unsloth_gemma3-12b.txt 2>&1
echo "unsloth gemma3-12b rc=$?: $(grep '^{' $OUT/unsloth_gemma3-12b.txt | tail -1 | cut -c1-300)"
# Call 2 (issue 30; carry [".anchors", ".work/tokenizer"], the tokenizer saved as
# pretrain_quality.sh says): bash bench/device/pretrain_quality.sh pretrain, then at once
#   bash bench/device/pretrain_quality.sh quality (same warm machine).
# Call 3: Gemma-2-9B 4 x 2048 and 1 x 8,192 (its softcapped XLA attention now in 512-query pieces:
#   memory down, one more score pass in the backward; bench/device/ours_runs.sh
#   "gemma2-9b 4 2048 offload auto --lora-dtype bfloat16" "gemma2-9b 1 8192 offload auto --lora-dtype bfloat16"),
# then issue 25's no-regression rows: llama3-1b 4 x 2048 ours (offload, bf16 LoRA) and
#   Unsloth (bash .anchors/run.sh "--system unsloth --shape llama3-1b --batch 4 --seq 2048 --steps 3"),
#   llama-65b 1 x 2048 (bench/train_step.py --model llama-65b --batch 1 --seq 2048 --offload yes
#   --lora-dtype bfloat16 --attention cudnn).
