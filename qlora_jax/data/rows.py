"""Rows of a dataset: a local json/jsonl/csv/parquet file or a hub dataset, as a `datasets.Dataset`,
and the train/eval split. A bad file is a one-line ValueError naming it (and the line, where one
is known) and the fix."""

from __future__ import annotations

import json
import pathlib
import re

from qlora_jax.data.conversations import CHAT_COLUMNS
from qlora_jax.data.formats import check_rows

SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
ROW_SHAPES = "a list of row objects [{...}, ...], or one key holding it ({\"data\": [...]})"


def load_rows(spec: str):
  """A `datasets.Dataset` from a local json/jsonl/csv/parquet file or a hub dataset name.

  A .json file holds a list of row objects, one key holding that list ({"data": [...]}), or one
  row object per line; a .jsonl file holds one row object per line (blank lines skipped). Every
  csv cell is read as text, an empty one as "". A file with no rows is an error."""
  path = pathlib.Path(spec)
  if path.suffix in SUFFIXES or path.exists():
    rows = _file_rows(path)
  elif re.fullmatch(r"[\w.-]+(/[\w.-]+)?", spec):
    rows = _hub_rows(spec)
  else:
    raise ValueError(f"dataset {spec!r} is neither an existing file nor a hub name")
  if len(rows) == 0:
    raise ValueError(f"{spec}: no examples (the file or dataset has no rows); add rows to it or "
                     "point the config at another dataset")
  return rows


def _file_rows(path: pathlib.Path):
  """The rows of a local file, by its suffix."""
  if not path.is_file():
    raise ValueError(f"dataset file {path} does not exist" if not path.exists()
                     else f"dataset {path} is a folder; give a json/jsonl/parquet/csv file")
  if path.suffix not in SUFFIXES:
    raise ValueError(f"dataset file {path}: unsupported type; use {sorted(SUFFIXES)}")
  if path.suffix in (".json", ".jsonl"):
    return _dataset(_json_rows(path))
  if path.suffix == ".csv":
    return _csv_rows(path)
  import datasets

  try:
    return datasets.load_dataset("parquet", data_files=str(path), split="train")
  except Exception as e:
    raise ValueError(f"cannot read dataset {path}: {type(e).__name__}: {e}") from None


def _hub_rows(spec: str):
  import datasets

  try:
    return datasets.load_dataset(spec, split="train")
  except Exception as e:
    raise ValueError(f"cannot load dataset {spec!r} from the hub ({type(e).__name__}); "
                     "download it where the network allows and pass a local file") from None


def _dataset(rows: list[dict]):
  """A Dataset of row dicts: every key any row has is a column; a column mixing types is Json."""
  import datasets

  columns = {k: [row.get(k) for row in rows] for k in dict.fromkeys(k for row in rows for k in row)}
  return datasets.Dataset.from_dict(columns, on_mixed_types="use_json")


def _json_rows(path: pathlib.Path) -> list[dict]:
  """The row objects of a .json file (a whole document, else JSON Lines) or a .jsonl file."""
  try:
    text = path.read_text(encoding="utf-8-sig")
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}: not UTF-8 text ({e}); save the file as UTF-8") from None
  if path.suffix == ".json" and text.strip():
    try:
      return _rows_of_document(json.loads(text), path)
    except json.JSONDecodeError as e:
      if not _looks_like_json_lines(text, e):
        raise ValueError(f"{path} line {e.lineno}: not valid JSON ({e.msg}, column {e.colno}); "
                         f"fix the file: it must hold {ROW_SHAPES}") from None
  return _json_lines(text, path)


def _looks_like_json_lines(text: str, error: json.JSONDecodeError) -> bool:
  """Whether a .json file that is not one document is JSON Lines: its first line is a whole object."""
  if error.msg != "Extra data":
    return False
  try:
    return isinstance(json.loads(text.lstrip().split("\n", 1)[0]), dict)
  except json.JSONDecodeError:
    return False


def _rows_of_document(doc, path: pathlib.Path) -> list[dict]:
  """The rows of a whole JSON document: a list of objects, or an object whose one key holds it.

  {"messages": [...]} or {"conversations": [...]} is one chat row, not a list of rows."""
  if isinstance(doc, dict) and len(doc) == 1 and next(iter(doc)) in CHAT_COLUMNS:
    return [doc]
  if isinstance(doc, dict):
    lists = [value for value in doc.values() if isinstance(value, list)]
    if len(doc) != 1 or not lists:
      raise ValueError(f"{path}: a JSON object with keys {sorted(doc)[:8]}; expected {ROW_SHAPES}")
    doc = lists[0]
  if not isinstance(doc, list):
    raise ValueError(f"{path}: a JSON {type(doc).__name__}; expected {ROW_SHAPES}")
  for n, row in enumerate(doc, start=1):
    if not isinstance(row, dict):
      raise ValueError(f"{path}: row {n} is a JSON {type(row).__name__}, not an object; expected {ROW_SHAPES}")
  return doc


def _json_lines(text: str, path: pathlib.Path) -> list[dict]:
  """One row object per line; blank lines are skipped, errors name the line (counted from one)."""
  rows = []
  for n, line in enumerate(text.split("\n"), start=1):  # not splitlines: JSON strings may hold U+2028
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} line {n}: not valid JSON ({e.msg}, column {e.colno}); "
                       "each line must be one complete JSON object") from None
    if not isinstance(row, dict):
      raise ValueError(f"{path} line {n}: a JSON {type(row).__name__}, not a row object {{...}}")
    rows.append(row)
  return rows


def _csv_rows(path: pathlib.Path):
  """Every cell as text as written (leading zeros kept, an empty cell ""): all formats read text."""
  import datasets
  import pandas

  try:
    frame = pandas.read_csv(path, dtype=str, keep_default_na=False)
  except pandas.errors.EmptyDataError:
    return []
  except (pandas.errors.ParserError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: not valid CSV ({' '.join(str(e).split())}); fix the file") from None
  return datasets.Dataset.from_pandas(frame, preserve_index=False)


def train_eval_rows(dataset: str, eval_dataset: str, eval_size: int, seed: int, *,
                    dataset_format: str = ""):
  """(train rows, eval rows): eval_dataset's, or eval_size examples of dataset held out with seed.

  With dataset_format, both are checked with `check_rows` (the columns the format reads) before
  anything else happens: "" skips that check."""
  rows = load_rows(dataset)
  if dataset_format:
    check_rows(rows, dataset_format, dataset)
  if eval_dataset:
    eval_rows = load_rows(eval_dataset)
    if dataset_format:
      check_rows(eval_rows, dataset_format, eval_dataset)
    return rows, eval_rows
  if len(rows) <= eval_size:
    raise ValueError(f"dataset {dataset} has {len(rows)} examples, not more than eval_size="
                     f"{eval_size}; lower eval_size or give eval_dataset")
  split = rows.train_test_split(test_size=eval_size, seed=seed, shuffle=True)
  return split["train"], split["test"]
