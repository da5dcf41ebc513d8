"""Small line plots for the benchmark tables (PNG), used by core.py and seqlen.py."""

from __future__ import annotations

from pathlib import Path

Series = dict[str, dict[float, float]]  # label -> {x: y}


def line_plot(path: Path, series: Series, *, xlabel: str, ylabel: str, title: str, logx: int | None = 2,
              logy: bool = True) -> str:
    """One panel: each series as a line with markers (graft solid, others dashed) into ``path``."""
    return panels_plot(path, [(title, ylabel, series)], xlabel=xlabel, logx=logx, logy=logy)


def panels_plot(path: Path, panels: list[tuple[str, str, Series]], *, xlabel: str, logx: int | None = 2,
                logy: bool = True) -> str:
    """Side-by-side panels of (title, ylabel, series) sharing the x axis; log-log by default.

    Returns a sentence for the report: the PNG's path, or why there is no plot (matplotlib missing).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import ScalarFormatter
    except ImportError:
        return "no plot: matplotlib is not installed"
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), squeeze=False)
    for ax, (title, ylabel, series) in zip(axes[0], panels):
        for label, points in series.items():
            xs = sorted(points)
            ax.plot(xs, [points[x] for x in xs], marker="o", label=label,
                    linestyle="-" if label.startswith("graft") else "--")
        if logx:
            ax.set_xscale("log", base=logx)
            ax.set_xticks(sorted({x for points in series.values() for x in points}))
            ax.get_xaxis().set_major_formatter(ScalarFormatter())
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
    docs = Path(__file__).resolve().parents[1] / "docs"
    if path.resolve().is_relative_to(docs):  # a plot for docs/benchmarks.md: shown there, by a relative link
        return f"plot: ![{path.stem}]({path.resolve().relative_to(docs).as_posix()})"
    return f"plot: {path}"
