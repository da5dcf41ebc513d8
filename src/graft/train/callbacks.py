"""Step callbacks: what ``graft.train.train(..., on_step=fn, callbacks=[fn, ...])`` calls after each step.

A callback is any ``fn(info: StepInfo) -> None``. ``StepInfo`` is the step's metrics dict (the line
``metrics.jsonl`` gets, with ``eval_*`` keys on evaluation steps) plus attributes, and
``info.request_stop(reason)`` ends training after this step: the adapter is saved as usual and
``TrainResult.stopped_early`` gives the reason. Under ``torchrun`` callbacks run on every rank with the
same metrics; a callback that stops must decide alike on every rank (deciding from the metrics does).

Early stopping and best-checkpoint keeping are callbacks of this kind (:class:`EarlyStopping`,
:class:`KeepBest`), built by the trainer from ``TrainConfig``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from graft.train import checkpoint as ckpt


class StepInfo(dict):
    """One optimizer step: its metrics (a dict: ``info["loss"]``), its place in the run, a way to stop.

    Attributes:
        total_steps: The steps the run plans.
        stop_reason: Why a callback asked to stop, or None.
    """

    def __init__(self, record: dict[str, Any], total_steps: int) -> None:
        super().__init__(record)
        self.total_steps = total_steps
        self.stop_reason: str | None = None

    @property
    def step(self) -> int:
        return self["step"]

    @property
    def loss(self) -> float:
        return self["loss"]

    @property
    def lr(self) -> float:
        return self["lr"]

    @property
    def epoch(self) -> float:
        return self["epoch"]

    @property
    def eval_loss(self) -> float | None:
        """The eval loss when this step evaluated, else None."""
        return self.get("eval_loss")

    def request_stop(self, reason: str = "a callback asked to stop") -> None:
        """End training after this step (the final adapter is still saved)."""
        self.stop_reason = self.stop_reason or reason


class EarlyStopping:
    """Stop when the eval loss has not improved by more than ``threshold`` for ``patience`` evaluations."""

    def __init__(self, patience: int, threshold: float = 0.0) -> None:
        self.patience, self.threshold = patience, threshold
        self.best = math.inf
        self.bad = 0

    def __call__(self, info: StepInfo) -> None:
        loss = info.eval_loss
        if loss is None:
            return
        if loss < self.best - self.threshold:
            self.best, self.bad = loss, 0
            return
        self.bad += 1
        if self.bad >= self.patience:
            info.request_stop(f"early stopping: eval loss has not improved on {self.best:.6g} by more than "
                              f"{self.threshold:g} for {self.bad} evaluations")


class KeepBest:
    """Remember the trainable weights (and method state) of the evaluation with the lowest eval loss.

    The copy lives in CPU memory; :meth:`restore` puts it back into the model before the final save.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.step: int | None = None
        self.eval_loss = math.inf
        self._weights: dict[str, torch.Tensor] = {}
        self._method: dict[str, torch.Tensor] = {}

    def __call__(self, info: StepInfo) -> None:
        loss = info.eval_loss
        if loss is None or not loss < self.eval_loss:
            return
        self.step, self.eval_loss = info.step, loss
        self._weights = ckpt.trainable_state(self.model)
        self._method = ckpt.method_state(self.model)

    def restore(self) -> bool:
        """Load the best weights into the model; False (nothing done) when none were kept."""
        if self.step is None:
            return False
        ckpt.load_trainable(self.model, self._weights, where=f"the best evaluation (step {self.step})")
        for name, method in ckpt.method_hooks(self.model, "load_training_state"):
            mine = {k.split("/", 1)[1]: v for k, v in self._method.items() if k.split("/", 1)[0] == name}
            method.load_training_state(self.model, name, mine)
        return True
