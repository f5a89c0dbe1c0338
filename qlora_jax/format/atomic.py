"""Write an output folder atomically: build it under a hidden sibling name, rename when done."""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import tempfile
import time


def check_out(out: pathlib.Path, overwrite: bool) -> None:
  """Refuse an existing OUT unless overwrite (and never a file)."""
  if out.exists() and not out.is_dir():
    raise ValueError(f"{out} exists and is not a folder")
  if out.exists() and not overwrite:
    raise ValueError(f"{out} already exists; pass --overwrite to replace it")


@contextlib.contextmanager
def atomic_dir(out: str | pathlib.Path, overwrite: bool = False):
  """Yield a temporary folder that becomes `out` on success; on failure nothing is left.

  An existing `out` (allowed by overwrite) is replaced only after the new one is complete.
  """
  out = pathlib.Path(out)
  check_out(out, overwrite)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
  umask = os.umask(0)
  os.umask(umask)
  tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 is for the temporary name only
  try:
    yield tmp
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
