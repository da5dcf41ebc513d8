"""Training data: read rows, render them with templates, tokenise with an exact loss mask, pack, collate.

Example:
    >>> from graft import data
    >>> records = data.read("train.jsonl")                       # keeps file + line of every row
    >>> records = data.load("org/name", split="train", fields={"instruction": "question"})  # + parquet, hub
    >>> examples = data.tokenize(records, tokenizer, format="alpaca", max_length=512)
    >>> data.stats(examples)
    Stats(examples=..., tokens=..., supervised_tokens=..., longest=...)
    >>> rows = data.pack(examples, max_length=2048)
    >>> data.check_packing(model, use_cache=False)              # once: attention stays per example
    >>> batch = data.collate(rows[:4], tokenizer.pad_token_id, packed=True)
    >>> loss = model(**batch, use_cache=False).loss
"""

from graft.data.formats import (
    FORMATS,
    FormatSpec,
    Rendered,
    detect_format,
    label_map,
    parse_gsm8k,
    render,
    serialize_row,
)
from graft.data.packing import PackedRow, PackingNotSupported, check_packing, collate, pack
from graft.data.preference import PreferencePair, collate_pairs, is_preference_row, tokenize_pairs
from graft.data.readers import FILE_FORMATS, DataError, Record, read
from graft.data.sources import load
from graft.data.templates import ALPACA_PROMPT_INPUT, ALPACA_PROMPT_NO_INPUT, Template, fill
from graft.data.tokenize import IGNORE_INDEX, OVERFLOW, Example, Stats, stats, tokenize

__all__ = [
    "ALPACA_PROMPT_INPUT",
    "ALPACA_PROMPT_NO_INPUT",
    "FILE_FORMATS",
    "FORMATS",
    "IGNORE_INDEX",
    "OVERFLOW",
    "DataError",
    "Example",
    "FormatSpec",
    "PackedRow",
    "PackingNotSupported",
    "PreferencePair",
    "Record",
    "Rendered",
    "Stats",
    "Template",
    "check_packing",
    "collate",
    "collate_pairs",
    "detect_format",
    "fill",
    "is_preference_row",
    "label_map",
    "load",
    "pack",
    "parse_gsm8k",
    "read",
    "render",
    "serialize_row",
    "stats",
    "tokenize",
    "tokenize_pairs",
]
