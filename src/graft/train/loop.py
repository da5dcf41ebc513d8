"""The training loop: ``train(model, train_data, collate, config)``.

One optimizer step = ``grad_accum`` micro-batches. The step's loss is the sum of the per-token (or
per-row) cross-entropies of all its micro-batches divided by the number of supervised tokens in
the whole step, so accumulating 2 x 2 examples gives the same gradient as one batch of 4. (Averaging
per-micro-batch means instead would over-weight tokens in micro-batches with few supervised tokens.)

Data order: epoch ``e`` visits the examples in ``torch.randperm`` order from a generator seeded with
``seed + e``, so the position (epoch, micro-batch index) alone says what comes next; a checkpoint
stores that position and the RNG states, and resuming continues bit for bit.
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from graft.io import atomic_dir_write
from graft.io import save as save_adapter
from graft.options import NAME, OptionError
from graft.train import checkpoint as ckpt
from graft.train import dpo
from graft.train.callbacks import EarlyStopping, KeepBest, StepInfo
from graft.train.compile import compiled_layers, require_compiler
from graft.train.config import DATA_ORDER_FIELDS, TrainConfig
from graft.train.distributed import DistConfig, Distributed
from graft.train.distributed import setup as setup_distributed
from graft.train.loss import (
    IGNORE_INDEX,
    causal_lm_loss_sum,
    classification_loss_sum,
    selective_fallback_reason,
    supervised_count,
)
from graft.train.monitor import (
    METRICS_NAME,
    PLOT_NAME,
    MetricsLog,
    map_large_blocks,
    peak_memory_mb,
    perplexity,
    plot_losses,
)
from graft.train.optim import build_optimizer, build_scheduler
from graft.train.packed_attention import applies as packed_applies
from graft.train.packed_attention import packed_attention
from graft.train.report import Reporters

Collate = Callable[[list[Any]], dict[str, torch.Tensor]]
LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]
Callback = Callable[[StepInfo], None]


@dataclass
class TrainResult:
    """What a run did.

    Attributes:
        steps: Optimizer steps done (in total, across resumes).
        epochs: Fractional epochs done.
        losses: Training loss of every step.
        final_loss: Mean loss of the last three steps (one step's loss is noisy).
        eval_loss: The last evaluation's loss, or None without eval data.
        evals: Every evaluation, as ``{"step", "eval_loss", "eval_ppl" | "eval_accuracy"}``.
        tokens: Input tokens seen (non-padding where an attention mask says so).
        supervised_tokens: Tokens (or rows, for classification) the loss was computed on.
        seconds: Wall time of training, across resumes.
        peak_rss_mb: Peak resident memory of the process (``ru_maxrss``).
        vm_hwm_mb: Peak resident memory from ``/proc/self/status`` (``VmHWM``), None off Linux.
        selective_logits: Whether the selective-logits loss was used.
        resumed_from: The checkpoint this run continued from, or None.
        saved_to: Where the final adapter (or full model) was written, or None without out_dir.
        stopped_early: Why training stopped before the planned steps (early stopping, a callback), or None.
        best_step: With ``keep_best``: the step whose weights were kept (and saved), or None.
        outputs: Where each output went: adapter, metrics, plot, checkpoints, metric backends.
    """

    steps: int
    epochs: float
    losses: list[float]
    final_loss: float
    eval_loss: float | None
    evals: list[dict[str, float]]
    tokens: int
    supervised_tokens: int
    seconds: float
    peak_rss_mb: float
    vm_hwm_mb: float | None
    selective_logits: bool
    resumed_from: Path | None = None
    saved_to: Path | None = None
    stopped_early: str | None = None
    best_step: int | None = None
    outputs: dict[str, str] = field(default_factory=dict)


@dataclass
class _Progress:
    """The mutable part of a run that a checkpoint carries."""

    step: int = 0
    epoch: int = 0  # position of the next micro-batch: epoch ...
    batch: int = 0  # ... and index within that epoch
    epoch_float: float = 0.0
    losses: list[float] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    tokens: int = 0
    supervised: int = 0
    elapsed: float = 0.0

    def to_state(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch, "epoch_float": self.epoch_float,
                "losses": self.losses, "metrics": self.records, "evals": self.evals, "tokens": self.tokens,
                "supervised_tokens": self.supervised, "elapsed": self.elapsed}

    @classmethod
    def from_state(cls, s: dict[str, Any]) -> _Progress:
        return cls(step=s["step"], epoch=s["epoch"], batch=s["batch_in_epoch"], epoch_float=s["epoch_float"],
                   losses=list(s["losses"]), records=list(s["metrics"]), evals=list(s["evals"]),
                   tokens=s["tokens"], supervised=s["supervised_tokens"], elapsed=s["elapsed"])


def train(
    model: nn.Module,
    train_data: Sequence[Any],
    collate: Collate,
    config: TrainConfig,
    eval_data: Sequence[Any] | None = None,
    resume: bool = False,
    *,
    on_step: Callback | None = None,
    distributed: DistConfig | None = None,
    callbacks: Sequence[Callback] = (),
) -> TrainResult:
    """Train the model's trainable parameters (an adapter after ``graft.attach``, or all of them).

    Args:
        model: A transformers model; what requires grad is what trains.
        train_data: Examples, opaque here: ``collate`` turns a list of them into a batch.
        collate: ``list of examples -> dict of tensors``. Causal LM: ``input_ids``, ``labels``
            (-100 = unsupervised, not shifted) and optionally ``attention_mask`` / ``position_ids``
            (packed rows), all passed to the model as given. Classification: ``input_ids``,
            ``attention_mask``, ``labels`` of shape (batch,).
        config: The training configuration.
        eval_data: Examples to evaluate on every ``config.eval_every`` steps and at the end.
        resume: Continue from the latest complete checkpoint in ``config.out_dir`` (an error if there
            is none). The lr schedule is planned over this run's steps, so a run resumed with a larger
            ``max_steps`` continues on the longer schedule.
        on_step: Called after every optimizer step (and its checkpoint) with that step's metrics, a
            :class:`~graft.train.callbacks.StepInfo` (a dict with attributes; ``request_stop()`` ends
            the run after this step), on every rank, with the metrics of all ranks.
        distributed: Strategy and collective timeout when this process is one of several
            (``torchrun``); see :mod:`graft.train.distributed`. There ``config.batch_size`` (or
            ``tokens_per_batch``) is per rank, and only rank 0 writes files.
        callbacks: More functions called like ``on_step``, in order, after it.

    Returns:
        A :class:`TrainResult`. With ``out_dir``, the final adapter is in ``out_dir/adapter`` (or the
        full model in ``out_dir/model``), with ``metrics.jsonl`` and ``loss.png`` beside it.

    Raises:
        ValueError: Empty data, nothing trainable, a bf16/fp16 ``autocast`` the hardware lacks,
            checkpoints in ``out_dir`` without ``resume=True`` (or ``resume=True`` without one),
            ``eval_every`` without ``eval_data``, or a checkpoint from a different data order.
    """
    if len(train_data) == 0:
        raise ValueError("train_data is empty")
    out_dir = Path(config.out_dir) if config.out_dir is not None else None
    if resume and out_dir is None:
        raise OptionError("{resume} needs TrainConfig.out_dir (where the checkpoints are)", resume=True)
    if config.eval_every and eval_data is None:
        raise OptionError("{eval_every} needs eval_data to evaluate on", eval_every=config.eval_every)
    dist = setup_distributed(model, distributed, config.seed)  # None in a single process
    order = dist.order_config(config) if dist is not None else config  # what decides the global data order
    device = next(model.parameters()).device
    _check_autocast(config, device)
    if config.compile:
        require_compiler(device)  # before anything is written
    if config.objective == "dpo":
        dpo.check_model(model)
    if (config.early_stopping_patience is not None or config.keep_best) and not eval_data:
        raise ValueError("early_stopping_patience / keep_best compare evaluations: pass eval_data")
    if config.release_cpu_memory and device.type == "cpu":
        map_large_blocks()
    lengths = [_length(x) for x in train_data] if config.tokens_per_batch else None
    total = config.max_steps or _count_steps(len(train_data), lengths, order)
    seed_everything(config.seed)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, total)
    scaler = torch.amp.GradScaler(device.type) if config.autocast == "fp16" else None
    if dist is None:
        start = _find_start(out_dir, resume, config, len(train_data))
    else:  # rank 0 looks (and cleans up); every rank then loads the same checkpoint
        start = dist.on_main(lambda: _find_start(out_dir, resume, config, len(train_data), dist.world_size))

    was_training = model.training
    checkpointing = _enable_checkpointing(model) if config.gradient_checkpointing else False
    try:
        first = _to(collate([train_data[0]]), device)
        loss_fn, selective = _loss_fn(model, config, first)
        # Packed rows on the CPU: attention one example at a time, not over the whole masked row (exact).
        attention = packed_attention(model) if packed_applies(model, first, device) else contextlib.nullcontext()
        compiled = compiled_layers(model, device) if config.compile else contextlib.nullcontext()
        if config.objective == "dpo" and config.precompute_ref:
            train_data, eval_data = (None if rows is None else dpo.precompute_reference(
                model, rows, collate, config.batch_size or 8, logits_chunk=config.logits_chunk, selective=selective)
                for rows in (train_data, eval_data))
        progress = _Progress()
        if start is not None:
            planned = [dict(vars(f)) for f in scheduler.lr_lambdas]  # this run's schedule, over ``total``
            progress = _Progress.from_state(ckpt.load_checkpoint(start, model, optimizer, scheduler, scaler))
            _replan_schedule(scheduler, planned, total)
        else:
            _prepare_methods(model, train_data, collate, order, lengths, loss_fn, device)
        model.train()
        best = KeepBest(model) if config.keep_best else None
        hooks = [h for h in (on_step, *callbacks, best) if h is not None]
        if config.early_stopping_patience is not None:
            hooks.append(EarlyStopping(config.early_stopping_patience, config.early_stopping_threshold))
        reporters = Reporters(out_dir, config) if dist is None or dist.is_main else None
        try:
            with attention, compiled:
                stopped = _run(model, train_data, collate, config, eval_data, device, lengths, total, loss_fn,
                               optimizer, scheduler, scaler, progress, selective, hooks, dist, reporters)
        finally:
            if reporters is not None:
                reporters.close()
        if best is not None:
            best.restore()
    finally:
        model.train(was_training)
        if checkpointing:
            _disable_checkpointing(model)

    if dist is not None:
        dist.check_in_sync(model)
    saved_to = None
    if out_dir is not None and (dist is None or dist.is_main):
        saved_to = _save_final(model, out_dir)
        plot_losses(progress.records, out_dir / PLOT_NAME)
    if dist is not None:
        dist.barrier()  # the files exist on return, on every rank
        if out_dir is not None:
            saved_to = out_dir / ("adapter" if ckpt.adapter_names(model) else "model")
    memory = peak_memory_mb()
    outputs = {}
    if out_dir is not None:
        outputs = {"adapter" if ckpt.adapter_names(model) else "model": str(saved_to),
                   "metrics": str(out_dir / METRICS_NAME), "loss plot": str(out_dir / PLOT_NAME)}
        if config.save_every:
            outputs["checkpoints"] = str(out_dir / "checkpoint-*")
        outputs.update(reporters.locations() if reporters is not None else {})
    return TrainResult(
        steps=progress.step, epochs=round(progress.epoch_float, 4), losses=progress.losses,
        final_loss=float(np.mean(progress.losses[-3:])) if progress.losses else float("nan"),
        eval_loss=progress.evals[-1]["eval_loss"] if progress.evals else None, evals=progress.evals,
        tokens=progress.tokens, supervised_tokens=progress.supervised, seconds=round(progress.elapsed, 3),
        peak_rss_mb=memory["peak_rss_mb"], vm_hwm_mb=memory["vm_hwm_mb"], selective_logits=selective,
        resumed_from=start, saved_to=saved_to, stopped_early=stopped,
        best_step=best.step if best is not None else None, outputs=outputs,
    )


def _run(model: nn.Module, data: Sequence[Any], collate: Collate, config: TrainConfig,
         eval_data: Sequence[Any] | None, device: torch.device, lengths: list[int] | None, total: int,
         loss_fn: LossFn, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any,
         progress: _Progress, selective: bool, callbacks: Sequence[Callback],
         dist: Distributed | None = None, reporters: Reporters | None = None) -> str | None:
    """Steps from ``progress`` to ``total``: train, log, evaluate, checkpoint; the reason for an early stop."""
    out_dir = Path(config.out_dir) if config.out_dir is not None else None
    main = dist is None or dist.is_main  # the process that writes files and shows progress
    metrics = MetricsLog(out_dir, progress.records) if out_dir is not None and main else None
    params = [p for group in optimizer.param_groups for p in group["params"]]
    schedule = scheduler.lr_lambdas[0]
    bar = tqdm(total=total, initial=progress.step, desc="train", unit="step",
               disable=not config.progress or not main, dynamic_ncols=True)
    started, base_elapsed, run_tokens = time.perf_counter(), progress.elapsed, 0
    order = dist.order_config(config) if dist is not None else config
    try:
        for group, (epoch, batch), epoch_float in _steps(len(data), lengths, order, progress.epoch, progress.batch):
            if progress.step >= total:
                break
            lr = config.lr * schedule(progress.step)  # the rate this step trains at (before scheduler.step)
            t0 = time.perf_counter()
            if dist is None:
                batches = [_to(collate([data[i] for i in indices]), device) for indices in group]
            else:  # this rank's slice of each global micro-batch
                batches = dist.local_batches(group, lambda part: _to(collate([data[i] for i in part]), device))
            stats = _train_step(model, batches, loss_fn, optimizer, scheduler, scaler, params, config, device,
                                step=progress.step + 1, total_steps=total, dist=dist)
            seconds = time.perf_counter() - t0
            progress.step, progress.epoch, progress.batch, progress.epoch_float = progress.step + 1, epoch, batch, epoch_float
            progress.losses.append(stats["loss"])
            progress.tokens += stats["tokens"]
            progress.supervised += stats["supervised_tokens"]
            progress.elapsed = base_elapsed + time.perf_counter() - started
            run_tokens += stats["tokens"]
            record = {"step": progress.step, "epoch": round(epoch_float, 4), "lr": lr, **stats,
                      "tok_per_s": round(stats["tokens"] / max(seconds, 1e-9), 1),
                      "elapsed": round(progress.elapsed, 3),
                      **(peak_memory_mb() if dist is None else dist.peak_memory_mb())}
            last = progress.step >= total
            if eval_data is not None and ((config.eval_every and progress.step % config.eval_every == 0) or last):
                result = _evaluate(model, eval_data, collate, config, loss_fn, device)
                progress.evals.append({"step": progress.step, **result})
                record.update(result)
            if progress.step % config.log_every == 0 or last or "eval_loss" in record:
                progress.records.append(record)
                if metrics is not None:
                    metrics.write(record)
                if reporters is not None:
                    reporters.log(record)
            if config.save_every and progress.step % config.save_every == 0 and main:
                state = {**progress.to_state(), "total_steps": total, "n_examples": len(data),
                         "selective_logits": selective, "config": config.to_dict()}
                if dist is not None:
                    state["world_size"] = dist.world_size  # config.batch_size was per rank
                ckpt.save_checkpoint(out_dir, progress.step, model, optimizer, scheduler, scaler, state)
                ckpt.prune_checkpoints(out_dir, config.keep_checkpoints)
            bar.set_postfix(loss=f"{stats['loss']:.4f}", lr=f"{lr:.2e}", refresh=False,
                            tok_s=f"{run_tokens / max(time.perf_counter() - started, 1e-9):.0f}")
            bar.update(1)
            info = StepInfo(record, total)
            for callback in callbacks:
                callback(info)
            if info.stop_reason is not None:
                return info.stop_reason
    finally:
        bar.close()
    return None


def _train_step(model: nn.Module, batches: list[dict[str, torch.Tensor]], loss_fn: LossFn,
                optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any, params: list[nn.Parameter],
                config: TrainConfig, device: torch.device, step: int = 1, total_steps: int = 1,
                dist: Distributed | None = None) -> dict[str, Any]:
    """One optimizer step over ``batches`` (the micro-batches of a gradient-accumulation group).

    ``step`` is the number of this optimizer step (1-based) out of ``total_steps``. Methods extend a
    step through optional hooks: ``loss_penalty(model, name)`` (a term backpropagated once per step),
    ``before_optimizer_step(model, name)`` (after clipping: gradient masks) and
    ``after_optimizer_step(model, name, step=, total_steps=, optimizer=)`` (before the gradients are
    cleared: rank allocation, merge-and-restart).

    With ``dist``, ``batches`` are this rank's: the step is normalised by the supervised count of all
    ranks and the trainable gradients are summed across ranks before clipping.
    """
    if isinstance(loss_fn, dpo.DPOLoss):
        loss_fn.take_metrics()  # only this step's pairs (not a method's preparation pass) count
    supervised = sum(_count(b, config) for b in batches)
    if dist is not None:
        supervised = dist.sum_count(supervised)
    denom = max(supervised, 1)  # token-weighted over the whole step, not a mean of micro-batch means
    loss_sum = 0.0
    with dist.forward_rng(step) if dist is not None else contextlib.nullcontext():
        for batch in batches:
            with _autocast(config, device):
                micro = loss_fn(model, batch)
            scaled = micro / denom
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
            loss_sum += micro.item()
    for name, method in ckpt.method_hooks(model, "loss_penalty"):
        penalty = method.loss_penalty(model, name)  # e.g. AdaLoRA's orthogonality term, once per step
        if dist is not None:
            penalty = penalty / dist.world_size  # every rank adds it; the sum over ranks counts it once
        (scaler.scale(penalty) if scaler is not None else penalty).backward()
    if dist is not None:
        dist.sync_gradients(params)
    if scaler is not None:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    grad_norm = None
    if config.max_grad_norm:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm))
    for name, method in ckpt.method_hooks(model, "before_optimizer_step"):
        method.before_optimizer_step(model, name)  # e.g. Child-Tuning's gradient masks, after clipping
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    for name, method in ckpt.method_hooks(model, "after_optimizer_step"):
        # Gradients are still there: AdaLoRA scores importance and prunes ranks, ReLoRA merges and restarts.
        method.after_optimizer_step(model, name, step=step, total_steps=total_steps, optimizer=optimizer)
    optimizer.zero_grad(set_to_none=True)
    tokens = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in batches)
    if dist is not None:
        loss_sum, tokens = dist.reduce_stats(loss_sum, tokens, batches)
    stats = {"loss": loss_sum / denom, "grad_norm": grad_norm, "tokens": tokens, "supervised_tokens": supervised}
    if isinstance(loss_fn, dpo.DPOLoss):
        stats.update(loss_fn.take_metrics())  # rewards/chosen ... of this step's pairs (this rank's)
    return stats


def _count(batch: dict[str, torch.Tensor], config: TrainConfig) -> int:
    """What a step's loss is averaged over: supervised tokens, labelled rows, or (DPO) pairs."""
    return dpo.pair_count(batch) if config.objective == "dpo" else supervised_count(batch, config.task)


# --------------------------------------------------------------------------------------------
# Evaluation


def evaluate(model: nn.Module, data: Sequence[Any], collate: Collate, config: TrainConfig) -> dict[str, float]:
    """Loss over ``data`` (token-weighted) and perplexity (causal LM) or accuracy (classification)."""
    device = next(model.parameters()).device
    loss_fn, _ = _loss_fn(model, config, _to(collate([data[0]]), device))
    return _evaluate(model, data, collate, config, loss_fn, device)


def _evaluate(model: nn.Module, data: Sequence[Any], collate: Collate, config: TrainConfig, loss_fn: LossFn,
              device: torch.device) -> dict[str, float]:
    was_training = model.training
    model.eval()
    lengths = [_length(x) for x in data] if config.tokens_per_batch else None
    total, count, correct = 0.0, 0, 0
    if isinstance(loss_fn, dpo.DPOLoss):
        loss_fn.take_metrics()  # start the evaluation's sums afresh
    try:
        with torch.no_grad():
            for indices in _group(list(range(len(data))), lengths, config):
                batch = _to(collate([data[i] for i in indices]), device)
                with _autocast(config, device):
                    if config.task == "classification":
                        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
                        labels = batch["labels"]
                        total += float(torch.nn.functional.cross_entropy(
                            logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum"))
                        correct += int(((logits.argmax(-1) == labels) & (labels != IGNORE_INDEX)).sum())
                    else:
                        total += float(loss_fn(model, batch))
                count += _count(batch, config)
    finally:
        model.train(was_training)
    loss = total / max(count, 1)
    if isinstance(loss_fn, dpo.DPOLoss):
        return {"eval_loss": loss, **{f"eval_{k}": v for k, v in loss_fn.take_metrics().items()}}
    if config.task == "classification":
        return {"eval_loss": loss, "eval_accuracy": correct / max(count, 1)}
    return {"eval_loss": loss, "eval_ppl": perplexity(loss)}


# --------------------------------------------------------------------------------------------
# Data order


def epoch_batches(n: int, lengths: list[int] | None, config: TrainConfig, epoch: int) -> list[list[int]]:
    """The micro-batches (lists of example indices) of ``epoch``: a permutation seeded by seed + epoch."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed + epoch)).tolist()
    return _group(order, lengths, config)


def _group(order: list[int], lengths: list[int] | None, config: TrainConfig) -> list[list[int]]:
    """Cut ``order`` into batches of ``batch_size``, or of at most ``tokens_per_batch`` padded tokens."""
    if config.batch_size is not None:
        return [order[i:i + config.batch_size] for i in range(0, len(order), config.batch_size)]
    assert lengths is not None and config.tokens_per_batch is not None
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        if current and max(longest, lengths[i]) * (len(current) + 1) > config.tokens_per_batch:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, lengths[i])
    if current:
        batches.append(current)
    return batches


def _steps(n: int, lengths: list[int] | None, config: TrainConfig, epoch: int,
           batch: int) -> Iterator[tuple[list[list[int]], tuple[int, int], float]]:
    """From position (epoch, batch): each step's micro-batches, the position after it, fractional epoch."""
    while True:
        batches = epoch_batches(n, lengths, config, epoch)
        for start in range(batch, len(batches), config.grad_accum):
            end = min(start + config.grad_accum, len(batches))
            after = (epoch, end) if end < len(batches) else (epoch + 1, 0)
            yield batches[start:end], after, epoch + end / len(batches)
        epoch, batch = epoch + 1, 0


def planned_steps(train_data: Sequence[Any], config: TrainConfig) -> int:
    """The optimizer steps ``train`` will run on ``train_data`` (in one process)."""
    if config.max_steps:
        return config.max_steps
    lengths = [_length(x) for x in train_data] if config.tokens_per_batch else None
    return _count_steps(len(train_data), lengths, config)


def _count_steps(n: int, lengths: list[int] | None, config: TrainConfig) -> int:
    if lengths is None:  # every epoch has the same number of batches
        return config.epochs * math.ceil(math.ceil(n / config.batch_size) / config.grad_accum)
    return sum(math.ceil(len(epoch_batches(n, lengths, config, e)) / config.grad_accum) for e in range(config.epochs))


def _length(example: Any) -> int:
    if isinstance(example, Mapping):
        return len(example["input_ids"])
    try:
        return len(example)
    except TypeError:
        raise TypeError(
            f"tokens_per_batch needs each example's length: give {type(example).__name__} a __len__ "
            "or use dicts with 'input_ids'"
        ) from None


# --------------------------------------------------------------------------------------------
# Setup helpers


def _prepare_methods(model: nn.Module, data: Sequence[Any], collate: Collate, config: TrainConfig,
                     lengths: list[int] | None, loss_fn: LossFn, device: torch.device) -> None:
    """Methods that look at the training data once before the first step (Child-Tuning D's Fisher mask).

    They see the first epoch's first batches, in training order. A resumed run skips this: the
    result is restored from the checkpoint.
    """
    for name, method in ckpt.method_hooks(model, "prepare"):
        if not method.needs_preparation():
            continue
        first = epoch_batches(len(data), lengths, config, 0)[: getattr(method, "fisher_batches", 1)]
        batches = (_to(collate([data[i] for i in indices]), device) for indices in first)
        method.prepare(model, name, batches, lambda m, b: loss_fn(m, b) / max(_count(b, config), 1))


def _loss_fn(model: nn.Module, config: TrainConfig, first_batch: dict[str, torch.Tensor]) -> tuple[LossFn, bool]:
    """The loss for ``config.task``, and whether the selective-logits path is used."""
    if config.task == "classification":
        return classification_loss_sum, False
    selective = config.selective_logits
    if selective:
        reason = selective_fallback_reason(model, first_batch, config.logits_chunk)
        if reason is not None:
            warnings.warn(f"graft.train: computing full logits, not selective ones: {reason}", stacklevel=3)
            selective = False
    if config.objective == "dpo":
        return dpo.DPOLoss(config.beta, config.label_smoothing, config.logits_chunk, selective), selective
    return functools.partial(causal_lm_loss_sum, logits_chunk=config.logits_chunk, selective=selective), selective


def _find_start(out_dir: Path | None, resume: bool, config: TrainConfig, n: int,
                world_size: int = 1) -> Path | None:
    """The checkpoint to resume from (checked against this run), or None to start afresh.

    A run on ``world_size`` ranks reads ``batch_size`` / ``tokens_per_batch`` per rank: what must match
    the checkpoint is the global value (per rank x ranks), so a run may resume on another number of ranks.
    """
    if out_dir is None:
        return None
    ckpt.remove_stale_temporaries(out_dir)
    latest = ckpt.latest_checkpoint(out_dir)
    if latest is None:
        if resume:
            raise OptionError(f"{{resume}}: no checkpoint to continue from in {out_dir} (looked for "
                              "checkpoint-<step>/ directories with a trainer_state.json)", resume=True)
        return None
    if not resume:
        raise OptionError(f"{out_dir} already holds {latest.name}; pass {{resume}} to continue that run, "
                          "or choose another {out_dir}", resume=True, out_dir=NAME)
    state = ckpt.read_state(latest)
    saved = _global_order(state["config"], state.get("world_size", 1))
    now = _global_order(config.to_dict(), world_size)
    bad = {f: (saved.get(f), now[f]) for f in DATA_ORDER_FIELDS if saved.get(f) != now[f]}
    if bad:
        ranks = "" if world_size == 1 and "world_size" not in state else (
            f"; batch sizes are global (per rank x ranks: {state.get('world_size', 1)} then, {world_size} now)")
        raise ValueError(f"cannot resume from {latest}: it was trained with a different data order "
                         f"(field: (checkpoint, now) = {bad}){ranks}")
    if state["n_examples"] != n:
        raise ValueError(f"cannot resume from {latest}: it was trained on {state['n_examples']} examples, "
                         f"train_data has {n}")
    changed = [k for k, v in now.items() if k not in ("out_dir", "progress") and saved.get(k) != v]
    if changed:
        warnings.warn(f"resuming {latest} with changed settings {changed}; the lr schedule is planned over this "
                      "run's steps", stacklevel=3)
    return latest


def _replan_schedule(scheduler: Any, planned: list[dict[str, Any]], total: int) -> None:
    """Put this run's schedule back after a checkpoint restored the saved one.

    ``LambdaLR.load_state_dict`` restores the schedule object's fields, its ``total`` among them, so a
    run resumed with a larger ``max_steps`` would follow the saved cosine past its end (lr 0 at the old
    last step, then rising again). The rate of every later step comes from this run's plan instead; the
    step count (``last_epoch``) stays the checkpoint's.
    """
    saved = [dict(vars(f)) for f in scheduler.lr_lambdas]
    if saved == planned:
        return
    for schedule, fields in zip(scheduler.lr_lambdas, planned):
        vars(schedule).update(fields)
    step = scheduler.last_epoch
    for group, base, schedule in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * schedule(step)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
    warnings.warn(f"resumed at step {step} with the lr schedule planned over {total} steps (the checkpoint's "
                  f"plan: {saved[0].get('total')}); the next step trains at lr {scheduler._last_lr[0]:.3g}",
                  stacklevel=3)


def _global_order(config: dict[str, Any], world_size: int) -> dict[str, Any]:
    """A config (as a dict) with its per-rank batch size or token budget made global."""
    if world_size == 1:
        return config
    return {**config, **{k: config[k] * world_size for k in ("batch_size", "tokens_per_batch") if config.get(k)}}


def _save_final(model: nn.Module, out_dir: Path) -> Path:
    """The adapter(s) in PEFT format to ``out_dir/adapter``, or a full model to ``out_dir/model``."""
    if ckpt.adapter_names(model):
        return save_adapter(model, out_dir / "adapter")
    path = out_dir / "model"

    def write(tmp: Path) -> None:
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(tmp)
        else:
            from safetensors.torch import save_model
            save_model(model, str(tmp / "model.safetensors"))

    atomic_dir_write(path, write)
    return path


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _check_autocast(config: TrainConfig, device: torch.device) -> None:
    """Refuse a reduced-precision autocast the hardware would only emulate (slowly)."""
    if config.autocast is None:
        return
    if device.type == "cpu":
        has = {
            "bf16": _cpu_flag("_is_avx512_bf16_supported") or _cpu_flag("_is_amx_tile_supported"),
            "fp16": _cpu_flag("_is_amx_fp16_supported"),
        }[config.autocast]
        if not has:
            need = "AVX512-BF16 or AMX" if config.autocast == "bf16" else "AMX-FP16"
            raise OptionError(f"{{autocast}}: this CPU lacks {need}, so reduced precision would be emulated and "
                              "slower than fp32; drop {autocast__name}", where="TrainConfig",
                              autocast=config.autocast, autocast__name=NAME)
    elif device.type == "cuda" and config.autocast == "bf16" and not torch.cuda.is_bf16_supported():
        raise ValueError("TrainConfig autocast='bf16': this GPU does not support bf16; use 'fp16' or None")


def _cpu_flag(name: str) -> bool:
    check = getattr(torch.cpu, name, None)  # private torch helpers; absent means unknown, so no
    return bool(check()) if check is not None else False


def _autocast(config: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if config.autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if config.autocast == "bf16" else torch.float16)


def _enable_checkpointing(model: nn.Module) -> bool:
    """Turn on non-reentrant activation checkpointing; return whether this call turned it on.

    Non-reentrant checkpointing propagates gradients to adapters inside a checkpointed layer even
    when the layer's input (a frozen embedding's output) does not require grad; transformers also
    registers its input-require-grads hook here. Both are covered by a test comparing gradients.
    """
    if any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
        return False  # already on: the caller's setting, left as it is
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5 name
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        raise ValueError(f"TrainConfig gradient_checkpointing=True, but {type(model).__name__} "
                         "is not a transformers model that supports it")
    return True


def _disable_checkpointing(model: nn.Module) -> None:
    disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
    disable()
    if hasattr(model, "disable_input_require_grads"):
        with contextlib.suppress(Exception):  # nothing to remove when transformers registered no hook
            model.disable_input_require_grads()
