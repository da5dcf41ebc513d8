"""Data formats: which fields a row needs, how a format is guessed, and how a row becomes text.

A row is *rendered* into a :class:`Rendered`: a prompt (never supervised) and a response
(supervised), or a chat conversation, or an input text plus a class label. Tokenisation
(:mod:`graft.data.tokenize`) then turns that into ids and a loss mask.

Formats (``fields`` may map a format field to a differently named column, e.g.
``{"text": "sentence"}`` for GLUE's SST-2):

========================  =====================================  =========================================
format                    fields                                 rendered as (defaults)
========================  =====================================  =========================================
``alpaca``                instruction, output, optional input    Stanford Alpaca preamble -> ``{output}``
``chat``                  messages: [{role, content}, ...]       tokenizer chat template; assistant turns
``completion``            prompt, completion                     ``{prompt}`` -> ``{completion}``
``text``                  text                                   everything supervised
``classification``        text, label (str or int)               ``{text}`` and a class index
``cot``                   question, answer, optional rationale   ``Q: {question}\\nA:`` ->
                                                                 `` {rationale}\\nThe answer is {answer}.``
``table``                 any columns, label                     "The age is 42. The job is nurse." + class
========================  =====================================  =========================================

The ``cot`` response starts with a space: the prompt ends at ``"A:"`` and the space belongs to the
response (lm-eval-harness's ``target_delimiter``), so the rationale's first word keeps its usual
leading-space token when prompt and response are tokenised separately. Without a ``rationale``
field, ``answer`` is read in GSM8K's form ``"worked steps\\n#### 42"`` (see :func:`parse_gsm8k`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from graft.data.readers import DataError, Record
from graft.data.templates import ALPACA_PROMPT_INPUT, ALPACA_PROMPT_NO_INPUT, Template, fill
from graft.options import NAME, OptionError

__all__ = [
    "FORMATS",
    "FormatSpec",
    "Rendered",
    "detect_format",
    "label_key",
    "label_map",
    "parse_gsm8k",
    "render",
    "serialize_row",
]


class DataOptionError(DataError, OptionError):
    """Bad data whose remedy is an option: its message names the option as the caller gives it."""


@dataclass(frozen=True)
class FormatSpec:
    """The fields a format reads.

    Attributes:
        name: The format's name.
        required: Fields every row must have (non-null).
        optional: Fields a row may have.
        description: One line for error messages and ``--help``.
    """

    name: str
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()
    description: str = ""


#: Every format by name.
FORMATS: dict[str, FormatSpec] = {
    spec.name: spec
    for spec in (
        FormatSpec("alpaca", ("instruction", "output"), ("input",), "instruction / input / output"),
        FormatSpec("chat", ("messages",), (), "messages: list of {role, content}"),
        FormatSpec("completion", ("prompt", "completion"), (), "prompt / completion"),
        FormatSpec("text", ("text",), (), "text (plain language modelling)"),
        FormatSpec("classification", ("text", "label"), (), "text / label"),
        FormatSpec("cot", ("question", "answer"), ("rationale",), "question / rationale / answer, or GSM8K"),
        FormatSpec("table", ("label",), (), "table columns + a label column (format='table' only)"),
    )
}

CLASSIFICATION_FORMATS = ("classification", "table")

# Guessing order: the first rule whose fields a row has wins. "table" is never guessed.
_DETECT: tuple[tuple[str, frozenset[str]], ...] = (
    ("chat", frozenset({"messages"})),
    ("alpaca", frozenset({"instruction", "output"})),
    ("completion", frozenset({"prompt", "completion"})),
    ("cot", frozenset({"question", "answer"})),
    ("classification", frozenset({"text", "label"})),
    ("text", frozenset({"text"})),
)

# (prompt, response) defaults. alpaca's prompt depends on the row (Stanford's rule), so it is None.
_DEFAULTS: dict[str, tuple[str | None, str]] = {
    "alpaca": (None, "{output}"),
    "completion": ("{prompt}", "{completion}"),
    "cot": ("Q: {question}\nA:", " {rationale}\nThe answer is {answer}."),
}
# (user message, assistant message) defaults when a format is rendered through a chat template.
_CHAT_DEFAULTS: dict[str, tuple[str | None, str]] = {
    "alpaca": (None, "{output}"),
    "completion": ("{prompt}", "{completion}"),
    "cot": ("{question}", "{rationale}\nThe answer is {answer}."),
}

_GSM8K_NUMBER = re.compile(r"-?\d{1,3}(,\d{3})+(\.\d+)?")


@dataclass(frozen=True)
class Rendered:
    """A row rendered as text, before tokenisation.

    Attributes:
        prompt: Unsupervised text (for classification: the input text).
        response: Supervised text, without EOS.
        messages: A conversation to render with a chat template, or ``None``.
        label: The class label as read (classification formats only).
    """

    prompt: str = ""
    response: str = ""
    messages: tuple[dict[str, str], ...] | None = None
    label: Any = None


def spec_for(format: str) -> FormatSpec:
    """Return the spec of a format name, or raise listing the allowed names."""
    if format not in FORMATS:
        allowed = "; ".join(f"{s.name} ({s.description})" for s in FORMATS.values())
        raise DataError(f"unknown data format {format!r}; allowed: {allowed}")
    return FORMATS[format]


def check_fields(format: str, fields: Mapping[str, str] | None) -> dict[str, str]:
    """Validate a ``{format field: column}`` mapping against a format and return it as a dict."""
    fields = dict(fields or {})
    spec = spec_for(format)
    known = spec.required + spec.optional
    for name, column in fields.items():
        if name not in known:
            raise DataError(
                f"fields maps {name!r}, which format {format!r} does not read; it reads: {', '.join(known)}"
            )
        if not isinstance(column, str):
            raise DataError(f"fields[{name!r}] must be a column name (str), got {column!r}")
    return fields


def detect_format(record: Record, fields: Mapping[str, str] | None = None) -> str:
    """Guess a row's format from its fields.

    Args:
        record: A row (usually the first of a data set).
        fields: Optional ``{format field: column}`` renames, as for :func:`render`.

    Returns:
        A name from :data:`FORMATS` (never ``"table"``, which must be asked for).

    Raises:
        DataError: No format matches; the message lists the row's fields and every format's fields.
    """
    have = set(record.data) | {name for name, column in (fields or {}).items() if column in record.data}
    for name, needed in _DETECT:
        if needed <= have:
            return name
    allowed = "; ".join(f"{s.name} ({s.description})" for s in FORMATS.values())
    raise DataOptionError(
        f"{record.where}: cannot tell the data format from the fields {', '.join(sorted(have)) or 'none'}; "
        f"pass {{format}} (one of: {allowed}) and, for other column names, {{fields}}",
        format=NAME, fields=NAME,
    )


def render(
    record: Record,
    format: str,
    template: Template | None = None,
    *,
    chat: bool = False,
    fields: Mapping[str, str] | None = None,
) -> Rendered:
    """Render one row of a given format as text.

    Args:
        record: The row.
        format: A name from :data:`FORMATS`.
        template: Overrides of the format's prompt / response templates. Their fields may name any
            column of the row and the derived fields (``cot``: ``rationale``, ``answer``; ``table``:
            ``text``, the serialised row).
        chat: Render ``alpaca``/``completion``/``cot`` as a user/assistant conversation (the user
            message is the instruction (plus ``"\\n\\n" + input``), the prompt or the question; the
            assistant message the response, without the cot leading space).
        fields: ``{format field: column}`` renames.

    Returns:
        The rendered row.

    Raises:
        DataError: A missing or null field (naming the row, the field and the fields the row has),
            a template field the row lacks, or an option the format does not support.
    """
    template = template or Template()
    values = _values(record, spec_for(format), fields or {})
    if format == "chat":
        if template != Template():
            raise DataError(
                "format 'chat' is rendered by the tokenizer's chat template; template= does not apply"
            )
        return Rendered(messages=_messages(values["messages"], record.where))
    if format in CLASSIFICATION_FORMATS:
        if template.response is not None or chat:
            raise DataOptionError(
                "{format} has no response: a {template} shapes its input text, and it takes no chat template",
                format=format, template=NAME,
            )
        return Rendered(
            prompt=fill(_first(template.prompt, "{text}"), values, record.where), label=values["label"]
        )
    if format == "text":
        if chat or template.response is not None:
            raise DataError(
                "format 'text' is one supervised text: use template=str, no response template, chat=False"
            )
        return Rendered(response=fill(_first(template.prompt, "{text}"), values, record.where))
    defaults = (_CHAT_DEFAULTS if chat else _DEFAULTS)[format]
    prompt = _first(template.prompt, defaults[0])
    if prompt is None:
        prompt = _alpaca_prompt(values, chat)
    response = _first(template.response, defaults[1])
    rendered = Rendered(
        prompt=fill(prompt, values, record.where), response=fill(response, values, record.where)
    )
    if chat:
        user = {"role": "user", "content": rendered.prompt}
        return Rendered(messages=(user, {"role": "assistant", "content": rendered.response}))
    return rendered


def _first(given: str | None, default: str | None) -> str | None:
    """A user template if given (even ``""``), else the default."""
    return default if given is None else given


def _values(record: Record, spec: FormatSpec, fields: Mapping[str, str]) -> dict[str, Any]:
    """The row's fields under the format's names, checked, plus the format's derived fields."""
    values = dict(record.data)
    for name, column in fields.items():
        if column in record.data:
            values[name] = record.data[column]
    for name in spec.required:
        if values.get(name) is None:
            _missing(record, spec, name, fields)
    if spec.name == "alpaca":
        values["input"] = values.get("input") or ""
    elif spec.name == "cot":
        values.update(_cot_fields(values, record.where))
    elif spec.name == "table":
        label_column = fields.get("label", "label")
        values["text"] = serialize_row({k: v for k, v in record.data.items() if k != label_column})
    return values


def _missing(record: Record, spec: FormatSpec, name: str, fields: Mapping[str, str]) -> None:
    """Raise the error for a missing (or null) required field."""
    column = fields.get(name, name)
    what = f"field {column!r}" + (f" (format field {name!r})" if column != name else "")
    problem = "is null" if column in record.data else "is missing"
    needs = ", ".join(spec.required) + (f"; optional {', '.join(spec.optional)}" if spec.optional else "")
    have = ", ".join(record.data) or "none"
    raise DataError(
        f"{record.where}: {what} {problem} (format {spec.name!r} needs {needs}); this row has fields: {have}"
    )


def _alpaca_prompt(values: Mapping[str, Any], chat: bool) -> str:
    """Stanford's rule: the input preamble iff ``input != ""``; in chat, the instruction (+ input)."""
    if chat:
        return "{instruction}\n\n{input}" if values["input"] != "" else "{instruction}"
    return ALPACA_PROMPT_INPUT if values["input"] != "" else ALPACA_PROMPT_NO_INPUT


def _cot_fields(values: Mapping[str, Any], where: str) -> dict[str, str]:
    """``rationale`` and ``answer`` of a cot row: given directly, or parsed from a GSM8K answer."""
    if values.get("rationale") is not None:
        return {"rationale": str(values["rationale"]), "answer": str(values["answer"])}
    rationale, answer = parse_gsm8k(str(values["answer"]), where)
    return {"rationale": rationale, "answer": answer}


def parse_gsm8k(answer: str, where: str = "answer") -> tuple[str, str]:
    """Split a GSM8K answer into its worked steps and its final answer.

    The final answer is the text after ``####``; a number written with thousands separators
    (``"1,234"``) is normalised to ``"1234"``, the form GSM8K scoring compares. The steps are kept
    verbatim, calculator annotations (``<<48/2=24>>``) included.

    Args:
        answer: GSM8K's ``answer`` field, ``"steps...\\n#### 42"``.
        where: The row's origin, for the error message.

    Returns:
        ``(rationale, final_answer)``, both stripped of surrounding whitespace.

    Raises:
        DataError: ``answer`` has no ``####`` line.
    """
    steps, marker, final = answer.rpartition("####")
    if not marker:
        raise DataError(
            f"{where}: cot needs a 'rationale' field or an 'answer' in GSM8K form "
            f"('worked steps\\n#### 42'); this 'answer' has no '####': {answer!r:.80}"
        )
    final = final.strip()
    if _GSM8K_NUMBER.fullmatch(final):
        final = final.replace(",", "")
    return steps.strip(), final


def serialize_row(row: Mapping[str, Any]) -> str:
    """Serialise a table row as sentences, TabLLM's "text" template (Hegselmann et al. 2023).

    Each column becomes ``"The {column} is {value}."`` (underscores in the column name read as
    spaces); empty or missing values are left out.

    Args:
        row: Column name -> value (the label column already removed).

    Returns:
        E.g. ``"The age is 42. The job is nurse."``.
    """
    parts = []
    for column, value in row.items():
        text = "" if value is None else str(value).strip()
        if text:
            parts.append(f"The {column.replace('_', ' ').strip()} is {text}.")
    return " ".join(parts)


def _messages(messages: Any, where: str) -> tuple[dict[str, str], ...]:
    """Check a chat row's ``messages``: a non-empty list of {role, content} with an assistant turn."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    checked = []
    for i, message in enumerate(messages):
        if not (
            isinstance(message, Mapping)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise DataError(
                f"{where}: messages[{i}] must be {{'role': str, 'content': str}}, got {message!r:.80}"
            )
        checked.append({"role": message["role"], "content": message["content"]})
    if not any(m["role"] == "assistant" for m in checked):
        roles = ", ".join(m["role"] for m in checked)
        raise DataError(f"{where}: no 'assistant' message to train on (roles: {roles})")
    return tuple(checked)


def label_key(value: Any, where: str) -> int | str:
    """Normalise a class label: integers and integer strings (``"1"``, as CSV gives) become ``int``.

    Raises:
        DataError: A label that is neither a string nor an integer (e.g. a bool or 0.5).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise DataError(f"{where}: a label must be a string or an integer, got {value!r}")
    if isinstance(value, float):
        if not value.is_integer():
            raise DataError(f"{where}: a label must be a string or an integer, got {value!r}")
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    return value


def label_map(records: Sequence[Record], field: str = "label") -> dict[int | str, int]:
    """Build the label -> class index map of a classification data set.

    Labels are normalised by :func:`label_key` and sorted (numerically when they are integers), so
    the map depends only on the set of labels, not on their order. Build it from the training
    data and pass the same map when tokenising evaluation data.

    Args:
        records: The rows.
        field: The label column.

    Returns:
        ``{label: index}`` with indices ``0..n-1``.

    Raises:
        DataError: A row without the label column, an invalid label, or labels mixing integers and
            strings (which would have no meaningful order).
    """
    seen: dict[int | str, str] = {}
    for record in records:
        if record.data.get(field) is None:
            have = ", ".join(record.data) or "none"
            raise DataError(
                f"{record.where}: label field {field!r} is missing or null; this row has fields: {have}"
            )
        seen.setdefault(label_key(record.data[field], record.where), record.where)
    kinds = {type(key) for key in seen}
    if len(kinds) > 1:
        number = next(k for k in seen if isinstance(k, int))
        word = next(k for k in seen if isinstance(k, str))
        raise DataError(
            f"labels mix integers and strings: {number!r} ({seen[number]}) and {word!r} ({seen[word]}); "
            "use one kind"
        )
    return {key: index for index, key in enumerate(sorted(seen))}
