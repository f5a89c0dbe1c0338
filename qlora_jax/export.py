"""python -m qlora_jax.export RUN_DIR OUT [--merge] [--overwrite]

Export a training run as a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors,
PEFT's key names and [r, in] / [out, r] shapes) naming the original model the base was converted
from, or with --merge as a bf16 transformers checkpoint with the adapters folded into the
dequantized base weights. `load_adapter` reads such adapters back, and PEFT's own.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import re
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from pallas_kernels.xla import precision_for
from qlora_jax import cli
from qlora_jax.format.atomic import atomic_dir
from qlora_jax.format.folder import ShardWriter, read_meta
from qlora_jax.format.quantization import dequantize
from qlora_jax.io.loading import expected_tensors, load_model
from qlora_jax.io.sources import DEFAULT_GGUF, DEFAULT_ORIGINAL
from qlora_jax.nn.families import LINEAR_NAMES
from qlora_jax.nn.lora import LoraConfig, QLoRALinear
from qlora_jax.nn.model import ModelOptions, variable_names
from qlora_jax.nn.model_config import ModelConfig
from qlora_jax.nn.variables import FrozenParam
from qlora_jax.train.builder import build_from_folder
from qlora_jax.train.checkpoint import BEST_DIR, Checkpointer
from qlora_jax.train.config import TrainConfig

PEFT_PREFIX = "base_model.model."
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "tokenizer.model", "vocab.json", "merges.txt")
# adapter_config.json fields that change what a LoRA computes (or the base it applies to), with
# the value of plain LoRA: any other value is refused, as qlora_jax cannot compute it exactly.
PLAIN_LORA = {"use_dora": False, "bias": "none", "lora_bias": False, "fan_in_fan_out": False,
              "modules_to_save": None, "trainable_token_indices": None, "target_parameters": None,
              "layer_replication": None, "megatron_config": None, "alora_invocation_tokens": None,
              "use_qalora": False, "use_bdlora": None, "arrow_config": None, "kasa_config": None,
              "monteclora_config": None, "velora_config": None, "loftq_config": {}}
# init_lora_weights methods that rewrite the base weights, so the adapter fits only that new base.
BASE_CHANGING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")


def run_config(run_dir: pathlib.Path) -> TrainConfig:
  path = pathlib.Path(run_dir) / "config.json"
  if not path.is_file():
    raise ValueError(f"{run_dir} is not a training run folder (no config.json)")
  try:
    return TrainConfig.from_dict(json.loads(path.read_text()))
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{path} is not a config this version can read ({type(e).__name__}: {e})") from e


def load_run(run_dir, model_dir=None, best: bool = False) -> tuple[TrainConfig, object, object]:
  """(config, model with the run's latest LoRA weights, or with those of its lowest eval loss,
  tokenizer); model_dir overrides the base model folder the run recorded."""
  cfg = run_config(run_dir)
  ckpt = (Checkpointer(pathlib.Path(run_dir), 1, BEST_DIR) if best
          else Checkpointer(pathlib.Path(run_dir), cfg.loop.keep_checkpoints))
  if ckpt.latest_step() is None:
    ckpt.close()
    raise ValueError(f"{run_dir} holds no {'best (evaluated) ' if best else ''}checkpoint yet")
  trainable, tokenizer = build_from_folder(cfg, pathlib.Path(model_dir or cfg.model.model_dir))
  state, _ = ckpt.restore(trainable.restore_template())
  ckpt.close()
  trainable.restore(state)
  return cfg, trainable.model(), tokenizer  # inference: LoRA dropout off


def linear_modules(model):
  """(transformers module name, QLoRALinear, layer index into stacked variables or None)."""
  for path, module in nnx.iter_modules(model):
    if isinstance(module, QLoRALinear):
      for name, index in variable_names(path, model.config, model.options):
        yield name, module, index


def _take(tree, index: int | None):
  """One layer's slice of a (possibly stacked) array or QuantizedArray."""
  return tree if index is None else jax.tree.map(lambda a: a[index], tree)


def peft_tensors(model) -> dict[str, np.ndarray]:
  """PEFT's adapter_model.safetensors entries (float32, PEFT's default)."""
  out = {}
  for name, layer, i in linear_modules(model):
    if layer.lora is not None:
      out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = np.asarray(_take(layer.lora_a[...], i), np.float32).T.copy()
      out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = np.asarray(_take(layer.lora_b[...], i), np.float32).T.copy()
  return out


def original_name(source: str) -> str:
  """What transformers loads for a converted folder's recorded source (its metadata "source", or a
  run's model_source): the hub id for "hub:ORG/NAME" and the embedded default, else the source
  as recorded (a transformers folder, or a .gguf file that transformers reads only with gguf_file=)."""
  if source.startswith("hub:"):
    return source[len("hub:"):]
  if source == "default" or pathlib.PurePath(source).name == DEFAULT_GGUF[1]:
    return DEFAULT_ORIGINAL
  return source


def original_base(cfg: TrainConfig) -> str:
  """The model the run's base was converted from, as PEFT's base_model_name_or_path: the converted
  folder's recorded source, else the run's model_source, else (neither known) the folder itself."""
  try:
    source = read_meta(cfg.model.model_dir).get("source") or cfg.model.model_source
  except ValueError:  # the folder is gone or not converted: fall back on the run's config
    source = cfg.model.model_source
  return original_name(source) if source else str(cfg.model.model_dir)


def peft_config(cfg: TrainConfig, base_model: str) -> dict:
  """adapter_config.json, derived from the run's config (nothing hard-coded that it holds)."""
  lora = cfg.lora
  return {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.alpha,
      "lora_dropout": lora.dropout, "target_modules": sorted(lora.targets), "bias": "none",
      "use_rslora": lora.use_rslora, "use_dora": False, "fan_in_fan_out": False,
      "base_model_name_or_path": base_model,
      "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "init_lora_weights": True,
      "inference_mode": True, "layers_to_transform": None, "layers_pattern": None,
  }


def write_peft(cfg: TrainConfig, model, out, overwrite: bool = False) -> None:
  with atomic_dir(out, overwrite) as tmp:
    save_file(peft_tensors(model), str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = peft_config(cfg, original_base(cfg))
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))


def merged_tensors(model):
  """(name, bf16 array) of a plain transformers checkpoint: W + scaling * (A @ B)^T folded in."""
  for name, module, i in linear_modules(model):
    w = dequantize(_take(module.weight.get_value(), i), jnp.float32)
    if module.lora is not None:
      a, b = _take(module.lora_a[...], i), _take(module.lora_b[...], i)
      w = w + module.lora.scaling * jnp.matmul(a, b, precision=precision_for(w.dtype)).T
    yield f"{name}.weight", np.asarray(w.astype(jnp.bfloat16))
  for path, var in nnx.to_flat_state(nnx.state(model, FrozenParam)):  # norms, embeddings, biases
    for name, i in variable_names(path, model.config, model.options):
      yield name, np.asarray(_take(var.get_value(), i).astype(jnp.bfloat16))


def write_merged(model, model_dir, out, overwrite: bool = False) -> None:
  model_dir = pathlib.Path(model_dir)
  with atomic_dir(out, overwrite) as tmp:
    writer = ShardWriter(tmp)
    for name, array in merged_tensors(model):
      writer.add(name, array)
    writer.close()
    hf = json.loads((model_dir / "config.json").read_text())
    hf.pop("quantization_config", None)
    hf["torch_dtype"] = "bfloat16"
    (tmp / "config.json").write_text(json.dumps(hf, indent=2))
    for f in TOKENIZER_FILES:
      if (model_dir / f).is_file():
        shutil.copy(model_dir / f, tmp / f)


def load_adapter(model_dir, adapter, dtype=jnp.bfloat16) -> tuple[object, object]:
  """(model, tokenizer) of a converted base with an adapter: a run folder or a PEFT folder."""
  adapter = pathlib.Path(adapter)
  if (adapter / "checkpoints").is_dir():
    _, model, tokenizer = load_run(adapter, model_dir)
    return model, tokenizer
  config_path = adapter / "adapter_config.json"
  if not config_path.is_file():
    raise ValueError(f"{adapter} is neither a training run nor a PEFT adapter folder")
  if not (adapter / "adapter_model.safetensors").is_file():
    raise ValueError(f"{adapter} has no adapter_model.safetensors")
  pc = json.loads(config_path.read_text())
  check_plain_lora(pc, config_path)
  read_meta(model_dir)  # names the fix when model_dir is not a converted folder
  config = ModelConfig.from_file(pathlib.Path(model_dir) / "config.json")
  names = [n.removesuffix(".weight") for n, (kind, _) in expected_tensors(config).items() if kind == "quantized"]
  adapted = peft_modules(pc, names)
  if not adapted:
    raise ValueError(f"{config_path}: target_modules {pc['target_modules']!r} adapt no linear layer of "
                     f"{model_dir}; give an adapter made for this model")
  lora = LoraConfig(rank=max(r for r, _ in adapted.values()), alpha=float(pc["lora_alpha"]),
                    targets=tuple(k for k in LINEAR_NAMES if any(n.endswith(f".{k}") for n in adapted)),
                    use_rslora=bool(pc.get("use_rslora")))
  model, tokenizer = load_model(model_dir, dtype, ModelOptions(lora=lora))
  with safe_open(str(adapter / "adapter_model.safetensors"), "flax") as f:  # bf16 too
    weights = {k: np.asarray(f.get_tensor(k), np.float32) for k in f.keys()}
  fill_adapters(model, adapted, weights, adapter)
  model.eval()
  return model, tokenizer


def check_plain_lora(pc: dict, config_path) -> None:
  """ValueError naming the first adapter_config.json field that qlora_jax cannot compute exactly."""
  if pc.get("peft_type") != "LORA" or "r" not in pc or "lora_alpha" not in pc:
    raise ValueError(f"{config_path}: peft_type {pc.get('peft_type')!r} is not a LoRA adapter (with r "
                     "and lora_alpha); only LoRA adapters load")
  if not pc.get("target_modules"):
    raise ValueError(f"{config_path}: target_modules is missing; re-save the adapter with PEFT's "
                     "save_pretrained, which records it")
  for field, plain in PLAIN_LORA.items():
    value = pc.get(field, plain)
    if value != plain and (value or plain):
      raise ValueError(f"{config_path}: {field}={value!r} is not supported (qlora_jax computes plain "
                       f"LoRA only); use an adapter trained with {field}={plain!r}")
  init = pc.get("init_lora_weights", True)
  if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
    raise ValueError(f"{config_path}: init_lora_weights={init!r} rewrote the base weights, so the adapter "
                     "fits only that base; convert it to a plain LoRA first (PEFT's save_pretrained "
                     "with path_initial_model_for_weight_conversion)")


def peft_modules(pc: dict, names: list[str]) -> dict[str, tuple[int, float]]:
  """name -> (rank, scaling) of each linear layer the adapter adapts, decided as PEFT decides it."""
  out = {}
  for name in names:
    if peft_targets(pc, name):
      r = int(peft_pattern_value(pc.get("rank_pattern") or {}, name, pc["r"]))
      alpha = float(peft_pattern_value(pc.get("alpha_pattern") or {}, name, pc["lora_alpha"]))
      out[name] = (r, alpha / (math.sqrt(r) if pc.get("use_rslora") else r))
  return out


def peft_targets(pc: dict, name: str) -> bool:
  """PEFT's check_target_module_exists (peft/tuners/tuners_utils.py) for one module name."""
  exclude = pc.get("exclude_modules")
  if isinstance(exclude, str) and re.fullmatch(exclude, name):
    return False
  if exclude and not isinstance(exclude, str) and (
      name in exclude or any(name.endswith(f".{e}") for e in exclude)):
    return False
  targets = pc["target_modules"]
  if isinstance(targets, str) and targets.lower() == "all-linear":  # PEFT expands it to these
    targets = list(LINEAR_NAMES)
  if isinstance(targets, str):  # a regex, full-matched; layers_to_transform does not apply
    return re.fullmatch(targets, name) is not None
  if name in targets:
    return True
  return any(name.endswith(f".{t}") for t in targets) and peft_in_layers(pc, name)


def peft_in_layers(pc: dict, name: str) -> bool:
  """Whether layers_to_transform (with layers_pattern) keeps the module, as PEFT reads them."""
  layers, patterns = pc.get("layers_to_transform"), pc.get("layers_pattern")
  if layers is None or layers == []:
    return True
  if not patterns:  # the first numbered part of the name is the layer index
    match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
  else:  # the number after the first part named by a pattern
    found = (re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name)
             for p in ([patterns] if isinstance(patterns, str) else patterns))
    match = next((m for m in found if m is not None), None)
  if match is None:
    return False
  index = int(match["idx"])
  return index == layers if isinstance(layers, int) else index in layers


def peft_pattern_value(patterns: dict, name: str, default):
  """PEFT's rank_pattern / alpha_pattern lookup (peft/utils/other.py get_pattern_key): the value
  of the first key, in order, that matches the end of the name at a dot boundary."""
  for key in patterns:
    if re.match(rf"(.*\.)?({key})$", name):
      return patterns[key]
  return patterns.get(name, default)


def fill_adapters(model, adapted: dict[str, tuple[int, float]], weights: dict, adapter) -> None:
  """Set the model's LoRA weights from PEFT's: each module's A and B zero-padded to the model's
  one rank, its own scaling folded into B; modules the adapter leaves alone get zeros."""
  found: dict[tuple[int, str], list] = {}
  used = set()
  for name, layer, i in linear_modules(model):
    if layer.lora is None:
      continue
    a_KxR, b_RxN = _padded_lora(name, adapted.get(name), weights, layer, used)
    for attr, value in (("lora_a", a_KxR), ("lora_b", b_RxN)):
      found.setdefault((id(layer), attr), [layer, attr, []])[2].append(value)
  for layer, attr, arrays in found.values():  # one array per layer; stacked when scanned
    value = arrays[0] if len(arrays) == 1 and getattr(layer, attr)[...].ndim == 2 else np.stack(arrays)
    getattr(layer, attr)[...] = jnp.asarray(value, getattr(layer, attr).dtype)
  unused = sorted(set(weights) - used)
  if unused:
    raise ValueError(f"{adapter}: weights for modules qlora_jax does not adapt here ({unused[:3]}, "
                     f"{len(unused)} in all); only the decoder's linear layers {LINEAR_NAMES} load")


def _padded_lora(name: str, spec, weights: dict, layer: QLoRALinear, used: set) -> tuple:
  """(A [in, R], B [R, out]) float32 of one module at the layer's rank R and scaling."""
  rank, scaling = layer.lora.rank, layer.lora.scaling
  a_KxR = np.zeros((layer.in_features, rank), np.float32)
  b_RxN = np.zeros((rank, layer.out_features), np.float32)
  if spec is None:  # not adapted: zero A and B add exactly nothing
    return a_KxR, b_RxN
  r, own = spec
  a_RxK = _peft_weight(weights, f"{PEFT_PREFIX}{name}.lora_A.weight", (r, layer.in_features), used)
  b_NxR = _peft_weight(weights, f"{PEFT_PREFIX}{name}.lora_B.weight", (layer.out_features, r), used)
  a_KxR[:, :r] = a_RxK.T
  # Folded in float64 and rounded once; a ratio of 1 (one rank and alpha) leaves B bit-identical.
  b_RxN[:r] = b_NxR.T if own == scaling else b_NxR.T.astype(np.float64) * (own / scaling)
  return a_KxR, b_RxN


def _peft_weight(weights: dict, key: str, shape: tuple, used: set) -> np.ndarray:
  if key not in weights:
    raise ValueError(f"adapter lacks {key}, which its adapter_config.json adapts")
  if tuple(weights[key].shape) != shape:
    raise ValueError(f"adapter's {key} has shape {tuple(weights[key].shape)}; its adapter_config.json "
                     f"(r, rank_pattern) and the base model imply {shape}")
  used.add(key)
  return weights[key]


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("run_dir")
  p.add_argument("out")
  p.add_argument("--merge", action="store_true", help="write a merged bf16 transformers checkpoint")
  p.add_argument("--overwrite", action="store_true")
  p.add_argument("--best", action="store_true", help="the adapters of the lowest eval loss, not the last")
  args = p.parse_args(argv)

  def export() -> str:
    cfg, model, _ = load_run(args.run_dir, best=args.best)
    if args.merge:
      write_merged(model, cfg.model.model_dir, args.out, args.overwrite)
    else:
      write_peft(cfg, model, args.out, args.overwrite)
    return f"wrote {'merged checkpoint' if args.merge else 'PEFT adapter'} to {args.out}"

  return cli.run(export)


if __name__ == "__main__":
  sys.exit(main())
