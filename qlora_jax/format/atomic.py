"""Write outputs atomically: a folder is built under a hidden sibling name and renamed when done,
a text file is written beside its final name and moved over it. What they hold gets the
permissions mkdir and open() would give, whatever the temporary files were created with."""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import shutil
import tempfile
import time


def check_out(out: pathlib.Path, overwrite: bool) -> None:
  """Refuse an existing OUT unless overwrite (and never a file)."""
  if out.exists() and not out.is_dir():
    raise ValueError(f"{out} exists and is not a folder")
  if out.exists() and not overwrite:
    raise ValueError(f"{out} already exists; pass --overwrite to replace it")


def _umask() -> int:
  umask = os.umask(0)
  os.umask(umask)
  return umask


def normal_permissions(folder: pathlib.Path) -> None:
  """Folders and files under (and including) folder as mkdir and open() make them: temporary
  files (safetensors, mkdtemp) are created 0600/0700, which must not reach the output."""
  umask = _umask()
  folder.chmod(0o777 & ~umask)
  for path in folder.rglob("*"):
    if path.is_symlink():
      continue
    executable = path.is_dir() or path.stat().st_mode & 0o100
    path.chmod((0o777 if executable else 0o666) & ~umask)


def _partial_prefix(out: pathlib.Path) -> str:
  return f".{out.name}.partial-"


def _owner_alive(name: str, prefix: str) -> bool:
  """Whether the process that made the partial folder `name` still runs (its pid is in the
  name; folders from before pids were recorded have none and count as stale)."""
  match = re.fullmatch(r"(\d+)-.*", name[len(prefix):])
  if match is None:
    return False
  try:
    os.kill(int(match.group(1)), 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, another user's
    return True
  return True


def remove_stale_partials(out: pathlib.Path) -> None:
  """Delete the hidden partial folders a killed writer of `out` left: only folders named as
  atomic_dir names out's, whose process is gone."""
  prefix = _partial_prefix(out)
  for p in out.parent.glob(f"{_glob_escape(prefix)}*"):
    if p.is_dir() and not p.is_symlink() and not _owner_alive(p.name, prefix):
      shutil.rmtree(p)


def _glob_escape(text: str) -> str:
  """text with glob's special characters matched literally."""
  return re.sub(r"([*?\[])", r"[\1]", text)


@contextlib.contextmanager
def atomic_dir(out: str | pathlib.Path, overwrite: bool = False):
  """Yield a temporary folder that becomes `out` on success; on failure nothing is left.

  An existing `out` (allowed by overwrite) is replaced only after the new one is complete. The
  partial folders of earlier runs that were killed before finishing `out` are removed first.
  """
  out = pathlib.Path(out)
  check_out(out, overwrite)
  out.parent.mkdir(parents=True, exist_ok=True)
  remove_stale_partials(out)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f"{_partial_prefix(out)}{os.getpid()}-", dir=out.parent))
  try:
    yield tmp
    normal_permissions(tmp)
    old = None
    if out.exists():
      old = out.with_name(f".{out.name}.old-{time.time_ns()}")
      out.rename(old)
    tmp.rename(out)
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def write_text(path: pathlib.Path, text: str) -> None:
  """Replace path's content with text so that a kill leaves the old or the new file, never a
  half-written one."""
  path = pathlib.Path(path)
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  tmp.write_text(text)
  os.replace(tmp, path)
