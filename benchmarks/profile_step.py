"""Where one training step goes: graft vs the peft + Trainer recipe, profiled (issue 20, point 1).

    .venv/bin/python benchmarks/profile_step.py                      # fp32, 2 threads, both sides
    .venv/bin/python benchmarks/profile_step.py --dtype bf16         # bf16 autocast on both sides
    .venv/bin/python benchmarks/profile_step.py --quick              # smoke test: tiny batches
    .venv/bin/python benchmarks/profile_step.py --json out.json

The step is the one benchmarks/train.py times, built by its own builders (``build_graft`` and
``build_reference``): SmolLM2-135M-Instruct, GSM8K in the Alpaca template, LoRA r=16 alpha=32
all-linear, batch 8, max length 512, AdamW with max_grad_norm 1. graft runs its real
``_train_step`` with its defaults (balanced packing + selective logits, and on the CPU its
per-example attention for packed rows, as ``graft.train.train`` switches it on); the reference runs the Trainer's
own ``training_step`` (padded rows, full logits), then its clipping, optimizer and scheduler step,
as ``Trainer._inner_training_loop`` does. Both sides see the same examples in the same order, each
side in its own process.

Each step's self CPU time (``torch.profiler``) is split into categories. Forward ops get the
category of the innermost scope this script opens around them (forward hooks on the modules: the
frozen base ``nn.Linear`` of each adapter layer, the adapter layer itself, the backbone, the
output head; and a scope around the loss computation); backward ops are mapped to the forward op
that created their autograd node (the profiler's ``sequence_nr``), so an ``MmBackward0`` of a base
linear counts as "base matmul bwd" and one of a LoRA factor as "LoRA". Attention is every op inside
``scaled_dot_product_attention`` and its backward. What runs in the step outside forward, backward
and collation (clipping, optimizer, scheduler, zero_grad, the loss's ``.item()``) is "optimizer".
"python / other" is the step's time not spent inside any ATen op: Python between ops, module
hooks, the autograd engine's bookkeeping (it includes the profiler's own overhead, so the table
also gives the unprofiled step time).

Next to it: the step's FLOPs (``torch.utils.flop_counter.FlopCounterMode`` over one step), and this
machine's GEMM rate measured here with ``torch.mm`` at SmolLM2's shapes and at 2048^3, in fp32 and
(where the CPU has AVX512-BF16 or AMX) bf16. "matmul work at peak rate" is the step's matmul FLOPs
divided by the best measured rate: the time the step would take if it did nothing but its
matmuls at the machine's best speed; its share of the measured step is the roofline ceiling on how
much faster the step could get.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train as train_bench  # benchmarks/train.py: the same builders and data

CATEGORIES = (
    "base matmul fwd",
    "base matmul bwd (input grads)",
    "attention (sdpa)",
    "LoRA",
    "head + loss",
    "norms / act / rotary / elementwise",
    "dtype casts / copies",
    "optimizer",
    "data / collate",
    "python / other",
)
STEP, DATA, LOSS = "scope::step", "scope::data", "scope::forward+loss"
BASE, ADAPTER, BACKBONE, HEAD = "mod::base", "mod::adapter", "mod::backbone", "mod::head"
MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::mv", "aten::addmv", "aten::dot",
              "aten::mkldnn_linear", "aten::_addmm_activation"}
CAST_OPS = {"aten::_to_copy", "aten::copy_", "aten::clone", "aten::contiguous"}
EVALUATE = "autograd::engine::evaluate_function: "


# --------------------------------------------------------------------------------------------
# Scopes: forward hooks that open a record_function around modules


def scope_targets(model: nn.Module) -> dict[nn.Module, str]:
    """The modules to scope in a transformers model with graft or peft adapters, and their scope names.

    An adapter layer is any module with a ``base_layer`` (graft's and peft's protocol); its base
    layer is "base", everything else it runs (the factors, dropout, the sum) is "adapter". Plain
    ``nn.Linear`` layers of the backbone outside adapter layers are "base" too.
    """
    backbone = getattr(model, model.base_model_prefix)
    head = model.get_output_embeddings()
    targets: dict[nn.Module, str] = {backbone: BACKBONE}
    if head is not None:
        targets[head] = HEAD
    inside: set[int] = set()
    for module in model.modules():
        base = getattr(module, "base_layer", None)
        if isinstance(base, nn.Module) and module is not head:
            targets[module] = ADAPTER
            targets[base] = BASE
            inside.update(id(m) for m in module.modules())
    for module in backbone.modules():
        if isinstance(module, nn.Linear) and id(module) not in inside:
            targets[module] = BASE
    return targets


@contextlib.contextmanager
def module_scopes(model: nn.Module) -> Iterator[None]:
    """Open a ``record_function`` named by :func:`scope_targets` around each target module's forward."""
    handles = []
    for module, name in scope_targets(model).items():
        stack: list[Any] = []

        def pre(_m: nn.Module, _args: Any, name: str = name, stack: list[Any] = stack) -> None:
            scope = record_function(name)
            scope.__enter__()
            stack.append(scope)

        def post(_m: nn.Module, _args: Any, _out: Any, stack: list[Any] = stack) -> None:
            stack.pop().__exit__(None, None, None)

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------------------------
# Categorising profiler events


def _chain(event: Any) -> list[Any]:
    """The event's ancestors, innermost first."""
    out = []
    parent = event.cpu_parent
    while parent is not None:
        out.append(parent)
        parent = parent.cpu_parent
    return out


def _region(chain: Sequence[Any]) -> str | None:
    """The innermost module scope of a forward op ("head" for loss code outside the backbone)."""
    for e in chain:
        if e.name in (BASE, ADAPTER, HEAD, BACKBONE):
            return e.name
        if e.name == LOSS:
            return HEAD
    return None


def forward_regions(events: Sequence[Any], chains: dict[int, list[Any]]) -> dict[int, str | None]:
    """Autograd sequence number -> module scope of the forward op that created that node."""
    regions: dict[int, str | None] = {}
    for e in events:
        chain = chains[id(e)]
        if e.sequence_nr >= 0 and e.name.startswith("aten::") and not any(a.name.startswith(EVALUATE) for a in chain):
            regions.setdefault(e.sequence_nr, _region(chain))
    return regions


def categorise(events: Sequence[Any]) -> dict[str, float]:
    """Self CPU time (microseconds) of the events under ``scope::step``, per category of :data:`CATEGORIES`.

    Every microsecond of a step is counted once: an op's self time (its time minus its children's)
    goes to its category; the self time of scopes, autograd-node wrappers and anything else that
    is not an ATen op is "python / other".
    """
    chains = {id(e): _chain(e) for e in events}
    forward_region = forward_regions(events, chains)
    out = dict.fromkeys(CATEGORIES, 0.0)
    for e in events:
        chain = chains[id(e)]
        if not any(a.name == STEP for a in chain) and e.name != STEP:
            continue
        t = e.self_cpu_time_total
        if not e.name.startswith("aten::"):
            out["python / other"] += t
        elif any(a.name == DATA for a in chain):
            out["data / collate"] += t
        else:
            out[_op_category(e, chain, forward_region)] += t
    return out


def _op_category(e: Any, chain: Sequence[Any], forward_region: dict[int, str | None]) -> str:
    node = next((a for a in chain if a.name.startswith(EVALUATE)), None)
    names = [e.name] + [a.name for a in chain]
    if any("scaled_dot_product" in n or "ScaledDotProduct" in n for n in names):
        return "attention (sdpa)"
    if node is not None:  # backward: the forward op that made this autograd node says where it belongs
        if "AccumulateGrad" in node.name:
            return "LoRA"  # only trainable (adapter) parameters accumulate gradients
        region = forward_region.get(node.sequence_nr)
    elif any(a.name == LOSS for a in chain):
        region = _region(chain)
    else:
        return "optimizer"  # in the step, outside forward, backward and collation
    if region == ADAPTER:
        return "LoRA"
    if region == HEAD:
        return "head + loss"
    if region == BASE and e.name in MATMUL_OPS:
        return "base matmul bwd (input grads)" if node is not None else "base matmul fwd"
    if e.name in CAST_OPS:
        return "dtype casts / copies"
    return "norms / act / rotary / elementwise"


def matmul_time(events: Sequence[Any]) -> float:
    """Self CPU time (microseconds) of all matmul ops under ``scope::step`` (any category)."""
    return sum(e.self_cpu_time_total for e in events if e.name in MATMUL_OPS
               and any(a.name == STEP for a in _chain(e)))


# --------------------------------------------------------------------------------------------
# FLOPs and the machine's GEMM rate


def _attention_flops(query: Any, key: Any, *_: Any, out_shape: Any = None, **__: Any) -> int:
    """Q Kᵀ and P V: 2 · 2·b·h·s_q·s_k·d (heads of the query: grouped K/V heads do the same work)."""
    b, h, s_q, d = query
    return 4 * b * h * s_q * key[-2] * d


def _attention_backward_flops(_grad: Any, query: Any, key: Any, *_: Any, out_shape: Any = None, **__: Any) -> int:
    """dV = Pᵀ dO, dP = dO Vᵀ, dQ = dS K, dK = dSᵀ Q: four matmuls of the forward's size."""
    return 2 * _attention_flops(query, key)


def count_flops(step: Callable[[], Any]) -> dict[str, float]:
    """FLOPs of one call of ``step`` (forward, backward, optimizer): total, attention, and the rest (matmul).

    torch's counter knows the CUDA attention kernels only; the CPU flash kernel (what sdpa runs
    here) and its backward are counted with the same formulas.
    """
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    mapping = {aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops,
               aten._scaled_dot_product_flash_attention_for_cpu_backward: _attention_backward_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        step()
    by_op = counter.get_flop_counts().get("Global", {})
    attention = sum(v for op, v in by_op.items() if "scaled_dot_product" in str(op))
    total = float(counter.get_total_flops())
    return {"total": total, "attention": float(attention), "matmul": total - attention}


def gemm_shapes(tokens: int, quick: bool) -> list[tuple[str, int, int, int]]:
    """(label, m, k, n): SmolLM2-135M's linear shapes at ``tokens`` rows, its head, and a large square."""
    if quick:
        return [("tokens x 576 x 1536", tokens, 576, 1536), ("512^3", 512, 512, 512)]
    return [("tokens x 576 x 1536 (gate/up)", tokens, 576, 1536), ("tokens x 1536 x 576 (down)", tokens, 1536, 576),
            ("tokens x 576 x 576 (q/o)", tokens, 576, 576), ("512 x 576 x 49152 (head chunk)", 512, 576, 49152),
            ("2048^3", 2048, 2048, 2048)]


def gemm_rates(dtype: torch.dtype, tokens: int, quick: bool, reps: int = 5) -> dict[str, float]:
    """GFLOP/s of ``torch.mm`` per shape (median of ``reps`` after a warm-up)."""
    rates = {}
    gen = torch.Generator().manual_seed(0)
    warm = torch.randn(1024, 1024, generator=gen).to(dtype)
    for _ in range(5):  # the process's first GEMMs run slow (threads, pages): measured 64.7 vs 186 GFLOP/s
        torch.mm(warm, warm)
    for label, m, k, n in gemm_shapes(tokens, quick):
        a = torch.randn(m, k, generator=gen).to(dtype)
        b = torch.randn(k, n, generator=gen).to(dtype)
        torch.mm(a, b)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - t0)
        rates[label] = 2 * m * k * n / statistics.median(times) / 1e9
    return rates


def cpu_has_bf16() -> bool:
    return train_bench.bf16_supported()


# --------------------------------------------------------------------------------------------
# What packing and selective logits should save, from the token counts alone


def step_work(config: Any, rows: list[int], supervised: int, full_logits: bool, r: int = 16) -> dict[str, float]:
    """FLOPs of one LoRA step of a Llama-shaped model on ``rows`` (each row's computed width).

    Base linears: forward and the input gradient (the base is frozen); LoRA: forward, input
    gradients and factor gradients; attention: 12·h·s²·d per row and layer (forward Q Kᵀ and P V,
    four backward matmuls); head: logits and their input gradient over every position (full
    logits) or the supervised ones only (selective).
    """
    d, layers, inter = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    kv = config.num_key_value_heads * head_dim
    shapes = [(d, heads * head_dim), (d, kv), (d, kv), (heads * head_dim, d), (d, inter), (d, inter), (inter, d)]
    positions = sum(rows)
    base = layers * sum(2 * 2 * i * o for i, o in shapes) * positions
    lora = layers * sum(2 * r * (i + o) * 4 for i, o in shapes) * positions
    attention = layers * sum(12 * heads * w * w * head_dim for w in rows)
    head = 2 * 2 * d * config.vocab_size * (positions if full_logits else supervised)
    return {"positions": positions, "base": base, "lora": lora, "attention": attention, "head": head,
            "total": base + lora + attention + head}


def token_model(args: argparse.Namespace) -> str:
    """Positions and FLOPs of graft's four combinations of packing and selective logits on the benchmark's data.

    Uses the tokeniser and the model's config only (no weights, no timing): what each technique
    removes, and what the two together should give if time followed FLOPs.
    """
    from transformers import AutoConfig, AutoTokenizer

    from graft import data, models

    path = models.resolve(args.model)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    examples = data.tokenize(train_bench.rows(args.examples, args.data), tok, format="alpaca",
                             max_length=args.max_length)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(args.seed)).tolist()
    totals: dict[tuple[bool, bool], dict[str, float]] = {}
    supervised = real = 0
    for start in range(0, len(order), args.batch_size):
        items = [examples[i] for i in order[start:start + args.batch_size]]
        sup = sum(sum(1 for t in x.labels[1:] if t != -100) for x in items)
        supervised, real = supervised + sup, real + sum(len(x) for x in items)
        packed = data.pack(items, args.max_length)
        widths = {False: [max(len(x) for x in items)] * len(items), True: [max(len(p) for p in packed)] * len(packed)}
        for packing in (False, True):
            for selective in (False, True):
                w = step_work(config, widths[packing], sup, full_logits=not selective)
                acc = totals.setdefault((packing, selective), dict.fromkeys(w, 0.0))
                for k, v in w.items():
                    acc[k] += v
    plain = totals[(False, False)]["total"]
    lines = [(f"Token model: {len(examples)} examples, batch {args.batch_size}, max length {args.max_length}: "
              f"{real} real tokens, {supervised} supervised."), "",
             ("| graft | positions computed | base + LoRA TFLOP | attention TFLOP | head TFLOP | total TFLOP | "
              "speed-up if time ~ FLOPs |"), "|---|---:|---:|---:|---:|---:|---:|"]
    for (packing, selective), t in sorted(totals.items()):
        label = f"{'packing' if packing else 'padded'}, {'selective' if selective else 'full'} logits"
        lines.append(f"| {label} | {t['positions']:.0f} | {(t['base'] + t['lora']) / 1e12:.2f} | "
                     f"{t['attention'] / 1e12:.2f} | {t['head'] / 1e12:.2f} | {t['total'] / 1e12:.2f} | "
                     f"{plain / t['total']:.2f}x |")
    pack, sel = plain / totals[(True, False)]["total"], plain / totals[(False, True)]["total"]
    lines += ["", (f"Product of the two alone: {pack * sel:.2f}x; together: {plain / totals[(True, True)]['total']:.2f}x "
                   "(both remove the head's work on padding, which is counted once).")]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# The two sides


@dataclass
class Side:
    """One implementation's training step: ``step(items)`` collates ``items`` and does one optimizer step."""

    name: str
    model: nn.Module  # the transformers model (inside any peft wrapper): what the scopes hook
    items: Sequence[Any]  # the examples, indexed like the other side's
    collate: Callable[[list[Any]], dict[str, torch.Tensor]]
    step: Callable[[Sequence[Any]], float]


def graft_side(model: nn.Module, examples: Sequence[Any], collate: Callable, config: Any,
               total_steps: int = 1000) -> Side:
    """graft's real ``_train_step`` (one micro-batch, as in benchmarks/train.py) with a loss scope."""
    from graft.train import loop, packed_attention
    from graft.train.optim import build_optimizer, build_scheduler

    device = next(model.parameters()).device
    loop._check_autocast(config, device)
    first = loop._to(collate([examples[0]]), device)
    loss_fn, _ = loop._loss_fn(model, config, first)
    if packed_attention.applies(model, first, device):  # as graft.train.train does for packed batches
        packed_attention.register()
        model.set_attn_implementation(packed_attention.NAME)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, total_steps)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    model.train()

    def scoped_loss(m: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with record_function(LOSS):
            return loss_fn(m, batch)

    def step(items: Sequence[Any]) -> float:
        with record_function(STEP):
            with record_function(DATA):
                batch = loop._to(collate(list(items)), device)
            stats = loop._train_step(model, [batch], scoped_loss, optimizer, scheduler, None, params, config, device)
        return stats["loss"]

    return Side("graft", model, examples, collate, step)


def reference_side(trainer: Any, data: Sequence[Any], collate: Callable, bf16: bool, total_steps: int = 1000) -> Side:
    """The Trainer's ``training_step`` then its clip / optimizer / scheduler / zero_grad, as its loop does.

    ``trainer.train()`` would wrap the model's forward in bf16 autocast through accelerate when
    ``bf16=True``; here the forward (``compute_loss``) runs under the same autocast directly.
    """
    trainer.create_optimizer_and_scheduler(num_training_steps=total_steps)
    model = trainer.model
    compute_loss = trainer.compute_loss
    cast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    def scoped_loss(*args: Any, **kwargs: Any) -> Any:
        with record_function(LOSS), cast():
            return compute_loss(*args, **kwargs)

    trainer.compute_loss = scoped_loss  # instance attribute: training_step calls it
    model.train()

    def step(items: Sequence[Any]) -> float:
        with record_function(STEP):
            with record_function(DATA):
                batch = collate(list(items))
            count = int((batch["labels"][:, 1:] != -100).sum())  # what Trainer passes as num_items_in_batch
            loss = trainer.training_step(model, batch, count)
            trainer._clip_grad_norm(model)
            trainer.optimizer.step()
            trainer.lr_scheduler.step()
            model.zero_grad()
            return float(loss)

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return Side("peft+Trainer", inner, data, collate, step)


def step_batches(n: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """Example indices of ``steps`` batches from one seeded permutation (the same on both sides)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    if len(batches) < steps:
        raise SystemExit(f"--examples {n} gives {len(batches)} batches of {batch_size}; need {steps}")
    return batches[:steps]


def measure(side: Side, batches: list[list[int]], profiled: int, timed: int) -> dict[str, Any]:
    """Warm up on ``batches[0]``; time ``timed`` steps and profile ``profiled`` steps on the following batches.

    Per-step figures are means over the profiled steps; the unprofiled time is the median.
    """
    pick = [[side.items[i] for i in b] for b in batches]
    side.step(pick[0])
    work = pick[1:] or pick
    times = []
    for k in range(timed):
        t0 = time.perf_counter()
        side.step(work[k % len(work)])
        times.append(time.perf_counter() - t0)
    cats = dict.fromkeys(CATEGORIES, 0.0)
    mm_us = step_us = 0.0
    with module_scopes(side.model):
        for k in range(profiled):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                side.step(work[k % len(work)])
            events = prof.events()
            for name, us in categorise(events).items():
                cats[name] += us / profiled
            mm_us += matmul_time(events) / profiled
            step_us += sum(e.cpu_time_total for e in events if e.name == STEP) / profiled
    flops = count_flops(lambda: side.step(work[0]))
    return {"impl": side.name, "step_s": statistics.median(times), "step_times_s": times,
            "profiled_step_s": step_us / 1e6, "categories_s": {k: v / 1e6 for k, v in cats.items()},
            "matmul_op_s": mm_us / 1e6, "flops": flops}


def batch_tokens(side: Side, batches: list[list[int]]) -> dict[str, float]:
    """Mean tokens per measured step: positions the model computes (padding included), real, supervised."""
    out = {"positions": 0.0, "real": 0.0, "supervised": 0.0}
    work = batches[1:] or batches
    for b in work:
        items = [side.items[i] for i in b]
        out["positions"] += side.collate(items)["input_ids"].numel()
        for x in items:
            ids, labels = (x["input_ids"], x["labels"]) if isinstance(x, dict) else (x.input_ids, x.labels)
            out["real"] += len(ids)
            out["supervised"] += sum(1 for t in labels[1:] if t != -100)
    return {k: v / len(work) for k, v in out.items()}


# --------------------------------------------------------------------------------------------
# Driver


GRAFT_VARIANTS = {  # --side name -> (packing, selective logits)
    "graft": (True, True),  # the defaults
    "graft-packing": (True, False),
    "graft-selective": (False, True),
    "graft-plain": (False, False),
}


def build_side(args: argparse.Namespace, which: str) -> Side:
    bf16 = args.dtype == "bf16"
    if which in GRAFT_VARIANTS:
        packing, selective = GRAFT_VARIANTS[which]
        model, examples, collate, cfg = train_bench.build_graft(args, packing=packing, selective=selective,
                                                                checkpointing=False, bf16=bf16)
        side = graft_side(model, examples, collate, cfg)
        if which != "graft":
            side.name = f"graft ({'packing' if packing else 'padded'}, {'selective' if selective else 'full'} logits)"
        return side
    trainer, data, collate = train_bench.build_reference(args, bf16=bf16)
    return reference_side(trainer, data, collate, bf16)


def child(args: argparse.Namespace) -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    side = build_side(args, args.side)
    batches = step_batches(len(side.items), args.batch_size, 1 + max(args.steps, 1), args.seed)
    out = measure(side, batches, profiled=args.steps, timed=args.steps)
    out["tokens"] = batch_tokens(side, batches)
    print("RESULT " + json.dumps(out), flush=True)


def table(results: list[dict[str, Any]], rates: dict[str, dict[str, float]], dtype: str) -> str:
    """The markdown report: per-category ms/step and share, then the roofline lines."""
    head = "| category | " + " | ".join(f"{r['impl']} ms/step | share" for r in results) + " |"
    lines = [head, "|---|" + "---:|---:|" * len(results)]
    for c in CATEGORIES:
        cells = []
        for r in results:
            v = r["categories_s"][c]
            cells.append(f"{1e3 * v:.1f} | {100 * v / max(r['profiled_step_s'], 1e-12):.1f}%")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    cells = [f"**{1e3 * r['profiled_step_s']:.1f}** | 100%" for r in results]
    lines.append("| **step, profiled** | " + " | ".join(cells) + " |")
    cells = [f"{1e3 * r['step_s']:.1f} | {100 * r['step_s'] / r['profiled_step_s']:.0f}%" for r in results]
    lines.append("| step, unprofiled (median) | " + " | ".join(cells) + " |")
    rate_key = "bf16" if dtype == "bf16" and "bf16" in rates else "fp32"
    peak = max(rates[rate_key].values())
    lines += ["", f"GEMM rate measured here ({rate_key}, GFLOP/s): "
              + ", ".join(f"{k} {v:.1f}" for k, v in rates[rate_key].items()) + f"; peak {peak:.1f}.", ""]
    lines += ["| | " + " | ".join(r["impl"] for r in results) + " |", "|---|" + "---:|" * len(results)]
    rows = [
        ("tokens per step: computed (with padding) / real / supervised",
         lambda r: f"{r['tokens']['positions']:.0f} / {r['tokens']['real']:.0f} / {r['tokens']['supervised']:.0f}"),
        ("step FLOPs (G): matmul + attention", lambda r: f"{r['flops']['matmul'] / 1e9:.1f} + {r['flops']['attention'] / 1e9:.1f}"),
        ("matmul ops' time in the step (ms)", lambda r: f"{1e3 * r['matmul_op_s']:.1f}"),
        ("achieved matmul rate in the step (GFLOP/s)",
         lambda r: f"{r['flops']['matmul'] / max(r['matmul_op_s'], 1e-12) / 1e9:.1f}"),
        ("matmul work at peak rate (ms)", lambda r: f"{1e3 * r['flops']['matmul'] / peak / 1e9:.1f}"),
        ("... as a share of the unprofiled step", lambda r: f"{100 * r['flops']['matmul'] / peak / 1e9 / r['step_s']:.1f}%"),
        ("matmul + attention work at peak rate, share",
         lambda r: f"{100 * r['flops']['total'] / peak / 1e9 / r['step_s']:.1f}%"),
    ]
    for label, fn in rows:
        lines.append(f"| {label} | " + " | ".join(fn(r) for r in results) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke test: 8 examples, batch 2, max length 256, 1 step")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast on both sides")
    ap.add_argument("--steps", type=int, default=3, help="profiled (and, separately, timed) steps after a warm-up")
    train_bench.step_args(ap)
    ap.add_argument("--only", choices=["graft", "reference"], action="append")
    ap.add_argument("--ablate", action="store_true",
                    help="also graft with packing alone, selective logits alone, and neither (why they do not compound)")
    ap.add_argument("--token-model", action="store_true",
                    help="only the FLOPs each combination of packing / selective logits should take (no timing)")
    ap.add_argument("--json", type=Path, help="write every figure here")
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("--tmp", default="/tmp/graft-bench-profile", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu", help=argparse.SUPPRESS)  # the builders read it
    args = ap.parse_args()
    if args.quick:
        args.examples, args.batch_size, args.max_length, args.steps = 8, 2, 256, 1
    if args.side:
        return child(args)
    if not args.data.exists():
        print(f"skipped: {args.data} not found (the benchmark reads ../shared/data)")
        return
    if args.ablate or args.token_model:
        print(token_model(args), flush=True)
        if args.token_model:
            return
    if args.dtype == "bf16" and not cpu_has_bf16():
        print("skipped: --dtype bf16 needs a CPU with AVX512-BF16 or AMX (this one would emulate bf16)")
        return
    torch.set_num_threads(args.threads)
    tokens = args.batch_size * args.max_length
    rates = {"fp32": gemm_rates(torch.float32, tokens, args.quick)}
    if cpu_has_bf16():
        rates["bf16"] = gemm_rates(torch.bfloat16, tokens, args.quick)
    for kind, r in rates.items():
        print(f"GEMM {kind} GFLOP/s: " + ", ".join(f"{k} {v:.1f}" for k, v in r.items()), flush=True)
    results = []
    sides = args.only or ["graft", "reference"]
    if args.ablate:
        sides += ["graft-packing", "graft-selective", "graft-plain"]
    for which in sides:
        cmd = [sys.executable, __file__, "--side", which] + [a for a in sys.argv[1:] if a not in ("--quick", "--ablate")]
        if args.quick:
            cmd += ["--examples", str(args.examples), "--batch-size", str(args.batch_size),
                    "--max-length", str(args.max_length), "--steps", str(args.steps)]
        results.append(train_bench.run_child(cmd, which))
        r = results[-1]
        print(f"{r['impl']}: {r['step_s']:.3f} s/step unprofiled, {r['profiled_step_s']:.3f} s profiled", flush=True)
    md = table(results, rates, args.dtype)
    print(f"\nthreads {args.threads}, dtype {args.dtype}, batch {args.batch_size}, max length {args.max_length}, "
          f"{args.steps} profiled step(s)\n")
    print(md)
    ref = next((r for r in results if r["impl"] == "peft+Trainer"), None)
    for r in results:
        if ref is not None and r is not ref and not math.isnan(ref["step_s"]):
            print(f"{r['impl']}: step time / reference {r['step_s'] / ref['step_s']:.3f} "
                  f"(throughput per supervised token {ref['step_s'] / r['step_s']:.2f}x the reference's)")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "gemm_gflops": rates,
                                         "results": results, "markdown": md}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
