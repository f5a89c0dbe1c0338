"""Rows of a dataset: a local json/jsonl/parquet/csv file or a hub dataset, read with HF
`datasets`, and the train/eval split."""

from __future__ import annotations

import pathlib
import re

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def load_rows(spec: str):
  """A `datasets.Dataset` from a local json/jsonl/parquet/csv file or a hub dataset name."""
  import datasets

  path = pathlib.Path(spec)
  if path.suffix in FILE_BUILDERS or path.exists():
    if not path.is_file():
      raise ValueError(f"dataset file {spec} does not exist" if not path.exists()
                       else f"dataset {spec} is a folder; give a json/jsonl/parquet/csv file")
    if path.suffix not in FILE_BUILDERS:
      raise ValueError(f"dataset file {spec}: unsupported type; use {sorted(FILE_BUILDERS)}")
    try:
      rows = datasets.load_dataset(FILE_BUILDERS[path.suffix], data_files=str(path), split="train")
    except Exception as e:
      raise ValueError(f"cannot read dataset {spec}: {type(e).__name__}: {e}") from e
  elif re.fullmatch(r"[\w.-]+(/[\w.-]+)?", spec):
    try:
      rows = datasets.load_dataset(spec, split="train")
    except Exception as e:
      raise ValueError(f"cannot load dataset {spec!r} from the hub ({type(e).__name__}); "
                       "download it where the network allows and pass a local file") from e
  else:
    raise ValueError(f"dataset {spec!r} is neither an existing file nor a hub name")
  if len(rows) == 0:
    raise ValueError(f"dataset {spec} is empty")
  return rows


def train_eval_rows(dataset: str, eval_dataset: str, eval_size: int, seed: int):
  """(train rows, eval rows): eval_dataset's, or eval_size examples of dataset held out with seed."""
  rows = load_rows(dataset)
  if eval_dataset:
    return rows, load_rows(eval_dataset)
  if len(rows) <= eval_size:
    raise ValueError(f"dataset {dataset} has {len(rows)} examples, not more than eval_size="
                     f"{eval_size}; lower eval_size or give eval_dataset")
  split = rows.train_test_split(test_size=eval_size, seed=seed, shuffle=True)
  return split["train"], split["test"]
