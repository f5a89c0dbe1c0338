"""Run observability: JSONL metrics, TensorBoard when installed, a loss-curve PNG and a summary
at the end. A killed run loses none of the records it wrote (TensorBoard's reach the disk within a
second)."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib

from qlora_jax.format.atomic import write_text


def _tensorboard_writer(folder: pathlib.Path, purge_step: int | None):
  for module in ("tensorboardX", "torch.utils.tensorboard"):
    try:
      writer = __import__(module, fromlist=["SummaryWriter"]).SummaryWriter
      # flush_secs: its writer thread puts events on disk within a second, not two minutes (a
      # killed run lost them all)
      return writer(str(folder), purge_step=purge_step, flush_secs=1)
    except Exception:  # not installed (or tensorboard missing behind torch's wrapper)
      continue
  return None


class MetricsLog:
  """Appends one JSON object per record to metrics.jsonl (and TensorBoard scalars).

  A log reopened to resume after `resumed_at` hides the TensorBoard events the killed run wrote
  past that step (the resumed run writes them again)."""

  def __init__(self, run_dir: pathlib.Path, resumed_at: int = 0):
    self.path = run_dir / "metrics.jsonl"
    self._tb = _tensorboard_writer(run_dir / "tensorboard", resumed_at + 1 if resumed_at else None)

  def write(self, record: dict) -> None:
    with self.path.open("a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      for key, value in record.items():
        if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
          self._tb.add_scalar(key, value, record["step"])

  def drop_after(self, step: int) -> None:
    """Forget records past `step` (a resumed run repeats the steps after its checkpoint)."""
    kept = [r for r in self.records() if r["step"] <= step]
    if self.path.is_file():
      write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

  def records(self) -> list[dict]:
    if not self.path.is_file():
      return []
    return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

  def latest(self, key: str, step: int | None = None):
    """The value of `key` in the last record that has it (at exactly `step`, if given), or None."""
    found = [r[key] for r in self.records() if key in r and (step is None or r["step"] == step)]
    return found[-1] if found else None

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def plot_loss(records: list[dict], out: pathlib.Path) -> None:
  """Train loss per step and eval loss per evaluation, one PNG."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  train = [(r["step"], r["loss"]) for r in records if "loss" in r]
  evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
  fig, ax = plt.subplots(figsize=(7, 4))
  if train:
    ax.plot(*zip(*train), label="train loss", lw=1)
  if evals:
    ax.plot(*zip(*evals), "o-", label="eval loss")
  ax.set_xlabel("step")
  ax.set_ylabel("cross entropy (nats/token)")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  plt.close(fig)


SUMMARY_TEXT, SUMMARY_JSON = "summary.txt", "summary.json"


@dataclasses.dataclass
class RunSummary:
  """What a training run did: printed at its end and written to summary.txt (and, to be read
  back by a rerun of the finished run, summary.json)."""

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

  def save(self, folder: pathlib.Path) -> None:
    write_text(folder / SUMMARY_JSON, json.dumps(dataclasses.asdict(self), indent=1))
    write_text(folder / SUMMARY_TEXT, self.text() + "\n")

  @classmethod
  def load(cls, folder: pathlib.Path) -> "RunSummary | None":
    """The summary a finished run saved in folder, or None (none, or not readable)."""
    try:
      return cls(**json.loads((folder / SUMMARY_JSON).read_text()))
    except (OSError, ValueError, TypeError):
      return None
