#!/usr/bin/env bash
# The test suite (CPU). GPU-only tests skip cleanly without a GPU.
set -euo pipefail
python -m pytest -q -ra --durations=15 tests "$@"
