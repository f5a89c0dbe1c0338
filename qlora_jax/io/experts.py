"""Mixture-of-experts checkpoints stored one tensor per expert, packed as the model holds them.

Hub checkpoints of Mixtral (`block_sparse_moe.experts.N.w1/w3/w2`, gate/up/down) and Qwen3-MoE
(`mlp.experts.N.gate_proj/up_proj/down_proj`), and what transformers 5 writes for them, store
each expert's projections apart; the model holds each layer's experts packed as transformers 5
computes with them: `mlp.experts.gate_up_proj` [experts, 2 x intermediate, hidden] (each
expert's gate rows, then its up rows) and `mlp.experts.down_proj` [experts, hidden,
intermediate], and the router as `mlp.gate.weight`. A layer's experts are packed once all of
them have been read; a bitsandbytes 4-bit expert is dequantized to be packed and the pack is
re-quantized as the source was.
"""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np

from qlora_jax.format.quantization import QuantizedArray, dequantize, quantize

PER_EXPERT = (  # (pattern of one expert's tensor: layer, expert, part; the part's name -> gate/up/down)
    (re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w1|w3|w2)\.weight"),
     {"w1": "gate", "w3": "up", "w2": "down"}),
    (re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight"),
     {"gate": "gate", "up": "up", "down": "down"}),
)
ROUTER = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.gate\.weight")


def _per_expert(name: str):
  for pattern, parts in PER_EXPERT:
    m = pattern.fullmatch(name)
    if m:
      return int(m.group(1)), int(m.group(2)), parts[m.group(3)]
  return None


def packed_experts(tensors, num_experts: int):
  """(name, load) pairs with each layer's per-expert tensors replaced by its two packed ones."""
  pending: dict[int, dict[tuple[str, int], object]] = {}
  for name, load in tensors:
    router = ROUTER.fullmatch(name)
    if router:
      yield f"model.layers.{router.group(1)}.mlp.gate.weight", load
      continue
    found = _per_expert(name) if num_experts else None
    if found is None:
      yield name, load
      continue
    layer, expert, part = found
    if expert >= num_experts:
      raise ValueError(f"tensor {name!r}: expert {expert} but config.json has num_experts={num_experts}")
    pending.setdefault(layer, {})[(part, expert)] = load
    if len(pending[layer]) == 3 * num_experts:
      loads = pending.pop(layer)
      prefix = f"model.layers.{layer}.mlp.experts."
      yield prefix + "gate_up_proj", lambda loads=loads: _pack(
          [[loads[("gate", e)], loads[("up", e)]] for e in range(num_experts)])
      yield prefix + "down_proj", lambda loads=loads: _pack([[loads[("down", e)]] for e in range(num_experts)])
  if pending:
    layer, parts = next(iter(pending.items()))
    raise ValueError(f"layer {layer} stores {len(parts)} of its {3 * num_experts} expert tensors "
                     "(gate, up and down for each of num_experts): the checkpoint is incomplete")


def _pack(experts: list[list]):
  """[experts, rows, cols]: each expert's tensors (loaded once each) stacked along its rows,
  the experts stacked; re-quantized as the source was when it came in 4 bits."""
  values = [[load() for load in loads] for loads in experts]
  first = values[0][0]
  dense = lambda v: dequantize(v, jnp.float32) if isinstance(v, QuantizedArray) else v  # noqa: E731
  stacked = np.stack([np.concatenate([np.asarray(dense(v), np.float32) for v in vs]) for vs in values])
  if isinstance(first, QuantizedArray):
    return quantize(jnp.asarray(stacked), first.quant_type, first.blocksize, first.double_quant)
  return stacked.astype(np.asarray(first).dtype)
