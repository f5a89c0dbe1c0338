"""The anchors' Unsloth / Liger runner (../shared/anchors/anchor_fast.py, copied to .anchors/) on
the other families' shapes: it builds Llama shapes only, so this wrapper gives it the family
shapes of qlora_jax.testing.SHAPES (Qwen3-8B, Gemma-3-12B, ...) as transformers configs of
their own class, and otherwise runs it unchanged. Run after `.anchors/run.sh` has installed its
wheels (PYTHONPATH=/tmp/site), on the GPU machine:

  PYTHONPATH=/tmp/site python bench/anchor_families.py --system unsloth --shape qwen3-8b --batch 4 --seq 2048
"""

import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, os.environ.get("ANCHORS", str(ROOT / ".anchors")))

import anchor_fast  # noqa: E402  (the anchors' runner)

from qlora_jax.testing import SHAPES  # noqa: E402

FAMILY_SHAPES = {name: dict(shape) for name, shape in SHAPES.items() if shape.get("model_type", "llama") != "llama"}


def build_config(a):
  """The shape as its family's transformers config (special ids as the anchors' tokenizer has them)."""
  from transformers import AutoConfig
  shape = {k: (list(v) if isinstance(v, tuple) else v) for k, v in FAMILY_SHAPES[a.shape].items()}
  if a.layers:
    shape["num_hidden_layers"] = a.layers
    if "layer_types" in shape:
      shape["layer_types"] = shape["layer_types"][:a.layers]
  model_type = shape.pop("model_type")
  shape["max_position_embeddings"] = max(shape.get("max_position_embeddings", 0), anchor_fast.max_positions(a))
  return AutoConfig.for_model(model_type, **shape, bos_token_id=1, eos_token_id=2, pad_token_id=3)


def make_model(a, path):
  """Random bf16 weights of the family's causal LM, saved as anchor_fast saves its Llama."""
  import json
  import shutil
  import time

  import torch
  from transformers import AutoModelForCausalLM
  cfg = build_config(a)
  t0 = time.perf_counter()
  torch.manual_seed(0)
  with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
  tmp = path + ".partial"
  shutil.rmtree(tmp, ignore_errors=True)
  model.save_pretrained(tmp, max_shard_size="4GB")
  anchor_fast.save_tokenizer(tmp, cfg.max_position_embeddings)
  n_params = sum(p.numel() for p in model.parameters())
  del model
  with open(os.path.join(tmp, "anchor_fast_made.json"), "w") as f:
    json.dump({"shape": a.shape, "params": n_params, "seed": 0}, f)
  shutil.rmtree(path, ignore_errors=True)
  os.replace(tmp, path)
  print(f"made {path}: {n_params / 1e9:.2f} B params in {time.perf_counter() - t0:.0f} s", flush=True)


def ensure_model(a):
  path = anchor_fast.model_dir(a)
  if not os.path.exists(os.path.join(path, "anchor_fast_made.json")):
    os.makedirs(anchor_fast.MODELS_DIR, exist_ok=True)
    make_model(a, path)
    import gc

    import torch
    gc.collect()  # the benchmark starts with the GPU as the build left it: released, peak reset
    if torch.cuda.is_available():
      torch.cuda.empty_cache()
      torch.cuda.reset_peak_memory_stats()
  return path


_check_dense_qlora = anchor_fast.check_qlora


def check_qlora(model, quant, n_layers):
  """The anchors' check for dense models; a mixture of experts as Unsloth loads it: its 4-bit
  `Linear4bit`s are the 4 attention projections of each layer (the stacked experts are
  parameters, not Linear modules: their storage dtype is recorded), LoRA on those and on the
  experts' parameters. Refuses anything else (no 4-bit base at all, or no LoRA)."""
  if not (getattr(model.config, "num_experts", 0) or getattr(model.config, "num_local_experts", 0)):
    return _check_dense_qlora(model, quant, n_layers)
  n_lora = sum(1 for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer"))
  quant["lora_modules"] = n_lora
  experts = [p for n, p in model.named_parameters() if "experts" in n and p.ndim == 3]
  quant["experts_dtype"] = str(experts[0].dtype).replace("torch.", "") if experts else None
  if quant["linear4bit_modules"] != 4 * n_layers or quant.get("quant_type") != "nf4" or n_lora < 4 * n_layers:
    raise RuntimeError(f"not the QLoRA workload: {quant['linear4bit_modules']} NF4 Linear4bit and "
                       f"{n_lora} LoRA modules, expected {4 * n_layers} attention projections of each")


def main():
  anchor_fast.check_qlora = check_qlora
  for name, shape in FAMILY_SHAPES.items():
    anchor_fast.SHAPES[name] = {k: shape[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                      "num_attention_heads", "num_key_value_heads", "vocab_size")}
  anchor_fast.build_config = build_config
  anchor_fast.make_model = make_model
  anchor_fast.ensure_model = ensure_model
  anchor_fast.main()


if __name__ == "__main__":
  main()
