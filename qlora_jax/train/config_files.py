"""Config files and the command line: a file in `configs/` defining `config = TrainConfig(...)`,
`key=value` overrides (flat or dotted keys), and the key listing `python train.py --help` shows."""

from __future__ import annotations

import dataclasses
import pathlib
import runpy
import traceback
import typing

from qlora_jax.train.config import (SECTIONS, TrainConfig, field_types, flat_keys, resolve_key, show,
                                    type_name)

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[2] / "configs"


def _parse_value(text: str, tp):
  """A command-line string as a value of type tp (tuples are comma-separated; pairs a:b)."""
  origin = typing.get_origin(tp)
  if origin is tuple:
    args = typing.get_args(tp)
    items = [t for t in text.split(",") if t] if text else []
    if len(args) == 2 and args[1] is Ellipsis:
      return tuple(_parse_value(t, args[0]) for t in items)
    parts = text.split(":")
    if len(parts) != len(args):
      raise ValueError(f"expected {len(args)} ':'-separated values, got {text!r}")
    return tuple(_parse_value(p, a) for p, a in zip(parts, args))
  if tp is bool:
    if text.lower() in ("1", "true", "yes", "on"):
      return True
    if text.lower() in ("0", "false", "no", "off"):
      return False
    raise ValueError(f"expected true/false, got {text!r}")
  if tp in (int, float):
    return tp(text)
  return text


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
  """cfg with `key=value` overrides applied; unknown keys and bad values raise ValueError."""
  changes = {}
  for item in overrides:
    key, sep, text = item.partition("=")
    if not sep:
      raise ValueError(f"override {item!r} is not key=value")
    section, field = resolve_key(key)
    tp = field_types(SECTIONS[section])[field]
    try:
      changes[f"{section}.{field}"] = _parse_value(text, tp)
    except ValueError as e:
      raise ValueError(f"bad value for {key} ({type_name(tp)}): {e}") from e
  return cfg.replace(**changes)


def help_text() -> str:
  """Every key with its type and default, by section (python train.py --help)."""
  lines = ["config keys (key=value; flat name, or section.field):"]
  reverse = {v: k for k, v in flat_keys().items()}
  defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
  for section, cls in SECTIONS.items():
    first_sentence = " ".join(cls.__doc__.split()).split(". ")[0].rstrip(".")
    lines.append(f"  [{section}] {first_sentence}")
    base = defaults[section] if defaults[section] is not dataclasses.MISSING else None
    for f in dataclasses.fields(cls):
      if base is not None:
        default = show(getattr(base, f.name))
      else:
        default = "(required)" if f.default is dataclasses.MISSING else show(f.default)
      name = reverse.get(f"{section}.{f.name}", f"{section}.{f.name}")
      lines.append(f"    {name:<24} {type_name(field_types(cls)[f.name]):<26} {default}")
  return "\n".join(lines)


def resolve_config_path(name_or_path: str) -> pathlib.Path:
  """A path, or a name inside configs/ (with or without .py)."""
  path = pathlib.Path(name_or_path)
  candidates = [path, CONFIG_DIR / path, CONFIG_DIR / f"{name_or_path}.py"]
  for c in candidates:
    if c.is_file():
      return c
  available = sorted(p.stem for p in CONFIG_DIR.glob("*.py"))
  raise ValueError(f"config {name_or_path!r} not found; give a path or one of: {available}")


def _line_in(error: BaseException, path: pathlib.Path) -> int | None:
  """The line of the config file that raised error (its last frame in that file)."""
  lines = [f.lineno for f in traceback.extract_tb(error.__traceback__) if f.filename == str(path)]
  return lines[-1] if lines else None


def load_config(name_or_path: str, overrides: list[str] = ()) -> TrainConfig:
  """Run a config file, take its `config` (a TrainConfig) and apply overrides."""
  path = resolve_config_path(name_or_path)
  try:
    namespace = runpy.run_path(str(path))
  except SyntaxError as e:
    raise ValueError(f"{path}, line {e.lineno}: {e.msg}; fix the config file's Python syntax") from e
  except TypeError as e:  # an unknown field in a section's constructor lands here
    raise ValueError(f"{path}: {e}; python train.py --help lists the keys") from e
  except (NameError, AttributeError, ImportError) as e:  # a misspelt name in the file
    raise ValueError(f"{path}, line {_line_in(e, path)}: {type(e).__name__}: {e}") from e
  cfg = namespace.get("config")
  if not isinstance(cfg, TrainConfig):
    raise ValueError(f"{path} must define `config = TrainConfig(...)`")
  return apply_overrides(cfg, list(overrides))
