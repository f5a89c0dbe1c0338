"""Training: configs, LoRA-only updates, compile-once step, resume, NaN and bad input, default run."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from qlora_jax.train import config as config_lib, trainer
from qlora_jax.train.config import TrainConfig
from qlora_jax.train.config_files import CONFIG_DIR, apply_overrides, load_config
from qlora_jax.train.optimizer import HostState
from tests.conftest import needs_smollm2

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _tiny(tiny_model_dir, out, *overrides):
  return load_config("tiny_test", [f"model_dir={tiny_model_dir}", "model_source=",
                                   f"output_dir={out}", *overrides])


def _cli(*args, timeout=600, **kw):
  return subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, args)], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout, **kw)


def _lora_arrays(run_dir) -> dict:
  from qlora_jax.export import linear_modules, load_run

  _, model, _ = load_run(run_dir)
  return {name: (np.asarray(m.lora_a[...]), np.asarray(m.lora_b[...]))
          for name, m, _ in linear_modules(model) if m.lora is not None}


def _lora_bytes(run_dir) -> dict:
  return {name: tuple(x.tobytes() for x in ab) for name, ab in _lora_arrays(run_dir).items()}


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.py")), ids=lambda p: p.stem)
def test_every_shipped_config_loads(path):
  cfg = load_config(path.stem)
  assert isinstance(cfg, TrainConfig) and cfg.optim.steps >= 1


def test_overrides_are_type_checked():
  cfg = load_config("tiny_test")
  cfg = apply_overrides(cfg, ["steps=9", "learning_rate=3e-4", "packing=false",
                              "lora_targets=q_proj,v_proj", "mesh=data:2,fsdp:4"])
  assert (cfg.optim.steps, cfg.optim.learning_rate, cfg.data.packing) == (9, 3e-4, False)
  assert cfg.lora.targets == ("q_proj", "v_proj") and cfg.devices.mesh == (("data", 2), ("fsdp", 4))
  assert apply_overrides(cfg, ["optim.steps=7"]).optim.steps == 7  # dotted keys too
  with pytest.raises(ValueError, match="unknown config key 'stepz'; valid keys: .*steps"):
    apply_overrides(cfg, ["stepz=3"])
  with pytest.raises(ValueError, match="bad value for steps"):
    apply_overrides(cfg, ["steps=many"])
  with pytest.raises(ValueError, match="lora_targets must be among"):
    apply_overrides(cfg, ["lora_targets=qq_proj"])
  with pytest.raises(ValueError, match="must be int"):
    cfg.replace(steps="3")


def test_flat_keys_are_unique_and_cover_every_field():
  fields = {f"{name}.{f}" for name, cls in config_lib.SECTIONS.items() for f in config_lib.field_types(cls)}
  assert sorted(config_lib.flat_keys().values()) == sorted(fields)


def test_config_round_trips_through_its_json_and_old_flat_files(tmp_path):
  cfg = apply_overrides(load_config("tiny_test"), ["mesh=data:2,fsdp:4", "lora_targets=q_proj,v_proj"])
  config_lib.save_config(cfg, tmp_path / "config.json")
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["optim"]["steps"] == cfg.optim.steps and saved["lora"]["rank"] == cfg.lora.rank
  assert TrainConfig.from_dict(saved) == cfg
  flat = cfg.to_flat_dict()  # the format older runs wrote
  assert flat["lora_rank"] == cfg.lora.rank and flat["steps"] == cfg.optim.steps
  assert TrainConfig.from_dict(json.loads(json.dumps(flat))) == cfg


# The refusals issue 24 names, each one line and exit 2 before any model work (no run folder).
@pytest.mark.parametrize("override, match", [
    ("learning_rate=-1e-3", "learning_rate must be > 0"), ("learning_rate=nan", "learning_rate must be > 0"),
    ("learning_rate=0", "learning_rate must be > 0"), ("lora_alpha=-16", "alpha must be > 0"),
    ("max_grad_norm=-1", "max_grad_norm must be >= 0"), ("weight_decay=-5", "weight_decay must be >= 0"),
    ("adam_beta1=2", "adam_beta1 must be in [0, 1)"), ("backend=palas", "backend must be one of"),
    ("lora_dtype=int8", "param_dtype must be"), ("optim.warmup_ratio=1.5", "warmup_ratio must be in"),
    ("embedding=gpu", "embedding must be one of"), ("mlp_chunk=-5", "mlp_chunk must be >= 0"),
    ("loss_chunk=-1", "loss_chunk must be >= 0"),
])
def test_bad_values_are_refused_in_one_line_before_model_work(tmp_path, override, match):
  r = _cli(override, f"output_dir={tmp_path / 'run'}", "model_dir=" + str(tmp_path / "never_made"))
  assert r.returncode == 2 and match in r.stderr and r.stderr.count("\n") == 1, r.stderr[-2000:]
  assert not (tmp_path / "run").exists() and not (tmp_path / "never_made").exists()


def test_help_lists_every_key_with_type_and_default():
  r = _cli("--help")
  assert r.returncode == 0
  for key in config_lib.flat_keys():
    assert key in r.stdout, key
  assert "learning_rate            float                      0.0002" in r.stdout


@pytest.mark.parametrize("args, match", [
    (["stepz=3"], "unknown config key"),
    (["steps=lots"], "bad value for steps"),
    (["dataset=does/not/exist.jsonl"], "does not exist"),
    (["--config", "nope"], "not found"),
])
def test_cli_bad_input_is_one_clear_error(tmp_path, args, match):
  r = _cli(*args, f"output_dir={tmp_path / 'run'}") if args[0] != "--config" else _cli(*args)
  assert r.returncode == 2 and match in r.stderr and r.stderr.count("error:") == 1, r.stderr[-2000:]


def test_empty_dataset_is_refused(tiny_model_dir, tmp_path):
  (tmp_path / "empty.jsonl").write_text("")
  with pytest.raises(ValueError, match="empty|cannot read"):
    trainer.train(_tiny(tiny_model_dir, tmp_path / "run", f"dataset={tmp_path / 'empty.jsonl'}"))


@pytest.mark.parametrize("offloaded", [False, True])
def test_only_lora_changes_and_step_compiles_once(tiny_model_dir, tmp_path, offloaded):
  cfg = _tiny(tiny_model_dir, tmp_path / "run")
  # stacked layers offloaded: the moments stream in chunks (a HostState), two programs
  run = trainer.setup(cfg.replace(offload_optimizer=offloaded))
  t = run.trainable
  assert isinstance(t.opt_state, HostState) == offloaded
  frozen_before = [np.asarray(x).tobytes() for x in jax.tree.leaves(t.frozen)]
  lora_before = [np.asarray(x).copy() for x in jax.tree.leaves(t.lora)]
  for _ in range(4):
    metrics = t.train_step(t.put_batch(run.batches.next_accumulated(cfg.optim.grad_accum)))
  assert np.isfinite(float(metrics["loss"]))
  # packed batches have one shape: each program compiled exactly once (the model's uncommitted
  # arrays in the first step and the programs' committed outputs after it included)
  compiled = {name: p._cache_size() for name, p in t.step.programs.items()}
  assert compiled == ({"whole": 0, "gradients": 1, "update": 1} if offloaded else
                      {"whole": 1, "gradients": 0, "update": 0}), compiled
  assert [np.asarray(x).tobytes() for x in jax.tree.leaves(t.frozen)] == frozen_before
  assert all(not np.array_equal(a, np.asarray(b)) for a, b in zip(lora_before, jax.tree.leaves(t.lora))
             if a.ndim == 2 and a.any())
  lora_params = sum(x.size for x in jax.tree.leaves(t.lora))
  moments = sum(x.size for x in jax.tree.leaves(t.opt_state) if x.ndim > 0)
  assert moments == 2 * lora_params  # AdamW's mu and nu of the LoRA params, nothing else


def test_offloaded_optimizer_matches_on_device(tiny_model_dir, tmp_path):
  results = []
  for offloaded in (False, True):
    cfg = _tiny(tiny_model_dir, tmp_path / f"run{offloaded}", "steps=3", f"offload_optimizer={offloaded}")
    trainer.train(cfg)
    results.append(_lora_arrays(tmp_path / f"run{offloaded}"))
  # The offloaded state is updated chunk by chunk (other XLA programs): equal to float32 rounding.
  assert results[0].keys() == results[1].keys()
  for name, pair in results[0].items():
    for want, got in zip(pair, results[1][name]):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max(), err_msg=name)


def _resume_args(tiny_model_dir):
  return [f"model_dir={tiny_model_dir}", "model_source=", "steps=12", "save_every=3",
          "eval_every=100", "keep_checkpoints=10", "--config", "tiny_test"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tmp_path_factory):
  """LoRA bytes after an uninterrupted 12-step run of the resume tests' command."""
  out = tmp_path_factory.mktemp("straight") / "run"
  r = _cli(*_resume_args(tiny_model_dir), f"output_dir={out}")
  assert r.returncode == 0, r.stderr[-3000:]
  return _lora_bytes(out)


def test_resume_after_kill_is_bitwise_identical(tiny_model_dir, tmp_path, uninterrupted):
  common = _resume_args(tiny_model_dir)
  # kill -9 mid-training (after the step-6 checkpoint), then resume.
  run = tmp_path / "killed"
  proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *common, f"output_dir={run}"],
                          cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  _wait_for(lambda: (run / "checkpoints" / "6").is_dir(), proc)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert not (run / "checkpoints" / "12").exists()
  r = _cli(*common, f"output_dir={run}")
  assert r.returncode == 0 and "resumed from" in r.stdout + r.stderr, r.stderr[-3000:]
  assert _lora_bytes(run) == uninterrupted


def test_resume_after_kill_during_save_is_bitwise_identical(tiny_model_dir, tmp_path, uninterrupted):
  common = _resume_args(tiny_model_dir)
  run = tmp_path / "killed"
  # The run stops itself with SIGKILL while orbax is writing the step-6 checkpoint.
  env = dict(os.environ, QLORA_JAX_TEST_KILL_DURING_SAVE="6")
  r = _cli(*common, f"output_dir={run}", env=env)
  assert r.returncode == -signal.SIGKILL
  assert list((run / "checkpoints").glob("6.*tmp*")), "the save had not started"
  assert not (run / "checkpoints" / "6").exists(), "the save had completed"
  r = _cli(*common, f"output_dir={run}")
  assert r.returncode == 0 and "resumed from" in r.stdout + r.stderr, r.stderr[-3000:]
  assert "(step 3)" in r.stdout + r.stderr
  assert _lora_bytes(run) == uninterrupted


def _wait_for(condition, proc, timeout=300):
  deadline = time.time() + timeout
  while not condition():
    assert proc.poll() is None, "the run ended before the condition held"
    assert time.time() < deadline, "timed out"
    time.sleep(0.05)


def test_resume_flags(tiny_model_dir, tmp_path):
  cfg = _tiny(tiny_model_dir, tmp_path / "run", "steps=3")
  with pytest.raises(ValueError, match="holds no checkpoint"):
    trainer.train(cfg, resume=True)
  trainer.train(cfg)
  before = (tmp_path / "run" / "config.json").read_text()
  with pytest.raises(ValueError, match="already holds checkpoints"):
    trainer.train(apply_overrides(cfg, ["lora_rank=8"]), resume=False)
  assert (tmp_path / "run" / "config.json").read_text() == before  # refused runs change nothing


def test_mesh_beyond_the_devices_is_refused_clearly(tiny_model_dir, tmp_path):
  with pytest.raises(ValueError, match="needs 8 devices; 1 cpu device"):
    trainer.train(_tiny(tiny_model_dir, tmp_path / "run", "mesh=data:1,fsdp:8"))
  assert not (tmp_path / "run").exists()  # refused before anything is written


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_model_dir, tmp_path):
  run = tmp_path / "run"
  r = _cli("--config", "tiny_test", f"model_dir={tiny_model_dir}", "model_source=", f"output_dir={run}",
           "steps=12", "save_every=2", "learning_rate=1e30", "warmup_ratio=0.0", "max_grad_norm=1e30")
  assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
  assert "at step" in r.stderr and "last good checkpoint" in r.stderr
  bad_step = int(r.stderr.split("at step ")[1].split()[0])
  steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
  assert all(s < bad_step for s in steps)


def test_truncation_is_counted(tiny_model_dir, tmp_path):
  summary = trainer.train(_tiny(tiny_model_dir, tmp_path / "run", "steps=1", "target_max_len=4"))
  assert summary.truncated > 0
  assert f"truncated to source/target max length: {summary.truncated}" in summary.text()


def test_run_folder_has_metrics_plot_and_summary(tiny_model_dir, tmp_path, capsys):
  cfg = _tiny(tiny_model_dir, tmp_path / "run", "steps=4")
  trainer.train(cfg)
  assert cfg.text() in capsys.readouterr().out  # the effective config, printed at start
  assert TrainConfig.from_dict(json.loads((tmp_path / "run" / "config.json").read_text())) == cfg
  records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert any("loss" in r for r in records) and any("eval_loss" in r for r in records)
  assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
  assert "eval loss" in (tmp_path / "run" / "summary.txt").read_text()


@needs_smollm2
def test_default_run_shortened(smollm2_dir, tmp_path):
  """The default config on the real SmolLM2, fewer steps: eval loss must drop clearly."""
  cfg = load_config("smollm2_135m_cpu", [f"model_dir={smollm2_dir}", f"output_dir={tmp_path / 'run'}",
                                         "steps=6", "eval_every=100", "save_every=100",
                                         "sample_prompts=What is the capital of Italy?"])
  summary = trainer.train(cfg)
  print("\n" + summary.text())
  assert summary.eval_loss_after < 0.5 * summary.eval_loss_before
  assert summary.samples_after[0][1].startswith("Answer:")


def test_sections_check_their_field_types_and_keep_the_recipe_defaults():
  from qlora_jax.nn.lora import LoraConfig
  from qlora_jax.train.config import DeviceConfig

  with pytest.raises(ValueError, match="targets a tuple"):
    LoraConfig(targets=["q_proj", "v_proj"])
  with pytest.raises(ValueError, match="must be tuple"):
    DeviceConfig(mesh="data:-1")
  cfg = load_config("tiny_test")
  partial = {"model": {"model_dir": "m"}, "data": {"dataset": "d"}, "lora": {"rank": 8}}
  assert TrainConfig.from_dict(partial).lora.dropout == TrainConfig.from_dict(
      {"model_dir": "m", "dataset": "d"}).lora.dropout == 0.1  # the recipe's, not LoraConfig's
  assert cfg.replace(lora_rank=8).lora.dropout == cfg.lora.dropout


@pytest.mark.parametrize("model_type, extra", [
    ("gemma2", dict(sliding_window=5, layer_types=["sliding_attention", "full_attention"],
                    attn_logit_softcapping=50.0, final_logit_softcapping=30.0, query_pre_attn_scalar=16)),
    ("gemma3_text", dict(sliding_window=5, layer_types=["sliding_attention", "full_attention"],
                         rope_local_base_freq=10000.0, rope_theta=1000000.0)),
    ("qwen3_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True)),
])
def test_new_families_train_through_the_trainer(tmp_path, smollm2_dir, model_type, extra):
  """A converted Gemma 2 / Gemma 3 / Qwen3-MoE folder trains through train.py's trainer (scanned layers,
  remat=offload_attention, packed rows; the experts model with expert adapters and the router's
  loss): finite losses, adapters moved, a PEFT export."""
  import shutil

  from qlora_jax.io.convert import convert
  from tests.test_convert import synthetic_checkpoint

  cfg = dict(model_type=model_type, vocab_size=49152, hidden_size=64, intermediate_size=96,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh",
             bos_token_id=1, eos_token_id=2, **extra)
  synthetic_checkpoint(tmp_path / "src", cfg, shard_bytes=1 << 30, seed=5)
  for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
    if (smollm2_dir / f).is_file():
      shutil.copy(smollm2_dir / f, tmp_path / "src" / f)
  convert(str(tmp_path / "src"), tmp_path / "nf4", progress=False)
  run = tmp_path / "run"
  # The experts model trains adapters on its experts too, with the router's load-balancing loss.
  experts = ("router_aux_loss=0.01", "lora_dropout=0",
             "lora_targets=q_proj,v_proj,experts.gate_up_proj,experts.down_proj") if model_type == "qwen3_moe" else ()
  summary = trainer.train(_tiny(tmp_path / "nf4", run, "steps=3", "remat=offload_attention",
                                "learning_rate=1e-2", *experts))
  assert summary.steps == 3 and np.isfinite(summary.eval_loss_after)
  assert any(np.abs(b).max() > 0 for _, b in _lora_arrays(run).values())
  from qlora_jax.export import main as export_main
  assert export_main([str(run), str(tmp_path / "adapter")]) == 0
