"""What a run reports about itself: peak memory, the metrics JSONL file, the loss-curve PNG."""

from __future__ import annotations

import ctypes
import json
import math
import resource
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "loss.png"


M_MMAP_THRESHOLD = -3  # glibc's mallopt() parameter number (malloc.h)
LARGE_BLOCK = 1 << 16  # bytes


def map_large_blocks(threshold: int = LARGE_BLOCK) -> bool:
    """glibc: give every heap block of ``threshold`` bytes or more its own memory map, for the whole process.

    By default glibc raises its mmap threshold (up to 32 MiB) each time a large block is freed, after
    which activation-sized tensors come from the heap, and freed heap memory stays in the process,
    fragmented. In CPU training that holds the peak resident memory 10-25% above the live tensors
    (SmolLM2-135M, LoRA, 1024 tokens: 2201 MiB vs 1766 MiB; docs/benchmarks.md, "Memory planning").
    With a fixed threshold, freeing a block hands its pages back at once: the same effect as
    ``MALLOC_MMAP_THRESHOLD_=65536`` in the environment. It lasts for the rest of the process.

    Returns:
        Whether it took effect (False off glibc, e.g. macOS or musl).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False


def peak_memory_mb() -> dict[str, float | None]:
    """Peak resident memory of this process in MiB: ``ru_maxrss`` and, on Linux, ``VmHWM``.

    Both are high-water marks over the whole process, so they include what ran before training.
    """
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_mb = rss / 1024 / 1024 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux
    hwm = None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024  # kB
                break
    except OSError:
        pass
    return {"peak_rss_mb": round(rss_mb, 1), "vm_hwm_mb": None if hwm is None else round(hwm, 1)}


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


class MetricsLog:
    """``out_dir/metrics.jsonl``: one JSON object per logged step, flushed as it is written."""

    def __init__(self, out_dir: Path, records: Sequence[dict[str, Any]] = ()) -> None:
        """Start the file afresh with ``records`` (a resumed run's history up to its checkpoint)."""
        self.path = Path(out_dir) / METRICS_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w") as f:
            f.writelines(json.dumps(record) + "\n" for record in records)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def plot_losses(records: Sequence[dict[str, Any]], path: Path) -> None:
    """Training loss per logged step, with eval loss as markers, saved as a PNG.

    Uses matplotlib's object API with the Agg canvas, not pyplot, so the caller's backend (a
    notebook's, say) is left alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if train or evals:
        ax.legend()
    fig.tight_layout()
    fig.savefig(str(path))
