"""python -m qlora_jax.export RUN_DIR OUT [--merge] [--overwrite]

Export a training run as a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors,
PEFT's key names and [r, in] / [out, r] shapes), or with --merge as a bf16 transformers
checkpoint with the adapters folded into the dequantized base weights.
"""

from __future__ import annotations

import argparse
import json
import pathlib
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
from qlora_jax.format.folder import ShardWriter
from qlora_jax.format.quantization import dequantize
from qlora_jax.io.loading import load_model
from qlora_jax.nn.lora import LoraConfig, QLoRALinear
from qlora_jax.nn.model import ModelOptions, variable_names
from qlora_jax.nn.variables import FrozenParam
from qlora_jax.train.builder import build_from_folder
from qlora_jax.train.checkpoint import Checkpointer
from qlora_jax.train.config import TrainConfig

PEFT_PREFIX = "base_model.model."
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


def load_run(run_dir, model_dir=None) -> tuple[TrainConfig, object, object]:
  """(config, model with the run's latest LoRA weights, tokenizer); model_dir overrides the
  base model folder the run recorded."""
  cfg = run_config(run_dir)
  ckpt = Checkpointer(pathlib.Path(run_dir), cfg.loop.keep_checkpoints)
  if ckpt.latest_step() is None:
    raise ValueError(f"{run_dir} holds no checkpoint yet")
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


def peft_config(cfg: TrainConfig) -> dict:
  """adapter_config.json, derived from the run's config (nothing hard-coded that it holds)."""
  lora, source = cfg.lora, cfg.model.model_source
  return {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.alpha,
      "lora_dropout": lora.dropout, "target_modules": sorted(lora.targets), "bias": "none",
      "use_rslora": lora.use_rslora, "use_dora": False, "fan_in_fan_out": False,
      "base_model_name_or_path": source if source not in ("", "default") else cfg.model.model_dir,
      "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "init_lora_weights": True,
      "inference_mode": True, "layers_to_transform": None, "layers_pattern": None,
  }


def write_peft(cfg: TrainConfig, model, out, overwrite: bool = False) -> None:
  with atomic_dir(out, overwrite) as tmp:
    save_file(peft_tensors(model), str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    (tmp / "adapter_config.json").write_text(json.dumps(peft_config(cfg), indent=2))


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
  pc = json.loads(config_path.read_text())
  if pc.get("peft_type") != "LORA" or pc.get("use_dora") or "r" not in pc or "target_modules" not in pc:
    raise ValueError(f"{config_path}: only plain LoRA adapters (with r and target_modules) are supported")
  if not (adapter / "adapter_model.safetensors").is_file():
    raise ValueError(f"{adapter} has no adapter_model.safetensors")
  targets = tuple(pc["target_modules"]) if isinstance(pc["target_modules"], list) else (pc["target_modules"],)
  lora = LoraConfig(rank=int(pc["r"]), alpha=float(pc["lora_alpha"]), targets=targets,
                    use_rslora=bool(pc.get("use_rslora")))
  model, tokenizer = load_model(model_dir, dtype, ModelOptions(lora=lora))
  with safe_open(str(adapter / "adapter_model.safetensors"), "numpy") as f:
    weights = {k: f.get_tensor(k) for k in f.keys()}
  found: dict[tuple[int, str], list] = {}
  for name, layer, i in linear_modules(model):
    if layer.lora is None:
      continue
    for attr, key in (("lora_a", "lora_A"), ("lora_b", "lora_B")):
      peft_name = f"{PEFT_PREFIX}{name}.{key}.weight"
      if peft_name not in weights:
        raise ValueError(f"adapter lacks {peft_name}")
      found.setdefault((id(layer), attr), [layer, attr, []])[2].append(weights[peft_name].T)
  for layer, attr, arrays in found.values():  # one array per layer; stacked when scanned
    value = arrays[0] if len(arrays) == 1 and getattr(layer, attr)[...].ndim == 2 else np.stack(arrays)
    getattr(layer, attr)[...] = jnp.asarray(value, getattr(layer, attr).dtype)
  model.eval()
  return model, tokenizer


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("run_dir")
  p.add_argument("out")
  p.add_argument("--merge", action="store_true", help="write a merged bf16 transformers checkpoint")
  p.add_argument("--overwrite", action="store_true")
  args = p.parse_args(argv)

  def export() -> str:
    cfg, model, _ = load_run(args.run_dir)
    if args.merge:
      write_merged(model, cfg.model.model_dir, args.out, args.overwrite)
    else:
      write_peft(cfg, model, args.out, args.overwrite)
    return f"wrote {'merged checkpoint' if args.merge else 'PEFT adapter'} to {args.out}"

  return cli.run(export)


if __name__ == "__main__":
  sys.exit(main())
