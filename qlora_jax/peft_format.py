"""PEFT's LoRA adapter format (adapter_config.json + adapter_model.safetensors), both ways:
our adapters written as PEFT writes them, and PEFT's read into our model exactly as PEFT computes
them (target_modules and its regexes, rank/alpha patterns, layers_to_transform, rsLoRA), with
anything else refused by name. A family whose checkpoints fuse projections (Phi-3: qkv_proj,
gate_up_proj; nn/families.py FUSED) is written and read under the fused names."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qlora_jax.nn.families import FUSED, FUSED_INTO, LINEAR_NAMES, family, fused_rows
from qlora_jax.nn.lora import QLoRALinear
from qlora_jax.nn.model import variable_names
from qlora_jax.nn.model_config import ModelConfig
from qlora_jax.peft_experts import (check_target_parameters, expert_adapter_values, expert_tensors,
                                    fold_scaling, target_parameters)
from qlora_jax.train.config import TrainConfig

PEFT_PREFIX = "base_model.model."
# adapter_config.json fields that change what a LoRA computes (or the base it applies to), with
# the value of plain LoRA: any other value is refused, as qlora_jax cannot compute it exactly.
PLAIN_LORA = {"use_dora": False, "bias": "none", "lora_bias": False, "fan_in_fan_out": False,
              "modules_to_save": None, "trainable_token_indices": None,
              "layer_replication": None, "megatron_config": None, "alora_invocation_tokens": None,
              "use_qalora": False, "use_bdlora": None, "arrow_config": None, "kasa_config": None,
              "monteclora_config": None, "velora_config": None, "loftq_config": {}}
# init_lora_weights methods that rewrite the base weights, so the adapter fits only that new base.
BASE_CHANGING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")


def linear_modules(model):
  """(transformers module name, QLoRALinear, layer index into stacked variables or None)."""
  for path, module in nnx.iter_modules(model):
    if isinstance(module, QLoRALinear):
      for name, index in variable_names(path, model.config, model.options):
        yield name, module, index


def layer_slice(tree, index: int | None):
  """One layer's slice of a (possibly stacked) array or QuantizedArray."""
  return tree if index is None else jax.tree.map(lambda a: a[index], tree)


def peft_tensors(model) -> dict[str, np.ndarray]:
  """PEFT's adapter_model.safetensors entries (float32, PEFT's default). For a fused family the
  adapters of a fused layer's parts become one adapter of it: A the parts' A stacked [k r, in],
  B block-diagonal [rows of all parts, k r] (zero where a part has none): the same sum exactly.
  Experts' adapters are written as PEFT's target_parameters (peft_experts.py)."""
  out, fused = expert_tensors(model), family(model.config.model_type).fused
  for name, layer, i in linear_modules(model):
    if layer.lora is not None:
      out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = np.asarray(layer_slice(layer.lora_a[...], i), np.float32).T.copy()
      out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = np.asarray(layer_slice(layer.lora_b[...], i), np.float32).T.copy()
  return _fuse(out, model.config) if fused else out


def _fuse(tensors: dict, config: ModelConfig) -> dict:
  out = dict(tensors)
  for name in [n.removesuffix(".lora_A.weight") for n in tensors if n.endswith(".lora_A.weight")]:
    prefix, part = name.rsplit(".", 1)
    group = FUSED_INTO.get(part)
    if group is None or f"{prefix}.{group}.lora_A.weight" in out:
      continue
    rows = fused_rows(group, config.linear_shapes)
    adapted = [p for p in rows if f"{prefix}.{p}.lora_A.weight" in tensors]
    a = [out.pop(f"{prefix}.{p}.lora_A.weight") for p in adapted]
    rank = a[0].shape[0]
    b = np.zeros((max(r.stop for r in rows.values()), rank * len(adapted)), np.float32)
    for col, p in enumerate(adapted):
      b[rows[p], col * rank:(col + 1) * rank] = out.pop(f"{prefix}.{p}.lora_B.weight")
    out[f"{prefix}.{group}.lora_A.weight"] = np.concatenate(a)
    out[f"{prefix}.{group}.lora_B.weight"] = b
  return out


def peft_config(cfg: TrainConfig, base_model: str, fused: bool = False) -> dict:
  """adapter_config.json, derived from the run's config (nothing hard-coded that it holds). A
  fused family (peft_tensors) targets its fused layers at k times the rank, and k times alpha
  (sqrt(k) with rsLoRA) so that PEFT's scaling is the run's."""
  lora = cfg.lora
  targets, ranks, alphas = set(lora.targets) & set(LINEAR_NAMES), {}, {}
  for group, parts in FUSED.items() if fused else ():
    k = len(set(parts) & targets)
    if k:
      targets = (targets - set(parts)) | {group}
      ranks[group] = k * lora.rank
      alphas[group] = lora.alpha * (math.sqrt(k) if lora.use_rslora else k)
  return {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.alpha,
      "lora_dropout": lora.dropout, "target_modules": sorted(targets) or None, "bias": "none",
      "target_parameters": target_parameters(lora.targets),
      "use_rslora": lora.use_rslora, "use_dora": False, "fan_in_fan_out": False,
      "base_model_name_or_path": base_model,
      "modules_to_save": None, "rank_pattern": ranks, "alpha_pattern": alphas, "init_lora_weights": True,
      "inference_mode": True, "layers_to_transform": None, "layers_pattern": None,
  }


def check_plain_lora(pc: dict, config_path) -> None:
  """ValueError naming the first adapter_config.json field that qlora_jax cannot compute exactly."""
  if pc.get("peft_type") != "LORA" or "r" not in pc or "lora_alpha" not in pc:
    raise ValueError(f"{config_path}: peft_type {pc.get('peft_type')!r} is not a LoRA adapter (with r "
                     "and lora_alpha); only LoRA adapters load")
  if not pc.get("target_modules") and not pc.get("target_parameters"):
    raise ValueError(f"{config_path}: target_modules is missing; re-save the adapter with PEFT's "
                     "save_pretrained, which records it")
  check_target_parameters(pc, config_path)
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


def peft_modules(pc: dict, names: list[str], config: ModelConfig | None = None) -> dict[str, tuple[int, float]]:
  """name -> (rank, scaling) of each linear layer the adapter adapts, decided as PEFT decides it
  (for a fused family, on the fused layer PEFT sees: peft_source)."""
  out = {}
  if not pc.get("target_modules"):
    return out
  for name in names:
    peft_name = peft_source(name, config)[0]
    if peft_targets(pc, peft_name):
      out[name] = peft_rank(pc, peft_name)
  return out


def peft_source(name: str, config: ModelConfig | None) -> tuple[str, slice | None, int | None]:
  """(the module PEFT names, this layer's rows of its lora_B, that lora_B's rows): a layer that a
  fused family's checkpoints fuse (Phi-3's q_proj in qkv_proj) reads the fused adapter's A whole
  and its own rows of B, exactly as PEFT's fused product splits; (name, None, None) otherwise."""
  prefix, part = name.rsplit(".", 1)
  group = FUSED_INTO.get(part)
  if config is None or group is None or not family(config.model_type).fused:
    return name, None, None
  rows = fused_rows(group, config.linear_shapes)
  return f"{prefix}.{group}", rows[part], max(r.stop for r in rows.values())


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
    targets = [*LINEAR_NAMES, *FUSED]
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


def peft_rank(pc: dict, name: str) -> tuple[int, float]:
  """(rank, scaling) PEFT gives the module or parameter `name` (rank and alpha patterns)."""
  r = int(peft_pattern_value(pc.get("rank_pattern") or {}, name, pc["r"]))
  alpha = float(peft_pattern_value(pc.get("alpha_pattern") or {}, name, pc["lora_alpha"]))
  return r, alpha / (math.sqrt(r) if pc.get("use_rslora") else r)


def fill_adapters(model, adapted: dict[str, tuple[int, float]], weights: dict, adapter, pc: dict) -> None:
  """Set the model's LoRA weights from PEFT's: each module's A and B zero-padded to the model's
  one rank, its own scaling folded into B; modules the adapter leaves alone get zeros. The
  experts' adapters come from target_parameters (peft_experts.py)."""
  found: dict[tuple[int, str], list] = {}
  used = set()
  fetch = lambda key, shape: _peft_weight(weights, key, shape, used)  # noqa: E731
  for name, layer, i in linear_modules(model):
    if layer.lora is not None:
      a_KxR, b_RxN = _padded_lora(name, adapted.get(name), fetch, layer, model.config)
      found.setdefault((id(layer), "lora_a"), [layer, "lora_a", []])[2].append(a_KxR)
      found.setdefault((id(layer), "lora_b"), [layer, "lora_b", []])[2].append(b_RxN)
  for adapter, attr, value in expert_adapter_values(model, pc, lambda name: peft_rank(pc, name), fetch):
    found.setdefault((id(adapter), attr), [adapter, attr, []])[2].append(value)
  for module, attr, arrays in found.values():  # one array per module; stacked when scanned
    var = getattr(module, attr)
    value = arrays[0] if len(arrays) == 1 and var[...].ndim == arrays[0].ndim else np.stack(arrays)
    var[...] = jnp.asarray(value, var.dtype)
  unused = sorted(set(weights) - used)
  if unused:
    raise ValueError(f"{adapter}: weights for modules qlora_jax does not adapt here ({unused[:3]}, "
                     f"{len(unused)} in all); only the decoder's linear layers {LINEAR_NAMES} "
                     "and the experts' stacked products load")


def _padded_lora(name: str, spec, fetch, layer: QLoRALinear, config: ModelConfig) -> tuple:
  """(A [in, R], B [R, out]) float32 of one module at the layer's rank R and scaling."""
  rank, scaling = layer.lora.rank, layer.lora.scaling
  a_KxR = np.zeros((layer.in_features, rank), np.float32)
  b_RxN = np.zeros((rank, layer.out_features), np.float32)
  if spec is None:  # not adapted: zero A and B add exactly nothing
    return a_KxR, b_RxN
  r, own = spec
  peft_name, rows, height = peft_source(name, config)
  a_RxK = fetch(f"{PEFT_PREFIX}{peft_name}.lora_A.weight", (r, layer.in_features))
  b_NxR = fetch(f"{PEFT_PREFIX}{peft_name}.lora_B.weight", (height or layer.out_features, r))
  b_NxR = b_NxR if rows is None else b_NxR[rows]
  a_KxR[:, :r] = a_RxK.T
  b_RxN[:r] = fold_scaling(b_NxR.T, own, scaling)
  return a_KxR, b_RxN


def _peft_weight(weights: dict, key: str, shape: tuple, used: set) -> np.ndarray:
  if key not in weights:
    raise ValueError(f"adapter lacks {key}, which its adapter_config.json adapts")
  if tuple(weights[key].shape) != shape:
    raise ValueError(f"adapter's {key} has shape {tuple(weights[key].shape)}; its adapter_config.json "
                     f"(r, rank_pattern) and the base model imply {shape}")
  used.add(key)
  return weights[key]
