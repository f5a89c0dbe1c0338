#!/usr/bin/env bash
# The test suite (CPU). GPU-only tests skip cleanly without a GPU. On CPU, one worker a core (at
# most 4; each test module on one worker, so its module fixtures are made once); with a GPU, one
# process (workers would each take the device's memory).
set -euo pipefail
workers=(-n auto --maxprocesses 4 --dist loadscope)
if command -v nvidia-smi > /dev/null && nvidia-smi -L > /dev/null 2>&1; then workers=(-n 0); fi
python -m pytest -q -ra --durations=15 "${workers[@]}" tests "$@"
