export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=.
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 250 python bench/device/variants.py base stacked_cache reduce_attention --rounds 3 --profile > $OUT/variants.txt 2>&1
grep -v "Warn\|warn" $OUT/variants.txt | grep "ms/token\|kernels,\|compiled\|failed\|Error" | cut -c1-900
timeout 150 python bench/device/variants.py base stacked_cache --rounds 3 --slots 8192 > $OUT/variants_8192.txt 2>&1
grep "ms/token\|failed\|Error" $OUT/variants_8192.txt
