"""A small line plot for the benchmark tables (PNG), used by core.py and seqlen.py."""

from __future__ import annotations

from pathlib import Path


def line_plot(path: Path, series: dict[str, dict[float, float]], *, xlabel: str, ylabel: str, title: str,
              logx: int | None = 2, logy: bool = True) -> str:
    """Draw each series (label -> {x: y}) as a line with markers into ``path``; say what was written.

    Returns a sentence for the report: the PNG's path, or why there is no plot (matplotlib missing).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is not installed"
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for label, points in series.items():
        xs = sorted(points)
        ax.plot(xs, [points[x] for x in xs], marker="o", label=label,
                linestyle="-" if label.startswith("graft") else "--")
    if logx:
        ax.set_xscale("log", base=logx)
        ax.set_xticks(sorted({x for points in series.values() for x in points}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return f"plot: {path}"
