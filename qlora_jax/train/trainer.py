"""The training loop: set-up, evaluation, samples, checkpoints, metrics (what trains:
builder.py; the step: step.py).

With a mesh of several devices every piece is created already split as nn/sharding.py lays it
out; with one device nothing changes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from qlora_jax import data as data_lib
from qlora_jax.io.convert import ensure_converted
from qlora_jax.nn.generate import SamplingConfig, complete
from qlora_jax.nn.model_config import ModelConfig
from qlora_jax.nn.sharding import Layout, batch_shards, initialize_distributed, make_layout, mesh_shape
from qlora_jax.train import memory
from qlora_jax.train.builder import Trainable, build_from_folder
from qlora_jax.train.checkpoint import BEST_DIR, Checkpointer
from qlora_jax.train.config import RESUMABLE, TrainConfig, save_config
from qlora_jax.train.metrics import MetricsLog, RunSummary, plot_loss


class TrainingError(ValueError):
  """A run that had to stop (NaN loss, ...): the message names the step and what is kept."""


@dataclasses.dataclass
class Run:
  """Everything the loop holds between steps."""

  cfg: TrainConfig
  trainable: Trainable
  tokenizer: object
  batches: data_lib.Batches
  eval_set: list
  truncated: int
  step: int = 0


def prepare(cfg: TrainConfig, layout: Layout | None = None) -> tuple[tuple, pathlib.Path]:
  """((train rows, eval rows), the converted model folder), checked against cfg (columns,
  quantization, context, memory) before any weight is loaded or a run folder is touched. The
  data is read before the model is converted, so bad data fails fast."""
  d = cfg.data
  rows = data_lib.train_eval_rows(d.dataset, d.eval_dataset, d.eval_size, cfg.loop.seed,
                                  dataset_format=d.dataset_format)
  folder = ensure_converted(cfg.model.model_dir, cfg.model.model_source, cfg.quant)
  cfg.check_context(ModelConfig.from_file(folder / "config.json").max_position_embeddings)
  memory.check_run(cfg, folder, layout)
  return rows, folder


def setup(cfg: TrainConfig, layout: Layout | None = None, prepared=None) -> Run:
  """Data, model (converted if needed), optimizer: a Run at step 0, laid out over the layout's
  devices (None: one device). prepared: what prepare(cfg, layout) returned, if it ran already."""
  d = cfg.data
  (train_rows, eval_rows), folder = prepared or prepare(cfg, layout)
  trainable, tokenizer = build_from_folder(cfg, folder, layout)
  train_data, eval_data = (data_lib.tokenize(rows, d.dataset_format, tokenizer, d.source_max_len,
                                             d.target_max_len, d.train_on_source, chat_turns=d.chat_turns)
                           for rows in (train_rows, eval_rows))
  batches = data_lib.Batches(train_data, cfg.optim.batch_size, d.max_seq_len, seed=cfg.loop.seed,
                             packing=d.packing, group_by_length=d.group_by_length)
  return Run(cfg=cfg, trainable=trainable, tokenizer=tokenizer, batches=batches,
             eval_set=data_lib.eval_batches(eval_data, cfg.optim.batch_size, d.max_seq_len),
             truncated=train_data.truncated + eval_data.truncated)


def evaluate(run: Run) -> float:
  """Mean token loss over the whole evaluation set (dropout off)."""
  return run.trainable.mean_loss([run.trainable.put_batch(b) for b in run.eval_set])


def sample(run: Run) -> list[tuple[str, str]]:
  """(prompt, greedy answer) for each configured sample prompt."""
  model = run.trainable.model()
  sampling = SamplingConfig(max_new_tokens=run.cfg.loop.sample_max_new_tokens)
  return [(p, complete(model, run.tokenizer, [{"role": "user", "content": p}], sampling))
          for p in run.cfg.loop.sample_prompts]


def _check_resume_choice(ckpt: Checkpointer, resume: bool | None) -> None:
  """--resume needs a checkpoint, --no-resume needs none (checked before any heavy work)."""
  latest = ckpt.latest_step()
  if resume is True and latest is None:
    raise ValueError(f"--resume: {ckpt.folder} holds no checkpoint")
  if resume is False and latest is not None:
    raise ValueError(f"--no-resume: {ckpt.folder} already holds checkpoints (step {latest}); "
                     "choose another output_dir or remove it")


def _check_same_run(cfg: TrainConfig, ckpt: Checkpointer, log_dir: pathlib.Path) -> None:
  """A folder with checkpoints resumes only under the config it was started with, but for the
  RESUMABLE keys (steps, cadence, logging); anything else is refused, the keys listed."""
  saved = log_dir / "config.json"
  if ckpt.latest_step() is None or not saved.is_file():
    return
  try:
    conflicts = cfg.resume_conflicts(TrainConfig.from_dict(json.loads(saved.read_text())))
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{saved} is not a config this version can read ({e}); resume with the "
                     "version that wrote it, or train into another output_dir") from None
  if conflicts:
    raise ValueError(f"{ckpt.folder.parent} is a run started with other settings; changed: "
                     + "; ".join(conflicts) + ". Resuming may change only " + ", ".join(RESUMABLE)
                     + ". Restore those values, or start a new run: output_dir=<new folder>")


def _devices(cfg: TrainConfig) -> Layout | None:
  """The run's layout (None: one device), after joining a multi-host job if there is one;
  a mesh that does not fit the devices or splits the batch unevenly is refused here."""
  initialize_distributed()
  d, batch_size = cfg.devices, cfg.optim.batch_size
  sizes = mesh_shape(d.mesh, jax.device_count())
  shards = batch_shards(sizes)
  if batch_size % shards:
    raise ValueError(f"batch_size {batch_size} does not split over the {shards} batch shards of "
                     f"mesh {sizes} (data x fsdp); make batch_size a multiple of {shards}")
  layout = make_layout(d.mesh, d.lora_sharding)
  print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}; mesh {sizes}"
        + ("" if layout is None else f"; LoRA {d.lora_sharding}"))
  return layout


def _restore(run: Run, ckpt: Checkpointer) -> None:
  """Continue from the newest readable checkpoint, if any (checkpoint.py sets newer unreadable
  ones aside, one warning line each)."""
  if ckpt.latest_step() is None:
    return
  state, meta = ckpt.restore(run.trainable.restore_template())
  run.trainable.restore(state)
  run.step = int(meta["step"])
  run.batches.restore(meta["data"])
  done = " (the run is already complete)" if run.step >= run.cfg.optim.steps else ""
  print(f"resumed from {ckpt.folder / str(run.step)} (step {run.step}){done}")


def _finished(ckpt: Checkpointer, log_dir: pathlib.Path, cfg: TrainConfig) -> RunSummary | None:
  """The saved summary of a run that already reached its last step, or None: a rerun of a
  finished run returns it and changes nothing in the folder."""
  latest = ckpt.latest_step()
  if latest is None or latest < cfg.optim.steps:
    return None
  summary = RunSummary.load(log_dir)
  return summary if summary is not None and summary.steps == latest else None


def _perplexity(loss: float) -> float:
  return math.exp(min(loss, 700.0))


def _record_eval(run: Run, log: MetricsLog, loss: float) -> None:
  """Log an evaluation after step 0 (loss and perplexity), and save the adapters to
  run_dir/best/ when it is the run's lowest yet (the log holds every earlier one); `export
  --best` exports them."""
  earlier = [r["eval_loss"] for r in log.records()
             if "eval_loss" in r and 0 < r["step"] < run.step]
  log.write({"step": run.step, "eval_loss": loss, "eval_perplexity": _perplexity(loss)})
  if earlier and min(earlier) <= loss:
    return
  best = Checkpointer(pathlib.Path(run.cfg.loop.output_dir), 1, BEST_DIR)
  best.save(run.step, run.trainable.checkpoint_state(),
            {"step": run.step, "data": run.batches.state(), "eval_loss": loss})
  best.close()


def _save(run: Run, ckpt: Checkpointer) -> None:
  ckpt.save(run.step, run.trainable.checkpoint_state(), {"step": run.step, "data": run.batches.state()})


def _log_dir(run_dir: pathlib.Path) -> pathlib.Path:
  """Where this process writes config, metrics, plot and summary: the run folder for process 0
  of a multi-host job (or the only process), a process_<i> folder inside it for the others.
  Checkpoints are written by all processes together (orbax)."""
  if jax.process_index() == 0:
    return run_dir
  (run_dir / f"process_{jax.process_index()}").mkdir(parents=True, exist_ok=True)
  return run_dir / f"process_{jax.process_index()}"


def train(cfg: TrainConfig, resume: bool | None = None) -> RunSummary:
  """Run (or resume) a training run in cfg.loop.output_dir; returns its summary."""
  print(cfg.text())
  run_dir = pathlib.Path(cfg.loop.output_dir)
  layout = _devices(cfg)
  prepared = prepare(cfg, layout)
  ckpt = Checkpointer(run_dir, cfg.loop.keep_checkpoints)
  _check_resume_choice(ckpt, resume)
  log_dir = _log_dir(run_dir)
  _check_same_run(cfg, ckpt, log_dir)
  finished = _finished(ckpt, log_dir, cfg)
  if finished is not None:
    ckpt.close()
    print(f"{run_dir} already finished at step {finished.steps}; nothing was changed "
          "(raise steps to train further)")
    return finished
  run = setup(cfg, layout, prepared)
  _restore(run, ckpt)
  save_config(cfg, log_dir / "config.json")  # a resumed run differs at most in RESUMABLE keys
  steps = cfg.optim.steps
  lrs = np.asarray(jax.vmap(run.trainable.schedule)(jnp.arange(steps)))  # read on the host once
  log = MetricsLog(log_dir, resumed_at=run.step)
  log.drop_after(run.step)  # records a killed run wrote past its last checkpoint
  try:
    before, samples_before = _before_training(run, log)
    start = time.time()
    last, tokens = _loop(run, ckpt, log, lrs)
    after = evaluate(run)
    if log.latest("eval_loss", step=run.step) is None:  # a finished run, resumed, has it already
      _record_eval(run, log, after)
  finally:
    log.close()
  if ckpt.latest_step() != run.step:
    _save(run, ckpt)
  ckpt.close()
  seconds = time.time() - start
  train_loss = last.get("loss", log.latest("loss"))
  summary = RunSummary(run.step, seconds, tokens / max(seconds, 1e-9), train_loss,
                       before, after, run.truncated, samples_before, sample(run))
  plot_loss(log.records(), log_dir / "loss.png")
  summary.save(log_dir)
  return summary


def _before_training(run: Run, log: MetricsLog) -> tuple[float | None, list]:
  """Eval loss and samples of the untrained adapters: measured (and logged with step 0) by a
  fresh run, read back from the log by a resumed one."""
  if run.step > 0:
    return log.latest("eval_loss", step=0), log.latest("samples", step=0) or []
  before, samples = evaluate(run), sample(run)
  log.write({"step": 0, "eval_loss": before, **({"samples": samples} if samples else {})})
  print(f"eval loss before training: {before:.4f}")
  return before, samples


def _loop(run: Run, ckpt: Checkpointer, log: MetricsLog, lrs) -> tuple[dict, int]:
  """The steps; metrics of step N are read after step N+1 is dispatched (no per-step stall)."""
  optim, loop, t = run.cfg.optim, run.cfg.loop, run.trainable
  bar = tqdm(total=optim.steps, initial=run.step, desc="training", unit="step")
  pending, last, tokens, t0 = None, {}, 0, time.time()
  while run.step < optim.steps:
    metrics = t.train_step(t.put_batch(run.batches.next_accumulated(optim.grad_accum), leading=1))
    run.step += 1
    if pending is not None:
      last, tokens = _report(pending, log, bar, tokens, t0, loop.log_every, lrs)
    pending = (run.step, metrics)
    boundary = (run.step % loop.save_every == 0 or run.step % loop.eval_every == 0
                or run.step == optim.steps)
    if boundary:  # settle the metrics before saving: a NaN step must not be checkpointed
      last, tokens = _report(pending, log, bar, tokens, t0, loop.log_every, lrs)
      pending = None
    if run.step % loop.eval_every == 0 and run.step < optim.steps:
      loss = evaluate(run)
      _record_eval(run, log, loss)
      bar.write(f"step {run.step}: eval loss {loss:.4f} (perplexity {_perplexity(loss):.3f})")
    if run.step % loop.save_every == 0:
      _save(run, ckpt)
  if pending is not None:
    last, tokens = _report(pending, log, bar, tokens, t0, loop.log_every, lrs)
  bar.close()
  return last, tokens


def _report(pending, log: MetricsLog, bar, tokens: int, t0: float, log_every: int,
            lrs) -> tuple[dict, int]:
  step, metrics = pending
  values = {k: float(v) for k, v in jax.device_get(metrics).items()}
  if not math.isfinite(values["loss"]) or not math.isfinite(values["grad_norm"]):
    raise TrainingError(f"loss became {values['loss']} at step {step} (grad norm {values['grad_norm']}); "
                        "stopped without saving it: the last good checkpoint is kept. Lower the "
                        "learning rate or check the data.")
  tokens += int(values["tokens"])
  rate = tokens / max(time.time() - t0, 1e-9)
  record = {"step": step, **values, "lr": float(lrs[step - 1]), "tokens_per_s": rate}
  if step % log_every == 0:
    log.write(record)
  bar.set_postfix(loss=f"{values['loss']:.3f}", tok_s=f"{rate:.0f}")
  bar.update(step - bar.n)
  return values, tokens
