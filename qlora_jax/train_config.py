"""The training configuration: one frozen, typed dataclass; config files in `configs/` define
`config = TrainConfig(...)`, and `key=value` overrides on the command line are type-checked."""

from __future__ import annotations

import dataclasses
import pathlib
import runpy
import typing

from qlora_jax.codebooks import BLOCKSIZES, QUANT_TYPES
from qlora_jax.model import ATTENTION_IMPLEMENTATIONS, LINEAR_NAMES, REMAT_POLICIES
from qlora_jax.sharding import LORA_SHARDINGS, MESH_AXES

DATA_FORMATS = ("alpaca", "oasst1", "chat", "text")
CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
  """Everything a QLoRA run needs. Defaults are the QLoRA paper's recipe (qlora.py)."""

  # Model: a converted folder; if it does not exist yet, `model_source` is converted into it
  # ("default" = the embedded SmolLM2-135M-Instruct GGUF; "" = model_dir must exist).
  model_dir: str
  model_source: str = ""
  quant_type: str = "nf4"
  blocksize: int = 64
  double_quant: bool = True
  dtype: str = "bfloat16"
  # LoRA
  lora_rank: int = 64
  lora_alpha: float = 16.0
  lora_dropout: float = 0.1
  lora_targets: tuple[str, ...] = LINEAR_NAMES
  use_rslora: bool = False
  lora_dtype: str = "float32"  # bfloat16: LoRA weights and gradients in bf16 (qlora.py), moments float32
  # Data: a hub name or a local json/jsonl/parquet/csv file
  dataset: str
  dataset_format: str = "alpaca"
  eval_dataset: str = ""  # "": hold out `eval_size` examples of `dataset`
  eval_size: int = 64
  source_max_len: int = 1024
  target_max_len: int = 256
  train_on_source: bool = False
  group_by_length: bool = True
  packing: bool = False
  # Optimization (AdamW; constant LR after warmup; clipping at 0.3)
  batch_size: int = 16
  grad_accum: int = 1
  steps: int = 1000
  learning_rate: float = 2e-4
  lr_schedule: str = "constant"  # constant | cosine | linear (after warmup)
  warmup_ratio: float = 0.03
  weight_decay: float = 0.0
  max_grad_norm: float = 0.3
  adam_beta1: float = 0.9
  adam_beta2: float = 0.999
  offload_optimizer: bool = False  # keep AdamW moments in pinned host memory between steps
  # Compute
  remat: str = "full"  # gradient checkpointing per layer: none | full | save_dots
  scan_layers: bool = True  # scan over one stacked layer: compile time independent of depth
  attention: str = "auto"  # auto: cuDNN flash attention on GPU where it applies, else XLA
  backend: str = "auto"
  # Devices (sharding.py): axes data | fsdp | tensor with sizes, -1 = the devices left; a mesh of
  # one device runs unsharded. lora_sharding: LoRA params and AdamW moments split over fsdp or not.
  mesh: tuple[tuple[str, int], ...] = (("data", -1),)
  lora_sharding: str = "fsdp"
  device_memory_gib: float = 0.0  # the per-device budget checked at start-up; 0: the device's own
  # Loop, evaluation, checkpoints, output
  output_dir: str = "runs/run"
  seed: int = 0
  log_every: int = 10
  eval_every: int = 200
  save_every: int = 500
  keep_checkpoints: int = 3
  sample_prompts: tuple[str, ...] = ()
  sample_max_new_tokens: int = 64

  def __post_init__(self):
    _check_types(self)
    checks = [
        (self.quant_type in QUANT_TYPES, f"quant_type must be one of {QUANT_TYPES}"),
        (self.blocksize in BLOCKSIZES, f"blocksize must be one of {BLOCKSIZES}"),
        (self.dtype in ("bfloat16", "float32"), "dtype must be bfloat16 or float32"),
        (self.lora_dtype in ("bfloat16", "float32"), "lora_dtype must be bfloat16 or float32"),
        (self.lora_rank >= 1, "lora_rank must be >= 1"),
        (0 <= self.lora_dropout < 1, "lora_dropout must be in [0, 1)"),
        (set(self.lora_targets) <= set(LINEAR_NAMES), f"lora_targets must be among {LINEAR_NAMES}"),
        (len(self.lora_targets) > 0, "lora_targets must name at least one layer"),
        (self.dataset_format in DATA_FORMATS, f"dataset_format must be one of {DATA_FORMATS}"),
        (self.source_max_len >= 1 and self.target_max_len >= 1, "max lengths must be >= 1"),
        (self.batch_size >= 1 and self.grad_accum >= 1 and self.steps >= 1,
         "batch_size, grad_accum and steps must be >= 1"),
        (self.lr_schedule in ("constant", "cosine", "linear"), "lr_schedule must be constant, cosine or linear"),
        (0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)"),
        (self.remat in REMAT_POLICIES, f"remat must be one of {tuple(REMAT_POLICIES)}"),
        (self.attention in ATTENTION_IMPLEMENTATIONS, f"attention must be one of {ATTENTION_IMPLEMENTATIONS}"),
        (self.log_every >= 1 and self.eval_every >= 1 and self.save_every >= 1,
         "log_every, eval_every and save_every must be >= 1"),
        (self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1"),
        (self.eval_size >= 1, "eval_size must be >= 1"),
        (all(size == -1 or size >= 1 for _, size in self.mesh), "mesh sizes must be >= 1 or -1"),
        (all(axis in MESH_AXES for axis, _ in self.mesh), f"mesh axes must be among {MESH_AXES}"),
        (len({axis for axis, _ in self.mesh}) == len(self.mesh), "mesh axes must be distinct"),
        (sum(size == -1 for _, size in self.mesh) <= 1, "at most one mesh axis may be -1"),
        (self.lora_sharding in LORA_SHARDINGS, f"lora_sharding must be one of {LORA_SHARDINGS}"),
        (self.device_memory_gib >= 0, "device_memory_gib must be >= 0"),
    ]
    for ok, message in checks:
      if not ok:
        raise ValueError(f"invalid config: {message}")

  @property
  def max_seq_len(self) -> int:
    return self.source_max_len + self.target_max_len


def _check_types(cfg: TrainConfig) -> None:
  hints = typing.get_type_hints(TrainConfig)
  for f in dataclasses.fields(cfg):
    value = getattr(cfg, f.name)
    if not _is_instance(value, hints[f.name]):
      raise ValueError(f"config field {f.name!r} must be {_type_name(hints[f.name])}, got {value!r}")


def _is_instance(value, tp) -> bool:
  origin = typing.get_origin(tp)
  if origin is tuple:
    args = typing.get_args(tp)
    if not isinstance(value, tuple):
      return False
    if len(args) == 2 and args[1] is Ellipsis:
      return all(_is_instance(v, args[0]) for v in value)
    return len(args) == len(value) and all(_is_instance(v, a) for v, a in zip(value, args))
  if tp is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if tp is int:
    return isinstance(value, int) and not isinstance(value, bool)
  return isinstance(value, tp)


def _type_name(tp) -> str:
  return getattr(tp, "__name__", str(tp).replace("typing.", ""))


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
  hints = typing.get_type_hints(TrainConfig)
  changes = {}
  for item in overrides:
    key, sep, text = item.partition("=")
    if not sep:
      raise ValueError(f"override {item!r} is not key=value")
    if key not in hints:
      raise ValueError(f"unknown config key {key!r}; valid keys: {', '.join(sorted(hints))}")
    try:
      changes[key] = _parse_value(text, hints[key])
    except ValueError as e:
      raise ValueError(f"bad value for {key} ({_type_name(hints[key])}): {e}") from e
  return dataclasses.replace(cfg, **changes)


def resolve_config_path(name_or_path: str) -> pathlib.Path:
  """A path, or a name inside configs/ (with or without .py)."""
  path = pathlib.Path(name_or_path)
  candidates = [path, CONFIG_DIR / path, CONFIG_DIR / f"{name_or_path}.py"]
  for c in candidates:
    if c.is_file():
      return c
  available = sorted(p.stem for p in CONFIG_DIR.glob("*.py"))
  raise ValueError(f"config {name_or_path!r} not found; give a path or one of: {available}")


def load_config(name_or_path: str, overrides: list[str] = ()) -> TrainConfig:
  """Run a config file, take its `config` (a TrainConfig) and apply overrides."""
  path = resolve_config_path(name_or_path)
  try:
    namespace = runpy.run_path(str(path))
  except TypeError as e:  # an unknown field in TrainConfig(...) lands here
    raise ValueError(f"{path}: {e}; valid keys: {', '.join(sorted(typing.get_type_hints(TrainConfig)))}") from e
  cfg = namespace.get("config")
  if not isinstance(cfg, TrainConfig):
    raise ValueError(f"{path} must define `config = TrainConfig(...)`")
  return apply_overrides(cfg, list(overrides))
