"""Training data: rows (rows.py) -> (prompt, response) tokens (formats.py) -> batches (batches.py)."""

from qlora_jax.data.batches import PAD_MULTIPLE, Batches, eval_batches, pack, packed_batch, padded_batch
from qlora_jax.data.formats import IGNORE, Tokenized, source_and_target, tokenize
from qlora_jax.data.rows import load_rows, train_eval_rows

__all__ = ["IGNORE", "PAD_MULTIPLE", "Batches", "Tokenized", "eval_batches", "load_rows", "pack",
           "packed_batch", "padded_batch", "source_and_target", "tokenize", "train_eval_rows"]
