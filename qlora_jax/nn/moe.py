"""A mixture-of-experts MLP block (Qwen3-MoE, Mixtral) with frozen 4-bit experts.

As transformers computes it: the router's logits (a dense [experts, hidden] matrix, kept in the
model dtype) go through a float32 softmax, each token takes its top-k experts, their weights
renormalized over the k when the config says so; each expert is a gated MLP whose gate and up
projections are stored fused ([experts, 2 x intermediate, hidden], gate rows first) and whose
down projection is [experts, hidden, intermediate], both NF4 + double quant. The token copies
are sorted by expert and go through each product as one grouped matmul (grouped_qmatmul.py):
no token is dropped, no expert is looped over, no token meets an expert it was not routed to.

Either product may carry a LoRA per expert (lora targets "experts.gate_up_proj",
"experts.down_proj"): A [experts, in, r] and B [experts, r, out], each expert's rows through its
own A then B, as PEFT's LoRA on the stacked parameter computes (W[e] + scaling B[e] A[e]).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels.xla import compute_dot
from qlora_jax.format.quantization import zeros_quantized
from qlora_jax.nn.attention import say_once
from qlora_jax.nn.expert_parallel import expert_shards, local_choices, on_experts, splits
from qlora_jax.nn.grouped_qmatmul import grouped_dot, grouped_qmatmul
from qlora_jax.nn.lora import LoraConfig, lora_a_init
from qlora_jax.nn.model_config import ModelConfig
from qlora_jax.nn.variables import ExpertLoRAWeight, FrozenParam, QuantWeight


class RouterStats(nnx.Variable):
  """A layer's routing statistics of its last forward (with router_aux_loss on): [2, experts],
  row 0 the fraction of the token copies each expert took, row 1 its mean router probability."""


class Router(nnx.Module):
  def __init__(self, cfg: ModelConfig, dtype: str):
    self.weight = FrozenParam(jnp.zeros((cfg.num_experts, cfg.hidden_size), dtype))


class ExpertLoRA(nnx.Module):
  """One LoRA per expert on a stacked product: A [experts, in, r] (each expert's A initialised
  as PEFT's, U(+-1/sqrt(in))), B [experts, r, out] zeros."""

  def __init__(self, experts: int, d_in: int, d_out: int, lora: LoraConfig, rngs: nnx.Rngs):
    if lora.dropout:
      raise ValueError(f"LoRA dropout {lora.dropout} cannot apply to the experts (PEFT's expert "
                       "LoRA has none); set lora dropout to 0 or drop experts.* from lora targets")
    keys = jax.random.split(rngs.params(), experts)
    self.lora_a = ExpertLoRAWeight(jax.vmap(lambda k: lora_a_init(k, d_in, lora.rank, lora.param_dtype))(keys))
    self.lora_b = ExpertLoRAWeight(jnp.zeros((experts, lora.rank, d_out), lora.param_dtype))
    self.scaling = lora.scaling


class Experts(nnx.Module):
  def __init__(self, cfg: ModelConfig, quant, dtype: str, lora: LoraConfig | None = None,
               rngs: nnx.Rngs | None = None):
    e, d, f = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    self.gate_up_proj = QuantWeight(zeros_quantized((e, 2 * f, d), quant, dtype))
    self.down_proj = QuantWeight(zeros_quantized((e, d, f), quant, dtype))
    targets = lora.targets if lora is not None else ()
    adapt = lambda name, d_in, d_out: (ExpertLoRA(e, d_in, d_out, lora, rngs)  # noqa: E731
                                       if f"experts.{name}" in targets else None)
    self.gate_up_lora, self.down_lora = adapt("gate_up_proj", d, 2 * f), adapt("down_proj", f, d)

  def adapters(self) -> tuple:
    """((A, B) or None) of gate_up_proj and of down_proj, as the layer computes with them."""
    return tuple(None if a is None else (a.lora_a[...], a.lora_b[...]) for a in (self.gate_up_lora, self.down_lora))

  def scalings(self) -> tuple:
    """Each product's LoRA scaling (static; 0 where it has no adapter)."""
    return tuple(0.0 if a is None else a.scaling for a in (self.gate_up_lora, self.down_lora))


class SparseMoeBlock(nnx.Module):
  """x [B, T, D] -> the routed experts' weighted sum [B, T, D]."""

  def __init__(self, cfg: ModelConfig, quant, dtype: str, activation,
               lora: LoraConfig | None = None, rngs: nnx.Rngs | None = None, record_stats: bool = False):
    self.gate = Router(cfg, dtype)
    self.experts = Experts(cfg, quant, dtype, lora, rngs)
    self.top_k, self.renormalize = cfg.num_experts_per_tok, cfg.norm_topk_prob
    self.num_experts, self.dtype, self.act = cfg.num_experts, jnp.dtype(dtype), activation
    self.router_stats = RouterStats(jnp.zeros((2, cfg.num_experts), jnp.float32)) if record_stats else None

  def route(self, x_MxD: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(weights [M, k] in the model dtype, experts [M, k], router probabilities [M, E] float32)."""
    logits = compute_dot("md,ed->me", x_MxD, self.gate.weight[...], self.dtype)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, self.top_k)
    if self.renormalize:
      weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights.astype(self.dtype), experts, probs

  def __call__(self, x_BxTxD: jax.Array, norm=None) -> jax.Array:
    """norm: the pre-norm, applied to x first (as MLP takes it), or None."""
    x_BxTxD = x_BxTxD if norm is None else norm(x_BxTxD)
    b, t, d = x_BxTxD.shape
    x = x_BxTxD.reshape(b * t, d)
    weights, experts, probs = self.route(x)
    if self.router_stats is not None:
      sizes = jnp.bincount(experts.reshape(-1), length=self.num_experts)
      self.router_stats[...] = jnp.stack([sizes / (b * t), jnp.mean(probs, axis=0)])
    stored = (self.experts.gate_up_proj.get_value(), self.experts.down_proj.get_value())
    shards = expert_shards()
    if shards > 1 and all(splits(qa, shards) for qa in stored):  # expert parallelism
      out = on_experts(self._combine, x, weights, experts, stored, self.experts.adapters(), shards)
    else:
      if shards > 1:
        say_once(f"experts: {self.num_experts} experts do not split into {shards} shards of whole experts "
                 "and double-quant groups; every device of the expert axis holds and computes them all")
      out = self._combine(x, weights, experts, 0, stored, self.experts.adapters())
    return out.reshape(b, t, d)

  def _combine(self, x, weights, experts, first, stored, adapters):
    """sum_k weight_k expert_k(x) over each token's chosen experts among the `len(stored[0])`
    from `first` on ([M, D]; 0 for a token with none of them)."""
    count = stored[0].shape[0]
    key, mine = local_choices(experts.reshape(-1), first, count)  # token m's k-th choice at m * k + j
    order = jnp.argsort(key, stable=True)  # the token copies grouped by expert, others last
    token = order // self.top_k
    sizes = jnp.bincount(key, length=count + 1)[:count].astype(jnp.int32)
    scalings = self.experts.scalings()
    gate, up = jnp.split(self._product(x[token], stored[0], adapters[0], scalings[0], sizes), 2, axis=-1)
    out = self._product(self.act(gate) * up, stored[1], adapters[1], scalings[1], sizes)
    out = out * jnp.where(mine, weights.reshape(-1), 0)[order][:, None]
    return jnp.zeros_like(x).at[token].add(out.astype(x.dtype))

  def _product(self, x_MxK, qw, adapter, scaling, sizes):
    """One stacked product of the rows sorted by expert, plus its adapter's where it has one."""
    y = grouped_qmatmul(x_MxK, qw, sizes, self.dtype)
    if adapter is None:
      return y
    h_MxR = grouped_dot(x_MxK, adapter[0], sizes, self.dtype)
    return y + grouped_dot(h_MxR, adapter[1], sizes, self.dtype) * jnp.asarray(scaling, self.dtype)


def router_aux_loss(model) -> jax.Array:
  """transformers' load_balancing_loss_func over the last forward's layers (no attention mask:
  every position of the batch): experts x sum_e (fraction of token copies to e) x (mean
  probability of e), each averaged over the layers. Differentiable through the probabilities."""
  stats = [v[...].reshape(-1, 2, v[...].shape[-1]) for _, v in nnx.to_flat_state(nnx.state(model, RouterStats))]
  if not stats:
    raise ValueError("router_aux_loss is on but the model records no routing (not a mixture of experts)")
  stats = jnp.concatenate(stats)  # [layers, 2, E]
  fraction, prob = jnp.mean(stats[:, 0], axis=0), jnp.mean(stats[:, 1], axis=0)
  return stats.shape[-1] * jnp.sum(jax.lax.stop_gradient(fraction) * prob)
