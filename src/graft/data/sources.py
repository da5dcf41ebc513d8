"""Where training data comes from: files, parquet, ``datasets`` directories and hub data sets.

:func:`load` takes what a user passes as ``--data`` and returns :class:`~graft.data.Record` rows:

=============================================  ===============================================================
source                                         read with
=============================================  ===============================================================
``x.jsonl`` / ``x.json`` / ``x.csv`` / ``.tsv``  :func:`graft.data.read` (rows remember their file and line)
``x.parquet``                                  pyarrow (a dependency of ``datasets``)
a ``save_to_disk`` directory                   ``datasets.load_from_disk`` (a DatasetDict: ``split``)
any other directory                            ``datasets.load_dataset(dir)`` (data files, or a loading script-free
                                               data set repository checked out locally)
``org/name`` or ``name`` (no such path)        ``datasets.load_dataset(name, config, split=...)``: the hub, or
                                               offline (``HF_HUB_OFFLINE``) datasets' cache, then the files in
                                               the Hugging Face hub cache (``huggingface-cli download``)
=============================================  ===============================================================

Conversations are then brought to graft's chat format (``messages``: ``[{role, content}]``, see
:mod:`graft.data.conversations`): ShareGPT rows (``conversations``: ``[{from, value}]``) are converted
and OpenAI-style content parts are joined. Finally a ``{format field: column}`` mapping is checked
against the columns that exist, so ``--field instruction=question`` with no ``question`` column fails
at once, naming the columns the data has.

``datasets`` is imported only for the sources that need it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from graft.data.conversations import normalize_conversations
from graft.data.readers import FILE_FORMATS, DataError, Record, read

__all__ = ["check_columns", "load", "parse_fields"]

PARQUET_SUFFIXES = (".parquet", ".pq")
# Files ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` write at the top of their directory.
_SAVED_DATASET = "state.json"
_SAVED_DATASET_DICT = "dataset_dict.json"


def load(
    source: str | os.PathLike[str],
    *,
    split: str | None = None,
    config: str | None = None,
    revision: str | None = None,
    fields: Mapping[str, str] | None = None,
    prefer: tuple[str, ...] = ("train",),
) -> list[Record]:
    """Read a data set from a file, a directory or the hub into records, conversations normalised.

    Args:
        source: A data file (jsonl, json, csv, tsv, parquet), a ``save_to_disk`` or data-file directory,
            or a ``datasets`` hub name (``"org/name"``) when no such path exists.
        split: The split to read from a DatasetDict or a hub data set; by default the first of ``prefer``
            that exists, or the only split.
        config: A hub data set's configuration (subset) name, e.g. ``"main"`` for gsm8k.
        revision: A hub data set's branch, tag or commit.
        fields: ``{format field: column}``; every column named must exist in the data.
        prefer: Split names to pick, in order, when ``split`` is not given (evaluation data:
            ``("validation", "test")``).

    Returns:
        The rows, in order.

    Raises:
        DataError: An empty or unreadable data set, a missing split (naming the splits there are),
            a mapped column that does not exist (naming the columns there are), or a hub data set that
            cannot be loaded (saying what to do).
        FileNotFoundError: A path that looks like a path and does not exist.
    """
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_dir():
        _no_hub_options(text, config=config, revision=revision)
        records = _from_dataset(_load_directory(path, split), text, split, prefer)
    elif path.is_file():
        _no_hub_options(text, split=split, config=config, revision=revision)
        records = _read_parquet(path) if path.suffix.lower() in PARQUET_SUFFIXES else read(path)
    elif _hub_name(text):
        records = _from_dataset(_load_hub(text, split, config, revision), text, split, prefer)
    else:
        raise FileNotFoundError(f"data file {text!r} does not exist (No such file or directory)")
    records = normalize_conversations(records, column=(fields or {}).get("messages"))
    check_columns(records, fields)
    return records


def check_columns(records: list[Record], fields: Mapping[str, str] | None) -> None:
    """Raise if a mapped column is absent from the data, naming the columns that exist.

    Args:
        records: The rows; the columns are those of the first row (every reader yields uniform rows,
            except JSON lines, where a later row missing a column fails with its line when rendered).
        fields: ``{format field: column}``.
    """
    if not fields or not records:
        return
    have = list(records[0].data)
    missing = {name: column for name, column in fields.items() if column not in records[0].data}
    if missing:
        asked = ", ".join(f"{name}={column}" for name, column in missing.items())
        raise DataError(f"{records[0].where}: the field mapping {asked} names "
                        f"{'a column' if len(missing) == 1 else 'columns'} the data does not have; "
                        f"its columns are: {', '.join(have) or 'none'}")


def parse_fields(items: list[str] | Mapping[str, Any] | None, flag: str = "--field") -> dict[str, str]:
    """``["instruction=question", ...]`` (CLI) or ``{instruction: question}`` (YAML) -> a checked dict."""
    if items is None:
        return {}
    if isinstance(items, Mapping):
        pairs = list(items.items())
    else:
        pairs = []
        for item in items:
            name, sep, column = str(item).partition("=")
            if not sep or not name.strip() or not column.strip():
                raise DataError(f"{flag} {item!r} must look like FORMAT_FIELD=COLUMN, e.g. instruction=question")
            pairs.append((name.strip(), column.strip()))
    out: dict[str, str] = {}
    for name, column in pairs:
        if not isinstance(name, str) or not isinstance(column, str) or not column:
            raise DataError(f"fields: {name!r}: {column!r} must map a format field to a column name (text)")
        if name in out and out[name] != column:
            raise DataError(f"fields: {name!r} is mapped twice ({out[name]!r} and {column!r})")
        out[name] = column
    return out


def _no_hub_options(text: str, **options: str | None) -> None:
    """``split`` / ``config`` / ``revision`` given for a source that has none is a mistake: say so."""
    given = [name for name, value in options.items() if value is not None]
    if given:
        where = "data set directories and hub data sets" if given == ["split"] else "hub data sets"
        raise DataError(f"{text}: {' and '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to {where}, "
                        f"not to {'a single file' if Path(text).expanduser().is_file() else 'a directory'}")


def _hub_name(text: str) -> bool:
    """Whether a missing path is spelled like a hub data set (``org/name`` or ``name``, no file suffix)."""
    from graft import hub

    suffixes = {s for group in FILE_FORMATS.values() for s in group} | set(PARQUET_SUFFIXES)
    return (hub.is_repo_id(text) and not text.startswith((".", "~"))
            and Path(text).suffix.lower() not in suffixes)


def _datasets():
    try:
        import datasets
    except ImportError:
        raise DataError("reading data set directories and hub data sets needs the `datasets` package: "
                        "pip install datasets") from None
    return datasets


def _load_directory(path: Path, split: str | None) -> Any:
    """A ``save_to_disk`` directory (Dataset or DatasetDict), else a directory of data files."""
    datasets = _datasets()
    if (path / _SAVED_DATASET).is_file() or (path / _SAVED_DATASET_DICT).is_file():
        return datasets.load_from_disk(str(path))
    try:
        return datasets.load_dataset(str(path), split=split)
    except (FileNotFoundError, ValueError) as err:
        raise DataError(f"{path}: not a data set directory that datasets can read ({err})") from None


def _load_hub(name: str, split: str | None, config: str | None, revision: str | None) -> Any:
    """``datasets.load_dataset`` on a hub name, or offline on its files in the Hugging Face hub cache.

    Offline, ``datasets`` finds only data sets it built before; files fetched with ``huggingface-cli download
    NAME --repo-type dataset`` sit in the hub cache instead, so they are loaded from their snapshot directory.
    """
    from graft import hub

    datasets = _datasets()
    try:
        return datasets.load_dataset(name, config, split=split, revision=revision)
    except ValueError as err:  # a wrong config / split name: datasets lists the ones there are
        raise DataError(f"data set {name!r}: {err}") from None
    except (FileNotFoundError, ConnectionError, OSError) as err:
        if not hub.offline():
            raise DataError(f"data set {name!r} could not be loaded from the cache or the hub ({err}). A local "
                            "file must exist; a hub data set is written org/name.") from None
        first = err
    try:
        snapshot = hub.snapshot(name, revision, repo_type="dataset")
    except hub.HubError:
        raise DataError(f"{hub.not_cached_message(name, '', 'dataset')} (datasets said: {first})") from None
    try:
        return datasets.load_dataset(str(snapshot), config, split=split)
    except ValueError as err:
        raise DataError(f"data set {name!r} (cached at {snapshot}): {err}") from None


def _from_dataset(data: Any, name: str, split: str | None, prefer: tuple[str, ...]) -> list[Record]:
    """Rows of a ``datasets.Dataset``, or of one split of a ``DatasetDict``."""
    if isinstance(data, Mapping):  # a DatasetDict
        splits = list(data)
        chosen = split or next((s for s in prefer if s in data), splits[0] if len(splits) == 1 else None)
        if chosen not in data:
            raise DataError(f"{name}: {'no split ' + repr(split) if split else 'several splits'}; pick one with "
                            f"--data-split (data_split:): {', '.join(splits)}")
        data, name = data[chosen], f"{name}[{chosen}]"
    elif split is not None and getattr(data, "split", None) is not None and str(data.split) != split:
        raise DataError(f"{name} holds one split ({data.split}); --data-split {split} does not apply")
    records = [Record(dict(row), name, None, index) for index, row in enumerate(data)]
    if not records:
        raise DataError(f"{name}: the data set is empty (no rows)")
    return records


def _read_parquet(path: Path) -> list[Record]:
    """Every row of a parquet file, as Python values."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading parquet needs pyarrow (installed with datasets): pip install pyarrow") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as err:  # noqa: BLE001 (pyarrow raises its own error types for a corrupt file)
        raise DataError(f"{path}: not a readable parquet file ({err})") from None
    if not rows:
        raise DataError(f"{path}: the data set is empty (no rows)")
    return [Record(row, str(path), None, index) for index, row in enumerate(rows)]
