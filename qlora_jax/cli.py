"""What the command-line entry points share: bad input becomes one `error:` line and exit 2."""

from __future__ import annotations

import sys
from collections.abc import Callable


def run(action: Callable[[], str | None]) -> int:
  """Run action; print its message (if any) and return 0, or the error and 2 on ValueError."""
  try:
    message = action()
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if message:
    print(message)
  return 0
