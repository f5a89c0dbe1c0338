"""The training loop: set-up, evaluation, samples, checkpoints, metrics (the step: train_step.py).

The model is split once into (graphdef, LoRA params, RNG state, frozen base); the loop carries
those and the optimizer state from step to step. With a mesh of several devices every piece is
created already split as sharding.py lays it out; with one device nothing changes.
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
from flax import nnx
from tqdm import tqdm

from qlora_jax import data as data_lib
from qlora_jax import memory
from qlora_jax.checkpoint import Checkpointer
from qlora_jax.convert import convert
from qlora_jax.generate import SamplingConfig, complete
from qlora_jax.lora import LoraConfig
from qlora_jax.metrics import MetricsLog, plot_loss
from qlora_jax.model import ModelOptions
from qlora_jax.model_config import ModelConfig
from qlora_jax.quantization import QuantConfig
from qlora_jax.sharding import Layout, batch_shards, initialize_distributed, make_layout, mesh_shape
from qlora_jax.sources import default_gguf
from qlora_jax.train_config import TrainConfig
from qlora_jax.optimizer import HostState, init_optimizer, make_optimizer, offload, offload_sharding
from qlora_jax.train_step import make_eval_step, make_train_step, to_device_batch
from qlora_jax.weights import META_FILE, load_model, read_meta


class TrainingError(ValueError):
  """A run that had to stop (NaN loss, ...): the message names the step and what is kept."""


def model_options(cfg: TrainConfig) -> ModelOptions:
  lora = LoraConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                    use_rslora=cfg.use_rslora, param_dtype=cfg.lora_dtype)
  return ModelOptions(dtype=cfg.dtype, lora=lora, lora_targets=cfg.lora_targets, remat=cfg.remat,
                      attention=cfg.attention, backend=cfg.backend, scan_layers=cfg.scan_layers)


def ensure_converted(cfg: TrainConfig) -> pathlib.Path:
  """cfg.model_dir, converting cfg.model_source into it first if it is not there yet."""
  folder = pathlib.Path(cfg.model_dir)
  if (folder / META_FILE).is_file():
    return folder
  if folder.exists():
    raise ValueError(f"model_dir {folder} exists but is not a converted model (no {META_FILE}); "
                     "point model_dir at a converted folder or at a path that does not exist yet")
  if not cfg.model_source:
    raise ValueError(f"{folder} is not a converted model and model_source is empty; "
                     f"run: python convert_weights.py SRC {folder}")
  src = str(default_gguf()) if cfg.model_source == "default" else cfg.model_source
  print(f"converting {src} -> {folder} (once)")
  quant = QuantConfig(quant_type=cfg.quant_type, blocksize=cfg.blocksize, double_quant=cfg.double_quant)
  print(f"  {convert(src, folder, quant)}")
  return folder


@dataclasses.dataclass
class Run:
  """Everything the loop holds between steps."""

  cfg: TrainConfig
  run_dir: pathlib.Path
  graphdef: object
  eval_graphdef: object
  lora: nnx.State
  rng: nnx.State
  frozen: nnx.State
  opt_state: object
  tx: object  # the optax transformation behind opt_state
  schedule: object  # its learning-rate schedule
  tokenizer: object
  batches: data_lib.Batches
  eval_set: list
  truncated: int
  layout: Layout | None = None  # None: one device
  step: int = 0

  def train_state(self) -> dict:
    """What a checkpoint holds: an offloaded state in optax's own structure."""
    opt_state = self.opt_state.stacked() if isinstance(self.opt_state, HostState) else self.opt_state
    return {"lora": self.lora, "rng": self.rng, "opt_state": opt_state}

  def model(self):
    """The model for inference (dropout off) with the current adapters."""
    return nnx.merge(self.eval_graphdef, self.lora, self.rng, self.frozen)

  def put_batch(self, batch: dict[str, np.ndarray], leading: int = 0) -> dict[str, jax.Array]:
    """A host batch on the devices: split over data x fsdp, or whole on the one device."""
    return to_device_batch(batch) if self.layout is None else self.layout.put_batch(batch, leading)


def load_rows(cfg: TrainConfig):
  """(train rows, eval rows) of cfg: eval_dataset, or eval_size examples held out with cfg.seed
  (read before the model, so bad data fails fast)."""
  rows = data_lib.load_rows(cfg.dataset)
  if cfg.eval_dataset:
    return rows, data_lib.load_rows(cfg.eval_dataset)
  if len(rows) <= cfg.eval_size:
    raise ValueError(f"dataset {cfg.dataset} has {len(rows)} examples, not more than eval_size="
                     f"{cfg.eval_size}; lower eval_size or give eval_dataset")
  split = rows.train_test_split(test_size=cfg.eval_size, seed=cfg.seed, shuffle=True)
  return split["train"], split["test"]


def check_memory(cfg: TrainConfig, folder: pathlib.Path, layout: Layout | None) -> memory.Estimate:
  """Print the per-device memory estimate; ValueError naming the fix if it cannot fit."""
  options = dataclasses.replace(model_options(cfg), quant=QuantConfig(**read_meta(folder)["quant"]))
  sizes = layout.sizes if layout is not None else {"data": 1}
  est = memory.estimate(ModelConfig.from_file(folder / "config.json"), options, cfg, sizes)
  limit, device = memory.device_memory(cfg)
  memory.check_fits(est, limit, device, cfg, sizes)
  print(est.text(limit, device) if limit else est.text() + f"\n  ({device}: no memory limit known, not checked)")
  return est


def setup(cfg: TrainConfig, run_dir: pathlib.Path, layout: Layout | None = None) -> Run:
  """Data, model (converted if needed), optimizer: a Run at step 0, laid out over the layout's
  devices (None: one device)."""
  train_rows, eval_rows = load_rows(cfg)
  folder = ensure_converted(cfg)
  check_memory(cfg, folder, layout)
  model, tokenizer = load_model(folder, jnp.dtype(cfg.dtype), model_options(cfg), seed=cfg.seed,
                                layout=layout)
  train_data, eval_data = (data_lib.tokenize(rows, cfg.dataset_format, tokenizer, cfg.source_max_len,
                                             cfg.target_max_len, cfg.train_on_source)
                           for rows in (train_rows, eval_rows))
  batches = data_lib.Batches(train_data, cfg.batch_size, cfg.max_seq_len, seed=cfg.seed,
                             packing=cfg.packing, group_by_length=cfg.group_by_length)
  model.train()
  graphdef, lora, rng, frozen = nnx.split(model, nnx.LoRAParam, nnx.RngState, ...)
  model.eval()
  eval_graphdef = nnx.graphdef(model)
  tx, schedule = make_optimizer(cfg)
  return Run(cfg=cfg, run_dir=run_dir, graphdef=graphdef, eval_graphdef=eval_graphdef, lora=lora,
             rng=rng, frozen=frozen, opt_state=init_optimizer(tx, lora, layout), tx=tx,
             schedule=schedule, tokenizer=tokenizer, batches=batches,
             eval_set=data_lib.eval_batches(eval_data, cfg.batch_size, cfg.max_seq_len),
             truncated=train_data.truncated + eval_data.truncated, layout=layout)


def evaluate(run: Run, eval_step) -> float:
  """Mean token loss over the whole evaluation set (dropout off)."""
  sums = [eval_step(run.lora, run.rng, run.frozen, run.put_batch(b)) for b in run.eval_set]
  total, count = jax.device_get((sum(t for t, _ in sums), sum(c for _, c in sums)))  # one read
  return float(total) / max(int(count), 1)


def sample(run: Run) -> list[tuple[str, str]]:
  """(prompt, greedy answer) for each configured sample prompt."""
  model = run.model()
  sampling = SamplingConfig(max_new_tokens=run.cfg.sample_max_new_tokens)
  return [(p, complete(model, run.tokenizer, [{"role": "user", "content": p}], sampling))
          for p in run.cfg.sample_prompts]


def _check_resume_choice(ckpt: Checkpointer, resume: bool | None) -> None:
  """--resume needs a checkpoint, --no-resume needs none (checked before any heavy work)."""
  latest = ckpt.latest_step()
  if resume is True and latest is None:
    raise ValueError(f"--resume: {ckpt.folder} holds no checkpoint")
  if resume is False and latest is not None:
    raise ValueError(f"--no-resume: {ckpt.folder} already holds checkpoints (step {latest}); "
                     "choose another output_dir or remove it")


def _devices(cfg: TrainConfig) -> Layout | None:
  """The run's layout (None: one device), after joining a multi-host job if there is one;
  a mesh that does not fit the devices or splits the batch unevenly is refused here."""
  initialize_distributed()
  sizes = mesh_shape(cfg.mesh, jax.device_count())
  shards = batch_shards(sizes)
  if cfg.batch_size % shards:
    raise ValueError(f"batch_size {cfg.batch_size} does not split over the {shards} batch shards of "
                     f"mesh {sizes} (data x fsdp); make batch_size a multiple of {shards}")
  layout = make_layout(cfg.mesh, cfg.lora_sharding)
  print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}; mesh {sizes}"
        + ("" if layout is None else f"; LoRA {cfg.lora_sharding}"))
  return layout


def _restore(run: Run, ckpt: Checkpointer) -> None:
  """Continue from the latest checkpoint, if any."""
  latest = ckpt.latest_step()
  if latest is None:
    return
  state, meta = ckpt.restore(run.train_state())
  run.lora, run.rng, run.opt_state = state["lora"], state["rng"], state["opt_state"]
  run.step = int(meta["step"])
  run.batches.restore(meta["data"])
  done = " (the run is already complete)" if run.step >= run.cfg.steps else ""
  print(f"resumed from {ckpt.folder / str(latest)} (step {run.step}){done}")


def _save(run: Run, ckpt: Checkpointer) -> None:
  ckpt.save(run.step, run.train_state(), {"step": run.step, "data": run.batches.state()})


@dataclasses.dataclass
class Summary:
  steps: int
  seconds: float
  tokens_per_second: float
  train_loss: float | None
  eval_loss_before: float | None
  eval_loss_after: float
  truncated: int
  samples_before: list
  samples_after: list

  def text(self) -> str:
    lines = [f"steps: {self.steps} in {self.seconds:.0f} s ({self.tokens_per_second:.0f} target tokens/s)",
             f"train loss (last step): {'n/a' if self.train_loss is None else f'{self.train_loss:.4f}'}",
             f"eval loss: {'n/a' if self.eval_loss_before is None else f'{self.eval_loss_before:.4f}'}"
             f" -> {self.eval_loss_after:.4f}",
             f"examples truncated to source/target max length: {self.truncated}"]
    before = dict(self.samples_before)
    for prompt, after in self.samples_after:
      lines.append(f"prompt: {prompt}")
      if prompt in before:
        lines.append(f"  before: {before[prompt]!r}")
      lines.append(f"  after:  {after!r}")
    return "\n".join(lines)


def _log_dir(run_dir: pathlib.Path) -> pathlib.Path:
  """Where this process writes config, metrics, plot and summary: the run folder for process 0
  of a multi-host job (or the only process), a process_<i> folder inside it for the others.
  Checkpoints are written by all processes together (orbax)."""
  if jax.process_index() == 0:
    return run_dir
  (run_dir / f"process_{jax.process_index()}").mkdir(parents=True, exist_ok=True)
  return run_dir / f"process_{jax.process_index()}"


def train(cfg: TrainConfig, resume: bool | None = None) -> Summary:
  """Run (or resume) a training run in cfg.output_dir; returns its summary."""
  run_dir = pathlib.Path(cfg.output_dir)
  layout = _devices(cfg)
  ckpt = Checkpointer(run_dir, cfg.keep_checkpoints)
  _check_resume_choice(ckpt, resume)
  run = setup(cfg, run_dir, layout)
  _restore(run, ckpt)
  log_dir = _log_dir(run_dir)
  if run.step == 0:  # a resumed run keeps the config it was started with
    (log_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
  lrs = np.asarray(jax.vmap(run.schedule)(jnp.arange(cfg.steps)))  # read on the host, never per step
  opt_sharding = offload_sharding(run.opt_state, layout) if cfg.offload_optimizer else None
  like = (run.lora, run.rng, run.opt_state, run.frozen)
  if opt_sharding is not None:
    run.opt_state = offload(run.opt_state, opt_sharding, run.lora)
  step_fn = make_train_step(run.graphdef, run.tx, opt_sharding, layout, like)
  eval_step = make_eval_step(run.eval_graphdef, layout)
  log = MetricsLog(log_dir)
  log.drop_after(run.step)  # records a killed run wrote past its last checkpoint
  fresh = run.step == 0
  before = evaluate(run, eval_step) if fresh else None
  samples_before = sample(run) if fresh else []
  if fresh:
    log.write({"step": 0, "eval_loss": before})
    print(f"eval loss before training: {before:.4f}")
  start, tokens, last = time.time(), 0, {}
  try:
    last, tokens = _loop(run, step_fn, eval_step, ckpt, log, lrs)
    after = evaluate(run, eval_step)
    log.write({"step": run.step, "eval_loss": after})
  finally:
    log.close()
  if ckpt.latest_step() != run.step:
    _save(run, ckpt)
  ckpt.close()
  seconds = time.time() - start
  summary = Summary(run.step, seconds, tokens / max(seconds, 1e-9), last.get("loss"),
                    before, after, run.truncated, samples_before, sample(run))
  plot_loss(log.records(), log_dir / "loss.png")
  (log_dir / "summary.txt").write_text(summary.text() + "\n")
  return summary


def _loop(run: Run, step_fn, eval_step, ckpt: Checkpointer, log: MetricsLog, lrs) -> tuple[dict, int]:
  """The steps; metrics of step N are read after step N+1 is dispatched (no per-step stall)."""
  cfg = run.cfg
  bar = tqdm(total=cfg.steps, initial=run.step, desc="training", unit="step")
  pending, last, tokens, t0 = None, {}, 0, time.time()
  while run.step < cfg.steps:
    batch = run.put_batch(run.batches.next_accumulated(cfg.grad_accum), leading=1)
    run.lora, run.rng, run.opt_state, metrics = step_fn(run.lora, run.rng, run.opt_state, run.frozen, batch)
    run.step += 1
    if pending is not None:
      last, tokens = _report(pending, log, bar, tokens, t0, cfg.log_every, lrs)
    pending = (run.step, metrics)
    boundary = run.step % cfg.save_every == 0 or run.step % cfg.eval_every == 0 or run.step == cfg.steps
    if boundary:  # settle the metrics before saving: a NaN step must not be checkpointed
      last, tokens = _report(pending, log, bar, tokens, t0, cfg.log_every, lrs)
      pending = None
    if run.step % cfg.eval_every == 0 and run.step < cfg.steps:
      loss = evaluate(run, eval_step)
      log.write({"step": run.step, "eval_loss": loss})
      bar.write(f"step {run.step}: eval loss {loss:.4f}")
    if run.step % cfg.save_every == 0:
      _save(run, ckpt)
  if pending is not None:
    last, tokens = _report(pending, log, bar, tokens, t0, cfg.log_every, lrs)
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
