"""A run's output directory: what an earlier run left there, and whether this run may write over it.

``graft train`` writes ``adapter/`` (or ``model/``), ``checkpoint-<step>/``, ``metrics.jsonl``,
``loss.png``, ``job.json`` and, with ``--report-to``, the reporters' local logs (``tensorboard/``,
``wandb/``, ``mlruns/``). A new run into a directory that holds anything is refused unless it
continues the run there (``resume``) or replaces it (``overwrite``: the earlier run's files are
removed first, and whatever else is there, such as a ``merged/`` model built from the earlier
adapter, is named, since it no longer matches the new one).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from graft.options import NAME, OptionError
from graft.train import checkpoint as ckpt
from graft.train.monitor import METRICS_NAME, PLOT_NAME
from graft.train.report import REPORT_DIRS

logger = logging.getLogger(__name__)

RUN_FILES = ("adapter", "model", "job.json", METRICS_NAME, PLOT_NAME, *REPORT_DIRS)  # besides checkpoint-<step>/


@dataclass(frozen=True)
class Contents:
    """What ``out_dir`` holds: this kind of run's own files, its checkpoints, and everything else."""

    run: list[Path]
    checkpoints: list[Path]
    other: list[Path]

    @classmethod
    def of(cls, out_dir: Path) -> Contents:
        if not out_dir.is_dir():
            return cls([], [], [])
        entries = sorted(p for p in out_dir.iterdir() if not p.name.startswith("."))
        saved = {p for _, p in ckpt.checkpoints(out_dir)}
        return cls(run=[p for p in entries if p.name in RUN_FILES],
                   checkpoints=[p for p in entries if p in saved],
                   other=[p for p in entries if p.name not in RUN_FILES and p not in saved])

    def __bool__(self) -> bool:
        return bool(self.run or self.checkpoints or self.other)


def names(paths: list[Path], n: int = 6) -> str:
    shown = [p.name + ("/" if p.is_dir() else "") for p in paths[:n]]
    return ", ".join(shown) + (f" and {len(paths) - n} more" if len(paths) > n else "")


def check(out_dir: str | Path | None, resume: bool, overwrite: bool) -> Contents:
    """Refuse a run that would silently write over or beside an earlier one; nothing is changed here.

    Raises:
        OptionError: ``resume`` with no checkpoint (the message says where it looked), ``resume`` with
            ``overwrite``, or a non-empty ``out_dir`` with neither.
    """
    if out_dir is None:
        if resume:
            raise OptionError("{resume} needs {out_dir}, where the checkpoints are", resume=True, out_dir=NAME)
        return Contents([], [], [])
    out_dir = Path(out_dir)
    found = Contents.of(out_dir)
    if resume and overwrite:
        raise OptionError("{resume} continues the run in {out_dir} and {overwrite} replaces it; give one",
                          resume=True, out_dir=str(out_dir), overwrite=True)
    if resume and ckpt.latest_checkpoint(out_dir) is None:
        there = f"it holds {names(found.run + found.other)}" if found else (
            "it is empty" if out_dir.is_dir() else "it does not exist")
        raise OptionError(f"{{resume}}: no checkpoint to continue from in {out_dir} (looked for "
                          f"checkpoint-<step>/ directories; {there}). Checkpoints are written with {{save_every}}",
                          resume=True, save_every=NAME)
    if found and not resume and not overwrite:
        what = "a finished run" if any(p.name in ("adapter", "model") for p in found.run) else (
            "an unfinished run" if found.checkpoints else "files")
        can_resume = " or {resume} to continue it" if found.checkpoints else ""
        own, other = found.run + found.checkpoints, found.other
        held = "; beside it ".join(names(group) for group in (own, other) if group)  # other files: never hidden
        raise OptionError(f"{out_dir} already holds {what} ({held}); "
                          f"give {{overwrite}} to replace it{can_resume}, or another {{out_dir}}",
                          overwrite=True, resume=True, out_dir=NAME)
    return found


def clear(found: Contents) -> None:
    """Remove an earlier run's files and checkpoints (``overwrite``); name whatever else stays."""
    for p in found.run + found.checkpoints:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    if found.run or found.checkpoints:
        logger.warning("removed the earlier run's %s", names(found.run + found.checkpoints))
    if found.other:
        logger.warning("left in %s from before (not written by this run, so they may not match it): %s",
                       found.other[0].parent, names(found.other))
