"""PEFT's LoRA on a mixture of experts' stacked parameters, both ways.

PEFT adapts transformers' packed expert tensors (gate_up_proj [E, 2F, D], down_proj [E, D, F])
as parameters (adapter_config.json `target_parameters`, peft's ParamWrapper): for a rank r,
lora_A.weight [E r, in] holds expert e's A in rows e r .. e r + r - 1, lora_B.weight [out, r E]
holds expert e's B in columns j E + e, and W[e] + scaling B[e] A[e] is the product. Two targeted
parameters of one experts module are nested wrappers: the first in the module's definition order
(gate_up_proj) is the inner one, its keys one `base_layer.` deeper per wrapper around it.
Ours (nn/moe.py ExpertLoRA): A [E, in, r], B [E, r, out].
"""

from __future__ import annotations

import numpy as np
from flax import nnx

from qlora_jax.nn.model import variable_names
from qlora_jax.nn.moe import Experts

PEFT_PREFIX = "base_model.model."
EXPERT_PARAMS = ("gate_up_proj", "down_proj")  # transformers' definition order in the module
ADAPTER_OF = {"gate_up_proj": "gate_up_lora", "down_proj": "down_lora"}


def expert_modules(model):
  """(transformers module name, e.g. model.layers.3.mlp.experts; Experts; layer index or None)."""
  for path, module in nnx.iter_modules(model):
    if isinstance(module, Experts):
      for name, index in variable_names(path, model.config, model.options):
        yield name, module, index


def adapted_params(module: Experts) -> list[str]:
  return [p for p in EXPERT_PARAMS if getattr(module, ADAPTER_OF[p]) is not None]


def peft_key(module_name: str, param: str, targeted: list[str], part: str) -> str:
  """The adapter_model.safetensors key of one targeted parameter's lora_A or lora_B."""
  nesting = len(targeted) - 1 - targeted.index(param)
  return f"{PEFT_PREFIX}{module_name}{'.base_layer' * nesting}.lora_{part}.weight"


def to_peft(a_ExKxR: np.ndarray, b_ExRxN: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Ours -> PEFT's (lora_A [E r, K], lora_B [N, r E])."""
  e, k, r = a_ExKxR.shape
  return (np.transpose(a_ExKxR, (0, 2, 1)).reshape(e * r, k),
          np.transpose(b_ExRxN, (2, 1, 0)).reshape(b_ExRxN.shape[2], r * e))


def from_peft(a_ErxK: np.ndarray, b_NxRe: np.ndarray, experts: int) -> tuple[np.ndarray, np.ndarray]:
  """PEFT's -> ours (A [E, K, r], B [E, r, N])."""
  r = a_ErxK.shape[0] // experts
  return (np.transpose(a_ErxK.reshape(experts, r, -1), (0, 2, 1)),
          np.transpose(b_NxRe.reshape(b_NxRe.shape[0], r, experts), (2, 1, 0)))


def _slice(value, index):
  return np.asarray(value if index is None else value[index], np.float32)


def expert_tensors(model) -> dict[str, np.ndarray]:
  """adapter_model.safetensors entries (float32) of every expert adapter."""
  out = {}
  for name, module, i in expert_modules(model):
    targeted = adapted_params(module)
    for param in targeted:
      adapter = getattr(module, ADAPTER_OF[param])
      a, b = to_peft(_slice(adapter.lora_a[...], i), _slice(adapter.lora_b[...], i))
      out[peft_key(name, param, targeted, "A")] = a
      out[peft_key(name, param, targeted, "B")] = b
  return out


def target_parameters(targets) -> list[str] | None:
  """adapter_config.json's target_parameters for our lora targets (None: no expert adapters)."""
  chosen = [f"mlp.experts.{p}" for p in EXPERT_PARAMS if f"experts.{p}" in targets]
  return chosen or None


def check_target_parameters(pc: dict, config_path) -> None:
  """ValueError unless every target_parameters entry names an experts parameter we adapt."""
  for t in pc.get("target_parameters") or ():
    if not any(t == f"experts.{p}" or t.endswith(f".experts.{p}") for p in EXPERT_PARAMS):
      raise ValueError(f"{config_path}: target_parameters entry {t!r} is not supported; qlora_jax "
                       f"adapts these parameters only: {[f'mlp.experts.{p}' for p in EXPERT_PARAMS]}")


def peft_targeted(pc: dict, module_name: str) -> list[str]:
  """The parameters of one experts module that PEFT adapts (its key matching), in nesting order."""
  targets = pc.get("target_parameters") or ()
  return [p for p in EXPERT_PARAMS if any(f"{module_name}.{p}" == t or f"{module_name}.{p}".endswith(f".{t}")
                                          for t in targets)]


def expert_targets(pc: dict, config) -> dict[str, list[str]]:
  """Our lora target (experts.<param>) -> the parameter names PEFT adapts with it, every layer."""
  out: dict[str, list[str]] = {}
  for i in range(config.num_hidden_layers if config.num_experts else 0):
    module = f"model.layers.{i}.mlp.experts"
    for param in peft_targeted(pc, module):
      out.setdefault(f"experts.{param}", []).append(f"{module}.{param}")
  return out


def fold_scaling(b: np.ndarray, own: float, scaling: float) -> np.ndarray:
  """PEFT's B with its own scaling folded into ours: in float64, rounded once; a ratio of 1 (one
  rank and alpha) leaves B bit-identical."""
  return b if own == scaling else b.astype(np.float64) * (own / scaling)


def expert_adapter_values(model, pc: dict, ranks, fetch):
  """(ExpertLoRA, "lora_a" | "lora_b", float32 value) of each experts adapter, layer by layer:
  PEFT's weights padded to the model's rank with their own scaling folded into B, zeros where
  the adapter leaves a parameter alone. ranks(name) -> (r, scaling) as PEFT reads its patterns;
  fetch(key, shape) -> the adapter's checked tensor."""
  for name, module, i in expert_modules(model):
    targeted = peft_targeted(pc, name)
    for param in adapted_params(module):
      adapter = getattr(module, ADAPTER_OF[param])
      a = np.zeros(adapter.lora_a[...].shape[-3:], np.float32)
      b = np.zeros(adapter.lora_b[...].shape[-3:], np.float32)
      if param in targeted:
        r, own = ranks(f"{name}.{param}")
        experts, k, n = a.shape[0], a.shape[1], b.shape[2]
        pa, pb = from_peft(fetch(peft_key(name, param, targeted, "A"), (experts * r, k)),
                           fetch(peft_key(name, param, targeted, "B"), (n, r * experts)), experts)
        a[..., :r] = pa
        b[:, :r] = fold_scaling(pb, own, adapter.scaling)
      yield adapter, "lora_a", a
      yield adapter, "lora_b", b


def merged_experts(module: Experts, param: str, index, weight: np.ndarray) -> np.ndarray:
  """A float32 [E, out, in] stacked weight with its adapter folded in (W[e] + scaling B[e] A[e])."""
  adapter = getattr(module, ADAPTER_OF[param])
  if adapter is None:
    return weight
  a, b = _slice(adapter.lora_a[...], index), _slice(adapter.lora_b[...], index)
  return weight + adapter.scaling * np.einsum("ekr,ern->enk", a, b)
