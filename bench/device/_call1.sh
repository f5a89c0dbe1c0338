export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=.
nvidia-smi --query-gpu=name --format=csv,noheader
XLA_FLAGS="--xla_dump_to=$OUT/dump --xla_dump_hlo_as_text" timeout 150 python bench/device/pipeline_ab.py --layers 2 --rounds 1 2>&1 | tail -3
(cd $OUT/dump && ls | wc -l && du -sh . && tar czf ../dump.tgz . ) ; rm -rf $OUT/dump
timeout 360 python bench/device/variants.py base cudnn_attention reduce_attention --rounds 3 --profile 2>&1 | tail -8
timeout 200 python bench/device/pipeline_ab.py 2>&1 | tail -3
