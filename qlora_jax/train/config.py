"""The training configuration: a TrainConfig composed of small frozen sections, each checked once
in its `__post_init__` (types, ranges, choices) before any model work.

Config files in `configs/` define `config = TrainConfig(...)` (config_files.py loads them and
applies `key=value` overrides). A key is flat (`learning_rate`, `lora_rank`: `python train.py
--help` lists them) or dotted (`optim.learning_rate`). The quantization and LoRA sections are the
library's own `QuantConfig` and `LoraConfig`: one object travels from the config to the layer.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import typing

import jax

from pallas_kernels import backends
from qlora_jax.data import CHAT_TURNS, FORMATS
from qlora_jax.format.quantization import QuantConfig
from qlora_jax.nn.families import LORA_TARGETS
from qlora_jax.nn.lora import LoraConfig
from qlora_jax.nn.attention import ATTENTION_IMPLEMENTATIONS
from qlora_jax.nn.model import ModelOptions
from qlora_jax.nn.remat import REMAT_POLICIES
from qlora_jax.nn.sharding import LORA_SHARDINGS, MESH_AXES

EMBEDDINGS = ("auto", "device", "host")  # DeviceConfig.embedding
# What a run may change when it resumes from its folder: how long, how often, and where and how
# it computes (devices, memory placement, kernels), not what it trains.
RESUMABLE = ("steps", "eval_every", "save_every", "log_every", "keep_checkpoints", "sample_prompts",
             "sample_max_new_tokens", "output_dir", "mesh", "lora_sharding", "device_memory_gib",
             "embedding", "remat", "mlp_chunk", "loss_chunk", "attention", "backend")

LR_SCHEDULES = ("constant", "cosine", "linear")
DTYPES = ("bfloat16", "float32")


def _require(checks: list[tuple[bool, str]]) -> None:
  """ValueError at the first check that fails."""
  for ok, message in checks:
    if not ok:
      raise ValueError(f"invalid config: {message}")


def _finite(x: float) -> bool:
  return math.isfinite(x)


def _check_types(obj) -> None:
  """Every field of obj has its declared type (a section: its class)."""
  hints = typing.get_type_hints(type(obj))
  for f in dataclasses.fields(obj):
    _check_type(f.name, getattr(obj, f.name), hints[f.name])


def _check_type(name: str, value, tp) -> None:
  if dataclasses.is_dataclass(tp) and not isinstance(value, tp):
    raise ValueError(f"config section {name!r} must be a {tp.__name__}, got {value!r}")
  if not dataclasses.is_dataclass(tp) and not _is_instance(value, tp):
    raise ValueError(f"config field {name!r} must be {type_name(tp)}, got {value!r}")


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


def type_name(tp) -> str:
  """int, str, tuple[str, ...]: a type as a user reads it."""
  return str(tp) if typing.get_origin(tp) else getattr(tp, "__name__", str(tp))


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSetup:
  """Which model and how it computes. `model_dir` is a converted folder; if it does not exist
  yet, `model_source` is converted into it ("default": the embedded SmolLM2-135M-Instruct GGUF;
  "": model_dir must exist)."""

  model_dir: str
  model_source: str = ""
  dtype: str = "bfloat16"  # compute dtype, and the dtype of embeddings, norms and lm_head
  remat: str = "full"  # per layer, a REMAT_POLICIES key (nn/remat.py)
  scan_layers: bool = True  # scan over one stacked layer: compile time independent of depth
  attention: str = "auto"  # auto: cuDNN flash attention on GPU where it applies, else XLA
  backend: str = backends.DEFAULT  # the 4-bit matmul: auto | pallas | xla
  mlp_chunk: int = 0  # tokens per MLP piece in training (0: the whole batch at once)
  loss_chunk: int = 0  # tokens whose float32 logits exist at once in the loss (0: by vocabulary)
  router_aux_loss: float = 0.0  # experts models: the router's load-balancing loss coefficient (0: off)

  def __post_init__(self):
    _check_types(self)
    _require([
        (bool(self.model_dir), "model_dir must name a folder"),
        (self.mlp_chunk >= 0, "mlp_chunk must be >= 0 (tokens; 0 = no chunking)"),
        (self.loss_chunk >= 0, "loss_chunk must be >= 0 (tokens; 0 = by vocabulary size)"),
        (_finite(self.router_aux_loss) and self.router_aux_loss >= 0,
         f"router_aux_loss must be >= 0 and finite (0: off), got {self.router_aux_loss}"),
        (self.dtype in DTYPES, f"dtype must be one of {DTYPES}"),
        (self.remat in REMAT_POLICIES, f"remat must be one of {tuple(REMAT_POLICIES)}"),
        (self.attention in ATTENTION_IMPLEMENTATIONS,
         f"attention must be one of {ATTENTION_IMPLEMENTATIONS}"),
        (self.backend in backends.NAMES,
         f"backend must be one of {backends.NAMES}, got {self.backend!r}"),
    ])


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
  """Training data: a hub name or a local json/jsonl/parquet/csv file, and how rows are cut."""

  dataset: str
  dataset_format: str = "alpaca"
  eval_dataset: str = ""  # "": hold out `eval_size` examples of `dataset`
  eval_size: int = 64
  source_max_len: int = 1024
  target_max_len: int = 256
  train_on_source: bool = False
  group_by_length: bool = True
  packing: bool = False
  chat_turns: str = "all"  # chat/ShareGPT rows: learn every assistant turn, or only the last

  def __post_init__(self):
    _check_types(self)
    _require([
        (bool(self.dataset), "dataset must name a file or a hub dataset"),
        (self.dataset_format in FORMATS, f"dataset_format must be one of {FORMATS}"),
        (self.chat_turns in CHAT_TURNS, f"chat_turns must be one of {CHAT_TURNS}"),
        (self.eval_size >= 1, "eval_size must be >= 1"),
        (self.source_max_len >= 1 and self.target_max_len >= 1, "max lengths must be >= 1"),
    ])

  @property
  def max_seq_len(self) -> int:
    return self.source_max_len + self.target_max_len


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
  """AdamW after global-norm clipping, its learning-rate schedule, and the step's size: `steps`
  updates of `batch_size` x `grad_accum` rows. Defaults: the QLoRA paper's recipe (constant LR
  after 3% warmup, clipping at 0.3)."""

  batch_size: int = 16
  grad_accum: int = 1
  steps: int = 1000
  learning_rate: float = 2e-4
  lr_schedule: str = "constant"  # after warmup: constant | cosine | linear
  warmup_ratio: float = 0.03
  weight_decay: float = 0.0
  max_grad_norm: float = 0.3  # 0: no clipping
  adam_beta1: float = 0.9
  adam_beta2: float = 0.999
  offload_optimizer: bool = False  # keep AdamW moments in pinned host memory between steps

  def __post_init__(self):
    _check_types(self)
    _require([
        (self.batch_size >= 1 and self.grad_accum >= 1 and self.steps >= 1,
         "batch_size, grad_accum and steps must be >= 1"),
        (_finite(self.learning_rate) and self.learning_rate > 0,
         f"learning_rate must be > 0 and finite, got {self.learning_rate}"),
        (self.lr_schedule in LR_SCHEDULES, f"lr_schedule must be one of {LR_SCHEDULES}"),
        (0 <= self.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}"),
        (_finite(self.weight_decay) and self.weight_decay >= 0,
         f"weight_decay must be >= 0 and finite, got {self.weight_decay}"),
        (_finite(self.max_grad_norm) and self.max_grad_norm >= 0,
         f"max_grad_norm must be >= 0 and finite (0: no clipping), got {self.max_grad_norm}"),
        (0 <= self.adam_beta1 < 1, f"adam_beta1 must be in [0, 1), got {self.adam_beta1}"),
        (0 <= self.adam_beta2 < 1, f"adam_beta2 must be in [0, 1), got {self.adam_beta2}"),
    ])


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeviceConfig:
  """Devices (nn/sharding.py): mesh axes data | fsdp | tensor with sizes, -1 = the devices left;
  a mesh of one device runs unsharded. lora_sharding: LoRA params and AdamW moments split over
  fsdp or not. device_memory_gib: the per-device budget checked at start-up; 0: the device's own.
  embedding: where the frozen token-embedding table lives while training; host: in host memory,
  its rows looked up as each batch is prepared (an untied lm_head only); auto: host on an
  accelerator when lm_head is untied, device otherwise."""

  mesh: tuple[tuple[str, int], ...] = (("data", -1),)
  lora_sharding: str = "fsdp"
  device_memory_gib: float = 0.0
  embedding: str = "auto"

  def __post_init__(self):
    _check_types(self)
    axes = [axis for axis, _ in self.mesh]
    _require([
        (all(size == -1 or size >= 1 for _, size in self.mesh), "mesh sizes must be >= 1 or -1"),
        (set(axes) <= set(MESH_AXES), f"mesh axes must be among {MESH_AXES}"),
        (len(set(axes)) == len(axes), "mesh axes must be distinct"),
        (sum(size == -1 for _, size in self.mesh) <= 1, "at most one mesh axis may be -1"),
        (self.lora_sharding in LORA_SHARDINGS, f"lora_sharding must be one of {LORA_SHARDINGS}"),
        (_finite(self.device_memory_gib) and self.device_memory_gib >= 0,
         "device_memory_gib must be >= 0"),
        (self.embedding in EMBEDDINGS, f"embedding must be one of {EMBEDDINGS}"),
    ])


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoopConfig:
  """The loop around the steps: where it writes, how often it logs, evaluates and saves."""

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
    _require([
        (bool(self.output_dir), "output_dir must name a folder"),
        (self.seed >= 0, "seed must be >= 0"),
        (self.log_every >= 1 and self.eval_every >= 1 and self.save_every >= 1,
         "log_every, eval_every and save_every must be >= 1"),
        (self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1"),
        (self.sample_max_new_tokens >= 1, "sample_max_new_tokens must be >= 1"),
    ])


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
  """Everything a QLoRA run needs, by section. Defaults are the QLoRA paper's recipe (qlora.py):
  NF4 + double quant, blocksize 64; LoRA r=64, alpha=16, dropout 0.1 on all linear layers. A
  section given whole replaces the default one (`lora=LoraConfig(rank=16)` has LoraConfig's
  dropout, 0); `replace` and `key=value` overrides change single fields of it."""

  model: ModelSetup
  quant: QuantConfig = QuantConfig()
  lora: LoraConfig = LoraConfig(dropout=0.1)
  data: DataConfig
  optim: OptimConfig = OptimConfig()
  devices: DeviceConfig = DeviceConfig()
  loop: LoopConfig = LoopConfig()

  def __post_init__(self):
    _check_types(self)  # each section checked its own ranges as it was made
    _check_types(self.quant)  # the library's sections check ranges, not types
    _check_types(self.lora)
    _require([(set(self.lora.targets) <= set(LORA_TARGETS),
               f"lora_targets must be among {LORA_TARGETS}")])

  def model_options(self, quant: QuantConfig | None = None) -> ModelOptions:
    """How the model runs: this config's compute settings, LoRA and backend (the one place a
    backend name becomes a Backend). quant: the stored model's, where it is known."""
    m = self.model
    return ModelOptions(dtype=m.dtype, quant=quant or self.quant, lora=self.lora, remat=m.remat,
                        attention=m.attention, backend=backends.get_backend(m.backend),
                        scan_layers=m.scan_layers, mlp_chunk=m.mlp_chunk, loss_chunk=m.loss_chunk,
                        router_aux_loss=m.router_aux_loss)

  def resume_conflicts(self, saved: "TrainConfig") -> list[str]:
    """The settings that differ from `saved` (the config a run folder was started with) and may
    not change when the run resumes: "key: old -> new" each. RESUMABLE lists those that may."""
    old, new = saved.to_flat_dict(), self.to_flat_dict()
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in new
            if k not in RESUMABLE and old.get(k) != new.get(k)]

  def check_context(self, max_positions: int) -> None:
    """ValueError when a row (source + target tokens) can be longer than the model's context."""
    d = self.data
    if d.max_seq_len > max_positions:
      raise ValueError(f"source_max_len + target_max_len = {d.max_seq_len} tokens is more than the "
                       f"model's context of {max_positions}; lower them so they sum to at most "
                       f"{max_positions}")

  def host_embedding(self, tied: bool, platform: str | None = None) -> bool:
    """Whether the embedding table stays in host memory for a model with (tied) or without an
    untied lm_head, on `platform` (default: JAX's)."""
    where = self.devices.embedding
    if where == "auto":
      return not tied and (platform or jax.default_backend()) != "cpu"
    if where == "host" and tied:
      raise ValueError("embedding=host needs an untied lm_head (this model ties lm_head to the "
                       "embedding, which the loss reads on the device); use embedding=device")
    return where == "host"

  def replace(self, **changes) -> "TrainConfig":
    """A copy with fields changed, named by flat key (`learning_rate`) or dotted path
    (`optim.learning_rate`); ValueError for an unknown key or a bad value."""
    by_section: dict[str, dict] = {}
    for key, value in changes.items():
      section, field = resolve_key(key)
      _check_type(f"{section}.{field}", value, field_types(SECTIONS[section])[field])
      by_section.setdefault(section, {})[field] = value
    updated = {s: dataclasses.replace(getattr(self, s), **f) for s, f in by_section.items()}
    return dataclasses.replace(self, **updated)

  def to_dict(self) -> dict:
    """{section: {field: value}}: what a run folder's config.json holds."""
    return dataclasses.asdict(self)

  def to_flat_dict(self) -> dict:
    """{flat key: value}, keys as `key=value` overrides name them (the config.json of older runs)."""
    return {key: getattr(getattr(self, section), field)
            for key, (section, _, field) in ((k, p.partition(".")) for k, p in flat_keys().items())}

  @classmethod
  def from_dict(cls, raw: dict) -> "TrainConfig":
    """The config a `to_dict()` (or an older flat config.json) describes."""
    flat = {}
    for key, value in raw.items():
      if isinstance(value, dict):
        flat.update({f"{key}.{k}": v for k, v in value.items()})
      else:
        flat[key] = value
    sections = {}
    for key, value in flat.items():
      section, field = resolve_key(key)
      hint = field_types(SECTIONS[section])[field]
      sections.setdefault(section, {})[field] = _from_json(value, hint)
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    return cls(**{s: dataclasses.replace(defaults[s], **f) if defaults[s] is not dataclasses.MISSING
                  else SECTIONS[s](**f) for s, f in sections.items()})

  def text(self) -> str:
    """One line per section: the effective config, as a run prints it at start."""
    lines = []
    for section in SECTIONS:
      values = dataclasses.asdict(getattr(self, section))
      lines.append(f"  {section}: " + ", ".join(f"{k}={show(v)}" for k, v in values.items()))
    return "config:\n" + "\n".join(lines)


SECTIONS: dict[str, type] = typing.get_type_hints(TrainConfig)  # name -> section class
# Flat keys whose name differs from their field (the rest: the field's own name).
ALIASES = {"lora_rank": "lora.rank", "lora_alpha": "lora.alpha", "lora_dropout": "lora.dropout",
           "lora_targets": "lora.targets", "lora_dtype": "lora.param_dtype",
           "use_rslora": "lora.use_rslora"}


def field_types(cls: type) -> dict[str, type]:
  return typing.get_type_hints(cls)


def flat_keys() -> dict[str, str]:
  """Every flat key -> its dotted path."""
  keys = {field: f"{section}.{field}" for section, cls in SECTIONS.items() if section != "lora"
          for field in field_types(cls)}
  return {**keys, **ALIASES}


def resolve_key(key: str) -> tuple[str, str]:
  """(section, field) of a flat or dotted key; ValueError listing the keys otherwise."""
  dotted = key if "." in key else flat_keys().get(key, "")
  section, _, field = dotted.partition(".")
  if section not in SECTIONS or field not in field_types(SECTIONS[section]):
    raise ValueError(f"unknown config key {key!r}; valid keys: {', '.join(sorted(flat_keys()))} "
                     "(or section.field; python train.py --help lists them)")
  return section, field


def show(value) -> str:
  if isinstance(value, tuple) and all(isinstance(v, tuple) for v in value):
    return ",".join(":".join(map(str, v)) for v in value) or '""'
  if isinstance(value, tuple):
    return ",".join(map(str, value)) or '""'
  return repr(value) if isinstance(value, str) and not value else str(value)


def _from_json(value, tp):
  """A JSON value as type tp (lists become tuples)."""
  if typing.get_origin(tp) is tuple and isinstance(value, list):
    args = typing.get_args(tp)
    inner = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
    return tuple(_from_json(v, a) for v, a in zip(value, inner))
  return value


def save_config(cfg: TrainConfig, path: pathlib.Path) -> None:
  path.write_text(json.dumps(cfg.to_dict(), indent=2))
