"""Run metrics: JSONL records, TensorBoard events when installed, the loss plot."""

import pytest

from qlora_jax.train.metrics import MetricsLog, plot_loss
from tests.conftest import has


def test_jsonl_and_plot(tmp_path):
  log = MetricsLog(tmp_path)
  for step in range(1, 6):
    log.write({"step": step, "loss": 2.0 / step})
  log.write({"step": 5, "eval_loss": 0.5})
  log.close()
  records = log.records()
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 5] and records[-1]["eval_loss"] == 0.5
  plot_loss(records, tmp_path / "loss.png")
  assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.skipif(not has("tensorboardX"), reason="TensorBoard logging needs tensorboardX")
def test_tensorboard_events_when_installed(tmp_path):
  log = MetricsLog(tmp_path)
  log.write({"step": 1, "loss": 1.5})
  log.close()
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
