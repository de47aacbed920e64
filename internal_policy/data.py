"""Records → token ids and the positions to measure (the paper's token-position convention).

A record (see `inputs.py` for the file formats) is one of:
- `{"text": ...}`: every position is kept;
- `{"prompt": ..., "response": ...}`: the prompt is tokenised with special tokens, the response
  without, the two are concatenated, and the kept positions are those whose *next* token is a
  response token (the positions at which the model produces the response);
- `{"messages": [...]}` whose last message is the assistant's: the earlier messages are the prompt,
  the assistant content is the response; a `prompt` may also be a list of chat messages;
- `{"prompt_ids": [...], "response_ids": [...]}`: token ids as `generate` saves them, used as is.

Chat prompts go through the tokenizer's chat template with the generation prompt (Qwen3's
`enable_thinking` and other template options via `chat`), so every template token, including an
empty `<think></think>` block, belongs to the prompt. The response is the assistant content alone:
the template's end-of-turn token (`<|im_end|>`, `<|eot_id|>`) is not a response token, as special
tokens never are under this convention. Kept positions are one contiguous span `[start, stop)`.
An optional `"id"` names the record; otherwise its 0-based index in the input does.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .errors import InputError

Prompt = str | Sequence[Mapping[str, str]]
"""A prompt: plain text, or chat messages `[{"role": ..., "content": ...}, ...]`."""


@dataclass(frozen=True)
class Example:
    """One tokenised record: ids, and the kept span of positions [start, stop)."""

    record_id: str
    input_ids: tuple[int, ...]
    start: int
    stop: int
    truncated: int = 0  # tokens cut from the end to fit the model's context

    def next_tokens(self, positions: np.ndarray) -> np.ndarray:
        """The token after each of `positions`, −1 where the record ends there (the targets of nll and rank)."""
        ids = np.asarray(self.input_ids + (-1,), dtype=np.int64)
        return ids[positions + 1]


def _messages(value, where: str) -> list[dict]:
    if not isinstance(value, Sequence) or isinstance(value, str) or not value:
        raise InputError(f"{where}: chat messages must be a non-empty list of {{'role', 'content'}} objects")
    for message in value:
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise InputError(f"{where}: every chat message needs a string 'role' and a string 'content', "
                             f"got {message!r}")
    return [dict(m) for m in value]


def render_prompt(prompt: Prompt, tokenizer, chat: Mapping | None = None) -> tuple[str, bool]:
    """A prompt as the text the model continues, and whether tokenising it adds special tokens.

    Chat messages go through the tokenizer's chat template with the generation prompt (`chat` holds
    template options such as `{"enable_thinking": False}`); the template writes its own special
    tokens. A tokenizer without a template (base models such as stories260K) joins the message
    contents by blank lines and tokenises that like plain text.
    """
    if isinstance(prompt, str):
        return prompt, True
    messages = _messages(prompt, "prompt")
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **(chat or {}))
        return text, False
    return "\n\n".join(m["content"] for m in messages) + "\n\n", True


def prompt_ids(prompt: Prompt, tokenizer, chat: Mapping | None = None) -> list[int]:
    """Token ids of a prompt (see `render_prompt`)."""
    text, special = render_prompt(prompt, tokenizer, chat)
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def record_id(record: Mapping, index: int) -> str:
    """A record's id: its `id` field, else its 0-based index in the input."""
    return str(record.get("id", index))


CONTENT_FIELDS = frozenset({"id", "text", "prompt", "response", "messages", "prompt_ids", "response_ids"})
"""Fields that hold a record's content or id, not a property of it (see `record_fields`)."""


def record_fields(record: Mapping) -> dict:
    """A record's scalar properties (e.g. `correct`, `answer`, `level`): its str / int / float / bool fields
    besides its content and id (`CONTENT_FIELDS`) and the reader's own `_line`."""
    return {k: v for k, v in record.items() if isinstance(v, (str, int, float, bool)) and k not in CONTENT_FIELDS
            and not k.startswith("_")}


def _where(record: Mapping, index: int) -> str:
    line = record.get("_line")
    return f"record {record_id(record, index)}" + (f" (line {line})" if line else "")


def split_record(record: Mapping, index: int = 0) -> tuple[Prompt | None, str | None]:
    """(prompt, response) of a prompt-style record; response is None when the record only holds a prompt."""
    where = _where(record, index)
    if record.get("messages") is not None:
        messages = _messages(record["messages"], where)
        if messages[-1]["role"] == "assistant":
            if len(messages) == 1:
                raise InputError(f"{where}: 'messages' holds only the assistant's reply; add the user's message")
            return messages[:-1], messages[-1]["content"]
        return messages, None
    prompt, response = record.get("prompt"), record.get("response")
    if prompt is None:
        raise InputError(f"{where}: expected a 'text', 'prompt' (+ 'response'), 'messages' or 'prompt_ids' field, "
                         f"got {sorted(k for k in record if k != '_line')}")
    if not isinstance(prompt, str):
        prompt = _messages(prompt, where)
    if response is not None and not isinstance(response, str):
        raise InputError(f"{where}: 'response' must be a string, got {type(response).__name__}")
    return prompt, response


def prompt_of(record: Mapping, index: int = 0) -> Prompt:
    """The prompt of a record that must have one (to sample from, or as a prompt set's entry)."""
    if record.get("prompt") is None and record.get("messages") is None:
        raise InputError(f"{_where(record, index)}: needs a prompt ('prompt' or 'messages') to sample from, "
                         f"got fields {sorted(k for k in record if k != '_line')}")
    return split_record(record, index)[0]


def _ids(value, name: str, where: str) -> list[int]:
    if not isinstance(value, Sequence) or not all(isinstance(i, int) and i >= 0 for i in value):
        raise InputError(f"{where}: '{name}' must be a list of non-negative token ids")
    return list(value)


def tokenize_record(
    record: Mapping, tokenizer, index: int, max_length: int | None = None, truncate: bool = False,
    chat: Mapping | None = None,
) -> Example:
    """Tokenise one record into an `Example` (see module docstring for the kept positions)."""
    where = _where(record, index)
    if record.get("text") is not None:
        text = record["text"]
        if not isinstance(text, str):
            raise InputError(f"{where}: 'text' must be a string, got {type(text).__name__} {text!r:.40}")
        if not text.strip():
            raise InputError(f"{where}: 'text' is empty; remove the record or give it text")
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        start, stop = 0, len(ids)
    else:
        if record.get("prompt_ids") is not None:
            head = _ids(record["prompt_ids"], "prompt_ids", where)
            tail = _ids(record.get("response_ids") or [], "response_ids", where)
        else:
            prompt, response = split_record(record, index)
            if response is None:
                raise InputError(f"{where}: has a prompt but no response; pass --generate to sample responses "
                                 "from the model, or give each record a 'response'")
            head = prompt_ids(prompt, tokenizer, chat)
            tail = tokenizer(response, add_special_tokens=False)["input_ids"]
        if not tail:
            raise InputError(f"{where}: the response is empty; remove the record or give it a response")
        ids = head + tail
        start, stop = max(len(head) - 1, 0), len(ids) - 1
        if stop <= start:
            raise InputError(f"{where}: no position predicts a response token (empty prompt and one-token response)")
    cut = 0
    if max_length is not None and len(ids) > max_length:
        if not truncate:
            raise InputError(f"{where} has {len(ids)} tokens, longer than the model's context of {max_length}; "
                             "shorten it or pass --truncate to cut the end")
        cut = len(ids) - max_length
        ids = ids[:max_length]
        stop = min(stop, max_length)
        if stop <= start:
            raise InputError(f"{where}: nothing left to measure after truncating to {max_length} tokens")
    return Example(record_id(record, index), tuple(int(i) for i in ids), start, stop, cut)


def tokenize_records(
    records: Sequence[Mapping], tokenizer, max_length: int | None = None, truncate: bool = False,
    chat: Mapping | None = None, vocab_size: int | None = None,
) -> list[Example]:
    """Tokenise all records; record ids must be unique (they key results and resumption).

    Generated records whose response is empty (the model stopped at once) have no position to
    measure and are skipped; any other empty response is an input error. With `vocab_size` (the
    model's embedding rows), saved token ids beyond the vocabulary are an input error too.
    """
    examples = [tokenize_record(r, tokenizer, i, max_length, truncate, chat) for i, r in enumerate(records)
                if not (r.get("prompt_ids") is not None and not r.get("response_ids"))]
    if not examples:
        raise InputError("nothing to measure: " + (f"all {len(records)} records are generated responses that are "
                         "empty (the model stopped at once); sample again with another --seed" if records else
                         "no records given"))
    seen: set[str] = set()
    for example in examples:
        if example.record_id in seen:
            raise InputError(f"record id {example.record_id!r} appears twice; ids must be unique")
        seen.add(example.record_id)
        if vocab_size is not None and max(example.input_ids) >= vocab_size:
            raise InputError(f"record {example.record_id}: token id {max(example.input_ids)} is outside the model's "
                             f"vocabulary of {vocab_size}; were these ids made with another tokenizer?")
    return examples


def pad_batch(examples: Sequence[Example], pad_id: int, device: torch.device | str = "cpu"):
    """Right-pad a batch: (input_ids [B,T], attention_mask [B,T]); right padding keeps positions exact."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        ids[row, : len(example.input_ids)] = torch.tensor(example.input_ids)
        mask[row, : len(example.input_ids)] = 1
    return ids.to(device), mask.to(device)


def batched(examples: Iterable[Example], batch_size: int) -> Iterator[list[Example]]:
    """Batches of similar length (longest first) so padding wastes little; order is deterministic."""
    ordered = sorted(examples, key=lambda e: -len(e.input_ids))
    for start in range(0, len(ordered), batch_size):
        yield ordered[start : start + batch_size]
