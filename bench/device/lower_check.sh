#!/usr/bin/env bash
# The Mosaic GPU kernels lowered for CUDA with the device's JAX (0.11.2), on this CPU machine,
# before spending device time: Mosaic GPU's layout inference runs at lowering, so a kernel the
# device's JAX would refuse is refused here too (2026-12-07: a TMA copy into a tiled buffer at a
# row offset of 4 passed JAX 0.10.2 and failed 0.11.2 on the H100). Makes /tmp/jax-device (a
# Python 3.12 venv: jax, jaxlib and the repo's CPU dependencies), then runs the kernel tests that
# lower for CUDA and the interpreted decode tests. The venv has JAX's CUDA plugin too (no GPU
# needed), for bench/device/launches.py's deviceless compile for an H100.
#   bash bench/device/lower_check.sh [pytest -k expression]
set -euo pipefail
version=${JAX_DEVICE_VERSION:-0.11.2}
venv=/tmp/jax-device
python=
for candidate in python3.12 ~/.pyenv/versions/3.12*/bin/python; do  # the first that runs as 3.12
  if "$candidate" -c "import sys; sys.exit(sys.version_info[:2] != (3, 12))" 2>/dev/null; then
    python=$candidate; break
  fi
done
[ -n "$python" ] || { echo "lower_check: needs a Python 3.12 (jaxlib $version's wheels are cp312)"; exit 1; }
if [ ! -x $venv/bin/python ] || ! $venv/bin/python -c "import jax, jax_plugins.xla_cuda13, sys; sys.exit(jax.__version__ != '$version')" 2>/dev/null; then
  [ -x $venv/bin/python ] || "$python" -m venv $venv
  $venv/bin/pip install -q "jax==$version" "jaxlib==$version" "jax-cuda13-plugin==$version" \
      "jax-cuda13-pjrt==$version" flax optax orbax-checkpoint chex safetensors gguf transformers \
      datasets tqdm pytest
fi
XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false $venv/bin/python -m pytest -q \
    -p no:cacheprovider tests/test_kernels.py -k "${1:-lowers or decoding_chunk or decode_attention}"
