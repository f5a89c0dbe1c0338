"""python -m qlora_jax.export RUN_DIR OUT [--merge] [--overwrite]

Export a training run as a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors,
PEFT's key names and [r, in] / [out, r] shapes) naming the original model the base was converted
from, or with --merge as a bf16 transformers checkpoint with the adapters folded into the
dequantized base weights. `load_adapter` reads such adapters back, and PEFT's own.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys

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
from qlora_jax.nn.families import FUSED, FUSED_INTO, LINEAR_NAMES, family
from qlora_jax.nn.lora import LoraConfig, QLoRALinear
from qlora_jax.nn.model import ModelOptions, variable_names
from qlora_jax.nn.model_config import ModelConfig
from qlora_jax.nn.moe import Experts
from qlora_jax.nn.variables import FrozenParam, QuantWeight
from qlora_jax.train.builder import build_from_folder
from qlora_jax.train.checkpoint import BEST_DIR, Checkpointer
from qlora_jax.peft_experts import EXPERT_PARAMS, expert_modules, expert_targets, merged_experts
from qlora_jax.peft_format import (check_plain_lora, fill_adapters, layer_slice, linear_modules,
                                   peft_config, peft_modules, peft_rank, peft_tensors)
from qlora_jax.train.config import TrainConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "tokenizer.model", "vocab.json", "merges.txt")


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


def write_peft(cfg: TrainConfig, model, out, overwrite: bool = False) -> None:
  with atomic_dir(out, overwrite) as tmp:
    save_file(peft_tensors(model), str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = peft_config(cfg, original_base(cfg), family(model.config.model_type).fused)
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))


def merged_tensors(model):
  """(name, bf16 array) of a plain transformers checkpoint: W + scaling * (A @ B)^T folded in.
  A fused family (Phi-3) gets its fused tensors back: the parts' rows in order, one layer at a
  time; an experts model its packed experts, dequantized."""
  def merged(module, i):
    w = dequantize(layer_slice(module.weight.get_value(), i), jnp.float32)
    if module.lora is not None:
      a, b = layer_slice(module.lora_a[...], i), layer_slice(module.lora_b[...], i)
      w = w + module.lora.scaling * jnp.matmul(a, b, precision=precision_for(w.dtype)).T
    return np.asarray(w.astype(jnp.bfloat16))

  fused = family(model.config.model_type).fused
  groups = {}  # (prefix, fused layer) -> {part: (module, index)}
  for name, module, i in linear_modules(model):
    prefix, part = name.rsplit(".", 1)
    if fused and part in FUSED_INTO:
      groups.setdefault((prefix, FUSED_INTO[part]), {})[part] = (module, i)
    else:
      yield f"{name}.weight", merged(module, i)
  for (prefix, group), parts in groups.items():
    yield f"{prefix}.{group}.weight", np.concatenate([merged(*parts[p]) for p in FUSED[group]])
  for path, var in nnx.to_flat_state(nnx.state(model, FrozenParam)):  # norms, embeddings, biases
    for name, i in variable_names(path, model.config, model.options):
      yield name, np.asarray(layer_slice(var.get_value(), i).astype(jnp.bfloat16))
  for name, module, i in expert_modules(model):  # the experts' stacked products, adapters folded in
    for param in EXPERT_PARAMS:
      w = np.asarray(dequantize(layer_slice(getattr(module, param).get_value(), i), jnp.float32))
      yield f"{name}.{param}", merged_experts(module, param, i, w).astype(jnp.bfloat16)
  covered = {path for path, m in nnx.iter_modules(model) if isinstance(m, (QLoRALinear, Experts))}
  for path, var in nnx.to_flat_state(nnx.state(model, QuantWeight)):
    if tuple(path[:-1]) not in covered:
      raise ValueError(f"the merged export does not know the 4-bit variable {path}")


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


def load_adapter(model_dir, adapter, dtype=jnp.bfloat16, tokenizer: bool = True) -> tuple[object, object]:
  """(model, tokenizer) of a converted base with an adapter: a run folder or a PEFT folder
  (tokenizer=False: a PEFT adapter on a folder without one; the tokenizer is then None)."""
  adapter = pathlib.Path(adapter)
  if (adapter / "checkpoints").is_dir():
    _, model, tok = load_run(adapter, model_dir)
    return model, tok
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
  adapted = peft_modules(pc, names, config)
  experts = expert_targets(pc, config)
  if pc.get("target_parameters") and not experts:
    raise ValueError(f"{config_path}: target_parameters {pc['target_parameters']!r} adapt no parameter of "
                     f"{model_dir} (only a mixture of experts' stacked products take them)")
  if not adapted and not experts:
    raise ValueError(f"{config_path}: target_modules {pc.get('target_modules')!r} adapt no linear layer of "
                     f"{model_dir}; give an adapter made for this model")
  ranks = [r for r, _ in adapted.values()] + [peft_rank(pc, n)[0] for ns in experts.values() for n in ns]
  lora = LoraConfig(rank=max(ranks), alpha=float(pc["lora_alpha"]),
                    targets=tuple(k for k in LINEAR_NAMES if any(n.endswith(f".{k}") for n in adapted)) + tuple(experts),
                    use_rslora=bool(pc.get("use_rslora")))
  model, tok = load_model(model_dir, dtype, ModelOptions(lora=lora), tokenizer=tokenizer)
  with safe_open(str(adapter / "adapter_model.safetensors"), "flax") as f:  # bf16 too
    weights = {k: np.asarray(f.get_tensor(k), np.float32) for k in f.keys()}
  fill_adapters(model, adapted, weights, adapter, pc)
  model.eval()
  return model, tok


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
