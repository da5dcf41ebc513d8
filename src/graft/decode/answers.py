"""Answer extraction from generated text, and comparison with the gold answer.

Numbers (GSM8K style), in order of trust:

1. ``#### 42`` (GSM8K's own final-answer line; the last one wins),
2. an answer phrase: ``"The answer is 42"``, ``"answer: 42"``, ``"Therefore, the answer (arabic
   numerals) is 42"``, ``\\boxed{42}`` (the first number after the last such phrase),
3. otherwise the last number in the text (the conclusion of a worked solution usually comes last).

A number may carry a sign (``-5``, ``−5``), thousands separators (``1,234``), a decimal part, a
currency sign or a unit (``$1,234.50``, ``12 cm``, ``50%``); a full stop ending the sentence is not
a decimal point. Numbers are compared by value after normalisation: ``"72.0"``, ``"72"`` and
``"$72"`` are equal.

Free-text answers (exact match) are compared after SQuAD-style normalisation: lower case,
punctuation and the articles a/an/the removed, whitespace collapsed.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation

__all__ = [
    "extract_exact",
    "extract_number",
    "majority_vote",
    "normalize_number",
    "normalize_text",
]

# A signed number with optional thousands separators and decimals; the sign may sit before a "$".
_NUMBER = re.compile(
    r"(?:(?<![\w)\]])(?P<sign>[-−–])(?=\s?[$€£]?\s?\d))?\s?[$€£]?\s?"
    r"(?<![\d.])(?P<int>\d{1,3}(?:,\d{3})+|\d+)(?P<frac>\.\d+)?(?!\d)"
)
_HASHES = re.compile(r"####\s*(?P<rest>.*)")
_PHRASES = re.compile(
    r"(?:answer\s*(?:\([^)]*\)\s*)?(?:is\b|:|=|would be\b|will be\b)|\\boxed\{)",
    re.IGNORECASE,
)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.IGNORECASE)
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def extract_number(text: str, which: str = "auto") -> str | None:
    """Find the numeric answer in a model's output.

    Args:
        text: The generated text.
        which: ``"auto"`` (``####``, then an answer phrase, then the last number), ``"first"``
            (the first number: zero-shot-CoT's second stage, whose prompt ends with "the answer is")
            or ``"last"``.

    Returns:
        The normalised number (see :func:`normalize_number`), or ``None`` if the text has none.
    """
    if which not in ("auto", "first", "last"):
        raise ValueError(f"which must be 'auto', 'first' or 'last', got {which!r}")
    if which == "auto":
        hashes = list(_HASHES.finditer(text))
        if hashes:
            found = _numbers(hashes[-1].group("rest"))
            if found:
                return found[0]
        phrases = list(_PHRASES.finditer(text))
        if phrases:
            found = _numbers(text[phrases[-1].end() :])
            if found:
                return found[0]
    found = _numbers(text)
    if not found:
        return None
    return found[0] if which == "first" else found[-1]


def _numbers(text: str) -> list[str]:
    """Every number in ``text``, normalised, in order."""
    out = []
    for match in _NUMBER.finditer(text):
        sign = "-" if match.group("sign") else ""
        value = normalize_number(sign + match.group("int") + (match.group("frac") or ""))
        if value is not None:
            out.append(value)
    return out


def normalize_number(text: str) -> str | None:
    """A number's canonical spelling: ``"1,234.50"`` -> ``"1234.5"``, ``"-$5"`` -> ``"-5"``, ``"7.0"`` -> ``"7"``.

    Returns:
        The canonical string, or ``None`` when ``text`` is not a number.
    """
    cleaned = re.sub(r"[\s,$€£%]", "", text.strip().rstrip(".")).replace("−", "-").replace("–", "-")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def normalize_text(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = text.translate(_PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def extract_exact(text: str) -> str:
    """The short answer in a free-text output: what follows the last answer phrase, else the first line.

    The result is cut at the end of its line and stripped; compare it with :func:`normalize_text`.
    """
    phrases = [m for m in _PHRASES.finditer(text) if not m.group(0).startswith("\\")]
    if phrases:
        text = text[phrases[-1].end() :]
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    answer = lines[0] if lines else ""
    return answer.rstrip(".").strip()


def majority_vote(answers: Sequence[str | None]) -> str | None:
    """The most common answer, ignoring ``None``; ties go to the answer seen first (Wang et al. 2023)."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == best)
