"""python scripts/pretrain_corpus.py OUT [--tokenizer DIR] [--roots DIR ...] [--max-tokens N]

A pretraining corpus that every machine with Python has offline (issue 30): the source files and
documentation of the installed packages and of the standard library (.py .md .rst .txt under the
interpreter's stdlib and site-packages folders, or --roots) plus CPython's pydoc topics. Files
are deduplicated by content and held out by content hash (1 in 50), so no validation text was
trained on; each is tokenized (default: the embedded SmolLM2's tokenizer) with EOS after it.
Writes OUT/train.bin and OUT/val.bin (uint16 token streams), OUT/tokenizer/ and OUT/corpus.json
(files, tokens, roots). scripts/pretrain.py trains on it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import sys
import sysconfig
import tempfile

import numpy as np

SUFFIXES = (".py", ".md", ".rst", ".txt")
HELD_OUT = 50  # one file in this many goes to validation
MAX_FILE_BYTES = 1 << 20  # larger files are data dumps more often than text
BATCH_FILES = 1024  # files tokenized together (the fast tokenizer spreads a batch over the cores)


def default_roots() -> list[pathlib.Path]:
  paths = {sysconfig.get_paths()[k] for k in ("stdlib", "purelib", "platlib")}
  return sorted(pathlib.Path(p) for p in paths if pathlib.Path(p).is_dir())


def documents(roots: list[pathlib.Path], pydoc: bool = True):
  """(name, text) of every readable text file under the roots, then the pydoc topics."""
  for root in roots:
    for path in sorted(root.rglob("*")):
      if path.suffix in SUFFIXES and path.is_file() and path.stat().st_size <= MAX_FILE_BYTES:
        try:
          yield str(path), path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
          continue
  if not pydoc:
    return
  try:
    from pydoc_data.topics import topics
  except ImportError:  # an interpreter built without pydoc's data
    return
  for name in sorted(topics):
    yield f"pydoc:{name}", topics[name]


def load_tokenizer(spec: str | None, out: pathlib.Path):
  """The tokenizer named (a folder or hub id), or the embedded SmolLM2 GGUF's; saved in out."""
  from transformers import AutoTokenizer

  if spec is None:
    from qlora_jax.io.sources import default_gguf, open_source

    with tempfile.TemporaryDirectory() as tmp:
      if not open_source(str(default_gguf())).save_tokenizer(pathlib.Path(tmp)):
        raise SystemExit("the embedded model has no tokenizer; pass --tokenizer DIR")
      tok = AutoTokenizer.from_pretrained(tmp)
  else:
    tok = AutoTokenizer.from_pretrained(spec)
  if len(tok) > 65536 or tok.eos_token_id is None:
    raise SystemExit(f"tokenizer {spec or 'SmolLM2'}: needs an EOS token and at most 65,536 ids (uint16 "
                     f"streams), has {len(tok)} ids; pass another --tokenizer")
  tok.save_pretrained(str(out / "tokenizer"))
  return tok


def build(out: pathlib.Path, tokenizer: str | None = None, roots=None, max_tokens: int = 0,
          progress: bool = True, pydoc: bool = True) -> dict:
  out.mkdir(parents=True, exist_ok=True)
  tok = load_tokenizer(tokenizer, out)
  roots = [pathlib.Path(r) for r in roots] if roots else default_roots()
  seen, counts = set(), {"train": [0, 0], "val": [0, 0]}  # split -> [files, tokens]
  streams = {s: open(out / f"{s}.bin", "wb") for s in counts}
  pending: list[tuple[str, str]] = []  # (split, text), tokenized a batch at a time (on every core)

  def flush() -> bool:
    """Tokenize and write the pending files in order; True once max_tokens is reached."""
    encoded = tok([text for _, text in pending], add_special_tokens=False)["input_ids"] if pending else []
    for (split, _), ids in zip(pending, encoded):
      streams[split].write(np.asarray(ids + [tok.eos_token_id], np.uint16).tobytes())
      counts[split][0] += 1
      counts[split][1] += len(ids) + 1
      if max_tokens and counts["train"][1] >= max_tokens:
        return True
    pending.clear()
    if progress:
      print(f"  {sum(c[1] for c in counts.values()):,} tokens from {len(seen):,} files", flush=True)
    return False

  try:
    for name, text in documents(roots, pydoc):
      digest = hashlib.sha1(text.encode("utf-8", "replace")).digest()
      if not text.strip() or digest in seen:
        continue
      seen.add(digest)
      pending.append(("val" if int.from_bytes(digest[:4], "little") % HELD_OUT == 0 else "train", text))
      if len(pending) == BATCH_FILES and flush():
        break
    else:
      flush()
  finally:
    for f in streams.values():
      f.close()
  if counts["train"][1] == 0 or counts["val"][1] == 0:
    raise SystemExit(f"corpus under {[str(r) for r in roots]} is too small: {counts} (files, tokens) "
                     "for train and val; give roots with more text")
  meta = {"roots": [str(r) for r in roots] + (["pydoc topics"] if pydoc else []), "tokenizer": tokenizer or "embedded SmolLM2-135M-Instruct GGUF",
          "vocab": len(tok), "eos": tok.eos_token_id, "held_out": f"1 in {HELD_OUT} files by content hash",
          **{f"{s}_files": c[0] for s, c in counts.items()}, **{f"{s}_tokens": c[1] for s, c in counts.items()}}
  (out / "corpus.json").write_text(json.dumps(meta, indent=2))
  return meta


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
  p.add_argument("out", type=pathlib.Path)
  p.add_argument("--tokenizer", default=None, help="a tokenizer folder or hub id (default: SmolLM2's)")
  p.add_argument("--roots", nargs="*", default=None, help="folders to read (default: stdlib + site-packages)")
  p.add_argument("--no-pydoc", dest="pydoc", action="store_false", help="leave out CPython's pydoc topics")
  p.add_argument("--max-tokens", type=int, default=0, help="stop after this many training tokens (0: all)")
  args = p.parse_args(argv)
  meta = build(args.out, args.tokenizer, args.roots, args.max_tokens, pydoc=args.pydoc)
  print(f"corpus: {meta['train_tokens']:,} training tokens ({meta['train_files']:,} files), "
        f"{meta['val_tokens']:,} held out ({meta['val_files']:,} files) in {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
