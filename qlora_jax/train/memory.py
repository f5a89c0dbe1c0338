"""Per-device memory estimate of a training run, printed at start-up and checked against the
device's memory before any weight is loaded.

  python -m qlora_jax.train.memory --config llama65b_v5e --shape llama-65b --devices 8 --device-memory-gib 16

Parameter storage is exact: the model's own variables, laid out by nn/sharding.py's rules. Working
memory (activations kept for the backward pass, one layer's recomputation, the loss chunk) is a
formula calibrated on measured H100 peaks (docs/SHARDING.md lists estimate against measurement).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
import sys

import jax
import numpy as np
from flax import nnx

from qlora_jax import cli
from qlora_jax.format.folder import read_meta
from qlora_jax.format.quantization import QuantConfig
from qlora_jax.nn.attention import SOFTCAP_QUERY_CHUNK, attention_implementation
from qlora_jax.nn.model import CausalLM, ModelOptions, mlp_pieces
from qlora_jax.nn.model_config import ModelConfig
from qlora_jax.nn.sharding import Layout, batch_shards, mesh_shape, per_device_bytes, quant_specs, specs
from qlora_jax.nn.variables import FrozenParam, QuantWeight
from qlora_jax.testing import shape_config
from qlora_jax.train.config import TrainConfig
from qlora_jax.train.config_files import load_config
from qlora_jax.train.loss import loss_chunk

GIB = 2**30
# One layer's transient tensors while it is recomputed and differentiated, in units of
# [tokens, width] of the compute dtype (fitted to the H100 peaks in docs/SHARDING.md).
LAYER_HIDDEN_TENSORS = 8
LAYER_MLP_TENSORS = 4


@dataclasses.dataclass(frozen=True)
class Estimate:
  """Bytes per device, by term."""

  terms: dict[str, int]
  devices: int

  @property
  def total(self) -> int:
    return sum(self.terms.values())

  def text(self, limit: int | None = None, device: str = "") -> str:
    unit, scale = ("GiB", GIB) if max(self.total, limit or 0) >= GIB else ("MiB", 2**20)
    lines = [f"memory per device (estimate, {self.devices} device(s)):"]
    lines += [f"  {name:<44} {value / scale:8.2f} {unit}" for name, value in self.terms.items()]
    lines.append(f"  {'total':<44} {self.total / scale:8.2f} {unit}")
    if limit:
      lines.append(f"  {'device memory' + (f' ({device})' if device else ''):<44} {limit / scale:8.2f} {unit}"
                   f"  ({100 * self.total / limit:.0f}% used)")
    return "\n".join(lines)


def _abstract_state(model: ModelConfig, options: ModelOptions):
  abstract = nnx.eval_shape(lambda: CausalLM(model, options, rngs=nnx.Rngs(0)))
  _, quant, dense, lora, _ = nnx.split(abstract, QuantWeight, FrozenParam, nnx.LoRAParam, ...)
  return quant, dense, lora


def _bytes(tree) -> int:
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def estimate(model: ModelConfig, options: ModelOptions, cfg: TrainConfig,
             sizes: dict[str, int]) -> Estimate:
  """The per-device peak of a training step of cfg on a mesh of `sizes` ({axis: size})."""
  quant, dense, lora = _abstract_state(model, options)
  stored = lambda tree: per_device_bytes(tree, specs(tree, sizes, cfg.devices.lora_sharding), sizes)  # noqa: E731
  tensor = sizes.get("tensor", 1)
  rows = cfg.optim.batch_size // batch_shards(sizes)  # per device
  seq = cfg.data.max_seq_len
  tokens = rows * seq
  cb = np.dtype(options.dtype).itemsize
  lora_bytes = stored(lora)
  base = stored(quant)
  terms = {"4-bit base weights (stored)": base}
  if base < _bytes(quant):  # split over devices: one layer at a time is gathered to compute with
    in_use = sum(per_device_bytes(v.get_value(), quant_specs(v.get_value(), sizes, in_use=True), sizes)
                 for _, v in nnx.to_flat_state(quant))  # still split over tensor (and expert)
    terms["4-bit layer gathered for use (x2, prefetch)"] = 2 * in_use // model.num_hidden_layers
  widest = max(math.prod(v.get_raw_value().shape) for v in jax.tree.leaves(
      quant, is_leaf=lambda x: isinstance(x, nnx.Variable)))
  # XLA's path writes a dequantized copy; the fused kernels ('auto' on one Hopper GPU for weights
  # >= 4096 wide) form none, so there the term is conservative (the formula is fit as a whole)
  terms["dequantized weight (widest matrix)"] = widest * cb // tensor
  table = model.vocab_size * model.hidden_size * cb
  if cfg.host_embedding(tied=model.tie_word_embeddings):  # the table is in host memory
    terms["lm_head, norms (embedding in host memory)"] = stored(dense) - table // sizes.get("fsdp", 1)
    terms["embedded batch (from the host)"] = tokens * model.hidden_size * cb
  else:
    terms["embeddings, lm_head, norms"] = stored(dense)
  terms[f"LoRA parameters ({cfg.lora.param_dtype})"] = lora_bytes
  if cfg.optim.grad_accum > 1:
    terms["LoRA gradients (accumulated + micro-batch)"] = 2 * lora_bytes
  else:
    terms["LoRA gradients"] = lora_bytes
  moments = 2 * lora_bytes * 4 // np.dtype(cfg.lora.param_dtype).itemsize  # float32 whatever the LoRA dtype
  if cfg.optim.offload_optimizer and options.scan_layers:  # streamed in chunks after the backward pass
    terms["AdamW moments (about a layer's worth; rest on host)"] = moments // model.num_hidden_layers
  else:  # offloaded unstacked state still comes to the device whole for the update
    terms["AdamW moments"] = moments
  terms["activations kept for backward"] = _saved_activations(model, options, rows, seq, cb)
  terms["one layer recomputed + differentiated"] = _layer_working_set(model, options, rows, seq, cb, tensor)
  chunk = loss_chunk(model.vocab_size, options.loss_chunk)
  terms["loss chunk (float32 logits)"] = 2 * min(chunk, tokens) * model.vocab_size * 4
  if cfg.data.packing:  # attention through [B, T, T] masks and a bias (unpacked rows: causal,
    # no mask, a sliding window in the kernel); layers of two kinds keep both masks
    masks = 2 if model.layer_types else 1
    terms["attention masks"] = rows * seq * seq * (masks + cb)
  return Estimate(terms, math.prod(sizes.values()))


def _lora_outputs(model: ModelConfig, options: ModelOptions) -> int:
  """Features of the LoRA dot outputs a layer computes: [tokens, r] and [tokens, out] a target."""
  rank = options.lora.rank if options.lora else 0
  shapes = model.linear_shapes  # a target the model lacks (an experts model's MLP) computes nothing
  return sum(shapes[t][1] + rank for t in options.lora.targets if t in shapes) if options.lora else 0


def _saved_activations(model: ModelConfig, options: ModelOptions, rows: int, seq: int, cb: int) -> int:
  """What the remat policy keeps per layer between forward and backward, times the depth.

  full keeps each layer's input; offload (and offload_attention, which moves the attention's
  output there too) keeps it in pinned host memory (two layers' worth on the device as they
  move). save_dots also keeps the float32 outputs of the LoRA dots (the
  4-bit matmuls sit behind a custom VJP, whose outputs the policy does not save; checked against
  XLA's buffer assignment on CPU). none keeps everything: attention scores and elementwise
  intermediates as well.
  """
  tokens = rows * seq
  per_layer = tokens * model.hidden_size * cb
  if options.remat.startswith("offload"):  # in host memory: two layers' in flight (prefetch: the next)
    return 2 * per_layer
  if options.remat != "full":
    per_layer += tokens * _lora_outputs(model, options) * 4
  if options.remat == "none":
    per_layer += _attention_scores(model, options, rows, seq, 1)
    per_layer += tokens * (4 * model.hidden_size + 3 * model.mlp_width) * 4
  return per_layer * model.num_hidden_layers


def _attention_scores(model: ModelConfig, options: ModelOptions, rows: int, seq: int, tensor: int) -> int:
  """XLA attention materialises float32 scores and probabilities [B, H, T, T] (the softcapped
  form: [B, H, SOFTCAP_QUERY_CHUNK, T] at a time); cuDNN's is fused."""
  impl = attention_implementation(options.attention, options.dtype, model.head_dim, model.attn_logit_softcapping)
  queries = min(seq, SOFTCAP_QUERY_CHUNK) if model.attn_logit_softcapping else seq
  return 0 if impl == "cudnn" else 2 * rows * (model.num_attention_heads // tensor) * queries * seq * 4


def _layer_working_set(model: ModelConfig, options: ModelOptions, rows: int, seq: int, cb: int,
                       tensor: int) -> int:
  """The [tokens, hidden] tensors of a layer's backward, the MLP's [tokens, intermediate] ones
  for the tokens of one MLP piece (mlp_chunk; with it the other two MLP weights dequantized
  once for all pieces; with experts: every token's k copies; the experts dequantized for a
  grouped product are the "widest matrix" term), and XLA attention's scores."""
  tokens = rows * seq
  pieces, mlp_tokens = mlp_pieces(tokens, options.mlp_chunk if not model.num_experts else 0)
  weights = 2 * model.hidden_size * model.intermediate_size * cb // tensor if pieces > 1 else 0
  dense = (tokens * LAYER_HIDDEN_TENSORS * model.hidden_size
           + mlp_tokens * LAYER_MLP_TENSORS * model.mlp_width // tensor) * cb
  return dense + weights + _attention_scores(model, options, rows, seq, tensor)


def device_memory(cfg: TrainConfig) -> tuple[int | None, str]:
  """(bytes one device offers, its kind): cfg.device_memory_gib, else what the device reports
  (None on CPU, which reports nothing)."""
  device = jax.devices()[0]
  if cfg.devices.device_memory_gib > 0:
    return int(cfg.devices.device_memory_gib * GIB), f"{device.device_kind}, device_memory_gib"
  stats = device.memory_stats() or {}
  return stats.get("bytes_limit"), device.device_kind


def check_fits(est: Estimate, limit: int | None, device: str, cfg: TrainConfig, sizes: dict[str, int]) -> None:
  """ValueError naming the biggest terms and the fixes when the estimate exceeds the limit."""
  if limit is None or est.total <= limit:
    return
  biggest = sorted(est.terms.items(), key=lambda kv: -kv[1])[:3]
  fixes = []
  if cfg.devices.lora_sharding == "replicated" and sizes.get("fsdp", 1) > 1:
    fixes.append("lora_sharding=fsdp")
  split = sizes.get("fsdp", 1) * sizes.get("tensor", 1)
  fixes.append(f"split the base and LoRA over all {est.devices} devices (mesh=fsdp:{est.devices})"
               if split < est.devices else "more devices (mesh=fsdp:N on a larger host or slice)")
  if cfg.optim.batch_size > 1:
    fixes.append(f"fewer rows per step (batch_size={max(1, cfg.optim.batch_size // 2)}, "
                 f"grad_accum={cfg.optim.grad_accum * 2})")
  if cfg.model.remat not in ("full", "offload", "offload_attention"):
    fixes.append("remat=full")
  fixes += ["a shorter source_max_len/target_max_len", "a smaller lora_rank or fewer lora_targets"]
  raise ValueError(
      f"this run needs about {est.total / GIB:.1f} GiB per device, more than the {limit / GIB:.1f} GiB "
      f"of one {device or 'device'}; largest terms: "
      + ", ".join(f"{k} {v / GIB:.1f} GiB" for k, v in biggest)
      + ". Fix: " + "; or ".join(fixes) + ".\n" + est.text(limit, device))


def check_run(cfg: TrainConfig, folder, layout: Layout | None) -> Estimate:
  """Print the per-device estimate of cfg's run on the model in `folder`; ValueError naming the
  fix if it cannot fit."""
  options = cfg.model_options(QuantConfig(**read_meta(folder)["quant"]))
  sizes = layout.sizes if layout is not None else {"data": 1}
  est = estimate(ModelConfig.from_file(pathlib.Path(folder) / "config.json"), options, cfg, sizes)
  limit, device = device_memory(cfg)
  check_fits(est, limit, device, cfg, sizes)
  print(est.text(limit, device) if limit else est.text() + f"\n  ({device}: no memory limit known, not checked)")
  return est


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", required=True)
  p.add_argument("--model-config", help="a transformers config.json (default: the config's model_dir)")
  p.add_argument("--shape", help="a named Llama shape instead (qlora_jax.testing.SHAPES: llama3-8b, llama-65b, ...)")
  p.add_argument("--devices", type=int, default=None, help="devices the mesh spans (default: those visible)")
  p.add_argument("--device-memory-gib", type=float, default=0.0)
  p.add_argument("overrides", nargs="*", metavar="key=value")
  args = p.parse_args(argv)

  def run() -> str:
    cfg = load_config(args.config, args.overrides)
    if args.shape:
      model = shape_config(args.shape)
    else:
      model = ModelConfig.from_file(args.model_config or f"{cfg.model.model_dir}/config.json")
    sizes = mesh_shape(cfg.devices.mesh, args.devices or jax.device_count())
    est = estimate(model, cfg.model_options(), cfg, sizes)
    limit = int(args.device_memory_gib * GIB) or None
    check_fits(est, limit, "", cfg, sizes)
    return est.text(limit) + f"\nmesh: {sizes}; fits"
  return cli.run(run)


if __name__ == "__main__":
  sys.exit(main())
