"""Reading adapter files a client named, without letting the name reach outside the adapter roots.

A path check followed by a separate read leaves a window in which the file can be swapped for a
link elsewhere. Here each file is opened once, the object actually opened is checked (its real
path, read back from ``/proc/self/fd``; or its device and inode against the resolved path where
there is no ``/proc``), and the bytes come from that same descriptor. Links that stay inside a
root are followed; links that leave every root are refused, whichever component they sit in.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from typing_extensions import Self

__all__ = ["CONTROL", "ConfinedFile", "check_text", "inside", "read_adapter_files"]

CONTROL = re.compile(r"[\x00-\x1f\x7f]")
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
MAX_CONFIG_BYTES = 1 << 20


class PathRefused(ValueError):
    """A path that may not be read; ``status`` and ``code`` are what the client is told."""

    def __init__(self, message: str, status: int = 403, code: str = "path_not_allowed") -> None:
        super().__init__(message)
        self.status, self.code = status, code


def check_text(value: str, what: str) -> None:
    """Refuse control characters (NUL included) and lone surrogates in a name or path."""
    bad = CONTROL.search(value)
    if bad:
        raise PathRefused(f"{what} {value!r} contains the control character {bad.group()!r}", 400, "invalid_path")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise PathRefused(f"{what} contains a lone surrogate at position {err.start}; send valid UTF-8", 400,
                          "invalid_path") from None


def inside(path: str | Path, roots: Sequence[Path]) -> bool:
    path = Path(path)
    return any(path == root or root in path.parents for root in roots)


class ConfinedFile:
    """A regular file opened once and checked to lie inside ``roots`` (``None``: trusted, no check)."""

    def __init__(self, path: Path, roots: Sequence[Path] | None, shown: str) -> None:
        self.shown = shown
        try:
            # O_NONBLOCK: a FIFO planted under the name must not block the open (it is refused below).
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            raise PathRefused(f"{shown!r} is not an adapter directory (needs {CONFIG_NAME} and {WEIGHTS_NAME})",
                              404, "adapter_not_found") from None
        except OSError as err:
            raise PathRefused(f"cannot open {shown!r}: {err.strerror}", 400, "invalid_adapter") from None
        try:
            info = os.fstat(self.fd)
            if not stat.S_ISREG(info.st_mode):
                raise PathRefused(f"{shown!r} is not a regular file", 400, "invalid_adapter")
            if roots is not None and not inside(self._real_path(path, info), roots):
                raise PathRefused(f"{shown!r} leads outside the adapter roots")
            self.size = info.st_size
        except BaseException:
            os.close(self.fd)
            raise

    def _real_path(self, path: Path, info: os.stat_result) -> str:
        link = f"/proc/self/fd/{self.fd}"
        if os.path.exists(link):
            return os.readlink(link)  # what was opened, whatever the name points at by now
        real = os.path.realpath(path)
        try:
            now = os.stat(real)
        except OSError:
            return ""
        same = (now.st_dev, now.st_ino) == (info.st_dev, info.st_ino)
        return real if same else ""  # swapped between the open and the check: refused as outside

    def read(self, limit: int) -> bytes:
        if self.size > limit:
            raise PathRefused(f"{self.shown!r} has {self.size} bytes; the limit is {limit}", 400, "invalid_adapter")
        chunks, total = [], 0
        while chunk := os.read(self.fd, 1 << 20):
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise PathRefused(f"{self.shown!r} has more than {limit} bytes", 400, "invalid_adapter")
        return b"".join(chunks)

    def tensors(self, limit: int) -> dict[str, torch.Tensor]:
        """The safetensors file's tensors, read through this descriptor (memory-mapped via ``/proc`` when it exists)."""
        from safetensors import safe_open
        from safetensors.torch import load

        if self.size > limit:
            raise PathRefused(f"{self.shown!r} has {self.size} bytes; the limit is {limit}", 400, "invalid_adapter")
        try:
            link = f"/proc/self/fd/{self.fd}"
            if os.path.exists(link):  # reopening the magic link opens this very file, not whatever the name holds now
                with safe_open(link, framework="pt") as f:
                    return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
            return load(self.read(limit))
        except PathRefused:
            raise
        except Exception as err:  # noqa: BLE001 (safetensors raises several error types for damaged files)
            raise PathRefused(f"{self.shown!r} is truncated or corrupted and cannot be read as safetensors ({err})",
                              400, "invalid_adapter") from None

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_config(directory: Path, roots: Sequence[Path] | None, shown: str) -> dict[str, Any]:
    with ConfinedFile(directory / CONFIG_NAME, roots, f"{shown}/{CONFIG_NAME}") as f:
        raw = f.read(MAX_CONFIG_BYTES)
    try:
        config = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise PathRefused(f"{shown}/{CONFIG_NAME} is not valid JSON: {err}", 400, "invalid_adapter") from None
    if not isinstance(config, dict) or "peft_type" not in config:
        raise PathRefused(f"{shown}/{CONFIG_NAME} has no 'peft_type'; it is not a PEFT/graft adapter config", 400,
                          "invalid_adapter")
    return config


def read_adapter_files(directory: Path, roots: Sequence[Path] | None, shown: str,
                       max_bytes: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``adapter_config.json`` and the tensors of ``adapter_model.safetensors``, each file confined to ``roots``."""
    config = read_config(directory, roots, shown)
    with ConfinedFile(directory / WEIGHTS_NAME, roots, f"{shown}/{WEIGHTS_NAME}") as f:
        tensors = f.tensors(max_bytes)
    return config, tensors
