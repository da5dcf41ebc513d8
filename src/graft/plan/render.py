"""graft plan: the plan as a table and as a plot."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from graft.plan.sizes import format_bytes

if TYPE_CHECKING:
    from graft.plan.planner import Plan


def _render(p: Plan) -> str:
    s = p.settings
    reserve = f" ({format_bytes(s.reserve)} reserved for the runtime)" if s.reserve else ""
    lines = [f"model: {p.model} - {p.architecture}, {p.total_params:,} parameters",
             (f"budget: {format_bytes(s.memory)} on {s.device}{reserve}; seq-len {s.seq_len}, batch {s.batch}, "
              f"{s.dtype}, optimizer {s.optimizer}, logits chunk {s.logits_chunk}"), ""]
    head = ("method", "trainable", "%", "weights", "grads", "optim adamw / 8bit", "activ full / ckpt",
            "total full / ckpt", "fits", "file")
    table = [head]
    for r in (r for r in p.rows if r.applicable):
        star = ("*", "") if not r.gradient_checkpointing else ("", "*")
        table.append((
            r.method, f"{r.trainable_params:,}", f"{r.trainable_percent:.3f}", format_bytes(r.weights_bytes),
            format_bytes(r.gradient_bytes),
            f"{format_bytes(r.optimizer_bytes_adamw)} / {format_bytes(r.optimizer_bytes_adamw8bit)}",
            f"{format_bytes(r.activation_bytes_no_checkpointing)} / {format_bytes(r.activation_bytes_checkpointing)}",
            (f"{format_bytes(r.total_bytes_no_checkpointing)}{star[0]} / "
             f"{format_bytes(r.total_bytes_checkpointing)}{star[1]}"),
            "yes" if r.fits else "no", format_bytes(r.adapter_file_bytes)))
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    lines += [f"{r.method.ljust(widths[0])}  n/a: {_first_sentence(r.note)}" for r in p.rows if not r.applicable]
    lines += ["", ("total = the predicted peak; * marks the setting planned (gradient checkpointing only where it "
                   "is needed to fit). Gradients and activations are not alive at the same time, so the peak is less "
                   "than the sum of the columns. file = the adapter file (full fine-tuning: the model)."), ""]
    rec = p.recommendation
    lines.append(f"recommendation: {rec.approach}" + ("" if rec.fits else " (does not fit)"))
    lines += [f"  - {reason}" for reason in rec.reasons]
    lines += [f"note: {n}" for n in p.notes]
    return "\n".join(lines)


def _first_sentence(text: str | None) -> str:
    text = text or ""
    return text.split("; ")[0]


_COLORS = {"weights": "#4c72b0", "gradients": "#dd8452", "optimizer": "#55a868", "activations": "#c44e52",
           "optimizer-step temporaries": "#b0b0b0"}


def _plot(p: Plan, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [r for r in p.rows if r.applicable and r.total_bytes is not None]
    fig = Figure(figsize=(max(6.0, 1.1 * len(rows) + 2), 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = range(len(rows))
    bottom = [0.0] * len(rows)
    parts = {"weights": [r.weights_bytes for r in rows], "gradients": [r.gradient_bytes for r in rows],
             "optimizer": [r.optimizer_bytes for r in rows], "activations": [r.activation_bytes for r in rows],
             "optimizer-step temporaries": [r.step_transient_bytes for r in rows]}
    for label, values in parts.items():
        gb = [v / 1e9 for v in values]
        ax.bar(x, gb, bottom=bottom, label=label, color=_COLORS[label], width=0.6)
        bottom = [b + v for b, v in zip(bottom, gb)]
    ax.scatter(list(x), [r.total_bytes / 1e9 for r in rows], marker="_", s=600, color="black", zorder=3,
               label="predicted peak")
    reserve = f" - {format_bytes(p.settings.reserve)} runtime" if p.settings.reserve else ""
    ax.axhline((p.settings.memory - p.settings.reserve) / 1e9, color="gray", linestyle="--",
               label=f"budget {format_bytes(p.settings.memory)}{reserve}")
    ax.set_xticks(list(x), [r.method for r in rows], rotation=30, ha="right")
    ax.set_ylabel("GB")
    ax.set_title(f"{p.model}: seq-len {p.settings.seq_len}, batch {p.settings.batch}, {p.settings.dtype}")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path))
    return path
