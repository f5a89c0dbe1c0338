"""Checkpoints of the trainable state with orbax: LoRA params, optimizer state, RNG state, step
and the data position. orbax writes each step to a temporary folder and renames it when
complete, so a run killed mid-save resumes from the previous complete checkpoint.

Arrays are written as they are laid out (each device's, or each host's, shards) and read back
into the layout of the template, whatever the device count that wrote them."""

from __future__ import annotations

import os
import pathlib
import signal
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp


def to_flat(tree) -> dict[str, jax.Array]:
  """A pytree as {key path: array}; PRNG key arrays become their raw uint32 key data."""
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    flat[jax.tree_util.keystr(path)] = leaf
  return flat


def from_flat(template, flat: dict) -> object:
  """The inverse of to_flat, given a template of the same structure (arrays or
  ShapeDtypeStructs)."""
  paths, treedef = jax.tree_util.tree_flatten_with_path(template)
  leaves = []
  for path, like in paths:
    key = jax.tree_util.keystr(path)
    if key not in flat:
      raise ValueError(f"checkpoint lacks {key}; it was written by a different model or config")
    value = flat[key]
    if jax.dtypes.issubdtype(like.dtype, jax.dtypes.prng_key):
      value = jax.random.wrap_key_data(value, impl=jax.random.key_impl(like))
    leaves.append(value)
  return jax.tree_util.tree_unflatten(treedef, leaves)


# Test hook: SIGKILL this process while orbax is writing the checkpoint of the given step.
KILL_DURING_SAVE = "QLORA_JAX_TEST_KILL_DURING_SAVE"


def _save_then_die(manager, folder: pathlib.Path, step: int, args) -> None:
  """Start writing the step in a thread and kill -9 the process once its files are appearing."""
  threading.Thread(target=lambda: manager.save(step, args=args, force=True), daemon=True).start()
  while not list(folder.glob(f"{step}.*tmp*")):
    time.sleep(0.001)
  os.kill(os.getpid(), signal.SIGKILL)


class Checkpointer:
  """Keeps the last `keep` checkpoints of a run under run_dir/checkpoints/<step>."""

  def __init__(self, run_dir: pathlib.Path, keep: int):
    self.folder = (pathlib.Path(run_dir) / "checkpoints").absolute()
    self.manager = ocp.CheckpointManager(
        self.folder, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                          enable_async_checkpointing=False))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, meta: dict) -> None:
    flat = {k: v if isinstance(v, jax.Array) else np.asarray(v) for k, v in to_flat(state).items()}
    args = ocp.args.Composite(state=ocp.args.StandardSave(flat), meta=ocp.args.JsonSave(meta))
    if os.environ.get(KILL_DURING_SAVE) == str(step):
      _save_then_die(self.manager, self.folder, step, args)
    self.manager.save(step, args=args, force=True)
    self.manager.wait_until_finished()

  def restore(self, template) -> tuple[object, dict]:
    """(state shaped and laid out like template, meta) of the latest checkpoint."""
    step = self.latest_step()
    abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=getattr(v, "sharding", None))
                for k, v in to_flat(template).items()}
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return from_flat(template, dict(restored["state"])), dict(restored["meta"])

  def close(self) -> None:
    self.manager.close()
