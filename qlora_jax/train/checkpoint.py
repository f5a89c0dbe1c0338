"""Checkpoints of the trainable state with orbax: LoRA params, optimizer state, RNG state, step
and the data position. orbax writes each step to a temporary folder and renames it when
complete, so a run killed mid-save resumes from the previous complete checkpoint. After the
save, each file's size and CRC-32 go into a digest in the step folder: a checkpoint damaged
later (flipped bytes, a truncated copy) is recognised before orbax reads it, set aside under a
name that says so, and the run resumes from the newest one that is whole.

Arrays are written as they are laid out (each device's, or each host's, shards) and read back
into the layout of the template, whatever the device count that wrote them."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import sys
import threading
import time
import zlib

import jax
import numpy as np
import orbax.checkpoint as ocp

from qlora_jax.format.atomic import write_text

DIGEST_FILE = "qlora_jax_digest.json"


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


def _crc32(path: pathlib.Path) -> int:
  crc = 0
  with path.open("rb") as f:
    while chunk := f.read(1 << 20):
      crc = zlib.crc32(chunk, crc)
  return crc


def file_digest(folder: pathlib.Path) -> dict[str, list[int]]:
  """{path inside folder: [bytes, CRC-32]} of every file under folder but the digest itself."""
  return {str(p.relative_to(folder)): [p.stat().st_size, _crc32(p)]
          for p in sorted(folder.rglob("*")) if p.is_file() and p.name != DIGEST_FILE}


def damage(folder: pathlib.Path) -> str | None:
  """Why a step folder no longer matches the digest written after its save, or None. A folder
  without a digest (saved by an older version, or killed just after orbax's commit) passes."""
  if not (folder / DIGEST_FILE).is_file():
    return None
  try:
    written = json.loads((folder / DIGEST_FILE).read_text())
  except ValueError:
    return f"its {DIGEST_FILE} is damaged"
  for name, (size, crc) in written.items():
    path = folder / name
    if not path.is_file():
      return f"{name} is missing"
    if path.stat().st_size != size:
      return f"{name} has {path.stat().st_size} bytes, {size} were written"
    if _crc32(path) != crc:
      return f"{name} changed after it was written, its CRC-32 differs"
  return None


def _reason(error: BaseException) -> str:
  """The root cause of an orbax/tensorstore error as one short line."""
  while error.__cause__ is not None:
    error = error.__cause__
  line = (str(error).strip().splitlines() or [type(error).__name__])[0]
  return line if len(line) <= 200 else line[:200] + "..."


# Test hook: SIGKILL this process while orbax is writing the checkpoint of the given step.
KILL_DURING_SAVE = "QLORA_JAX_TEST_KILL_DURING_SAVE"


def _save_then_die(manager, folder: pathlib.Path, step: int, args) -> None:
  """Start writing the step in a thread and kill -9 the process once its files are appearing."""
  threading.Thread(target=lambda: manager.save(step, args=args, force=True), daemon=True).start()
  while not list(folder.glob(f"{step}.*tmp*")):
    time.sleep(0.001)
  os.kill(os.getpid(), signal.SIGKILL)


BEST_DIR = "best"  # a run's checkpoint with the lowest eval loss so far


class Checkpointer:
  """Keeps the last `keep` checkpoints of a run under run_dir/<subdir>/<step> (checkpoints/; the
  best by eval loss: best/, keep=1)."""

  def __init__(self, run_dir: pathlib.Path, keep: int, subdir: str = "checkpoints"):
    self.folder = (pathlib.Path(run_dir) / subdir).absolute()
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
    if jax.process_index() == 0:  # the folder is shared: one process writes its digest
      write_text(self.folder / str(step) / DIGEST_FILE, json.dumps(file_digest(self.folder / str(step))))

  def restore(self, template) -> tuple[object, dict]:
    """(state shaped and laid out like template, meta) of the newest readable checkpoint; newer
    unreadable ones are set aside with a one-line warning each. ValueError naming each
    checkpoint's problem when none is readable (then nothing is moved)."""
    bad = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      reason = damage(self.folder / str(step))
      if reason is None:
        try:
          state, meta = self._restore_step(step, template)
        except Exception as e:  # only a checkpoint without a digest gets here damaged: orbax and
          reason = _reason(e)   # tensorstore raise many types (and print the reads they abandon)
      if reason is None:
        for unreadable, why in bad:
          print(f"warning: {self._set_aside(unreadable, why, step)}", file=sys.stderr)
        return state, meta
      bad.append((step, reason))
    problems = "; ".join(f"step {s} ({why})" for s, why in bad)
    raise ValueError(f"no checkpoint in {self.folder} is readable: {problems}. Nothing was moved or "
                     "deleted: move the checkpoints folder aside to start again, or choose another output_dir")

  def _restore_step(self, step: int, template) -> tuple[object, dict]:
    abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=getattr(v, "sharding", None))
                for k, v in to_flat(template).items()}
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return from_flat(template, dict(restored["state"])), dict(restored["meta"])

  def _set_aside(self, step: int, reason: str, resumed: int) -> str:
    """Rename an unreadable step folder to <step>.unreadable (orbax no longer lists it, a later
    save of that step is not refused, and nothing is deleted); the line that reports it."""
    aside = self.folder / f"{step}.unreadable"
    n = 1
    while aside.exists():
      n += 1
      aside = self.folder / f"{step}.unreadable-{n}"
    if jax.process_index() == 0:
      (self.folder / str(step)).rename(aside)
    self.manager.reload()
    return (f"checkpoint step {step} in {self.folder} is unreadable ({reason}); set aside as "
            f"{aside.name}, resuming from step {resumed}")

  def close(self) -> None:
    self.manager.close()
