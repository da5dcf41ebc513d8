"""Preference pairs for DPO: tokenise (prompt, chosen, rejected) rows with an exact response mask,
and collate a batch of pairs as one forward (chosen sequences first, then rejected, as TRL does).

Rows take either form:

* ``{"prompt": str, "chosen": str, "rejected": str}``: rendered like a ``completion`` row
  (``[BOS] + prompt + response + EOS``, or through the chat template with ``chat_template=True``);
  a ``template`` renders the prompt from the row's other fields.
* ``{"chosen": [messages], "rejected": [messages]}`` with an optional ``prompt`` (a string: one user
  message; or a list of messages). Without a prompt, the messages the two lists share from the start
  are the prompt; lists that repeat the given prompt before the response are read the same way.
  Rendered by the tokenizer's chat template.

Only the response is supervised: every prompt token (assistant turns inside a multi-turn prompt
included) has label ``-100``. Chosen and rejected keep the *same* prompt tokens: when a pair is too
long for ``max_length``, the prompt is cut from the left by the amount the longer side needs.

Packing: the 2 x batch sequences of a batch are packed padding-free (best-fit, attention confined per
sequence by ``position_ids``, as for SFT), and ``sequence_ids`` says which sequence each token is in,
so the per-sequence log-probabilities are sums over each sequence's own tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from graft.data.chat import chat_segments
from graft.data.formats import _messages, render
from graft.data.packing import collate, pack
from graft.data.readers import DataError, Record, read
from graft.data.templates import Template
from graft.data.tokenize import IGNORE_INDEX, Example, _bos, _encode, _eos_id

__all__ = ["PreferencePair", "collate_pairs", "is_preference_row", "tokenize_pairs"]


@dataclass(frozen=True)
class PreferencePair:
    """One tokenised preference pair.

    Attributes:
        chosen: The prompt and the preferred response (labels on the response only).
        rejected: The same prompt tokens and the dispreferred response.
        ref_logps: The reference model's summed log-probabilities of (chosen, rejected) responses, when
            precomputed (:func:`graft.train.dpo.precompute_reference`); None computes them per step.
        source: Where the row came from.
    """

    chosen: Example
    rejected: Example
    ref_logps: tuple[float, float] | None = None
    source: str = ""

    def __len__(self) -> int:
        return max(len(self.chosen), len(self.rejected))

    def with_reference(self, chosen: float, rejected: float) -> PreferencePair:
        return replace(self, ref_logps=(float(chosen), float(rejected)))


def is_preference_row(row: Mapping[str, Any]) -> bool:
    """Whether a row looks like a preference pair (has ``chosen`` and ``rejected``)."""
    return "chosen" in row and "rejected" in row


def tokenize_pairs(
    records: Sequence[Record] | Iterable[Mapping[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    template: str | None = None,
    max_length: int = 512,
    chat_template: bool = False,
) -> list[PreferencePair]:
    """Render and tokenise preference rows (see the module notes for the row forms).

    Args:
        records: Rows from :func:`graft.data.read` or dicts.
        tokenizer: A Hugging Face tokenizer.
        template: A prompt template with ``{field}`` names (string prompts only).
        max_length: Longest sequence (prompt + response) in tokens.
        chat_template: Render string rows through the tokenizer's chat template (message rows always are).

    Raises:
        DataError: A row without ``chosen`` / ``rejected``, mixed or malformed fields, or a response
            that alone does not fit ``max_length`` (naming the row and the lengths).
    """
    records = list(records) if isinstance(records, Sequence) and all(isinstance(r, Record) for r in records) \
        else read(records)
    if not records:
        raise DataError("no preference rows")
    if not isinstance(max_length, int) or max_length < 2:
        raise DataError(f"max_length must be an integer >= 2, got {max_length!r}")
    return [_pair(record, tokenizer, template, max_length, chat_template) for record in records]


def _pair(record: Record, tokenizer: PreTrainedTokenizerBase, template: str | None, max_length: int,
          chat_template: bool) -> PreferencePair:
    row, where = record.data, record.where
    if not is_preference_row(row):
        raise DataError(f"{where}: a preference row needs 'chosen' and 'rejected' fields; it has {sorted(row)}")
    chosen, rejected = row["chosen"], row["rejected"]
    if isinstance(chosen, str) and isinstance(rejected, str):
        prompt, sides = _text_pieces(record, tokenizer, template, chat_template)
    elif isinstance(chosen, list) and isinstance(rejected, list):
        if template is not None:
            raise DataError(f"{where}: a template applies to string prompts, not to message lists")
        prompt, sides = _message_pieces(record, tokenizer)
    else:
        raise DataError(f"{where}: 'chosen' and 'rejected' must both be strings or both be message lists, got "
                        f"{type(chosen).__name__} and {type(rejected).__name__}")
    return _join(prompt, sides, max_length, where)


def _text_pieces(record: Record, tokenizer: PreTrainedTokenizerBase, template: str | None,
                 chat_template: bool) -> tuple[list[int], list[list[int]]]:
    """Prompt ids (BOS included) and each side's response ids (EOS included) of a string row."""
    row = record.data
    if template is None and not isinstance(row.get("prompt"), str):
        raise DataError(f"{record.where}: a string preference row needs a 'prompt' string (or pass a template)")
    tmpl = Template(prompt=template) if template is not None else None
    if not chat_template:
        rendered = render(_side(record, row["chosen"]), "completion", tmpl)
        prompt_ids, = _encode(tokenizer, [rendered.prompt])
        responses = _encode(tokenizer, [row["chosen"], row["rejected"]])
        eos = _eos_id(tokenizer)
        return _bos(tokenizer) + prompt_ids, [ids + [eos] for ids in responses]
    sides = []
    for text in (row["chosen"], row["rejected"]):
        messages = render(_side(record, text), "completion", tmpl, chat=True).messages
        sides.append(_chat_ids(tokenizer, messages, prompt_turns=1, where=record.where))
    return _common(sides, record.where)


def _side(record: Record, response: str) -> Record:
    return replace(record, data={**record.data, "completion": response, "prompt": record.data.get("prompt", "")})


def _message_pieces(record: Record, tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[list[int]]]:
    """Prompt ids and each side's response ids of a message-list row."""
    row, where = record.data, record.where
    chosen, rejected = _messages(row["chosen"], f"{where} 'chosen'"), _messages(row["rejected"], f"{where} 'rejected'")
    prompt = row.get("prompt")
    if prompt is None:  # implicit prompt: the turns both lists open with
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        head, chosen, rejected = list(chosen[:shared]), chosen[shared:], rejected[shared:]
    elif isinstance(prompt, str):
        head = [{"role": "user", "content": prompt}]
    else:
        head = [m for m in prompt]
        if not head or not all(isinstance(m, Mapping) and isinstance(m.get("content"), str) for m in head):
            raise DataError(f"{where}: 'prompt' must be a string or a list of {{role, content}} messages")
        head = [{"role": m["role"], "content": m["content"]} for m in head]
    if not head:
        raise DataError(f"{where}: no prompt: give a 'prompt', or chosen/rejected lists that open with the same turns")
    if all(list(side[:len(head)]) == head for side in (chosen, rejected)) and min(len(chosen), len(rejected)) > len(head):
        chosen, rejected = chosen[len(head):], rejected[len(head):]  # lists that repeat the prompt (UltraFeedback)
    sides = [_chat_ids(tokenizer, head + list(side), prompt_turns=len(head), where=where) for side in (chosen, rejected)]
    return _common(sides, where)


def _chat_ids(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]], prompt_turns: int,
              where: str) -> tuple[list[int], list[bool]]:
    """A conversation's ids and a mask of supervised ids: assistant turns after the first ``prompt_turns``."""
    pieces = chat_segments(tokenizer, messages, where)
    in_prompt = sum(m["role"] == "assistant" for m in messages[:prompt_turns])
    if not any(m["role"] == "assistant" for m in messages[prompt_turns:]):
        raise DataError(f"{where}: the response has no 'assistant' message")
    ids, mask, seen = [], [], 0
    for piece, encoded in zip(pieces, _encode(tokenizer, [text for text, _ in pieces])):
        supervised = piece[1] and seen >= in_prompt
        seen += piece[1]
        ids += encoded
        mask += [supervised] * len(encoded)
    return ids, mask


def _common(sides: list[tuple[list[int], list[bool]]], where: str) -> tuple[list[int], list[list[int]]]:
    """Split two rendered conversations into their shared prompt ids and each response's ids."""
    starts = [mask.index(True) for _, mask in sides]
    prompt = sides[0][0][: starts[0]]
    if sides[1][0][: starts[1]] != prompt:
        raise DataError(f"{where}: chosen and rejected render different prompts")
    return prompt, [ids[start:] for (ids, _), start in zip(sides, starts)]


def _join(prompt: list[int], responses: list[list[int]], max_length: int, where: str) -> PreferencePair:
    """Cut the shared prompt from the left so the longer side fits, then label the responses only."""
    longest = max(len(r) for r in responses)
    if longest > max_length - 1:  # at least one prompt token must precede the response
        raise DataError(f"{where}: a response is {longest} tokens, but max_length={max_length} must hold it "
                        "after at least one prompt token; raise max_length or shorten the row")
    excess = len(prompt) + longest - max_length
    if excess > 0:
        prompt = prompt[excess:]
    chosen, rejected = (Example(input_ids=prompt + r, labels=[IGNORE_INDEX] * len(prompt) + r, source=where)
                        for r in responses)
    return PreferencePair(chosen=chosen, rejected=rejected, source=where)


def collate_pairs(pairs: Sequence[PreferencePair], pad_id: int, packed: bool = False,
                  max_length: int | None = None) -> dict[str, torch.Tensor]:
    """A batch of pairs as one forward: sequences ``0..n-1`` chosen, ``n..2n-1`` rejected.

    Returns ``input_ids``, ``labels`` and (unpacked) ``attention_mask`` or (packed) ``position_ids``,
    plus ``sequence_ids`` (which sequence each token is in; -1 on padding) and, when every pair has
    them, ``ref_logps`` of shape (2n,).
    """
    if not pairs:
        raise DataError("cannot collate an empty batch of preference pairs")
    sequences = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    if packed:
        rows = pack(sequences, max_length or max(len(s) for s in sequences))
        batch = collate(rows, pad_id, packed=True)
        ids = torch.full_like(batch["input_ids"], -1)
        for r, row in enumerate(rows):
            start = 0
            for index, length in zip(row.indices, row.seq_lens):
                ids[r, start:start + length] = index
                start += length
    else:
        batch = collate(sequences, pad_id, packed=False)
        ids = torch.arange(len(sequences))[:, None].expand_as(batch["input_ids"]).masked_fill(
            batch["attention_mask"] == 0, -1)
    batch["sequence_ids"] = ids.contiguous()
    if all(p.ref_logps is not None for p in pairs):
        batch["ref_logps"] = torch.tensor([p.ref_logps[0] for p in pairs] + [p.ref_logps[1] for p in pairs],
                                          dtype=torch.float32)
    return batch
