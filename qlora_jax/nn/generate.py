"""Token generation with the KV cache: greedy, temperature and top-p (nucleus) sampling."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels.gpu_decode_attention import BLOCK as ATTENTION_BLOCK
from qlora_jax.nn.kv_cache import KVCache
from qlora_jax.nn.lora import scaling_in_a
from qlora_jax.nn.model import CausalLM
from qlora_jax.nn.variables import LoRAWeight

PROMPT_BUCKET = 64


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
  """temperature 0 is greedy; top_p < 1 samples from the smallest set holding p of the mass."""

  max_new_tokens: int = 128
  temperature: float = 0.0
  top_p: float = 1.0
  seed: int = 0

  def __post_init__(self):
    if self.temperature < 0 or not 0 < self.top_p <= 1 or self.max_new_tokens < 1:
      raise ValueError("need temperature >= 0, 0 < top_p <= 1 and max_new_tokens >= 1")


def sample_token(logits_BxV: jax.Array, key: jax.Array, temperature: float, top_p: float) -> jax.Array:
  """Next token ids [B] from float32 logits."""
  if temperature == 0.0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits = logits_BxV / temperature
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # The cut-off logit: the smallest one still needed to reach top_p of the mass.
    keep = jnp.sum(cum - jax.nn.softmax(sorted_logits, axis=-1) < top_p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(sorted_logits, keep - 1, axis=-1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


CHUNK = 16  # tokens a compiled call generates: one dispatch and one host round trip per chunk


def decode_state(model: CausalLM) -> tuple[nnx.GraphDef, nnx.State]:
  """(graphdef, state) of the model as generation reads it: float32 LoRA weights (the experts'
  too) as copies in a 16-bit compute dtype. Their products round both operands to the compute
  dtype anyway (compute_dot, grouped_dot), so the tokens are the same, and each token reads half
  the adapter bytes; the copies live while generating (docs/BENCHMARKS.md, "Generation"). A
  power-of-two LoRA scaling is carried in A's copy (lora.scaling_in_a: the same products, one
  multiply kernel fewer a layer and token). Each generate call pays this: the graph is walked
  once per model structure, the copies made by one compiled call."""
  graphdef, lora, rest = nnx.split(model, LoRAWeight, ...)
  decode_graphdef, scales = _decode_graph(graphdef, model)
  flat = nnx.to_flat_state(lora)
  cd = jnp.dtype(model.options.dtype)
  arrays = _lora_copies([v.get_value() for _, v in flat], tuple(scales.get(p, 1.0) for p, _ in flat),
                        cd if cd.itemsize == 2 else None)
  lora = nnx.from_flat_state([(p, v.replace(a)) for (p, v), a in zip(flat, arrays)])
  return decode_graphdef, nnx.merge_state(lora, rest)


_DECODE_GRAPHS: dict[nnx.GraphDef, tuple[nnx.GraphDef, dict]] = {}


def _decode_graph(graphdef: nnx.GraphDef, model: CausalLM) -> tuple[nnx.GraphDef, dict]:
  """(the graphdef of lora.scaling_in_a's copy, its {A path: scaling}) for a model of this
  graphdef, made once per structure: the copy walks every module in Python, which made most of
  a call's setup when each call made it (docs/BENCHMARKS.md, "Generation")."""
  found = _DECODE_GRAPHS.get(graphdef)  # one lookup: hashing the graphdef is a walk too
  if found is None:
    if len(_DECODE_GRAPHS) >= 8:
      _DECODE_GRAPHS.pop(next(iter(_DECODE_GRAPHS)))
    marked, scales = scaling_in_a(model)
    found = _DECODE_GRAPHS[graphdef] = (nnx.split(marked, LoRAWeight, ...)[0], scales)
  return found


@functools.partial(jax.jit, static_argnums=(1, 2))
def _lora_copies(arrays: list[jax.Array], scales: tuple[float, ...], dtype) -> list[jax.Array]:
  """Each adapter weight times its scaling (1: none), float32 ones cast to dtype (None: kept)."""
  out = [a if s == 1.0 else a * jnp.asarray(s, a.dtype) for a, s in zip(arrays, scales)]
  return [a.astype(dtype) if dtype is not None and a.dtype == jnp.float32 else a for a in out]


@functools.lru_cache(maxsize=8)
def _decoder(graphdef: nnx.GraphDef, temperature: float, top_p: float) -> tuple[Callable, Callable]:
  """(prefill, chunk), compiled once per model structure and sampling setting:

    prefill(state, ids [B, T], mask [B, T], cache, key) -> (first new tokens [B], cache)
    chunk(state, tokens [B], cache, key) -> (the CHUNK tokens after them [B, CHUNK], cache)

  Plain jax.jit over the split model's state, the cache donated (updated in place), CHUNK
  decoding steps in one on-device loop: per token, nnx.jit would walk the model's graph of
  variables and jax.jit check every argument, which costs more than a token's compute on an
  accelerator (docs/BENCHMARKS.md, "Generation")."""

  def next_tokens(state, ids, mask, cache, key):  # ids [B, T] appended: (next token [B], cache)
    logits, cache = nnx.merge(graphdef, state).decode(ids, cache, mask)
    return sample_token(logits[:, -1], key, temperature, top_p), cache

  def chunk(state, tokens, cache, key):
    arrays, treedef = jax.tree.flatten(state)

    def one(carry, step_key):  # state rebuilt in the loop's trace: NNX refuses outer variables
      tokens, cache = next_tokens(jax.tree.unflatten(treedef, arrays), carry[0][:, None], None,
                              carry[1], step_key)
      return (tokens, cache), tokens

    (_, cache), out = jax.lax.scan(one, (tokens, cache), jax.random.split(key, CHUNK))
    return out.T, cache

  return jax.jit(next_tokens, donate_argnums=3), jax.jit(chunk, donate_argnums=2)


def greedy_chunk(model: CausalLM, batch: int, slots: int) -> tuple[Callable, tuple]:
  """(chunk, args): generation's compiled call of CHUNK greedy decoding steps for `batch`
  sequences in a cache of `slots` slots, and arguments to call, lower or export it with (the
  model's state as generation reads it, start tokens 0, an empty cache, a key). The cache is
  donated: a second call needs another (a copy of args[2] made before the first call)."""
  graphdef, state = decode_state(model)
  _, chunk = _decoder(graphdef, 0.0, 1.0)
  cache = model.empty_cache(batch, slots)
  return chunk, (state, jnp.zeros((batch,), jnp.int32), cache, jax.random.key(0))


def run_chunks(chunk: Callable, state: nnx.State, token: jax.Array, cache: KVCache, key: jax.Array,
               n: int) -> Iterator[np.ndarray]:
  """The tokens of n compiled chunks after `token` ([B, CHUNK] host arrays, in order; `chunk`
  from _decoder or greedy_chunk, the cache donated), each chunk's key split off `key` in turn.
  Chunk k + 1 is dispatched before chunk k's tokens are read back, so the host's dispatch (every
  array of the state an argument) and the round trip overlap
  the device's work instead of following it; the first is dispatched by this call, before the
  caller reads anything back. A consumer that stops early leaves one chunk computed for nothing."""

  def launch(token, cache, key):
    key, sub = jax.random.split(key)
    tokens, cache = chunk(state, token, cache, sub)
    return tokens, cache, key

  def chunks(ahead):
    for i in range(n):
      tokens, cache, key = ahead
      if i + 1 < n:
        ahead = launch(tokens[:, -1], cache, key)
      yield np.asarray(tokens)

  return chunks(launch(token, cache, key) if n else None)


def generate(model: CausalLM, prompts: list[list[int]], sampling: SamplingConfig,
             stop_ids: tuple[int, ...] = ()) -> Iterator[np.ndarray]:
  """Yield the next token of every prompt ([B] int array) until all stopped, the budget ends or
  the longest sequence fills the model's context (a prompt that fills it already: ValueError).

  Prompts are left-padded into one batch; a finished sequence keeps yielding its stop token.
  Tokens are computed CHUNK at a time (so up to CHUNK - 1 past the last stop are computed and
  dropped) and yielded one by one.
  """
  model.eval()
  context = model.config.max_position_embeddings
  if not prompts or not all(prompts):
    raise ValueError("generate needs at least one prompt, and no empty prompt")
  prompt_len = max(len(p) for p in prompts)
  if prompt_len >= context:
    raise ValueError(f"the prompt has {prompt_len} tokens, the model's context {context}: shorten "
                     "the prompt (or start a new conversation)")
  # Left-pad to a multiple of PROMPT_BUCKET: prompts of similar length share compiled code.
  b, longest = len(prompts), -(-prompt_len // PROMPT_BUCKET) * PROMPT_BUCKET
  ids = np.zeros((b, longest), np.int32)
  mask = np.zeros((b, longest), np.int32)
  for i, p in enumerate(prompts):
    ids[i, longest - len(p):], mask[i, longest - len(p):] = p, 1
  chunks = -(-(sampling.max_new_tokens - 1) // CHUNK)  # after the prefill's token
  # the cache in whole blocks of the decode attention kernel's slots (the extra ones stay masked)
  slots = longest + chunks * CHUNK
  cache = model.empty_cache(b, -(-slots // ATTENTION_BLOCK) * ATTENTION_BLOCK)
  graphdef, state = decode_state(model)
  prefill, chunk = _decoder(graphdef, sampling.temperature, sampling.top_p)
  key = jax.random.key(sampling.seed)
  key, sub = jax.random.split(key)
  token, cache = prefill(state, jnp.asarray(ids), jnp.asarray(mask), cache, sub)
  new_tokens = min(sampling.max_new_tokens, context - prompt_len)
  later = run_chunks(chunk, state, token, cache, key, -(-(new_tokens - 1) // CHUNK))
  pending = np.asarray(token)[:, None]  # [B, n]: computed, not yet yielded
  done = np.zeros((b,), bool)
  for _ in range(new_tokens):
    if not pending.shape[1]:
      pending = next(later)
    out = np.where(done, stop_ids[0] if stop_ids else pending[:, 0], pending[:, 0])
    pending = pending[:, 1:]
    yield out
    done |= np.isin(out, stop_ids)
    if done.all():
      return


def complete(model: CausalLM, tokenizer, text_or_messages, sampling: SamplingConfig = SamplingConfig(),
             on_text: Callable[[str], None] | None = None) -> str:
  """One answer: a chat (list of {role, content}) through the chat template, or raw text.

  on_text receives the decoded text as it grows (for streaming to a terminal).
  """
  if isinstance(text_or_messages, str):
    prompt = tokenizer(text_or_messages, add_special_tokens=False)["input_ids"]
  else:
    prompt = tokenizer.apply_chat_template(text_or_messages, add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
  eos = tokenizer.eos_token_id  # may be 0, or a list (Llama 3)
  stops = tuple(int(t) for t in np.atleast_1d([] if eos is None else eos))
  tokens: list[int] = []
  printed = ""
  for out in generate(model, [prompt], sampling, stops):
    if int(out[0]) in stops:
      break
    tokens.append(int(out[0]))
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    if on_text is not None and len(text) > len(printed):
      on_text(text[len(printed):])
      printed = text
  return tokenizer.decode(tokens, skip_special_tokens=True)
