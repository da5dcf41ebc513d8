"""Prompt templates: the exact Stanford Alpaca preambles and user templates with named fields.

A template is an ordinary :meth:`str.format` string whose fields name columns of a row, e.g.
``"Q: {question}\\nA:"``. A field the row lacks is an error that names it; positional fields
(``"{}"``) are refused because a row has no order.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from graft.data.readers import DataError

__all__ = ["ALPACA_PROMPT_INPUT", "ALPACA_PROMPT_NO_INPUT", "Template", "fill", "template_fields"]

#: Stanford Alpaca ``PROMPT_DICT["prompt_input"]`` (tatsu-lab/stanford_alpaca@761dc5b train.py), byte-exact.
#: Note: no trailing space after "### Response:" (QLoRA's copy has one).
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)

#: Stanford Alpaca ``PROMPT_DICT["prompt_no_input"]``, byte-exact; used when ``input`` is empty.
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)


@dataclass(frozen=True)
class Template:
    """A prompt template and a response template; ``None`` means the format's default.

    Attributes:
        prompt: The unsupervised part (for ``text``: the whole text; for ``classification`` and
            ``table``: the input text), e.g. ``"Q: {question}\\nA:"``.
        response: The supervised part, e.g. ``" {answer}"``. EOS is appended by tokenisation, never
            written here.
    """

    prompt: str | None = None
    response: str | None = None

    def __post_init__(self) -> None:
        for name in ("prompt", "response"):
            value = getattr(self, name)
            if value is not None:
                if not isinstance(value, str):
                    raise TypeError(f"Template.{name} must be a string or None, got {type(value).__name__}")
                template_fields(value)  # fail on a malformed template now, not at row 1,000


def template_fields(template: str) -> list[str]:
    """Return the field names a template uses, in order.

    Args:
        template: A :meth:`str.format` template.

    Returns:
        The base names of its fields (``"{row.x}"`` counts as ``"row"``).

    Raises:
        ValueError: A malformed template, or a positional field such as ``"{}"`` or ``"{0}"``.
    """
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        raise ValueError(
            f"malformed template {template!r}: {err} (write a literal brace as {{{{ or }}}})"
        ) from None
    names = []
    for _, field, _, _ in parsed:
        if field is None:
            continue
        base = field.split(".", 1)[0].split("[", 1)[0]
        if not base or base.isdigit():
            raise ValueError(
                f"template {template!r} has a positional field {{{field}}}; name a column instead"
            )
        names.append(base)
    return names


def fill(template: str, values: Mapping[str, Any], where: str) -> str:
    """Fill a template from a row's values.

    Args:
        template: A :meth:`str.format` template with named fields.
        values: The row's fields (plus any derived fields of its format).
        where: The row's origin, for the error message.

    Returns:
        The filled string.

    Raises:
        DataError: The template names a field the row does not have.
    """
    for name in template_fields(template):
        if name not in values:
            have = ", ".join(sorted(values)) or "none"
            raise DataError(
                f"{where}: the template uses field {{{name}}}, which this row lacks; it has: {have}"
            )
    return template.format_map(values)
