"""Streaming conversion of a model into the qlora_jax folder format (format/folder.py).

Tensors are read, quantized and written one at a time, so host memory holds one input tensor,
its quantized form and at most one output shard, never the model. The output is written
atomically (format/atomic.py): an interrupted run never leaves a folder that looks converted.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time

import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from qlora_jax.format.atomic import atomic_dir, check_out
from qlora_jax.format.bnb_format import BNB_QUANT_TYPES, to_bnb_state
from qlora_jax.nn.model_config import ModelConfig
from qlora_jax.format.quantization import QuantConfig, QuantizedArray, dequantize, quantize
from qlora_jax.io.experts import packed_experts
from qlora_jax.io.sources import Source, default_gguf, open_source
from qlora_jax.format.folder import FORMAT_VERSION, META_FILE, ShardWriter, read_meta
from qlora_jax.io.loading import expected_tensors
from qlora_jax.nn.families import classify, fused_parts, fused_rows, text_config, text_name

DENSE_DTYPES = ("bfloat16", "float16", "float32")


@dataclasses.dataclass(frozen=True)
class Summary:
  """What a conversion produced."""

  params: int
  bytes_on_disk: int
  seconds: float
  quant: QuantConfig

  @property
  def bits_per_param(self) -> float:
    return 8 * self.bytes_on_disk / self.params

  def __str__(self) -> str:
    return (f"{self.params / 1e6:.1f}M parameters, {self.bytes_on_disk / 2**20:.1f} MiB on disk, "
            f"{self.bits_per_param:.2f} bits/parameter overall ({self.quant.quant_type}, blocksize "
            f"{self.quant.blocksize}, double quant {'on' if self.quant.double_quant else 'off'}), "
            f"{self.seconds:.1f} s")


def convert(src: str, out: str | pathlib.Path, quant: QuantConfig = QuantConfig(), *,
            dense_dtype: str = "bfloat16", export_bnb: bool = False, overwrite: bool = False,
            shard_bytes: int = 2 << 30, progress: bool = True) -> Summary:
  """Convert SRC (folder, hub id, .gguf) into OUT; see convert_weights.py for the options."""
  start = time.time()
  out = pathlib.Path(out)
  check_out(out, overwrite)
  if dense_dtype not in DENSE_DTYPES:
    raise ValueError(f"dense dtype must be one of {DENSE_DTYPES}, got {dense_dtype!r}")
  if export_bnb and quant.quant_type not in BNB_QUANT_TYPES:
    raise ValueError(f"--export-bnb needs nf4 or fp4: bitsandbytes has no {quant.quant_type!r}")
  source = open_source(str(src))
  config = ModelConfig.from_hf(source.hf_config)
  with atomic_dir(out, overwrite) as tmp:
    params, quant = _write_tensors(source, config, quant, dense_dtype, tmp, shard_bytes, progress)
    _write_metadata(source, tmp, quant, dense_dtype, export_bnb, params)
  size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
  return Summary(params=params, bytes_on_disk=size, seconds=time.time() - start, quant=quant)


def _write_tensors(source: Source, config: ModelConfig, quant: QuantConfig, dense_dtype: str,
                   folder: pathlib.Path, shard_bytes: int, progress: bool) -> tuple[int, QuantConfig]:
  """Stream every tensor through quantization into shards; returns (parameters, quant used)."""
  expected = expected_tensors(config)
  seen, params, used = set(), 0, None
  writer = ShardWriter(folder, shard_bytes)
  bar = tqdm(total=source.num_tensors, desc="converting", unit="tensor", disable=not progress)
  for name, load in packed_experts(_language_model(source.tensors(), config, bar), config.num_experts):
    if config.tie_word_embeddings and name == "lm_head.weight" or classify(name) == "ignored":
      continue
    if name not in expected:
      raise ValueError(f"unexpected tensor {name!r} for this config.json ({config.model_type}, "
                       f"{config.num_hidden_layers} layers)")
    kind, shape = expected[name]
    value = load()
    if tuple(value.shape) != tuple(shape):
      raise ValueError(f"tensor {name!r} has shape {tuple(value.shape)}, config.json implies {tuple(shape)}")
    if kind == "quantized":
      qw = value if isinstance(value, QuantizedArray) else quantize(
          jnp.asarray(value), quant.quant_type, quant.blocksize, quant.double_quant)
      used = _same_quant(used, qw, name)
      for key, array in to_bnb_state(qw, name).items():
        writer.add(key, array)
    else:
      writer.add(name, np.asarray(value).astype(jnp.dtype(dense_dtype)))  # host cast, no device trip
    seen.add(name)
    params += int(np.prod(shape))
  bar.close()
  missing = sorted(set(expected) - seen)
  if missing:
    raise ValueError(f"the source lacks {len(missing)} tensor(s) the model needs: {missing[:6]}")
  writer.close()
  return params, used or quant


def _language_model(tensors, config: ModelConfig, bar):
  """The source's (name, load) pairs as the language model's: a multimodal checkpoint's prefixes
  taken off and its other parts (vision tower, projector) left out; each fused projection
  (Phi-3's qkv_proj, gate_up_proj) split by rows into the layers it fuses (q, k, v / gate, up;
  sizes from config.json). A fused tensor already in 4 bits (a bitsandbytes source) is
  dequantized to be split and re-quantized as the source was."""
  for name, load in tensors:
    bar.update(1)
    name = text_name(name)
    if name is None:
      continue
    found = fused_parts(name)
    if found is None:
      yield name, load
      continue
    prefix, fused = found
    value = source = load()
    if isinstance(value, QuantizedArray):  # split, then re-quantized as the source was
      value = dequantize(value, jnp.float32)
    value = np.asarray(value)
    rows = fused_rows(fused, config.linear_shapes)
    height = max(r.stop for r in rows.values())
    if value.ndim != 2 or value.shape[0] != height:
      raise ValueError(f"tensor {name!r} has shape {tuple(value.shape)}; config.json implies {height} rows "
                       f"({' + '.join(f'{r.stop - r.start} for {p}' for p, r in rows.items())})")
    for part, r in rows.items():
      piece = value[r]
      if isinstance(source, QuantizedArray):
        piece = quantize(jnp.asarray(piece), source.quant_type, source.blocksize, source.double_quant)
      yield f"{prefix}{part}.weight", (lambda piece=piece: piece)


def _same_quant(used: QuantConfig | None, qw: QuantizedArray, name: str) -> QuantConfig:
  """Pre-quantized (bitsandbytes) weights keep their own settings, which must all agree."""
  got = QuantConfig(quant_type=qw.quant_type, blocksize=qw.blocksize, double_quant=qw.double_quant)
  if used is not None and got != used:
    raise ValueError(f"{name} is quantized as {got}, earlier weights as {used}: mixed settings "
                     "are not supported")
  return got


def _write_metadata(source: Source, folder: pathlib.Path, quant: QuantConfig, dense_dtype: str,
                    export_bnb: bool, params: int) -> None:
  hf = {k: v for k, v in text_config(source.hf_config).items() if k != "quantization_config"}
  hf["torch_dtype"] = dense_dtype
  if export_bnb:
    hf["quantization_config"] = {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
        "bnb_4bit_quant_type": quant.quant_type, "bnb_4bit_use_double_quant": quant.double_quant,
        "bnb_4bit_compute_dtype": dense_dtype, "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": ["lm_head"]}
  (folder / "config.json").write_text(json.dumps(hf, indent=2))
  has_tokenizer = source.save_tokenizer(folder)
  meta = {"format_version": FORMAT_VERSION, "quant": dataclasses.asdict(quant),
          "dense_dtype": dense_dtype, "source": source.description, "parameters": params,
          "requantized": not source.bnb_quantized, "tokenizer": has_tokenizer}
  (folder / META_FILE).write_text(json.dumps(meta, indent=2))


def _quant_text(q: QuantConfig) -> str:
  return f"quant_type={q.quant_type} blocksize={q.blocksize} double_quant={q.double_quant}"


def ensure_converted(model_dir: str, source: str, quant: QuantConfig) -> pathlib.Path:
  """model_dir, converting `source` ("default": the embedded SmolLM2) into it first if it is
  not there yet; ValueError naming the fix when neither is usable."""
  folder = pathlib.Path(model_dir)
  if (folder / META_FILE).is_file():
    _check_converted(folder, quant)
    return folder
  if folder.exists():
    raise ValueError(f"model_dir {folder} exists but is not a converted model (no {META_FILE}); "
                     "point model_dir at a converted folder or at a path that does not exist yet")
  if not source:
    raise ValueError(f"{folder} is not a converted model and model_source is empty; "
                     f"run: python convert_weights.py SRC {folder}")
  src = str(default_gguf()) if source == "default" else source
  print(f"converting {src} -> {folder} (once)")
  print(f"  {convert(src, folder, quant)}")
  return folder


def _check_converted(folder: pathlib.Path, quant: QuantConfig) -> None:
  """ValueError when the converted `folder` was quantized otherwise than `quant` asks (a
  bitsandbytes 4-bit source keeps its own quantization: said in one line)."""
  meta = read_meta(folder)
  stored = QuantConfig(**meta["quant"])
  if stored != quant and meta.get("requantized", True):
    raise ValueError(f"model_dir {folder} holds a {_quant_text(stored)} conversion but the config "
                     f"asks for {_quant_text(quant)}; set the quant settings to match, or point "
                     "model_dir at a new folder to convert the model again")
  if stored != quant:  # a bitsandbytes 4-bit source: its own quantization is the model
    print(f"note: {folder} keeps its source's bitsandbytes {_quant_text(stored)} (the config's "
          f"{_quant_text(quant)} does not apply to an already 4-bit checkpoint)")
