"""The Pallas training kernels under a mesh of several devices (pallas_kernels/dispatch.on_mesh),
in subprocesses with 8 simulated CPU devices: the TPU kernels interpreted (discharged into XLA
ops) give the one-device XLA product and gradient, and a whole sharded training step equals the
one-device step; the GPU kernels' sharded program is built (the interpreted Mosaic GPU
warpgroups are too slow to run on 8 simulated devices); the sharded training step lowers for TPU
from this CPU machine with the Mosaic kernels in it."""

from tests.test_sharding import _on_devices

SETUP = """
import re, sys, jax, jax.numpy as jnp, numpy as np
from pallas_kernels import dispatch
from pallas_kernels.backends import get_backend
from qlora_jax.format.quantization import quantize
from qlora_jax.nn.qmatmul import qmatmul
from qlora_jax.nn.sharding import make_layout, quant_specs
from jax.sharding import NamedSharding, PartitionSpec as P

assert jax.device_count() == 8
layout = make_layout((("data", 2), ("fsdp", 2), ("tensor", 2)))
rng = np.random.default_rng(0)
qw = quantize(jnp.asarray(rng.standard_normal((256, 512)).astype(np.float32) * 0.05), "nf4", 64, True)
qw_split = jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(layout.mesh, s)), qw,
                        quant_specs(qw, layout.sizes))  # stored split over tensor x fsdp

def grad_of(x, qw, backend, g):
  def loss(x):
    return jnp.sum(qmatmul(x, qw, backend).astype(jnp.float32) * g)
  if jax.sharding.get_abstract_mesh().empty and backend.name != "xla":
    with jax.sharding.use_abstract_mesh(layout.mesh.abstract_mesh):
      return jax.value_and_grad(loss)(x)
  return jax.value_and_grad(loss)(x)
"""

TPU_WORKER = SETUP + """
dispatch.INTERPRET = "hlo"  # the kernels discharged to XLA ops: no host callbacks across 8 devices
cpu_backend = jax.default_backend
for rows in (64, 3):  # rows split over data x fsdp; a decode-sized batch taken whole by each device
  x = jnp.asarray(rng.standard_normal((rows, 512)), jnp.bfloat16)
  g = jnp.asarray(rng.standard_normal((rows, 256)), jnp.float32)
  ref_v, ref_g = jax.jit(grad_of, static_argnums=2)(x, qw, get_backend("xla"), g)
  dispatch.jax.default_backend = lambda: "tpu"
  text = str(jax.make_jaxpr(grad_of, static_argnums=2)(x, qw_split, get_backend("pallas"), g))
  assert text.count("pallas_call") == 2 and "shard_map" in text and "psum" in text, text[-3000:]
  v, gx = jax.jit(grad_of, static_argnums=2)(x, qw_split, get_backend("pallas"), g)
  dispatch.jax.default_backend = cpu_backend
  np.testing.assert_allclose(float(v), float(ref_v), rtol=2e-3)
  err = float(jnp.max(jnp.abs(gx.astype(jnp.float32) - ref_g.astype(jnp.float32))))
  assert err <= 1e-2 * float(jnp.max(jnp.abs(ref_g.astype(jnp.float32)))), err
  print("equal", rows, float(v), float(ref_v), err)
"""


def test_tpu_kernels_under_a_mesh_equal_the_one_device_product():
  """data x fsdp x tensor (2 x 2 x 2): each device multiplies its rows of x by its output rows
  of the weight (interpreted Mosaic TPU kernels inside shard_map, the fsdp-split codes and
  scales gathered); value and dX equal one device's XLA product (bf16 operands)."""
  out = _on_devices(8, TPU_WORKER)
  assert out.count("equal") == 2, out


GPU_WORKER = """
import os  # the interpreted Mosaic GPU kernels need XLA:CPU's serial scheduler (pallas_kernels/gpu.py)
os.environ["XLA_FLAGS"] += " --xla_cpu_enable_concurrency_optimized_scheduler=false"
""" + SETUP + """
dispatch.INTERPRET = True  # traced only: the interpreted kernels need no GPU to build
dispatch.jax.default_backend = lambda: "gpu"
x = jnp.ones((64, 512), jnp.bfloat16)
text = str(jax.make_jaxpr(grad_of, static_argnums=2)(x, qw_split, get_backend("pallas"), jnp.ones((64, 256))))
assert text.count("shard_map") == 2 and "psum" in text and "dot_general" not in text, text[-3000:]
print("sharded")
"""


def test_gpu_kernels_under_a_mesh_run_per_device():
  """The GPU training kernels under a mesh: both products inside shard_map (the backward's
  partial sums added over the tensor axis), no XLA dot left."""
  assert "sharded" in _on_devices(8, GPU_WORKER)


STEP_WORKER = """
import jax, numpy as np, optax
from flax import nnx
from pallas_kernels import dispatch
from pallas_kernels.backends import get_backend
from qlora_jax.nn.lora import LoraConfig
from qlora_jax.nn.model import ModelOptions
from qlora_jax.nn.model_config import ModelConfig
from qlora_jax.nn.sharding import make_layout
from qlora_jax.train.optimizer import clipped, init_optimizer
from qlora_jax.train.step import make_train_step, to_device_batch
from qlora_jax.testing import random_model

assert jax.device_count() == 8
# Every linear layer's shape suits the TPU kernels (K a multiple of 512, N of 128).
config = ModelConfig(model_type="llama", vocab_size=256, hidden_size=512, intermediate_size=1024,
                     num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, head_dim=64)
ids = np.random.default_rng(0).integers(0, 256, (1, 8, 33)).astype(np.int32)
host = {"input_ids": ids[..., :-1], "labels": ids[..., 1:],
        "positions": np.broadcast_to(np.arange(32, dtype=np.int32), (1, 8, 32)).copy()}
tx = clipped(optax.sgd(1.0), 1e9)

def step_metrics(backend, mesh):
  options = ModelOptions(lora=LoraConfig(rank=8, alpha=16.0), remat="full", scan_layers=True,
                         attention="xla", backend=get_backend(backend))
  graphdef, lora, rng, frozen = nnx.split(random_model(config, options), nnx.LoRAParam, nnx.RngState, ...)
  lora = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(jax.random.key(1), x.shape, x.dtype), lora)
  layout = None if mesh is None else make_layout(mesh)
  lora, rng, frozen = (lora, rng, frozen) if layout is None else layout.put((lora, rng, frozen))
  opt = init_optimizer(tx, lora, layout)
  step = make_train_step(graphdef, tx, None, layout, (lora, rng, opt, frozen))
  batch = to_device_batch(host) if layout is None else layout.put_batch(host, leading=1)
  return jax.device_get(step(lora, rng, opt, frozen, batch)[3])

ref = step_metrics("xla", None)
cpu_backend = jax.default_backend
dispatch.jax.default_backend = lambda: "tpu"
dispatch.INTERPRET = "hlo"
got = step_metrics("pallas", (("data", 2), ("fsdp", 2), ("tensor", 2)))
dispatch.jax.default_backend = cpu_backend
np.testing.assert_allclose(got["loss"], ref["loss"], rtol=1e-4)
np.testing.assert_allclose(got["grad_norm"], ref["grad_norm"], rtol=5e-3)
print("equal", got["loss"], ref["loss"], got["grad_norm"], ref["grad_norm"])
"""


def test_sharded_step_with_the_tpu_kernels_equals_one_device():
  """data x fsdp x tensor, full remat, every 4-bit product through the TPU kernels per device:
  the loss and gradient norm of one step equal the one-device XLA step's (bf16 compute)."""
  assert "equal" in _on_devices(8, STEP_WORKER)


EXPORT_WORKER = """
import jax, numpy as np, optax
from flax import nnx
from pallas_kernels import dispatch
from pallas_kernels.backends import get_backend
from qlora_jax.nn.lora import LoraConfig
from qlora_jax.nn.model import ModelOptions
from qlora_jax.nn.model_config import ModelConfig
from qlora_jax.nn.sharding import make_layout
from qlora_jax.train.optimizer import clipped, init_optimizer
from qlora_jax.train.step import make_train_step
from qlora_jax.testing import random_model

config = ModelConfig(model_type="llama", vocab_size=256, hidden_size=512, intermediate_size=1024,
                     num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, head_dim=64)
options = ModelOptions(lora=LoraConfig(rank=8), remat="full", scan_layers=True, attention="xla",
                       backend=get_backend("pallas"))
dispatch.jax.default_backend = lambda: "tpu"  # trace as on a TPU host: the Mosaic TPU kernels
graphdef, lora, rng, frozen = nnx.split(random_model(config, options), nnx.LoRAParam, nnx.RngState, ...)
layout = make_layout((("fsdp", 4), ("tensor", 2)))
lora, rng, frozen = layout.put((lora, rng, frozen))
tx = clipped(optax.adamw(1e-4), 0.3)
opt = init_optimizer(tx, lora, layout)
step = make_train_step(graphdef, tx, None, layout, (lora, rng, opt, frozen))
ids = np.zeros((1, 8, 32), np.int32)
batch = layout.put_batch({"input_ids": ids, "labels": ids, "positions": ids}, leading=1)
exported = jax.export.export(step.programs["whole"], platforms=("tpu",))(lora, rng, opt, frozen, batch)
text = exported.mlir_module()
print("kernels", text.count("tpu_custom_call"), "manual", text.count("manual_computation"), exported.nr_devices)
"""


def test_sharded_training_step_lowers_for_tpu_with_the_kernels():
  """The fsdp x tensor training step exported for TPU from this CPU machine (JAX's cross-platform
  lowering): the Mosaic TPU kernels are in it, inside per-device (manual) computations."""
  out = _on_devices(8, EXPORT_WORKER).split()
  kernels, manual, devices = int(out[out.index("kernels") + 1]), int(out[out.index("manual") + 1]), int(out[-1])
  assert kernels >= 8 and manual >= kernels and devices == 8, out
