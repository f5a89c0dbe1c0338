"""Generation's compiled chunk for an H100, compiled on a machine with no GPU, its kernels a layer
counted: XLA's GPU compiler runs deviceless from a target description (the CUDA plugin's
topology with an H100's GpuTargetConfigProto, the spec XLA ships), so the fusions, GEMMs and
Mosaic kernels of a decoding step can be counted and compared across variants without device
time. XLA cannot autotune without the device: GEMM fusions keep their default configs (on the
H100 the autotuner splits the LoRA A products over K into a GEMM and a reduction, which this
count shows as one kernel), so the count is the launch structure, not the timing.

Needs JAX's CUDA plugin, no GPU (the venv `bash bench/device/lower_check.sh` makes: JAX 0.11.2
and its plugin); a variant (variants.py) ~40 s on the CPU machine:
  JAX_PLATFORMS=cpu PYTHONPATH=. /tmp/jax-device/bin/python bench/device/launches.py base norm_in_launch
"""
import argparse
import collections
import os
import re
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # quiet: no GPU to find is this tool's premise
import jax
import jax.numpy as jnp
from jax.experimental import topologies
from jax.sharding import SingleDeviceSharding

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # bench/
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/device/
from common import SHAPES, generation_model  # noqa: E402
from pallas_kernels import dispatch, gpu_decode  # noqa: E402
from qlora_jax.nn import generate  # noqa: E402
from variants import VARIANTS, applied  # noqa: E402

# An H100 SXM as XLA describes it (xla/backends/gpu/target_config/specs/h100_sxm.txtpb, the
# fields the compiler reads): enough for fusion, layout and GEMM decisions.
H100 = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 84942979072 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 feature_extension: ACCELERATED_FEATURES }
  registers_per_core_limit: 65536 registers_per_block_limit: 65536 name: "NVIDIA H100 80GB HBM3"
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 10 patch: 0 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""

# instructions of a computation that launch nothing
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional",
         "call", "after-all", "opt-barrier", "partition-id", "replica-id",
         "fusion-done", "copy-done", "async-done"}  # an async pair is one launch: its start


def h100():
  """The one device of a deviceless H100 topology."""
  return topologies.get_topology_desc("h100", "cuda", target_config=H100, topology="1x1x1").devices[0]


def computations(hlo: str) -> dict[str, list[str]]:
  """Each computation's instruction lines, by name."""
  out, name = {}, None
  for line in hlo.splitlines():
    if m := re.match(r"^(?:ENTRY )?%(\S+) .*\{$", line):
      name = m.group(1)
      out[name] = []
    elif name and line.startswith("  ") and " = " in line:
      out[name].append(line)
  return out


def kernels(lines: list[str]) -> collections.Counter:
  """The launches of a computation's instructions, by kind: a fusion by its name (XLA's
  numbering dropped: the names a profile shows), a custom call by its target."""
  count = collections.Counter()
  for line in lines:
    m = re.match(r"\s*(?:ROOT )?%(\S+) = .*? ([a-z][a-z0-9-]*)\(", line)
    if not m:
      continue
    name, op = m.groups()
    if op in _FREE:
      continue
    if op == "custom-call":
      op = "custom-call " + re.search(r'custom_call_target="([^"]+)"', line).group(1)
    elif op == "fusion":
      op = re.sub(r"[._]\d+$", "", name)
    count[op] += 1
  return count


def loop_body(hlo: str) -> list[str]:
  """The decoding loop's body: the computation the entry's while runs."""
  comps = computations(hlo)
  entry = next(c for c in comps if hlo.find(f"ENTRY %{c} ") >= 0)
  body = next(re.search(r"body=%([^,\s]+)", l).group(1) for l in comps[entry] if " while(" in l)
  return comps[body]


def chunk_kernels(model, slots: int, device) -> collections.Counter:
  """The kernels of one decoding step (the chunk's loop body), compiled for `device`."""
  generate._decoder.cache_clear()
  chunk, args = generate.greedy_chunk(model, 1, slots)
  sharding = SingleDeviceSharding(device)
  specs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), args)
  compiled = chunk.trace(*specs).lower(lowering_platforms=("cuda",)).compile()
  return kernels(loop_body(compiled.as_text()))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("variants", nargs="+", help=f"of {sorted(VARIANTS)}, or several joined by '+'")
  p.add_argument("--model", default="llama3-8b")
  p.add_argument("--slots", type=int, default=256)
  a = p.parse_args()
  # generation takes the decode kernel where it runs on a Hopper GPU: as on the H100
  gpu_decode.sm_count = lambda interpret: 132
  dispatch.INTERPRET = False
  dispatch._hopper = lambda: True
  jax.default_backend = lambda: "gpu"
  device = h100()
  models = {n: generation_model({**SHAPES[a.model], "num_hidden_layers": n}) for n in (1, 2)}
  for name in a.variants:
    with applied(name):
      one, two = (chunk_kernels(models[n], a.slots, device) for n in (1, 2))
    layer = two - one
    rest = one - layer
    print(f"{name}: {sum(layer.values())} kernels a layer, {sum(rest.values())} outside the layers "
          f"({a.model}: {sum(layer.values()) * SHAPES[a.model]['num_hidden_layers'] + sum(rest.values())} a token)")
    print("  a layer: " + ", ".join(f"{k} {n}" for k, n in layer.most_common()))
    print("  outside: " + ", ".join(f"{k} {n}" for k, n in rest.most_common()))


if __name__ == "__main__":
  main()
