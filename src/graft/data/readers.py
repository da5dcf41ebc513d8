"""Read training data into :class:`Record` rows that remember where they came from.

Every later error (a missing field, a response that does not fit) names the record through
:attr:`Record.where`, e.g. ``"train.jsonl line 17"`` or ``"data.json[3]"``, so a user can open the
file at the right place.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["FILE_FORMATS", "DataError", "Record", "read"]

#: File formats :func:`read` understands, keyed by the name accepted as ``format``, with their suffixes.
FILE_FORMATS: dict[str, tuple[str, ...]] = {
    "jsonl": (".jsonl", ".ndjson"),
    "json": (".json",),
    "csv": (".csv",),
    "tsv": (".tsv",),
}


class DataError(ValueError):
    """Bad training data or a bad data option; the message names the file, line and field."""


@dataclass(frozen=True)
class Record:
    """One row of a data set plus its origin.

    Attributes:
        data: The row as read (column name -> value).
        source: The file name, or a short description of an in-memory source (``"<list>"``).
        line: 1-based line in ``source`` where the row starts (JSONL, CSV, TSV), else ``None``.
        index: 0-based position of the row in its source.
    """

    data: dict[str, Any]
    source: str
    line: int | None
    index: int

    @property
    def where(self) -> str:
        """Where the row came from, for error messages: ``"x.jsonl line 17"`` or ``"x.json[3]"``."""
        if self.line is not None:
            return f"{self.source} line {self.line}"
        return f"{self.source}[{self.index}]"


def read(
    source: str | os.PathLike[str] | Iterable[Mapping[str, Any]], format: str | None = None
) -> list[Record]:
    """Read a data set into records.

    Args:
        source: A path to a JSONL, JSON (a list of objects, or ``{"data": [...]}``), CSV or TSV file;
            or an in-memory data set: a ``datasets.Dataset`` or any iterable of dicts.
        format: The *file* format, one of :data:`FILE_FORMATS` (``"jsonl"``, ``"json"``, ``"csv"``,
            ``"tsv"``); by default taken from the file suffix. Ignored for in-memory sources.

    Returns:
        The rows in order, each with its origin. CSV/TSV values are strings, as in the file.

    Raises:
        DataError: An empty data set, invalid JSON (naming the file and line), a row that is not an
            object, a CSV row with the wrong number of values, an unknown format or suffix, or a
            ``datasets.DatasetDict`` (pick a split first).
        FileNotFoundError: The path does not exist.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        records = list(_read_file(path, _file_format(path, format)))
        name = str(source)
    else:
        name = _describe(source)
        records = list(_read_rows(source, name))
    if not records:
        raise DataError(f"{name}: the data set is empty (no rows)")
    return records


def _file_format(path: Path, format: str | None) -> str:
    """Return the file format named by ``format`` or implied by the suffix of ``path``."""
    if format is not None:
        if format not in FILE_FORMATS:
            raise DataError(f"unknown file format {format!r}; allowed: {', '.join(FILE_FORMATS)}")
        return format
    suffix = path.suffix.lower()
    for name, suffixes in FILE_FORMATS.items():
        if suffix in suffixes:
            return name
    known = ", ".join(s for suffixes in FILE_FORMATS.values() for s in suffixes)
    raise DataError(
        f"{path}: cannot tell the file format from the suffix {suffix!r}; use one of {known} "
        f"or pass format= ({', '.join(FILE_FORMATS)})"
    )


def _read_file(path: Path, file_format: str) -> Iterator[Record]:
    """Dispatch to the reader for ``file_format``."""
    try:
        # newline="": keep line endings as written (CSV fields may hold them); -sig: tolerate a BOM.
        with path.open(encoding="utf-8-sig", newline="") as file:
            text = file.read()
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err})") from None
    name = str(path)
    if file_format == "jsonl":
        return _read_jsonl(text, name)
    if file_format == "json":
        return _read_json(text, name)
    return _read_delimited(text, name, delimiter="\t" if file_format == "tsv" else ",")


def _read_jsonl(text: str, name: str) -> Iterator[Record]:
    """One JSON object per line; blank lines are skipped."""
    index = 0
    # Split on "\n" only: str.splitlines would also split at U+2028, which JSON allows inside strings.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{name} line {number}: invalid JSON ({err.msg} at column {err.colno})") from None
        record = Record(_as_row(row, f"{name} line {number}"), name, number, index)
        index += 1
        yield record


def _read_json(text: str, name: str) -> Iterator[Record]:
    """A JSON array of objects, or an object whose ``"data"`` key holds that array."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{name} line {err.lineno}: invalid JSON ({err.msg} at column {err.colno})") from None
    if isinstance(data, dict):
        if "data" not in data:
            keys = ", ".join(map(repr, data)) or "none"
            raise DataError(
                f'{name}: expected a list of objects or {{"data": [...]}}; got an object with keys {keys}'
            )
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{name}: expected a list of objects, got {type(data).__name__}")
    for index, row in enumerate(data):
        yield Record(_as_row(row, f"{name}[{index}]"), name, None, index)


def _read_delimited(text: str, name: str, delimiter: str) -> Iterator[Record]:
    """CSV (standard quoting) or TSV (no quoting: GLUE text has unbalanced quotes); line 1 is the header."""
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting)
    header = next(reader, None)
    if header is None:
        return
    if len(set(header)) != len(header) or any(not column for column in header):
        raise DataError(f"{name} line 1: the header needs distinct, non-empty column names; got {header}")
    index = 0
    while True:
        start = reader.line_num + 1
        values = next(reader, None)
        if values is None:
            return
        if not values or values == [""]:
            continue
        if len(values) != len(header):
            raise DataError(
                f"{name} line {start}: {len(values)} values for {len(header)} columns ({', '.join(header)})"
            )
        yield Record(dict(zip(header, values)), name, start, index)
        index += 1


def _read_rows(rows: Iterable[Mapping[str, Any]], name: str) -> Iterator[Record]:
    """Rows of an in-memory data set (a ``datasets.Dataset``, a list of dicts, ...)."""
    if isinstance(rows, Mapping):
        splits = ", ".join(map(repr, rows)) or "none"
        raise DataError(
            f"{name}: got a mapping, not a list of rows (a datasets.DatasetDict?); "
            f"pick a split, one of: {splits}"
        )
    if isinstance(rows, (bytes, bytearray)) or not isinstance(rows, Iterable):
        raise DataError(f"expected a path, a datasets.Dataset or a list of dicts; got {type(rows).__name__}")
    for index, row in enumerate(rows):
        yield Record(_as_row(row, f"{name}[{index}]"), name, None, index)


def _as_row(row: Any, where: str) -> dict[str, Any]:
    """Return ``row`` as a plain dict, or raise naming the offending row."""
    if not isinstance(row, Mapping):
        raise DataError(
            f"{where}: expected an object with named fields, got {type(row).__name__}: {row!r:.80}"
        )
    return dict(row)


def _describe(source: object) -> str:
    """A short name for an in-memory source: ``"<list>"``, ``"<Dataset>"``."""
    return f"<{type(source).__name__}>"
