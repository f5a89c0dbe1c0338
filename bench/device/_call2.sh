export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=.
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 300 python bench/device/variants.py base stacked_cache reduce_attention --rounds 3 --profile 2>&1 | grep -v Warn | tail -7
A="--model llama3-8b --short 8 --long 136 --repeats 3"
. bench/device/rows.sh
ROW_TIMEOUT=150 row . ours:auto
