"""Conversations of the chat format: a row's messages (`messages` of {role, content}, or ShareGPT
`conversations` of {from, value}) and the text parts the tokenizer's chat template renders for
them, each marked learned (an assistant turn) or not."""

from __future__ import annotations

CHAT_COLUMNS = ("messages", "conversations")  # a chat row holds one of these
CHAT_TURNS = ("all", "last")  # which assistant turns a chat example learns
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}


def messages(row: dict) -> list[dict]:
  """The row's messages as {role, content, ...} dicts.

  `messages` is used as it is; ShareGPT `conversations` turns are mapped from {from, value} with
  human -> user, gpt -> assistant, system -> system. Null keys (which Arrow adds when rows differ)
  are dropped."""
  raw = next((row[k] for k in CHAT_COLUMNS if row.get(k) is not None), None)
  if raw is None:
    present = sorted(k for k, v in row.items() if v is not None)
    raise ValueError(f"no {' or '.join(map(repr, CHAT_COLUMNS))} field (fields present: {present})")
  if not isinstance(raw, list) or not raw:
    raise ValueError(f"the conversation must be a non-empty list of messages, got {raw!r:.120}")
  return [_message(m) for m in raw]


def _message(m) -> dict:
  """One message as {role, content, ...}, from either the role/content or the from/value keys."""
  if not isinstance(m, dict):
    raise ValueError(f"a message must be an object like {{\"role\": ..., \"content\": ...}}, got {m!r:.120}")
  m = {k: v for k, v in m.items() if v is not None}
  if "role" in m:
    return m
  if "from" not in m:
    raise ValueError(f"a message has neither 'role' nor ShareGPT 'from' (keys: {sorted(m)})")
  role = SHAREGPT_ROLES.get(str(m["from"]).lower())
  if role is None:
    raise ValueError(f"unknown ShareGPT speaker {m['from']!r}; expected one of {sorted(SHAREGPT_ROLES)}")
  rest = {k: v for k, v in m.items() if k not in ("from", "value")}
  return {**rest, "role": role, "content": m.get("value", "")}


def assistant_turns(msgs: list[dict]) -> list[int]:
  """Indices of the assistant messages; ValueError when there is none (nothing to learn)."""
  turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
  if not turns:
    raise ValueError(f"a chat example needs an assistant message; roles: {[m['role'] for m in msgs]}")
  return turns


def chat_parts(msgs: list[dict], tokenizer, turns: str = "all") -> list[tuple[str, bool]]:
  """The conversation rendered by the chat template as consecutive (text, learned) parts.

  turns="all": every assistant turn is learned (its rendered reply, end-of-turn marker included)
  and every other message (system, user, tool) is context. turns="last": only the last assistant
  turn is learned; all before it is context. Messages after the last assistant turn are dropped:
  nothing would learn from them. Each turn is found by rendering the conversation up to it, so the
  template must render a conversation's start as a prefix of the whole; one that does not (one
  that rewrites earlier turns) is an error here, and turns="last" then still works."""
  if turns not in CHAT_TURNS:
    raise ValueError(f"chat_turns must be one of {CHAT_TURNS}, got {turns!r}")
  answers = assistant_turns(msgs)
  parts, done = [], ""
  for i in answers[-1:] if turns == "last" else answers:
    prompt = _render(tokenizer, msgs[:i], add_generation_prompt=True)
    full = _render(tokenizer, msgs[:i + 1], add_generation_prompt=False)
    if not (prompt.startswith(done) and full.startswith(prompt)):
      raise ValueError(f"the chat template does not render the conversation up to message {i + 1} as "
                       "a prefix of the rest; train on the last assistant turn only (chat_turns='last')")
    parts += [(prompt[len(done):], False), (full[len(prompt):], True)]
    done = full
  return parts


def _render(tokenizer, msgs: list[dict], add_generation_prompt: bool) -> str:
  try:
    return tokenizer.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt, tokenize=False)
  except Exception as e:  # a template's own checks (e.g. roles must alternate) raise many types
    reason = " ".join(str(e).split())
    raise ValueError(f"the tokenizer's chat template rejects this conversation ({type(e).__name__}: "
                     f"{reason}); fix the messages or use a tokenizer whose template accepts them") from None
