"""Tokenise rendered rows and build the loss mask.

Prompt and response are tokenised *separately* and their ids concatenated, so the mask is exact
even where BPE would merge characters across the boundary (METHODS.md §13). The sequence is
``[BOS if the tokenizer adds one] + prompt + response + [EOS]``; rows rendered through a chat
template carry their own special tokens and get nothing added.

Labels follow Hugging Face's convention: unshifted (the model shifts them inside its loss), ``-100``
on tokens that are not trained. The first token's label can never be trained (nothing precedes it),
so :func:`stats` does not count it.

Too long? The prompt is cut from the left first. If the response alone does not fit, ``on_overflow``
decides: ``"error"`` (default) names the row and both lengths, ``"skip"`` drops the row, and
``"truncate"`` keeps as much of the response as fits (prompt first dropped entirely); skipped and
truncated rows are counted in a warning.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from graft.data.chat import chat_segments
from graft.data.formats import (
    CLASSIFICATION_FORMATS,
    DataOptionError,
    Rendered,
    check_fields,
    detect_format,
    label_key,
    label_map,
    render,
)
from graft.data.readers import DataError, Record, read
from graft.data.templates import Template
from graft.options import NAME

__all__ = ["IGNORE_INDEX", "OVERFLOW", "Example", "Stats", "stats", "tokenize"]

logger = logging.getLogger(__name__)

#: The label of a token that is not trained (Hugging Face's ``ignore_index``).
IGNORE_INDEX = -100
#: Allowed values of ``on_overflow``.
OVERFLOW = ("error", "skip", "truncate")


@dataclass(frozen=True)
class Example:
    """One tokenised row.

    Attributes:
        input_ids: Token ids.
        labels: Per-token labels for a language model (``-100`` = not trained), or ``None`` for
            classification.
        label: The class index for classification, else ``None``.
        source: Where the row came from (``"train.jsonl line 17"``).
    """

    input_ids: list[int]
    labels: list[int] | None = None
    label: int | None = None
    source: str = ""

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class Stats:
    """Size of a tokenised data set.

    Attributes:
        examples: Number of examples (or packed rows' examples).
        tokens: Total tokens.
        supervised_tokens: Tokens that contribute to the language-model loss (0 for classification).
        longest: Length of the longest example (or row).
    """

    examples: int
    tokens: int
    supervised_tokens: int
    longest: int


def tokenize(
    records: Sequence[Record] | Iterable[Mapping[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    format: str | None = None,
    template: str | Template | None = None,
    max_length: int = 512,
    train_on_prompt: bool = False,
    chat_template: bool = False,
    *,
    fields: Mapping[str, str] | None = None,
    label_map: Mapping[int | str, int] | None = None,
    on_overflow: str = "error",
    system: str | None = None,
) -> list[Example]:
    """Render, tokenise and mask a data set.

    Args:
        records: Rows from :func:`graft.data.read` (or anything it accepts, e.g. a list of dicts).
        tokenizer: A Hugging Face tokenizer (a fast one is fastest).
        format: A name from :data:`graft.data.FORMATS`; guessed from the first row's fields if
            ``None`` (``table`` is never guessed).
        template: A prompt template string with named fields (e.g. ``"Q: {question}\\nA:"``), or a
            :class:`Template` to override the response template too. For ``text``,
            ``classification`` and ``table`` the string is the whole (input) text.
        max_length: Longest sequence in tokens.
        train_on_prompt: Train on every token, prompt included.
        chat_template: Render ``alpaca``/``completion``/``cot`` rows through the tokenizer's chat
            template as one user and one assistant message (``chat`` rows always are).
        fields: ``{format field: column}`` for data whose columns are named differently, e.g.
            ``{"text": "sentence"}``; for ``table``, ``{"label": "income"}`` names the label column.
        label_map: For classification: ``{label: index}``. By default built from ``records`` with
            :func:`graft.data.label_map`; pass the training map when tokenising evaluation data.
        on_overflow: What to do with a row whose response alone exceeds ``max_length``: one of
            :data:`OVERFLOW`.
        system: A system message put first in every conversation rendered through the chat
            template (``chat`` rows that start with their own system message keep theirs).

    Returns:
        The examples, in order (minus skipped ones).

    Raises:
        DataError: Bad options (naming the allowed values), bad rows (naming file, line and field),
            a response longer than ``max_length`` with ``on_overflow="error"``, or no example left.
    """
    records = records if _all_records(records) else read(records)
    if on_overflow not in OVERFLOW:
        raise DataError(f"on_overflow must be one of {', '.join(OVERFLOW)}; got {on_overflow!r}")
    if not isinstance(max_length, int) or max_length < 2:
        raise DataError(f"max_length must be an integer >= 2, got {max_length!r}")
    format = format or detect_format(records[0], fields)
    fields = check_fields(format, fields)
    if isinstance(template, str):
        template = Template(prompt=template)
    if chat_template and format in ("text", *CLASSIFICATION_FORMATS):
        raise DataOptionError("{chat_template} applies to alpaca, completion and cot rows, not {format}",
                              chat_template=True, format=format)
    if system is not None and not (chat_template or format == "chat"):
        raise DataOptionError("{system} is a chat-template message; {format} rows are rendered without the chat "
                              "template (add {chat_template}, or put the text in the template)",
                              system=NAME, format=format, chat_template=True)
    if format in CLASSIFICATION_FORMATS:
        return _tokenize_classes(records, tokenizer, format, template, max_length, fields, label_map)
    if label_map is not None:
        raise DataError(
            f"label_map applies to classification formats ({', '.join(CLASSIFICATION_FORMATS)}), "
            f"not {format!r}"
        )
    chat = chat_template or format == "chat"
    rendered = [render(r, format, template, chat=chat_template, fields=fields) for r in records]
    if system is not None:
        rendered = [_with_system(item, system) for item in rendered]
    pieces = [
        _pieces(tokenizer, item, record.where) if chat else _plain_pieces(item)
        for item, record in zip(rendered, records)
    ]
    encoded = iter(_encode(tokenizer, [text for row in pieces for text, _ in row]))
    head = [] if chat else _bos(tokenizer)
    tail = [] if chat else [_eos_id(tokenizer)]
    examples, outcomes = [], dict.fromkeys(("prompt cut", "skipped", "response cut"), 0)
    for record, row in zip(records, pieces):
        body = [(next(encoded), is_response) for _, is_response in row]
        example, outcome = _example(record, head, body, tail, max_length, train_on_prompt, on_overflow)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        if example is not None:
            examples.append(example)
    return _finish(examples, outcomes, max_length, len(records))


def stats(examples: Sequence[Any]) -> Stats:
    """Count examples, tokens and trained tokens of :class:`Example` s or packed rows.

    Args:
        examples: Output of :func:`tokenize` or :func:`graft.data.pack`.

    Returns:
        The counts. A token counts as supervised when its label is not ``-100`` and it is not the
        first of its sequence (which no position predicts).
    """
    tokens = sum(len(e.input_ids) for e in examples)
    supervised = sum(_supervised(e) for e in examples)
    count = sum(len(_sequence_lengths(e)) for e in examples)
    return Stats(count, tokens, supervised, max((len(e.input_ids) for e in examples), default=0))


def _sequence_lengths(example: Any) -> list[int]:
    """The lengths of the sequences in an example (one) or a packed row (``seq_lens``)."""
    return list(getattr(example, "seq_lens", [len(example.input_ids)]))


def _supervised(example: Any) -> int:
    """Trained tokens of an example or packed row (first token of each sequence excluded)."""
    if example.labels is None:
        return 0
    starts, start = set(), 0
    for length in _sequence_lengths(example):
        starts.add(start)
        start += length
    return sum(label != IGNORE_INDEX and i not in starts for i, label in enumerate(example.labels))


def _all_records(records: Any) -> bool:
    """Whether ``records`` is a non-empty sequence of :class:`Record` (else it goes through :func:`read`)."""
    return isinstance(records, Sequence) and bool(records) and all(isinstance(r, Record) for r in records)


def _with_system(rendered: Rendered, system: str) -> Rendered:
    """The conversation with ``system`` first, unless it starts with a system message of its own."""
    messages = rendered.messages or ()
    if messages and messages[0]["role"] == "system":
        return rendered
    return dataclasses.replace(rendered, messages=({"role": "system", "content": system}, *messages))


def _plain_pieces(rendered: Rendered) -> list[tuple[str, bool]]:
    """A non-chat row as (text, is_response) pieces."""
    return [(rendered.prompt, False), (rendered.response, True)]


def _pieces(tokenizer: PreTrainedTokenizerBase, rendered: Rendered, where: str) -> list[tuple[str, bool]]:
    """A conversation as (text, is_response) pieces of its chat-template rendering."""
    return chat_segments(tokenizer, rendered.messages or (), where)


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens added (one batched call)."""
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _bos(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """``[bos_token_id]`` if the tokenizer itself prepends BOS to a text, else ``[]``."""
    bos = tokenizer.bos_token_id
    with_special = tokenizer("a")["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    added = bos is not None and with_special[:1] == [bos] and without[:1] != [bos]
    return [bos] if added else []


def _eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The EOS id that ends every response, or an error if the tokenizer has none."""
    if tokenizer.eos_token_id is None:
        raise DataError(
            f"{type(tokenizer).__name__} has no eos_token; set tokenizer.eos_token before tokenising"
        )
    return tokenizer.eos_token_id


def _example(
    record: Record,
    head: list[int],
    body: list[tuple[list[int], bool]],
    tail: list[int],
    max_length: int,
    train_on_prompt: bool,
    on_overflow: str,
) -> tuple[Example | None, str]:
    """Join ``head`` (kept, unsupervised), the (ids, is_response) pieces and ``tail`` (EOS, supervised).

    Returns:
        The example (``None`` when skipped) and what happened: ``"fits"``, ``"prompt cut"``,
        ``"response cut"`` or ``"skipped"``.
    """
    ids = [t for piece, _ in body for t in piece] + tail
    response = [r for piece, r in body for _ in piece] + [True] * len(tail)
    first = response.index(True) if True in response else len(ids)  # where the response starts
    excess = len(head) + len(ids) - max_length
    outcome = "fits" if excess <= 0 else "prompt cut" if excess <= first else "response cut"
    if outcome == "response cut":  # cutting the whole prompt is not enough
        if on_overflow == "error":
            raise DataOptionError(
                f"{record.where}: the response is {len(ids) - first} tokens and the prompt "
                f"{len(head) + first}, but {{max_length}} cannot hold the response; raise {{max_length__name}}, "
                "shorten the row, or pass {on_overflow} (or {on_overflow__truncate})",
                max_length=max_length, max_length__name=NAME, on_overflow="skip", on_overflow__truncate="truncate",
            )
        if on_overflow == "skip":
            return None, "skipped"
        ids, response = ids[first:], response[first:]
        excess = len(head) + len(ids) - max_length
        ids, response = ids[: len(ids) - excess], response[: len(response) - excess]
    elif outcome == "prompt cut":
        ids, response = ids[excess:], response[excess:]
    supervised = [True] * len(head) if train_on_prompt else [False] * len(head)
    supervised += [r or train_on_prompt for r in response]
    input_ids = head + ids
    labels = [t if s else IGNORE_INDEX for t, s in zip(input_ids, supervised)]
    return Example(input_ids=input_ids, labels=labels, source=record.where), outcome


def _finish(
    examples: list[Example], outcomes: Mapping[str, int], max_length: int, total: int
) -> list[Example]:
    """Report rows that did not fit and refuse an empty result."""
    if outcomes["prompt cut"]:
        logger.info(
            "%d of %d prompts cut on the left to fit max_length=%d", outcomes["prompt cut"], total, max_length
        )
    for outcome in ("skipped", "response cut"):
        if outcomes[outcome]:
            logger.warning(
                "%d of %d examples %s: the response alone exceeds max_length=%d",
                outcomes[outcome],
                total,
                outcome,
                max_length,
            )
    if not examples:
        raise DataError(
            f"no examples left: all {total} rows have a response longer than max_length={max_length}"
        )
    return examples


def _tokenize_classes(
    records: Sequence[Record],
    tokenizer: PreTrainedTokenizerBase,
    format: str,
    template: Template | None,
    max_length: int,
    fields: Mapping[str, str],
    labels: Mapping[int | str, int] | None,
) -> list[Example]:
    """Classification rows: the tokenizer's own special tokens, right truncation, a class index."""
    label_column = fields.get("label", "label")
    labels = dict(labels) if labels is not None else label_map(records, label_column)
    rendered = [render(r, format, template, fields=fields) for r in records]
    encoded = tokenizer([r.prompt for r in rendered], truncation=True, max_length=max_length)["input_ids"]
    examples = []
    for record, item, ids in zip(records, rendered, encoded):
        key = label_key(item.label, record.where)
        if key not in labels:
            known = ", ".join(map(repr, labels))
            raise DataError(f"{record.where}: label {item.label!r} is not in the label map ({known})")
        examples.append(Example(input_ids=ids, label=labels[key], source=record.where))
    truncated = sum(len(ids) >= max_length for ids in encoded)
    if truncated:
        logger.info(
            "%d of %d classification inputs reached max_length=%d (cut on the right)",
            truncated,
            len(records),
            max_length,
        )
    return examples
