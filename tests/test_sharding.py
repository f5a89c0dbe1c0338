"""Several devices: the mesh, the layout rules, the memory estimate, and, in subprocesses with 8
simulated CPU devices (the flag must be set before jax starts), the sharded step against one
device, checkpoints restored onto other device counts, the v5e config's code path and the
multi-GPU benchmark."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from qlora_jax.nn import sharding
from qlora_jax.train import memory, trainer
from qlora_jax.nn.lora import LoraConfig
from qlora_jax.nn.model import ModelOptions
from qlora_jax.nn.model_config import ModelConfig
from qlora_jax.format.quantization import QuantConfig, zeros_quantized
from qlora_jax.train.config import DataConfig, DeviceConfig, ModelSetup, OptimConfig, TrainConfig
from qlora_jax.train.config_files import load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
LLAMA_65B = ModelConfig(model_type="llama", vocab_size=32000, hidden_size=8192, intermediate_size=22016,
                        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=64, head_dim=128)
TINY = dict(model_type="llama", vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32)


def _on_devices(n: int, code: str, *args, timeout: int = 600) -> str:
  """Run `code` in a fresh python with n simulated CPU devices; its stdout (fails on error)."""
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}", PYTHONPATH=str(ROOT),
             JAX_PLATFORMS="cpu")  # also on a GPU machine
  r = subprocess.run([sys.executable, *(["-c", code] if code else []), *map(str, args)], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=timeout)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
  return r.stdout


# --- the mesh and the layout rules (one process, no devices needed) ---


def test_mesh_shape_resolves_and_refuses():
  assert sharding.mesh_shape((("data", -1),), 8) == {"data": 8}
  assert sharding.mesh_shape((("data", 2), ("fsdp", -1)), 8) == {"data": 2, "fsdp": 4}
  assert sharding.mesh_shape((("fsdp", 2),), 8) == {"fsdp": 2}  # the first 2 of 8 devices
  with pytest.raises(ValueError, match="needs 16 devices; 8"):
    sharding.mesh_shape((("data", 2), ("fsdp", 8)), 8)
  with pytest.raises(ValueError, match="a multiple of 3"):
    sharding.mesh_shape((("data", 3), ("fsdp", -1)), 8)
  for bad, match in [((("model", 2),), "mesh axes must be among"), ((("data", -1), ("fsdp", -1)), "at most one"),
                     ((("data", 2), ("data", 2)), "distinct")]:
    with pytest.raises(ValueError, match=match):
      DeviceConfig(mesh=bad)
  with pytest.raises(ValueError, match="lora_sharding"):
    DeviceConfig(lora_sharding="zero3")


@pytest.mark.parametrize("shape", [(128, 64), (96, 200), (4096, 14336), (3, 37), (64, 96)])
@pytest.mark.parametrize("sizes", [{"fsdp": 8}, {"data": 2, "fsdp": 4}, {"fsdp": 2, "tensor": 4}, {"data": 8}])
def test_4bit_layout_keeps_blocks_whole(shape, sizes):
  qa = zeros_quantized(shape, QuantConfig())
  spec = sharding.quant_specs(qa, sizes)
  axes = spec.codes[-1] if spec.codes != P() else None
  assert spec.absmax == spec.codes  # codes and their scales are split alike
  assert all(s == P() for s in (spec.quant_map, spec.nested_absmax, spec.nested_quant_map, spec.offset))
  if axes is None:
    return
  shards = int(np.prod([sizes[a] for a in ((axes,) if isinstance(axes, str) else axes)]))
  assert shards > 1 and qa.size % qa.blocksize == 0 and qa.num_blocks % shards == 0
  chunk = qa.size // shards  # elements per device: whole blocks, matching its slice of scales
  assert chunk % qa.blocksize == 0 and chunk // qa.blocksize == qa.num_blocks // shards
  assert chunk == 2 * (qa.codes.shape[0] // shards)
  if "tensor" in sizes:  # the tensor axis splits whole output rows
    assert shape[0] % sizes["tensor"] == 0
  used = sharding.quant_specs(qa, sizes, in_use=True).codes
  assert used == (P("tensor") if "tensor" in sizes else P())  # gathered over fsdp at use


def test_unaligned_weights_stay_whole():
  for shape in [(3, 37), (12, 64)]:  # a partial last block; 12 blocks on 8 devices
    assert sharding.quant_specs(zeros_quantized(shape, QuantConfig()), {"fsdp": 8}).codes == P()


def test_roles_of_a_model_and_its_optimizer_state():
  from qlora_jax.nn.model import CausalLM
  from qlora_jax.train.optimizer import make_optimizer

  options = ModelOptions(lora=LoraConfig(rank=8), scan_layers=True)
  model = nnx.eval_shape(lambda: CausalLM(ModelConfig(**TINY), options, rngs=nnx.Rngs(0)))
  _, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
  sizes = {"data": 2, "fsdp": 4}
  flat = lambda tree: {".".join(map(str, k)): v.get_raw_value() for k, v in nnx.to_flat_state(tree)}  # noqa: E731
  base = flat(sharding.specs(rest, sizes))
  assert base["model.embed_tokens.weight"] == P("fsdp", None)
  assert base["model.layers.input_layernorm.weight"] == P()
  assert base["model.layers.self_attn.q_proj.weight"].codes == P(None, "fsdp")
  adapters = flat(sharding.specs(lora, sizes))
  assert adapters["model.layers.self_attn.q_proj.lora_a"] == P(None, "fsdp", None)
  assert adapters["model.layers.self_attn.q_proj.lora_b"] == P(None, None, "fsdp")
  assert set(jax.tree.leaves(sharding.specs(lora, sizes, "replicated"))) == {P()}
  tx, _ = make_optimizer(OptimConfig())
  moments = jax.tree.leaves(sharding.specs(jax.eval_shape(tx.init, lora), sizes))
  assert moments.count(P(None, "fsdp", None)) == 2 * 7 and moments.count(P(None, None, "fsdp")) == 2 * 7


def test_distributed_start_only_when_the_environment_asks():
  assert sharding.distributed_settings({}) is None
  assert sharding.distributed_settings({"TPU_WORKER_HOSTNAMES": "localhost"}) is None  # one host
  assert sharding.distributed_settings({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}) == {}
  assert sharding.distributed_settings({"SLURM_NTASKS": "4"}) == {}
  assert sharding.distributed_settings({"OMPI_COMM_WORLD_SIZE": "1"}) is None
  assert sharding.distributed_settings({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "2",
                                        "JAX_PROCESS_ID": "1"}) == {
      "coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1}


# --- the memory estimate ---


def _estimate(model: ModelConfig, attention: str, batch: int, sizes=None, **overrides):
  cfg = TrainConfig(model=ModelSetup(model_dir="-", remat="full", attention=attention),
                    data=DataConfig(dataset="-", source_max_len=1, target_max_len=2047),
                    optim=OptimConfig(batch_size=batch)).replace(**overrides)
  options = ModelOptions(lora=LoraConfig(rank=64), remat="full", scan_layers=True, attention=attention)
  return memory.estimate(model, options, cfg, sizes or {"data": 1}), cfg


@pytest.mark.parametrize("shape, batch, attention, measured_gib", [
    pytest.param(dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True),
                 4, "xla", 8.85, marks=pytest.mark.xfail(strict=True, reason=(
                     "XLA attention's causal path at head_dim 64 peaks 1.45 GiB above the estimate "
                     "(H100, 2026-12-05; llama3-8b's XLA row and every cuDNN row are within 6%): "
                     "its term needs recalibrating on a device"))),
    (dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
          num_key_value_heads=8, head_dim=64, tie_word_embeddings=True), 4, "cudnn", 3.43),
    (dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
          num_key_value_heads=8, head_dim=128), 4, "xla", 16.13),
    (dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
          num_key_value_heads=8, head_dim=128), 4, "cudnn", 12.05),
    (None, 1, "cudnn", 49.39),
], ids=["llama3-1b-xla", "llama3-1b-cudnn", "llama3-8b-xla", "llama3-8b-cudnn", "llama-65b-cudnn"])
def test_estimate_tracks_measured_h100_peaks(shape, batch, attention, measured_gib):
  """Measured peaks (one H100, r=64 on all layers, 2048 tokens a row, full remat; llama3 rows:
  docs/results/ours_h100_2026-12-05.jsonl, causal attention and the vocabulary-sized loss chunk;
  65B: docs/BENCHMARKS.md)."""
  model = LLAMA_65B if shape is None else ModelConfig(model_type="llama", **shape)
  est, _ = _estimate(model, attention, batch)
  assert abs(est.total / 2**30 / measured_gib - 1) < 0.06, est.text()


@pytest.mark.parametrize("remat, batch, seq, chunk, measured_gib, tol", [
    ("offload", 4, 2048, 0, 8.49, 0.04), ("full", 4, 2048, 0, 10.49, 0.04),
    ("offload", 4, 2048, 4096, 8.12, 0.04),
    ("offload_attention", 1, 32768, 4096, 9.63, 0.08), ("offload_attention", 1, 98304, 4096, 16.46, 0.08)])
def test_estimate_tracks_measured_peaks_with_host_embedding(remat, batch, seq, chunk, measured_gib, tol):
  """llama3-8b on one H100 with bf16 LoRA, cuDNN attention, the embedding table in host memory
  and the loss backward as one bf16 GEMM, from 4 x 2048 to 1 x 98,304 with the MLP in pieces
  (docs/results/ours_h100_2026-12-05_{b,d}.jsonl, ours_h100_2026-12-05_98304_uncapped.jsonl;
  the long rows within 8%: 32k over by 6%, 98k under by 4.5%)."""
  model = ModelConfig(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128)
  cfg = TrainConfig(model=ModelSetup(model_dir="-", remat=remat, attention="cudnn", mlp_chunk=chunk),
                    data=DataConfig(dataset="-", source_max_len=1, target_max_len=seq - 1),
                    optim=OptimConfig(batch_size=batch)).replace(lora_dtype="bfloat16", embedding="host")
  est = memory.estimate(model, cfg.model_options(), cfg, {"data": 1})
  assert "embedded batch (from the host)" in est.terms
  assert abs(est.total / 2**30 / measured_gib - 1) < tol, est.text()


def test_65b_on_a_v5e_host_fits_only_when_split():
  cfg = load_config("llama65b_v5e")
  mesh, batch = cfg.devices.mesh, cfg.optim.batch_size
  sizes = sharding.mesh_shape(mesh, 8)
  est, _ = _estimate(LLAMA_65B, "xla", batch, sizes, mesh=mesh)
  assert est.total < 16 * 2**30 and est.terms["4-bit base weights (stored)"] < 4 * 2**30
  memory.check_fits(est, 16 * 2**30, "TPU v5 lite", cfg, sizes)
  replicated, cfg_r = _estimate(LLAMA_65B, "xla", batch, sizes, mesh=mesh, lora_sharding="replicated")
  with pytest.raises(ValueError, match=r"needs about 2\d\.\d GiB per device.*Fix: lora_sharding=fsdp"):
    memory.check_fits(replicated, 16 * 2**30, "TPU v5 lite", cfg_r, sizes)
  data, cfg_d = _estimate(LLAMA_65B, "xla", batch, {"data": 8}, mesh=(("data", 8),))
  with pytest.raises(ValueError, match=r"split the base and LoRA over all 8 devices \(mesh=fsdp:8\)"):
    memory.check_fits(data, 16 * 2**30, "TPU v5 lite", cfg_d, {"data": 8})


def test_a_run_that_cannot_fit_is_refused_before_loading(tiny_model_dir, tmp_path, capsys):
  cfg = load_config("tiny_test", [f"model_dir={tiny_model_dir}", "model_source=", f"output_dir={tmp_path / 'run'}",
                                  "device_memory_gib=0.001"])
  with pytest.raises(ValueError, match=r"more than the 0\.0 GiB of one cpu, device_memory_gib.*Fix:"):
    trainer.train(cfg)
  assert not list((tmp_path / "run").glob("config.json"))


# --- several devices (subprocesses) ---

STEP_WORKER = """
import jax, numpy as np, optax
from flax import nnx
from qlora_jax.nn.lora import LoraConfig
from qlora_jax.nn.model import ModelOptions
from qlora_jax.nn.model_config import ModelConfig
from qlora_jax.nn.sharding import make_layout
from qlora_jax.train.optimizer import HostState, clipped, init_optimizer, offload, offload_sharding
from qlora_jax.train.step import make_train_step, to_device_batch
from qlora_jax.testing import random_model

assert jax.device_count() == 8
config = ModelConfig(**{tiny})
options = ModelOptions(lora=LoraConfig(rank=8, alpha=16.0, dropout=0.1), remat="full", scan_layers=True,
                       dtype="float32", attention="xla")
graphdef, lora0, rng0, frozen0 = nnx.split(random_model(config, options), nnx.LoRAParam, nnx.RngState, ...)
lora0 = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(jax.random.key(1), x.shape), lora0)  # B != 0
ids = np.random.default_rng(0).integers(0, config.vocab_size, (2, 8, 65)).astype(np.int32)
host = {{"input_ids": ids[..., :-1], "labels": ids[..., 1:], "segment_ids": np.ones((2, 8, 64), np.int32),
        "positions": np.broadcast_to(np.arange(64, dtype=np.int32), (2, 8, 64)).copy()}}
# SGD with momentum, lr 1: after one step the update and the momentum are exactly the gradient
# (clipped at a norm it never reaches; the offloaded state is streamed in chunks of layers).
tx = clipped(optax.sgd(1.0, momentum=0.9), 1e9)

def run(mesh, offloaded=False):
  layout = None if mesh is None else make_layout(mesh)
  lora, rng = jax.tree.map(lambda x: x.copy(), (lora0, rng0))  # the step donates them
  lora, rng, frozen = (lora, rng, frozen0) if layout is None else layout.put((lora, rng, frozen0))
  opt = init_optimizer(tx, lora, layout)
  like = (lora, rng, opt, frozen)
  off = offload_sharding(opt, layout) if offloaded else None
  opt = opt if off is None else offload(opt, off, lora, chunk_layers=1)
  step = make_train_step(graphdef, tx, off, layout, like)
  batch = to_device_batch(host) if layout is None else layout.put_batch(host, leading=1)
  lora, rng, opt, metrics = step(lora, rng, opt, frozen, batch)
  lora, _, opt, _ = step(lora, rng, opt, frozen, batch)  # again: compiled once, shardings kept
  assert sum(p._cache_size() for p in step.programs.values()) == (2 if offloaded else 1)
  assert isinstance(opt, HostState) == offloaded
  opt = opt.stacked() if offloaded else opt
  return frozen, lora, jax.device_get(metrics), jax.device_get((lora, opt))

_, _, ref_m, ref = run(None)
for mesh, offloaded in [((("fsdp", 8),), False), ((("data", 2), ("fsdp", 2), ("tensor", 2)), True)]:
  frozen, lora, m, got = run(mesh, offloaded)
  np.testing.assert_allclose(m["loss"], ref_m["loss"], rtol=1e-6)
  np.testing.assert_allclose(m["grad_norm"], ref_m["grad_norm"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):  # LoRA after 2 updates, momentum
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * float(np.abs(a).max()))
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(jax.device_get(frozen0)),
                                                  jax.tree.leaves(jax.device_get(frozen))))
  codes = frozen["model"]["layers"]["mlp"]["down_proj"]["weight"].get_raw_value().codes
  lora_a = lora["model"]["layers"]["mlp"]["down_proj"]["lora_a"].get_raw_value()
  split = tuple(a for a in ("tensor", "fsdp") if dict(mesh).get(a, 1) > 1)
  assert codes.sharding.spec == jax.sharding.PartitionSpec(None, split if len(split) > 1 else split[0])
  assert lora_a.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None), lora_a.sharding
  print("equal", mesh, "offload" if offloaded else "", m["loss"], flush=True)
"""


def test_sharded_step_matches_one_device():
  """On 8 devices, FSDP, and data x FSDP x tensor with the optimizer state offloaded: loss,
  gradient norm, LoRA after two updates and the optimizer state equal one device's in float32
  (dropout on); each step compiled once; the base untouched and laid out as declared."""
  out = _on_devices(8, STEP_WORKER.format(tiny=TINY))
  assert out.count("equal (") == 2, out


CKPT_WRITER = """
import sys, jax, numpy as np
from flax import nnx
from qlora_jax.train.checkpoint import Checkpointer, to_flat
from qlora_jax.nn.lora import LoraConfig
from qlora_jax.nn.model import ModelOptions
from qlora_jax.nn.model_config import ModelConfig
from qlora_jax.nn.sharding import make_layout
from qlora_jax.train.config import OptimConfig
from qlora_jax.train.optimizer import init_optimizer, make_optimizer
from qlora_jax.testing import random_model

layout = make_layout((("data", 2), ("fsdp", 4)))
model = random_model(ModelConfig(**{tiny}), ModelOptions(lora=LoraConfig(rank=8), scan_layers=True), seed=1,
                     layout=layout)
_, lora, rng, _ = nnx.split(model, nnx.LoRAParam, nnx.RngState, ...)
tx = make_optimizer(OptimConfig())[0]
opt = init_optimizer(tx, lora, layout)
grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(3), x.shape, x.dtype), lora)
_, opt = tx.update(grads, opt, lora)  # moments that are not zero
state = {{"lora": lora, "rng": rng, "opt_state": opt}}
assert "fsdp" in str(lora["model"]["layers"]["mlp"]["up_proj"]["lora_b"].get_raw_value().sharding.spec)
ckpt = Checkpointer(sys.argv[1], 2)
ckpt.save(7, state, {{"step": 7}})
ckpt.close()
np.savez(sys.argv[1] + "/expected.npz", **{{k: np.asarray(v) for k, v in to_flat(state).items()}})
"""

CKPT_READER = """
import sys, jax, numpy as np
from flax import nnx
from qlora_jax.train.checkpoint import Checkpointer, to_flat
from qlora_jax.nn.lora import LoraConfig
from qlora_jax.nn.model import ModelOptions
from qlora_jax.nn.model_config import ModelConfig
from qlora_jax.nn.sharding import make_layout
from qlora_jax.train.config import OptimConfig
from qlora_jax.train.optimizer import init_optimizer, make_optimizer
from qlora_jax.testing import random_model

expected = dict(np.load(sys.argv[1] + "/expected.npz"))
model = random_model(ModelConfig(**{tiny}), ModelOptions(lora=LoraConfig(rank=8), scan_layers=True), seed=2)
_, lora0, rng0, _ = nnx.split(model, nnx.LoRAParam, nnx.RngState, ...)  # other values, same structure
tx = make_optimizer(OptimConfig())[0]
for mesh in [(("fsdp", jax.device_count()),), (("data", 1),)]:
  layout = make_layout(mesh)
  lora, rng = (lora0, rng0) if layout is None else layout.put((lora0, rng0))
  template = {{"lora": lora, "rng": rng, "opt_state": init_optimizer(tx, lora, layout)}}
  ckpt = Checkpointer(sys.argv[1], 2)
  state, meta = ckpt.restore(template)
  ckpt.close()
  flat = to_flat(state)
  assert meta["step"] == 7 and sorted(flat) == sorted(expected)
  for k, v in flat.items():
    assert v.sharding == to_flat(template)[k].sharding, k
    np.testing.assert_array_equal(np.asarray(v), expected[k], err_msg=k)
  print("restored", jax.device_count(), mesh, flush=True)
"""


def test_checkpoint_written_sharded_restores_onto_other_device_counts(tmp_path):
  """Written from 8 devices (data 2 x fsdp 4), read bit for bit into 2 devices split over fsdp and
  into one device, each in the layout of its template."""
  _on_devices(8, CKPT_WRITER.format(tiny=TINY), tmp_path)
  out = _on_devices(2, CKPT_READER.format(tiny=TINY), tmp_path)
  assert out.count("restored 2") == 2, out


def test_v5e_config_path_on_8_simulated_devices_then_resumed_on_one(tiny_model_dir, tmp_path, capsys):
  """configs/llama65b_v5e.py as it is (data 1 x fsdp 8, LoRA split) with a tiny model: the
  estimate is printed and checked, two steps train and are checkpointed; the run then resumes
  on one device from the 8-device checkpoint."""
  run = tmp_path / "run"
  common = [f"model_dir={tiny_model_dir}", "model_source=", "dataset=data/answer_reason.jsonl",
            "dataset_format=chat", "eval_size=8", "source_max_len=48", "target_max_len=16",
            "grad_accum=1", "eval_every=100", "save_every=2", f"output_dir={run}"]
  out = _on_devices(8, "", ROOT / "train.py", "--config", "llama65b_v5e", *common, "steps=2",
                    "device_memory_gib=16")
  assert "mesh {'data': 1, 'fsdp': 8}; LoRA fsdp" in out
  assert "memory per device (estimate, 8 device(s))" in out and "device memory (cpu, device_memory_gib)" in out
  assert (run / "checkpoints" / "2").is_dir()
  summary = trainer.train(load_config("llama65b_v5e", [*common, "steps=3", "mesh=data:-1"]))
  assert "resumed from" in capsys.readouterr().out and summary.steps == 3
  assert np.isfinite(summary.eval_loss_after)


def test_multi_gpu_bench_on_8_simulated_devices():
  out = _on_devices(8, "", ROOT / "bench" / "multi_gpu.py", "--model", "tiny", "--devices", "8",
                    "--per-device-batch", "1", "--seq", "32", "--steps", "1", "--rank", "4")
  result = json.loads(out.strip().splitlines()[-1])
  assert result["devices"] == 8 and result["global_batch"] == 8 and result["mesh"] == {"fsdp": 8}
  assert result["tokens_per_s"] > 0 and len(result["peak_gib_per_device"]) == 8 and result["first_step_s"] > 0


HOST_EMBEDDING_WORKER = """
import jax, numpy as np
from qlora_jax.nn.lora import LoraConfig
from qlora_jax.nn.model import ModelOptions
from qlora_jax.nn.model_config import ModelConfig
from qlora_jax.nn.sharding import make_layout
from qlora_jax.testing import random_model
from qlora_jax.train.builder import build
from qlora_jax.train.config import OptimConfig

ids = np.random.default_rng(0).integers(0, 1024, (1, 4, 17)).astype(np.int32)
batch = {{"input_ids": ids[..., :-1], "labels": ids[..., 1:],
          "positions": np.broadcast_to(np.arange(16, dtype=np.int32), (1, 4, 16)).copy()}}
losses = []
for host in (False, True):
  layout = make_layout((("fsdp", 4),))
  options = ModelOptions(dtype="float32", lora=LoraConfig(rank=4), remat="full", scan_layers=True)
  t = build(random_model(ModelConfig(**{tiny}), options, seed=2, layout=layout), OptimConfig(steps=10),
            layout, host_embedding=host)
  losses.append([float(t.train_step(t.put_batch(batch, leading=1))["loss"]) for _ in range(2)])
assert losses[0] == losses[1], losses
print("equal", losses)
"""


def test_embedding_in_host_memory_under_fsdp():
  """fsdp:4 with the embedding table in host memory (rows looked up by put_batch, sharded with
  the batch): the same losses as the table split over the devices."""
  assert "equal" in _on_devices(4, HOST_EMBEDDING_WORKER.format(tiny=TINY))


@pytest.mark.parametrize("config, shape, base_gib", [
    ("qwen3_8b_h100", "qwen3-8b", (3, 4)),  # q/k norms, 152k vocabulary
    ("gemma2_9b_h100", "gemma2-9b", (3.5, 4.5)),  # softcaps: XLA attention; tied 256k on the device
    ("gemma3_12b_h100", "gemma3-12b", (5, 6.5)),  # 5:1 sliding layers, head_dim 256
    ("phi4_mini_h100", "phi4-mini", (1.2, 2)),  # fused projections split at conversion
    ("qwen3_30b_a3b_h100", "qwen3-30b-a3b", (13.5, 15.5)),  # 128 experts a layer, 4-bit
])
def test_the_shipped_family_configs_fit_one_h100(config, shape, base_gib):
  """Each new family's shipped config on its model's shape: the start-up estimate fits an
  80 GiB device, the 4-bit base in the range its parameter count implies."""
  from qlora_jax.testing import shape_config

  cfg = load_config(config)
  model = shape_config(shape)
  est = memory.estimate(model, cfg.model_options(), cfg, {"data": 1})
  memory.check_fits(est, 80 * 2**30, "H100", cfg, {"data": 1})
  low, high = base_gib
  assert low * 2**30 < est.terms["4-bit base weights (stored)"] < high * 2**30, est.text()
  assert est.total < 40 * 2**30, est.text()
  if model.layer_types:
    assert est.terms["attention masks"] > 0, est.text()


def test_expert_axis_divides_the_experts_in_the_estimate():
  """Qwen3-30B-A3B on expert:8: each device stores and computes with an eighth of the experts
  (the attention stays whole), so the stored base and the layer in use shrink by close to 8."""
  from qlora_jax.testing import shape_config

  cfg = load_config("qwen3_30b_a3b_h100")
  model = shape_config("qwen3-30b-a3b")
  one = memory.estimate(model, cfg.model_options(), cfg, {"data": 1})
  ep = memory.estimate(model, cfg.model_options(), cfg, {"expert": 8})
  stored, in_use = "4-bit base weights (stored)", "4-bit layer gathered for use (x2, prefetch)"
  assert 6 < one.terms[stored] / ep.terms[stored] < 8, (one.text(), ep.text())
  assert ep.terms[in_use] < 2 * one.terms[stored] / model.num_hidden_layers / 6, ep.text()


def test_step_memory_bench_reads_growth_with_the_row():
  """bench/step_memory.py compiles the whole step without running it: XLA's temporaries grow
  with the row."""
  out = subprocess.run([sys.executable, str(ROOT / "bench" / "step_memory.py"), "--model", "tiny",
                        "--seq", "32", "128", "--attention", "xla", "--remat", "offload_attention"],
                       capture_output=True, text=True, check=True).stdout
  rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
  assert [r["seq"] for r in rows] == [32, 128] and rows[0]["remat"] == "offload_attention"
  assert 0 < rows[0]["temp"] < rows[1]["temp"] and rows[1]["temp_bytes_per_token"] > 0


@pytest.mark.parametrize("shape, embedding, measured_gib", [
    ("qwen3-8b", "host", 8.52), ("qwen3-30b-a3b", "host", 17.78),
    pytest.param("gemma3-12b", "device", 13.05, marks=pytest.mark.xfail(strict=True, reason=(
        "Gemma-3-12B peaks 1.2 GiB (10%) above the estimate (H100, 2026-12-06: 13.12 GiB through "
        "[B, T, T] masks, 13.05 on the mask-free path, so the masks were not it); which term the "
        "formula misses for this family (262k vocabulary, four norms a layer, 256-wide heads) needs "
        "a GPU memory profile"))),
])
def test_estimate_tracks_the_families_measured_peaks(shape, embedding, measured_gib):
  """The new families at 4 x 2048 on one H100 (remat=offload, bf16 LoRA, cuDNN attention, XLA's
  dequantize + cuBLAS for every training product, the `auto` of that day;
  docs/results/h100_2026-12-06/ours_families.jsonl, ours_moe_grouped_kernels.jsonl; the
  Qwen3-30B-A3B row with LoRA on the attention only): the estimate within 5%."""
  from qlora_jax.nn.families import LINEAR_NAMES
  from qlora_jax.testing import shape_config

  model = shape_config(shape)
  cfg = TrainConfig(model=ModelSetup(model_dir="-", remat="offload", attention="cudnn"),
                    data=DataConfig(dataset="-", source_max_len=1, target_max_len=2047),
                    optim=OptimConfig(batch_size=4)).replace(lora_dtype="bfloat16", embedding=embedding,
                                                             lora_targets=LINEAR_NAMES)
  est = memory.estimate(model, cfg.model_options(), cfg, {"data": 1})
  assert abs(est.total / 2**30 / measured_gib - 1) < 0.05, est.text()
