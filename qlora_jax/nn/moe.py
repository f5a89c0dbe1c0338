"""A mixture-of-experts MLP block (Qwen3-MoE, Mixtral) with frozen 4-bit experts.

As transformers computes it: the router's logits (a dense [experts, hidden] matrix, kept in the
model dtype) go through a float32 softmax, each token takes its top-k experts, their weights
renormalized over the k when the config says so; each expert is a gated MLP whose gate and up
projections are stored fused ([experts, 2 x intermediate, hidden], gate rows first) and whose
down projection is [experts, hidden, intermediate], both NF4 + double quant. The token copies
are sorted by expert and go through each product as one grouped matmul (grouped_qmatmul.py):
no token is dropped, no expert is looped over, no token meets an expert it was not routed to.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels.xla import compute_dot
from qlora_jax.format.quantization import zeros_quantized
from qlora_jax.nn.grouped_qmatmul import grouped_qmatmul
from qlora_jax.nn.model_config import ModelConfig
from qlora_jax.nn.variables import FrozenParam, QuantWeight


class Router(nnx.Module):
  def __init__(self, cfg: ModelConfig, dtype: str):
    self.weight = FrozenParam(jnp.zeros((cfg.num_experts, cfg.hidden_size), dtype))


class Experts(nnx.Module):
  def __init__(self, cfg: ModelConfig, quant, dtype: str):
    e, d, f = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    self.gate_up_proj = QuantWeight(zeros_quantized((e, 2 * f, d), quant, dtype))
    self.down_proj = QuantWeight(zeros_quantized((e, d, f), quant, dtype))


class SparseMoeBlock(nnx.Module):
  """x [B, T, D] -> the routed experts' weighted sum [B, T, D]."""

  def __init__(self, cfg: ModelConfig, quant, dtype: str, activation):
    self.gate = Router(cfg, dtype)
    self.experts = Experts(cfg, quant, dtype)
    self.top_k, self.renormalize = cfg.num_experts_per_tok, cfg.norm_topk_prob
    self.num_experts, self.dtype, self.act = cfg.num_experts, jnp.dtype(dtype), activation

  def route(self, x_MxD: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(weights [M, k] in the model dtype, experts [M, k]) of each token."""
    logits = compute_dot("md,ed->me", x_MxD, self.gate.weight[...], self.dtype)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, self.top_k)
    if self.renormalize:
      weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights.astype(self.dtype), experts

  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    b, t, d = x_BxTxD.shape
    x = x_BxTxD.reshape(b * t, d)
    weights, experts = self.route(x)
    flat = experts.reshape(-1)  # token m's k-th choice at m * k + j
    order = jnp.argsort(flat, stable=True)  # the token copies grouped by expert
    token = order // self.top_k
    sizes = jnp.bincount(flat, length=self.num_experts).astype(jnp.int32)
    gate_up = grouped_qmatmul(x[token], self.experts.gate_up_proj.get_value(), sizes, self.dtype)
    gate, up = jnp.split(gate_up, 2, axis=-1)
    out = grouped_qmatmul(self.act(gate) * up, self.experts.down_proj.get_value(), sizes, self.dtype)
    out = out * weights.reshape(-1)[order][:, None]
    return jnp.zeros_like(x).at[token].add(out.astype(x.dtype)).reshape(b, t, d)
