"""Training data: rows (rows.py) -> (text, learned) parts (formats.py, conversations.py for chat)
-> tokens -> batches (batches.py)."""

from qlora_jax.data.batches import PAD_MULTIPLE, Batches, eval_batches, pack, packed_batch, padded_batch
from qlora_jax.data.conversations import CHAT_TURNS
from qlora_jax.data.formats import FORMATS, IGNORE, Tokenized, check_rows, text_parts, tokenize
from qlora_jax.data.rows import load_rows, train_eval_rows

__all__ = ["CHAT_TURNS", "FORMATS", "IGNORE", "PAD_MULTIPLE", "Batches", "Tokenized", "check_rows",
           "eval_batches", "load_rows", "pack", "packed_batch", "padded_batch", "text_parts", "tokenize",
           "train_eval_rows"]
