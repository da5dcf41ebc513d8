"""Core benchmarks: graft vs peft, side by side in one process.

Measures the acceptance targets of the "core" issue and prints a markdown report (ratios are
graft / peft, lower is better):

  (a) attach time on a meta-device Llama-2-7B-shaped model (q,v r=8 and all-linear r=16);
  (b) forward latency of SmolLM2-135M with one unmerged LoRA (r=16, alpha=32, all-linear) at
      1x128 and 8x256 tokens, and a merged graft adapter against the plain base model;
  (c) mixed-batch inference: 8 LoRA adapters (r=16, all-linear) routed over 32 rows, prefill
      (32 x 32 tokens) and one decode step (32 x 1 token on a 32-token KV cache);
      graft.route vs peft's ``adapter_names=``;
  (d) cost as adapters grow (``--only count``, not in the default run): the same mixed prefill and
      decode step with 1, 2, 4, 8, 16 and 32 distinct adapters over 32 rows, graft vs peft, with each
      side's growth factor from 1 to 32 adapters and a plot (``--plot-dir``, default docs/img).

Timings are interleaved (graft, peft, ... with the order rotated every repetition) after a
warm-up, with ``torch.set_num_threads(2)``; the table gives the median time of each side and the
median of the per-repetition ratios (each ratio is taken between neighbouring runs, which cancels
slow drift of the machine). Both libraries get identical weights: the adapters are built and
randomised (B != 0) in peft, saved, and loaded into graft with ``graft.load``; outputs are
checked to agree before anything is timed.

Usage:
    .venv/bin/python benchmarks/core.py                       # full run (a few minutes)
    .venv/bin/python benchmarks/core.py --quick               # smoke run, < 60 s
    .venv/bin/python benchmarks/core.py --out docs/benchmarks.md   # also write the report section
    .venv/bin/python benchmarks/core.py --only count           # (d): cost vs number of adapters, ~6 min
"""

from __future__ import annotations

import argparse
import copy
import gc
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

SECTION = "## Core (issue: core)"
BEGIN = "<!-- benchmarks/core.py: begin generated -->"
END = "<!-- benchmarks/core.py: end generated -->"
COMMAND = ".venv/bin/python benchmarks/core.py"
COUNT_SECTION = "## Cost as adapters grow (issue 20)"
COUNT_BEGIN = "<!-- benchmarks/core.py --only count: begin generated -->"
COUNT_END = "<!-- benchmarks/core.py --only count: end generated -->"

N_ADAPTERS = 8


# --------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class Settings:
    quick: bool
    attach_layers: int  # Llama-2-7B has 32
    attach_reps: int
    small: tuple[int, int]  # (batch, seq) of the small forward
    large: tuple[int, int]
    small_reps: int
    large_reps: int
    mixed_rows: int
    mixed_prefill: int  # tokens per row in the prefill (and KV-cache length for the decode step)
    prefill_reps: int
    decode_reps: int
    warmup: int
    retry_block_s: float  # per block: seconds of waiting for quiet / redoing disturbed rounds
    retry_total_s: float  # the same, for the whole run
    adapter_counts: tuple[int, ...] = (1, 2, 4, 8, 16, 32)  # (d): distinct adapters over mixed_rows rows


FULL = Settings(
    quick=False, attach_layers=32, attach_reps=7, small=(1, 128), large=(8, 256), small_reps=15,
    large_reps=5, mixed_rows=32, mixed_prefill=32, prefill_reps=7, decode_reps=21, warmup=1,
    retry_block_s=60, retry_total_s=240,
)
QUICK = Settings(
    quick=True, attach_layers=4, attach_reps=3, small=(1, 16), large=(2, 32), small_reps=3,
    large_reps=3, mixed_rows=32, mixed_prefill=4, prefill_reps=3, decode_reps=5, warmup=1,
    retry_block_s=0, retry_total_s=0, adapter_counts=(1, 2, 4),
)


# --------------------------------------------------------------------------------------------
# Timing, with a guard against other processes on the machine
#
# On a shared 2-core machine another busy process is catastrophic for 2-thread torch: every
# parallel region waits for a descheduled thread, and a 100 ms forward can take seconds. So each
# round (one run of every case) measures the CPU time used by *other* processes (system busy time
# from /proc/stat minus our own CPU time); rounds where it exceeds ``QUIET_CORES`` are redone
# while the time budget lasts, and the table reports how busy the rest of the machine was.

QUIET_CORES = 0.25  # foreign CPU load (in cores) above which a round counts as disturbed


def _busy_s() -> float | None:
    """Seconds of non-idle CPU time of the whole machine since boot (None where unknown)."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal (guest time is already in user)
    return (v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)) / os.sysconf("SC_CLK_TCK")


class Foreign:
    """Average CPU load (in cores) of other processes over a window."""

    def __enter__(self) -> Foreign:  # noqa: PYI034 (py3.10: no typing.Self)
        self.busy, self.own, self.wall = _busy_s(), time.process_time(), time.perf_counter()
        self.cores = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        busy = _busy_s()
        wall = time.perf_counter() - self.wall
        if busy is not None and self.busy is not None and wall > 0:
            self.cores = max(0.0, (busy - self.busy) - (time.process_time() - self.own)) / wall


def wait_quiet(max_s: float) -> float:
    """Wait up to ``max_s`` seconds for the other processes to go quiet; return their last load."""
    deadline = time.monotonic() + max_s
    waited = False
    while True:
        with Foreign() as f:
            time.sleep(0.5)
        if f.cores <= QUIET_CORES or time.monotonic() >= deadline:
            return f.cores
        if not waited:
            print(f"  (waiting for other processes to go quiet: {f.cores:.1f} cores busy)", file=sys.stderr, flush=True)
        waited = True
        time.sleep(2.0)


def _clock(fn: Callable[[], Any]) -> float:
    """Seconds for one call, with the garbage collector out of the way (as timeit does)."""
    gc.collect()
    gc.disable()
    try:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    finally:
        gc.enable()


@dataclass
class Case:
    """One timed thing: ``prepare`` (untimed) returns what ``run`` (timed) needs."""

    run: Callable[[Any], Any]
    prepare: Callable[[], Any] = lambda: None


@dataclass
class Timing:
    times: dict[str, list[float]]
    foreign: float  # mean load of other processes over the kept rounds, in cores
    disturbed: int  # kept rounds whose foreign load exceeded QUIET_CORES
    redone: int  # rounds thrown away and repeated


class Clock:
    """Runs interleaved rounds; disturbed rounds are redone within a per-block and a global budget."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.budget_left = settings.retry_total_s

    def _wait(self, block_left: float) -> float:
        """Wait for quiet within the budgets; return the seconds spent."""
        t0 = time.monotonic()
        wait_quiet(max(0.0, min(block_left, self.budget_left)))
        return time.monotonic() - t0

    def interleaved(self, cases: dict[str, Case], reps: int) -> Timing:
        """Time every case ``reps`` times, alternating between cases, order rotated each round."""
        s = self.settings
        block_left = s.retry_block_s
        spent = self._wait(block_left) if s.retry_block_s > 0 else 0.0
        block_left -= spent
        self.budget_left -= spent
        names = list(cases)
        for _ in range(s.warmup):
            for name in names:
                case = cases[name]
                case.run(case.prepare())
        rounds: list[tuple[float, dict[str, float]]] = []
        kept_count = 0
        rnd = 0
        while kept_count < reps:
            k = rnd % len(names)
            rnd += 1
            one: dict[str, float] = {}
            t0 = time.monotonic()
            with Foreign() as f:
                for name in names[k:] + names[:k]:
                    case = cases[name]
                    arg = case.prepare()
                    one[name] = _clock(lambda c=case, a=arg: c.run(a))
            rounds.append((f.cores, one))
            if f.cores <= QUIET_CORES:
                kept_count += 1
            elif block_left > 0 and self.budget_left > 0 and len(rounds) < 3 * reps:
                print(f"  (round disturbed: other processes used {f.cores:.1f} cores; redoing)",
                      file=sys.stderr, flush=True)
                spent = (time.monotonic() - t0) + self._wait(block_left)
                block_left -= spent
                self.budget_left -= spent
            else:
                kept_count += 1  # out of budget: keep it, flagged as disturbed
        # Keep the clean rounds; top up with the least disturbed ones when there are too few.
        ok = [r for r in rounds if r[0] <= QUIET_CORES]
        bad = sorted((r for r in rounds if r[0] > QUIET_CORES), key=lambda r: r[0])
        kept = ok[:reps] + bad[: max(0, reps - len(ok))]
        times = {name: [r[1][name] for r in kept] for name in names}
        return Timing(
            times=times,
            foreign=statistics.fmean(r[0] for r in kept),
            disturbed=sum(r[0] > QUIET_CORES for r in kept),
            redone=len(rounds) - len(kept),
        )


# --------------------------------------------------------------------------------------------
# Results


@dataclass
class Row:
    """One table row: ``ours`` (normally graft) against ``ref`` (peft or the base model)."""

    section: str
    what: str
    timing: Timing
    ours_key: str
    ref_key: str
    ours_label: str = "graft"
    ref_label: str = "peft"
    target: float | None = None  # ratio must be <= target
    note: str = ""

    @property
    def ours(self) -> list[float]:
        return self.timing.times[self.ours_key]

    @property
    def ref(self) -> list[float]:
        return self.timing.times[self.ref_key]

    @property
    def ratio(self) -> float:
        """Median of paired ratios (runs i of both sides were neighbours in time)."""
        return statistics.median(a / b for a, b in zip(self.ours, self.ref))

    @property
    def met(self) -> bool | None:
        return None if self.target is None else self.ratio <= self.target


@dataclass
class Report:
    settings: Settings
    clock: Clock
    rows: list[Row] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)
    growth: list[str] = field(default_factory=list)  # (d): lines on cost vs number of adapters
    wall_s: float = 0.0
    revision: str = field(default_factory=lambda: _revision())

    def add(self, row: Row) -> None:
        self.rows.append(row)
        tgt = "" if row.target is None else f"  (target <= {row.target:.2f}: {'met' if row.met else 'MISSED'})"
        print(
            f"  {row.what}: {row.ours_label} {_fmt(row.ours)}  {row.ref_label} {_fmt(row.ref)}  "
            f"ratio {row.ratio:.3f}{tgt}  [other load {row.timing.foreign:.2f} cores]",
            file=sys.stderr, flush=True,
        )

    def check(self, line: str) -> None:
        self.checks.append(line)
        print(f"  check: {line}", file=sys.stderr, flush=True)


def _fmt(times: list[float]) -> str:
    m = statistics.median(times)
    return f"{m * 1e3:.1f} ms" if m < 10 else f"{m:.2f} s"


def _spread(times: list[float]) -> str:
    """Half the interquartile range relative to the median, as a noise indicator."""
    if len(times) < 4:
        return "—"
    q = statistics.quantiles(times, n=4)
    return f"±{50 * (q[2] - q[0]) / statistics.median(times):.0f}%"


def _noise(t: Timing) -> str:
    text = f"{len(next(iter(t.times.values())))}, {t.foreign:.2f}"
    if t.redone:
        text += f", {t.redone} redone"
    if t.disturbed:
        text += f", **{t.disturbed} disturbed**"
    return text


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem = next(line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
        mem_gb = f", {int(mem.split()[1]) / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration):
        mem_gb = ""
    import peft
    import transformers

    return (
        f"{cpu}, {os.cpu_count()} logical cores{mem_gb}, no GPU; Python {platform.python_version()}, "
        f"torch {torch.__version__} (CPU, {torch.get_num_threads()} threads), transformers "
        f"{transformers.__version__}, peft {peft.__version__}"
    )


def _revision() -> str:
    """The graft commit measured, marked when src/graft has uncommitted changes."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src/graft"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"{head}{' + uncommitted changes in src/graft' if dirty else ''}"


def _load() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def to_markdown(report: Report, started_load: str, begin: str = BEGIN, end: str = END,
                command: str = COMMAND) -> str:
    s = report.settings
    lines = [
        begin,
        "",
        (
            f"Command: `{command}{' --quick' if s.quick else ''}` "
            f"({'QUICK smoke run: smaller shapes, not the acceptance numbers; ' if s.quick else ''}"
            f"wall time {report.wall_s:.0f} s)."
        ),
        "",
        f"Machine: {machine()}. Load average (1/5/15 min) at start {started_load}, at end {_load()}.",
        "",
        f"graft measured at commit {report.revision}.",
        "",
        (
            "Times are medians over rounds; in each round every case runs once (order rotated, after a "
            "warm-up), and ratio = measured / reference is the median of the per-round ratios. Lower is "
            "better. IQR: half the interquartile range over the median (measured / reference). Rounds, "
            "other load: kept rounds and the mean CPU load of other processes during them, in cores "
            f"(rounds above {QUIET_CORES} cores are redone while the waiting budget lasts; any kept anyway "
            "are counted as disturbed)."
        ),
        "",
        "| Measurement | measured | reference | ratio | target | result | IQR | rounds, other load |",
        "|---|---:|---:|---:|---:|---|---|---|",
    ]
    for r in report.rows:
        target = "—" if r.target is None else f"≤ {r.target:.2f}"
        result = "—" if r.met is None else ("met" if r.met else "**missed**")
        lines.append(
            f"| {r.section} {r.what} | {r.ours_label} {_fmt(r.ours)} | {r.ref_label} {_fmt(r.ref)} | "
            f"{r.ratio:.3f} | {target} | {result} | {_spread(r.ours)} / {_spread(r.ref)} | {_noise(r.timing)} |"
        )
    lines += ["", "Targets:", ""]
    for r in report.rows:
        if r.target is None:
            continue
        if r.met:
            verdict = f"met ({r.ratio:.3f} ≤ {r.target:.2f})"
        else:
            verdict = f"**missed** by {100 * (r.ratio / r.target - 1):.1f}% ({r.ratio:.3f} > {r.target:.2f})"
        lines.append(
            f"- {r.section} {r.what}, {r.ours_label} vs {r.ref_label}: {verdict}{'. ' + r.note if r.note else ''}"
        )
    if report.growth:
        lines += ["", "Cost as the number of adapters grows (d):", ""] + [f"- {g}" for g in report.growth]
    lines += ["", "Sanity checks (run before timing):", ""]
    lines += [f"- {c}" for c in report.checks]
    lines += ["", end]
    return "\n".join(lines) + "\n"


def write_section(path: Path, generated: str, section: str = SECTION, begin: str = BEGIN, end: str = END) -> None:
    """Replace the generated block of ``section`` in ``path`` (creating file/section as needed)."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + generated.rstrip("\n") + tail
    elif section in text:
        head, tail = text.split(section, 1)
        text = head + section + "\n\n" + generated + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n\n" + generated
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# --------------------------------------------------------------------------------------------
# (a) attach on a meta-device Llama-2-7B-shaped model


def bench_attach(report: Report) -> None:
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import LlamaConfig, LlamaForCausalLM

    import graft

    s = report.settings
    cfg = LlamaConfig(
        hidden_size=4096, num_hidden_layers=s.attach_layers, intermediate_size=11008, vocab_size=32000,
        num_attention_heads=32, num_key_value_heads=32,
    )

    def fresh() -> torch.nn.Module:
        with torch.device("meta"):
            return LlamaForCausalLM(cfg)

    shape = f"Llama-2-7B shape, {s.attach_layers} layers, meta"
    variants = [
        ("q,v r=8", {"r": 8, "alpha": 16, "targets": ("q_proj", "v_proj")},
         {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}),
        ("all-linear r=16", {"r": 16, "alpha": 32, "targets": "all-linear"},
         {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"}),
    ]
    for label, gkw, pkw in variants:
        cases = {
            "graft": Case(prepare=fresh, run=lambda m, kw=gkw: graft.attach(m, graft.LoRA(**kw), name="default")),
            "peft": Case(prepare=fresh, run=lambda m, kw=pkw: get_peft_model(m, LoraConfig(**kw))),
            "peft_lcmu": Case(
                prepare=fresh, run=lambda m, kw=pkw: get_peft_model(m, LoraConfig(**kw), low_cpu_mem_usage=True)
            ),
        }
        # Same modules on both sides?
        g, p = cases["graft"].run(fresh()), cases["peft"].run(fresh())
        n_g = sum(1 for _ in graft.core.adapter_layers(g))
        n_p = sum(1 for m in p.modules() if isinstance(m, LoraLayer))
        report.check(f"(a) attach {label}: graft wraps {n_g} modules, peft {n_p}")
        del g, p
        t = report.clock.interleaved(cases, s.attach_reps)
        report.add(Row("(a)", f"attach {label} ({shape})", t, "graft", "peft", target=0.5))
        report.add(Row("(a)", f"attach {label}, vs peft `low_cpu_mem_usage=True`", t, "graft", "peft_lcmu",
                       ref_label="peft lcmu"))


# --------------------------------------------------------------------------------------------
# Shared setup for (b) and (c): one base model, adapters built in peft, loaded into graft


@dataclass
class Models:
    base: torch.nn.Module
    adapter_dirs: dict[str, Path]
    peft_multi: Any  # PeftModel holding all adapters


def peft_adapters(base: torch.nn.Module, tmp: Path, n: int = N_ADAPTERS, dora: bool = False) -> tuple[Any, dict[str, Path]]:
    """A PeftModel on a copy of ``base`` with ``n`` LoRA adapters (r=16, all-linear, B randomised),
    saved under ``tmp``; returns it and each adapter's directory."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", use_dora=dora)
    names = [f"a{i}" for i in range(n)]
    torch.manual_seed(0)
    peft_multi = get_peft_model(copy.deepcopy(base), cfg, adapter_name=names[0])
    for name in names[1:]:
        peft_multi.add_adapter(name, cfg)
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for pname, p in peft_multi.named_parameters():
            if ".lora_B." in pname:  # peft starts B at zero; make every adapter do something
                p.copy_((torch.randn(p.shape, generator=gen) * 0.02).to(p.device, p.dtype))
    peft_multi.eval()
    peft_multi.save_pretrained(tmp, selected_adapters=names)
    return peft_multi, {x: tmp / x if (tmp / x / "adapter_config.json").exists() else tmp for x in names}


def build_models(tmp: Path) -> Models:
    import graft.models

    base, _ = graft.models.load("smollm2-135m")
    base.eval()
    peft_multi, dirs = peft_adapters(base, tmp)
    return Models(base=base, adapter_dirs=dirs, peft_multi=peft_multi)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def _agree(report: Report, label: str, a: torch.Tensor, b: torch.Tensor, atol: float = 1e-4) -> None:
    diff = _max_diff(a, b)
    scale = b.abs().max().item()
    ok = diff <= atol + 1e-5 * scale
    report.check(
        f"{label}: max |Δlogits| = {diff:.2e} (|logits| ≤ {scale:.1f}; tolerance {atol:g} + 1e-5·max) "
        f"{'OK' if ok else 'FAILED'}"
    )
    if not ok:
        raise SystemExit(f"outputs disagree: {label}")


# --------------------------------------------------------------------------------------------
# (b) single-adapter forward latency


def bench_forward(report: Report, models: Models) -> None:
    from peft import PeftModel

    import graft

    s = report.settings
    d = models.adapter_dirs["a0"]
    base = models.base
    g = graft.load(copy.deepcopy(base), d, name="a0")
    p = PeftModel.from_pretrained(copy.deepcopy(base), d, adapter_name="a0").eval()
    gm = graft.merge(graft.load(copy.deepcopy(base), d, name="a0"))

    with torch.no_grad():
        ids = torch.randint(0, base.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
        lg, lp, lm, lb = (m(input_ids=ids).logits for m in (g, p, gm, base))
        _agree(report, "(b) unmerged graft vs peft", lg, lp)
        _agree(report, "(b) merged graft vs unmerged graft", lm, lg, atol=1e-3)
        report.check(f"(b) adapter changes the output: max |Δlogits| vs base = {_max_diff(lg, lb):.2e}")
        for (batch, seq), reps in ((s.small, s.small_reps), (s.large, s.large_reps)):
            ids = torch.randint(0, base.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))
            cases = {
                "graft": Case(run=lambda _, m=g, x=ids: m(input_ids=x)),
                "peft": Case(run=lambda _, m=p, x=ids: m(input_ids=x)),
                "merged": Case(run=lambda _, m=gm, x=ids: m(input_ids=x)),
                "base": Case(run=lambda _, m=base, x=ids: m(input_ids=x)),
            }
            t = report.clock.interleaved(cases, reps)
            shape = f"{batch}x{seq}"
            report.add(Row("(b)", f"forward {shape}, unmerged LoRA", t, "graft", "peft", target=1.0))
            report.add(Row("(b)", f"forward {shape}, merged LoRA vs plain base", t, "merged", "base",
                           ours_label="graft merged", ref_label="base", target=1.03))
            report.add(Row("(b)", f"forward {shape}, unmerged LoRA vs plain base", t, "graft", "base",
                           ref_label="base"))
    del g, p, gm
    gc.collect()


# --------------------------------------------------------------------------------------------
# (c) mixed-batch inference: 8 adapters routed over 32 rows


def bench_mixed(report: Report, models: Models) -> None:
    import graft

    s = report.settings
    base, pm = models.base, models.peft_multi
    g = copy.deepcopy(base)
    for n, d in models.adapter_dirs.items():
        graft.load(g, d, name=n)
    rows = s.mixed_rows
    names = [f"a{i % N_ADAPTERS}" for i in range(rows)]
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, base.config.vocab_size, (rows, s.mixed_prefill), generator=gen)
    nxt = torch.randint(0, base.config.vocab_size, (rows, 1), generator=gen)

    def g_fwd(x: torch.Tensor, **kw: Any) -> Any:
        with graft.route(g, names):
            return g(input_ids=x, **kw)

    def p_fwd(x: torch.Tensor, **kw: Any) -> Any:
        return pm(input_ids=x, adapter_names=names, **kw)

    with torch.no_grad():
        og, op = g_fwd(ids, use_cache=True), p_fwd(ids, use_cache=True)
        _agree(report, f"(c) mixed prefill {rows}x{s.mixed_prefill}, graft vs peft", og.logits, op.logits)
        cache_g, cache_p, cache_b = og.past_key_values, op.past_key_values, base(input_ids=ids).past_key_values
        dg = g_fwd(nxt, past_key_values=copy.deepcopy(cache_g)).logits
        dp = p_fwd(nxt, past_key_values=copy.deepcopy(cache_p)).logits
        _agree(report, "(c) mixed decode step, graft vs peft", dg, dp)
        # Rows with the same adapter must match a single-adapter forward of that adapter.
        with graft.route(g, ["a3"] * 2):
            solo = g(input_ids=ids[[3, 11]]).logits
        _agree(report, "(c) routed rows vs the same adapter alone (graft)", og.logits[[3, 11]], solo)
        del og, op, dg, dp, solo

        prefill = {
            "graft": Case(run=lambda _: g_fwd(ids)),
            "peft": Case(run=lambda _: p_fwd(ids)),
            "base": Case(run=lambda _: base(input_ids=ids)),
        }
        t = report.clock.interleaved(prefill, s.prefill_reps)
        what = f"mixed prefill, {N_ADAPTERS} adapters / {rows} rows x {s.mixed_prefill} tok"
        report.add(Row("(c)", what, t, "graft", "peft", target=0.5))
        report.add(Row("(c)", f"{what}: graft vs plain base (adapter overhead)", t, "graft", "base",
                       ref_label="base"))
        report.add(Row("(c)", f"{what}: plain base vs peft (floor for any graft ratio)", t, "base", "peft",
                       ours_label="base"))

        decode = {
            "graft": Case(prepare=lambda: copy.deepcopy(cache_g), run=lambda c: g_fwd(nxt, past_key_values=c)),
            "peft": Case(prepare=lambda: copy.deepcopy(cache_p), run=lambda c: p_fwd(nxt, past_key_values=c)),
            "base": Case(prepare=lambda: copy.deepcopy(cache_b), run=lambda c: base(input_ids=nxt, past_key_values=c)),
        }
        t = report.clock.interleaved(decode, s.decode_reps)
        what = f"mixed decode step, {N_ADAPTERS} adapters / {rows} rows x 1 tok, KV {s.mixed_prefill}"
        report.add(Row("(c)", what, t, "graft", "peft", target=0.5))
        report.add(Row("(c)", f"{what}: graft vs plain base (adapter overhead)", t, "graft", "base",
                       ref_label="base"))
        report.add(Row("(c)", f"{what}: plain base vs peft (floor for any graft ratio)", t, "base", "peft",
                       ours_label="base"))


# --------------------------------------------------------------------------------------------
# (d) cost as the number of adapters grows: the (c) batches with 1 ... 32 distinct adapters


def bench_count(report: Report, tmp: Path, plot_dir: Path | None) -> None:
    """Mixed prefill and decode time with ``settings.adapter_counts`` distinct adapters over the same rows.

    Row i gets adapter ``a{i % n}``, so every count spreads the same 32 rows over n adapters; the
    growth factor is (time with the most adapters) / (time with one), per side.
    """
    import graft
    import graft.models

    s = report.settings
    base, _ = graft.models.load("smollm2-135m")
    base.eval()
    pm, dirs = peft_adapters(base, tmp, n=max(s.adapter_counts))
    g = copy.deepcopy(base)
    for name, d in dirs.items():
        graft.load(g, d, name=name)
    rows = s.mixed_rows
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, base.config.vocab_size, (rows, s.mixed_prefill), generator=gen)
    nxt = torch.randint(0, base.config.vocab_size, (rows, 1), generator=gen)
    medians: dict[str, dict[float, float]] = {f"{side} {what}": {} for what in ("prefill", "decode")
                                              for side in ("graft", "peft")}

    def g_fwd(x: torch.Tensor, names: list[str], **kw: Any) -> Any:
        with graft.route(g, names):
            return g(input_ids=x, **kw)

    def p_fwd(x: torch.Tensor, names: list[str], **kw: Any) -> Any:
        return pm(input_ids=x, adapter_names=names, **kw)

    with torch.no_grad():
        for count in s.adapter_counts:
            names = [f"a{i % count}" for i in range(rows)]
            og, op = g_fwd(ids, names, use_cache=True), p_fwd(ids, names, use_cache=True)
            _agree(report, f"(d) {count} adapters over {rows} rows, prefill, graft vs peft", og.logits, op.logits)
            cache_g, cache_p = og.past_key_values, op.past_key_values
            del og, op
            prefill = {"graft": Case(run=lambda _, n=names: g_fwd(ids, n)),
                       "peft": Case(run=lambda _, n=names: p_fwd(ids, n))}
            t = report.clock.interleaved(prefill, s.prefill_reps)
            report.add(Row("(d)", f"mixed prefill, {count} adapters / {rows} rows x {s.mixed_prefill} tok", t,
                           "graft", "peft"))
            for side in ("graft", "peft"):
                medians[f"{side} prefill"][count] = statistics.median(t.times[side])
            decode = {
                "graft": Case(prepare=lambda c=cache_g: copy.deepcopy(c),
                              run=lambda c, n=names: g_fwd(nxt, n, past_key_values=c)),
                "peft": Case(prepare=lambda c=cache_p: copy.deepcopy(c),
                             run=lambda c, n=names: p_fwd(nxt, n, past_key_values=c)),
            }
            t = report.clock.interleaved(decode, s.decode_reps)
            report.add(Row("(d)", f"mixed decode step, {count} adapters / {rows} rows x 1 tok, KV {s.mixed_prefill}",
                           t, "graft", "peft"))
            for side in ("graft", "peft"):
                medians[f"{side} decode"][count] = statistics.median(t.times[side])
    lo, hi = min(s.adapter_counts), max(s.adapter_counts)
    for key, points in medians.items():
        growth = points[hi] / points[lo]
        target = " (target <= 1.2)" if key.startswith("graft") else ""
        report.growth.append(f"{key}: {_fmt([points[lo]])} with {lo} adapter(s), {_fmt([points[hi]])} with {hi}: "
                             f"growth x{growth:.2f}{target}")
    if plot_dir is not None:
        from plots import line_plot

        where = line_plot(plot_dir / "adapters_mixed.png", {k: {x: 1e3 * y for x, y in v.items()} for k, v in medians.items()},
                          xlabel="distinct adapters in the batch", ylabel="ms (median)",
                          title=f"mixed batch, {rows} rows: prefill x {s.mixed_prefill} tok, decode 1 tok")
        report.growth.append(where)


# --------------------------------------------------------------------------------------------


def _progress(t0: float, what: str) -> None:
    print(f"[{time.perf_counter() - t0:5.1f} s] {what}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: fewer repetitions, smaller shapes (< 60 s)")
    ap.add_argument("--out", type=Path, help="write the report into this markdown file's 'Core' section")
    ap.add_argument("--only", choices=["attach", "forward", "mixed", "count"], action="append",
                    help="run only these parts (repeatable); 'count' (d) runs only when named")
    ap.add_argument("--plot-dir", type=Path, default=Path(__file__).resolve().parent.parent / "docs" / "img",
                    help="where (d) writes its PNG")
    args = ap.parse_args(argv)

    torch.set_num_threads(2)
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.getLogger("peft").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass

    settings = QUICK if args.quick else FULL
    report = Report(settings, Clock(settings))
    started_load = _load()
    t0 = time.perf_counter()
    parts = set(args.only or ["attach", "forward", "mixed"])
    if "attach" in parts:
        _progress(t0, "(a) attach")
        bench_attach(report)
    if parts & {"forward", "mixed"}:
        with tempfile.TemporaryDirectory(prefix="graft-bench-") as tmp:
            _progress(t0, "loading SmolLM2-135M, building 8 adapters in peft")
            models = build_models(Path(tmp))
            if "forward" in parts:
                _progress(t0, "(b) forward")
                bench_forward(report, models)
            if "mixed" in parts:
                _progress(t0, "(c) mixed batch")
                bench_mixed(report, models)
    report.wall_s = time.perf_counter() - t0
    if report.rows:
        md = to_markdown(report, started_load)
        print(md)
        if args.out is not None:
            write_section(args.out, md)
            print(f"wrote {args.out}", file=sys.stderr)
    if "count" in parts:
        count = Report(settings, report.clock)
        t1 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="graft-bench-") as tmp:
            _progress(t0, f"(d) adapter count: building {max(settings.adapter_counts)} adapters in peft")
            bench_count(count, Path(tmp), args.plot_dir)
        count.wall_s = time.perf_counter() - t1
        md = to_markdown(count, started_load, COUNT_BEGIN, COUNT_END, COMMAND + " --only count")
        print(md)
        if args.out is not None:
            write_section(args.out, md, COUNT_SECTION, COUNT_BEGIN, COUNT_END)
            print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
