"""A run folder survives what users do to it: damaged checkpoints, NaN steps, kills and reruns,
killed conversions; what is written has normal permissions; bad config files are one line."""

import hashlib
import json
import os
import pathlib
import shutil
import signal
import stat
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax.io.convert import convert
from qlora_jax.train import trainer
from qlora_jax.train.builder import Trainable
from qlora_jax.train.checkpoint import DIGEST_FILE, KILL_DURING_SAVE, Checkpointer
from qlora_jax.train.metrics import MetricsLog
from tests.conftest import has
from tests.test_train import _cli, _tiny
from tests.test_convert import _llama_config, synthetic_checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUN = ["--config", "tiny_test", "model_source=", "save_every=2", "eval_every=100", "keep_checkpoints=5"]


def _run_cli(tiny_model_dir, run, steps, **kw):
  return _cli(*RUN, f"model_dir={tiny_model_dir}", f"output_dir={run}", f"steps={steps}", **kw)


def _messages(stderr: str) -> list[str]:
  """stderr's lines without tqdm's progress bar."""
  return [line for line in stderr.split("\n") if line.strip() and "training:" not in line]


def _tree(folder: pathlib.Path) -> dict[str, str]:
  """{path: sha256} of every file under folder."""
  return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(folder.rglob("*")) if p.is_file()}


def _largest_data_file(step_dir: pathlib.Path) -> pathlib.Path:
  return max((p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"),
             key=lambda p: p.stat().st_size)


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory):
  """A finished 6-step run with checkpoints at steps 2, 4 and 6 (copy it before changing it)."""
  out = tmp_path_factory.mktemp("finished") / "run"
  trainer.train(_tiny(tiny_model_dir, out, "steps=6", "save_every=2", "eval_every=100",
                      "keep_checkpoints=5"))
  return out


def test_unreadable_checkpoints_are_set_aside_in_one_line_each(tiny_model_dir, finished_run, tmp_path):
  run = tmp_path / "run"
  shutil.copytree(finished_run, run)
  ckpts = run / "checkpoints"
  data = _largest_data_file(ckpts / "6")
  flipped = bytearray(data.read_bytes())
  flipped[len(flipped) // 2] ^= 1  # one bit: orbax would read it back without noticing
  data.write_bytes(bytes(flipped))
  truncated = _largest_data_file(ckpts / "4")
  truncated_size = truncated.stat().st_size
  truncated.write_bytes(truncated.read_bytes()[:100])
  damaged = {s: _tree(ckpts / s) for s in ("4", "6")}
  r = _run_cli(tiny_model_dir, run, steps=8)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "Traceback" not in r.stderr
  lines = _messages(r.stderr)
  assert len(lines) == 2, lines
  assert lines[0].startswith(f"warning: checkpoint step 6 in {ckpts} is unreadable (")
  assert "changed after it was written" in lines[0] and "set aside as 6.unreadable" in lines[0]
  assert lines[1] == (f"warning: checkpoint step 4 in {ckpts} is unreadable ({truncated.relative_to(ckpts / '4')} "
                      f"has 100 bytes, {truncated_size} were written); set aside as "
                      "4.unreadable, resuming from step 2")
  assert "(step 2)" in r.stdout
  assert {s: _tree(ckpts / f"{s}.unreadable") for s in ("4", "6")} == damaged  # kept as they were
  assert {p.name for p in ckpts.iterdir()} >= {"2", "4", "6", "8", "4.unreadable", "6.unreadable"}


def test_a_checkpoint_without_digest_that_orbax_cannot_read_is_set_aside(tmp_path, capsys):
  """Checkpoints saved before digests existed: orbax's own failure is the signal."""
  state = {"w": jnp.arange(4096.0).reshape(64, 64), "b": jnp.ones(64)}
  ckpt = Checkpointer(tmp_path, keep=5)
  for step in (1, 2):
    ckpt.save(step, state, {"step": step})
  ckpt.close()
  (tmp_path / "checkpoints" / "2" / DIGEST_FILE).unlink()
  data = _largest_data_file(tmp_path / "checkpoints" / "2")
  data.write_bytes(data.read_bytes()[:100])
  capsys.readouterr()
  restored, meta = Checkpointer(tmp_path, keep=5).restore(state)
  assert meta == {"step": 1} and np.array_equal(restored["w"], state["w"])
  lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("warning:")]
  assert len(lines) == 1 and lines[0].startswith("warning: checkpoint step 2 in ")
  assert lines[0].endswith("set aside as 2.unreadable, resuming from step 1")
  assert (tmp_path / "checkpoints" / "2.unreadable").is_dir()


def test_no_readable_checkpoint_is_one_error_and_changes_nothing(tiny_model_dir, finished_run, tmp_path):
  run = tmp_path / "run"
  shutil.copytree(finished_run, run)
  for step in ("2", "4", "6"):
    data = _largest_data_file(run / "checkpoints" / step)
    data.write_bytes(data.read_bytes()[:100])
  before = _tree(run)
  r = _run_cli(tiny_model_dir, run, steps=8)
  assert r.returncode == 2, r.stderr[-3000:]
  lines = _messages(r.stderr)
  assert len(lines) == 1 and lines[0].startswith(f"error: no checkpoint in {run / 'checkpoints'} is readable"), lines
  assert "step 6 (" in lines[0] and "step 2 (" in lines[0] and "Nothing was moved or deleted" in lines[0]
  assert _tree(run) == before


def test_a_nan_step_never_becomes_a_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
  calls = []
  train_step = Trainable.train_step

  def poisoned(self, batch):
    metrics = train_step(self, batch)
    calls.append(1)
    return {**metrics, "loss": jnp.float32(jnp.nan)} if len(calls) == 3 else metrics

  monkeypatch.setattr(Trainable, "train_step", poisoned)
  run = tmp_path / "run"
  with pytest.raises(trainer.TrainingError, match="at step 3 .*last good checkpoint is kept"):
    trainer.train(_tiny(tiny_model_dir, run, "steps=6", "save_every=1", "eval_every=100",
                        "keep_checkpoints=10"))
  assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["1", "2"]
  records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
  assert max(r["step"] for r in records) == 2
  assert not (run / "summary.txt").exists()


def _events(run: pathlib.Path) -> list[pathlib.Path]:
  return sorted((run / "tensorboard").glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)


def test_kill_resume_and_rerun_keep_the_metrics_whole(tiny_model_dir, tmp_path):
  run = tmp_path / "run"
  r = _run_cli(tiny_model_dir, run, steps=6, env=dict(os.environ, **{KILL_DURING_SAVE: "4"}))
  assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
  if has("tensorboardX"):
    assert _events(run)[0].stat().st_size > 0  # steps 1-4 reached the disk before the kill
  trainer.train(_tiny(tiny_model_dir, run, *RUN[2:], "steps=6"))  # resumes from step 2
  records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
  before = [r["eval_loss"] for r in records if r["step"] == 0]
  assert len(before) == 1 and f"eval loss: {before[0]:.4f} -> " in (run / "summary.txt").read_text()
  assert sorted(r["step"] for r in records if "loss" in r) == [1, 2, 3, 4, 5, 6]
  assert [r["step"] for r in records if "eval_loss" in r] == [0, 6]
  kept = _tree(run)
  r = _run_cli(tiny_model_dir, run, steps=6)
  assert r.returncode == 0 and "already finished at step 6" in r.stdout, r.stderr[-3000:]
  assert "train loss (last step): n/a" not in r.stdout
  assert _tree(run) == kept  # no summary rewritten, no eval record or events file added


@pytest.mark.skipif(not has("tensorboardX"), reason="TensorBoard logging needs tensorboardX")
def test_tensorboard_events_reach_the_disk_while_the_run_goes_on(tmp_path):
  log = MetricsLog(tmp_path)
  log.write({"step": 1, "loss": 1.5})
  time.sleep(3)  # the run goes on; a kill now must not lose the record
  (events,) = _events(tmp_path)
  written = events.stat().st_size
  log.close()
  assert written > 0 and events.stat().st_size == written


def test_a_rerun_removes_the_partial_folder_of_a_killed_conversion(tmp_path):
  synthetic_checkpoint(tmp_path / "src", _llama_config(), 1 << 30)
  out = tmp_path / "out"
  killed = ("import os, signal\nfrom qlora_jax.format.atomic import atomic_dir\n"
            f"with atomic_dir({str(out)!r}) as tmp:\n"
            "  (tmp / 'shard-00000.tmp').write_bytes(b'half')\n  os.kill(os.getpid(), signal.SIGKILL)\n")
  assert subprocess.run([sys.executable, "-c", killed], cwd=ROOT).returncode == -signal.SIGKILL
  (stale,) = tmp_path.glob(".out.partial-*")
  legacy = tmp_path / ".out.partial-k2x9q0zz"  # named before the writer's pid was recorded
  live = tmp_path / f".out.partial-{os.getpid()}-abc"  # a writer that still runs
  others = [tmp_path / ".other.partial-k2x9q0zz", tmp_path / "out.partial-mine"]
  for folder in (legacy, live, *others):
    folder.mkdir()
  (tmp_path / ".out.partial-note").write_text("a file, not a partial folder")
  convert(str(tmp_path / "src"), out, progress=False)
  assert not stale.exists() and not legacy.exists()
  assert live.is_dir() and all(p.is_dir() for p in others)
  assert (tmp_path / ".out.partial-note").read_text() == "a file, not a partial folder"


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_converted_files_get_the_permissions_open_gives(tmp_path, umask):
  synthetic_checkpoint(tmp_path / "src", _llama_config(), 1 << 30)
  old = os.umask(umask)
  try:
    convert(str(tmp_path / "src"), tmp_path / "out", shard_bytes=100_000, progress=False)
  finally:
    os.umask(old)
  paths = [tmp_path / "out", *(tmp_path / "out").rglob("*")]
  assert any(p.suffix == ".safetensors" for p in paths)
  for p in paths:
    want = (0o777 if p.is_dir() else 0o666) & ~umask
    assert stat.S_IMODE(p.stat().st_mode) == want, (p.name, oct(p.stat().st_mode))


@pytest.mark.parametrize("text, match", [
    ("from qlora_jax.train.config import TrainConfig\nconfig = TrainConfig(\n  steps=3,,\n)\n",
     ", line 3: invalid syntax"),
    ("from qlora_jax.train.config import TrainConfig\n\nconfig = TrainConfg()\n",
     ", line 3: NameError: name 'TrainConfg' is not defined"),
], ids=["syntax", "name"])
def test_a_broken_config_file_is_one_line_naming_file_and_line(tmp_path, text, match):
  path = tmp_path / "mine.py"
  path.write_text(text)
  r = _cli("--config", path, f"output_dir={tmp_path / 'run'}")
  assert r.returncode == 2, r.stderr[-3000:]
  assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"error: {path}{match}"), r.stderr[-3000:]
  assert not (tmp_path / "run").exists()


def test_memory_estimate_of_an_unknown_shape_is_one_line():
  r = subprocess.run([sys.executable, "-m", "qlora_jax.train.memory", "--config", "tiny_test",
                      "--shape", "foo"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr[-3000:]
  assert r.stderr.startswith("error: unknown shape 'foo'; choose one of")


def test_a_run_resumes_only_with_its_own_settings(tiny_model_dir, finished_run, tmp_path):
  """The README's second command after the quick start (lora_targets changed) used to fail in
  orbax internals; a changed learning rate or dataset was applied silently. Now anything but
  the resumable keys is refused in one line listing the keys, and nothing in the folder
  changes; more steps resume, and config.json records them."""
  run = tmp_path / "run"
  shutil.copytree(finished_run, run)
  before = _tree(run)
  for change, key in (("lora_targets=q_proj,v_proj", "lora_targets"), ("learning_rate=5e-4", "learning_rate")):
    r = _cli(*RUN, f"model_dir={tiny_model_dir}", f"output_dir={run}", change)
    assert r.returncode == 2 and len(_messages(r.stderr)) == 1, r.stderr[-2000:]
    assert f"changed: {key}" in r.stderr and "output_dir=<new folder>" in r.stderr, r.stderr
  assert _tree(run) == before
  steps = json.loads((run / "config.json").read_text())["optim"]["steps"]
  r = _cli(*RUN, f"model_dir={tiny_model_dir}", f"output_dir={run}", f"steps={steps + 2}")
  assert r.returncode == 0, r.stderr[-2000:]
  assert json.loads((run / "config.json").read_text())["optim"]["steps"] == steps + 2


def test_a_converted_folder_is_not_used_for_other_quant_settings(tiny_model_dir, tmp_path):
  r = _cli(*RUN, f"model_dir={tiny_model_dir}", f"output_dir={tmp_path / 'run'}", "quant_type=fp4",
           "blocksize=128")
  assert r.returncode == 2 and "holds a quant_type=nf4 blocksize=64" in r.stderr, r.stderr[-2000:]
  assert "asks for quant_type=fp4 blocksize=128" in r.stderr and not (tmp_path / "run").exists()


def test_rows_longer_than_the_context_are_refused(tiny_model_dir, tmp_path):
  from qlora_jax.nn.model_config import ModelConfig

  context = ModelConfig.from_file(tiny_model_dir / "config.json").max_position_embeddings
  r = _cli(*RUN, f"model_dir={tiny_model_dir}", f"output_dir={tmp_path / 'run'}",
           f"source_max_len={context}", "target_max_len=8")
  assert r.returncode == 2 and f"more than the model's context of {context}" in r.stderr, r.stderr[-2000:]


def test_wrong_columns_are_found_before_the_model_is_converted(tmp_path):
  data = tmp_path / "qa.jsonl"
  data.write_text('{"question": "2+2?", "answer": "4"}\n' * 3)
  r = _cli("--config", "tiny_test", f"dataset={data}", "dataset_format=alpaca",
           f"model_dir={tmp_path / 'never_made'}", "model_source=default", f"output_dir={tmp_path / 'run'}")
  assert r.returncode == 2 and "needs a 'instruction' column" in r.stderr, r.stderr[-2000:]
  assert "columns found: ['question', 'answer']" in r.stderr
  assert not (tmp_path / "never_made").exists()


def test_a_truncated_model_file_is_one_line(tiny_model_dir, tmp_path):
  folder = tmp_path / "model"
  shutil.copytree(tiny_model_dir, folder)
  weights = folder / "model.safetensors"
  with open(weights, "r+b") as f:
    f.truncate(weights.stat().st_size // 2)
  r = subprocess.run([sys.executable, "-m", "qlora_jax.chat", str(folder), "--prompt", "hi"], cwd=ROOT,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 2 and len(_messages(r.stderr)) == 1, r.stderr[-2000:]
  assert "model.safetensors is not a readable safetensors file" in r.stderr


def test_the_best_checkpoint_by_eval_loss_is_kept_and_exported(tiny_model_dir, tmp_path):
  """eval every 2 of 4 steps: run/best/ holds the step of the lowest logged eval loss (steps > 0),
  each eval record carries its perplexity, and `export --best` writes that step's adapters."""
  from qlora_jax import export
  from qlora_jax.train.checkpoint import BEST_DIR

  run = tmp_path / "run"
  trainer.train(_tiny(tiny_model_dir, run, "steps=4", "eval_every=2", "save_every=4",
                      "learning_rate=5e-3"))
  evals = [r for r in MetricsLog(run).records() if "eval_loss" in r and r["step"] > 0]
  assert [r["step"] for r in evals] == [2, 4]
  assert all(r["eval_perplexity"] == pytest.approx(np.exp(r["eval_loss"])) for r in evals)
  best = min(evals, key=lambda r: r["eval_loss"])["step"]
  assert sorted(p.name for p in (run / BEST_DIR).iterdir() if p.name.isdigit()) == [str(best)]
  assert export.main([str(run), str(tmp_path / "adapter"), "--best"]) == 0
  assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
