#!/usr/bin/env bash
# usage: bash bench/device/unsloth_row.sh NAME "ANCHOR ARGS"   (.anchors carried; see ../shared/anchors)
# One Unsloth run of the anchors runner; its log in $OUT/unsloth_NAME.txt, its JSON row printed.
PER_RUN_TIMEOUT=${PER_RUN_TIMEOUT:-200} timeout $(( ${PER_RUN_TIMEOUT:-200} + 30 )) bash .anchors/run.sh "$2" \
    > $OUT/unsloth_$1.txt 2>&1
grep '^{' $OUT/anchor_fast.jsonl 2>/dev/null | tail -1 | cut -c1-300
