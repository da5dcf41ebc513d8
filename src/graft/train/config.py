"""The training configuration: one frozen, validated, JSON-serialisable dataclass."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from graft.options import NAME, OptionError

OPTIMIZERS = ("adamw", "adamw8bit")
SCHEDULES = ("cosine", "linear", "constant", "cosine_restarts")
AUTOCAST = ("bf16", "fp16", None)
TASKS = ("causal-lm", "classification")
OBJECTIVES = ("sft", "dpo")
REPORTERS = ("tensorboard", "wandb", "mlflow")

# Fields that decide which examples land in which step. Changing one of them on resume would make
# the saved data position point at different data, so resuming with a different value is an error.
DATA_ORDER_FIELDS = ("seed", "batch_size", "tokens_per_batch", "grad_accum", "task")


@dataclass(frozen=True)
class TrainConfig:
    """How to train.

    Args:
        lr: Peak learning rate (> 0).
        epochs: Passes over the training data (>= 1); ignored when ``max_steps`` is set.
        max_steps: Optimizer steps to run; None runs ``epochs`` full passes.
        batch_size: Examples per micro-batch; None when batches are built by ``tokens_per_batch``.
        tokens_per_batch: Instead of a fixed ``batch_size``: fill each micro-batch with examples while
            (longest length x count) stays within this budget (at least one example per batch).
        grad_accum: Micro-batches per optimizer step (>= 1).
        weight_decay: Decoupled weight decay (>= 0) for matrices; vectors (biases, norms, the DoRA
            magnitude) are never decayed.
        optimizer: "adamw" (torch) or "adamw8bit" (bitsandbytes, 8-bit optimizer states).
        loraplus_ratio: LoRA+ (Hayou et al. 2024): train LoRA B matrices, and every trainable
            vector, at ``ratio x lr`` (>= 1); None trains everything at ``lr``.
        head_lr_ratio: Train the modules an adapter trains in full (``modules_to_save``: a new
            classification head) at ``ratio x lr`` (> 0): they start from scratch, where the adapter
            only nudges pretrained weights. None trains them at ``lr``.
        schedule: "cosine", "linear" (both decay to 0 at the last step) or "constant", after warmup;
            or "cosine_restarts", ReLoRA's jagged cosine (Lialin et al. 2023): a cosine from the peak to
            ``min_lr_ratio x lr`` over the run, dropping to 0 every ``restart_every`` steps and warming
            back up over ``restart_warmup_steps`` (use it with ``graft.ReLoRA`` and the same
            ``restart_every``, so each merge-and-restart is followed by a warm restart).
        warmup_steps: Linear warmup from 0 over this many steps.
        warmup_ratio: Warmup as a fraction of the total steps, in [0, 1); use one of the two.
        restart_every: "cosine_restarts" only: steps per cycle (>= 1, >= the warmup).
        restart_warmup_steps: "cosine_restarts" only: linear warmup after each restart, in
            [0, restart_every); None takes restart_every // 10 (ReLoRA's 1B config: 100 of 1000).
        min_lr_ratio: "cosine_restarts" only: the floor of the cosine as a fraction of ``lr``, in
            [0, 1]; None takes ReLoRA's default 0.1.
        max_grad_norm: Clip the global gradient norm to this value; None or 0 disables clipping.
        gradient_checkpointing: Recompute each decoder layer's activations in backward.
        compile: ``torch.compile`` each decoder layer for the run (inductor; graft.train.compile): about
            1.13x per step on SmolLM2 on a CPU, after about 24 s of compiling; pays off on long runs.
        autocast: "bf16", "fp16" or None (fp32). On CPU, bf16 needs AVX512-BF16 or AMX.
        seed: Seeds python, numpy and torch at the start, and the data order of every epoch.
        eval_every: Evaluate every N steps (0: only at the end).
        save_every: Write a checkpoint every N steps (0: none; the final weights are always saved).
        keep_checkpoints: How many of the most recent checkpoints to keep (>= 1).
        out_dir: Where checkpoints, metrics, the loss plot and the final adapter go; None writes nothing.
        logits_chunk: Rows of the output head computed at once by the selective-logits loss.
        selective_logits: Compute the language-model head only on supervised positions (causal LM).
        task: "causal-lm" (next-token loss on ``labels`` != -100) or "classification".
        log_every: Write a metrics line every N steps.
        progress: Show a tqdm progress bar.
        release_cpu_memory: CPU training on Linux (glibc): map blocks of 64 KiB or more on their own,
            so memory freed during a step returns to the OS and peak RSS follows the live tensors
            (``graft.train.monitor.map_large_blocks``; process-wide, for the rest of the process).
            A trade: SmolLM2-135M LoRA, 4 x 512 tokens, peak RSS 5,048 -> 3,677 MB (-27%), time per
            step +46% (every large tensor is page-faulted in afresh). For when memory, not time, binds.
        objective: "sft" (the loss of ``task``) or "dpo": Direct Preference Optimization on preference
            pairs (``graft.data.tokenize_pairs``), the base model with the adapter disabled as reference
            (:mod:`graft.train.dpo`); needs an adapter and task "causal-lm".
        beta: DPO's β (> 0): how far the policy may move from the reference (higher: less).
        label_smoothing: Conservative DPO's ε in [0, 0.5): the assumed probability that a preference
            label is flipped; 0 is plain DPO.
        precompute_ref: DPO: compute the reference log-probabilities once before training instead of in
            every step (the base is frozen, so they do not change).
        report_to: Where metrics go besides ``metrics.jsonl``: "none", or "tensorboard", "wandb",
            "mlflow", several comma-separated (each an optional extra, imported when asked for).
        early_stopping_patience: Stop when the eval loss has not improved by more than
            ``early_stopping_threshold`` for this many evaluations in a row (>= 1); needs ``eval_every``
            and eval data. None never stops early.
        early_stopping_threshold: The least decrease of the eval loss that counts as an improvement (>= 0).
        keep_best: Keep the weights of the evaluation with the lowest eval loss and save those at the end
            (needs ``eval_every`` and eval data).
    """

    lr: float = 2e-4
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int | None = 8
    tokens_per_batch: int | None = None
    grad_accum: int = 1
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    loraplus_ratio: float | None = None
    head_lr_ratio: float | None = None
    schedule: str = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    restart_every: int | None = None
    restart_warmup_steps: int | None = None
    min_lr_ratio: float | None = None
    max_grad_norm: float | None = 1.0
    gradient_checkpointing: bool = False
    compile: bool = False
    autocast: str | None = None
    seed: int = 0
    eval_every: int = 0
    save_every: int = 0
    keep_checkpoints: int = 2
    out_dir: str | None = None
    logits_chunk: int = 512
    selective_logits: bool = True
    task: str = "causal-lm"
    log_every: int = 1
    progress: bool = True
    release_cpu_memory: bool = False
    objective: str = "sft"
    beta: float = 0.1
    label_smoothing: float = 0.0
    precompute_ref: bool = False
    report_to: str = "none"
    early_stopping_patience: int | None = None
    early_stopping_threshold: float = 0.0
    keep_best: bool = False

    def __post_init__(self) -> None:
        _number("lr", self.lr, low=0.0, strict=True)
        _integer("epochs", self.epochs, low=1)
        if self.max_steps is not None:
            _integer("max_steps", self.max_steps, low=1)
        if self.batch_size is not None:
            _integer("batch_size", self.batch_size, low=1)
        if self.tokens_per_batch is not None:
            _integer("tokens_per_batch", self.tokens_per_batch, low=1)
        if (self.batch_size is None) == (self.tokens_per_batch is None):
            raise ValueError(
                f"TrainConfig needs exactly one of batch_size and tokens_per_batch, got "
                f"batch_size={self.batch_size!r}, tokens_per_batch={self.tokens_per_batch!r}"
            )
        _integer("grad_accum", self.grad_accum, low=1)
        _number("weight_decay", self.weight_decay, low=0.0)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        if self.loraplus_ratio is not None:
            _number("loraplus_ratio", self.loraplus_ratio, low=1.0)
        if self.head_lr_ratio is not None:
            _number("head_lr_ratio", self.head_lr_ratio, low=0.0, strict=True)
        _choice("schedule", self.schedule, SCHEDULES)
        _integer("warmup_steps", self.warmup_steps, low=0)
        _number("warmup_ratio", self.warmup_ratio, low=0.0)
        if self.warmup_ratio >= 1.0:
            raise OptionError("{warmup_ratio} must be in [0, 1)", where="TrainConfig", warmup_ratio=self.warmup_ratio)
        if self.warmup_steps and self.warmup_ratio:
            raise OptionError("sets both {warmup_steps} and {warmup_ratio}; use one", where="TrainConfig",
                              warmup_steps=self.warmup_steps, warmup_ratio=self.warmup_ratio)
        self._check_restarts()
        if self.max_grad_norm is not None:
            _number("max_grad_norm", self.max_grad_norm, low=0.0)
        _flag("gradient_checkpointing", self.gradient_checkpointing)
        _choice("autocast", self.autocast, AUTOCAST)
        _integer("seed", self.seed, low=0)
        _integer("eval_every", self.eval_every, low=0)
        _integer("save_every", self.save_every, low=0)
        _integer("keep_checkpoints", self.keep_checkpoints, low=1)
        if self.out_dir is not None and not isinstance(self.out_dir, str):
            object.__setattr__(self, "out_dir", str(self.out_dir))  # accept a Path, store JSON-friendly text
        if self.save_every and self.out_dir is None:
            raise OptionError("{save_every} needs {out_dir} (got None)", where="TrainConfig",
                              save_every=self.save_every, out_dir=NAME)
        _integer("logits_chunk", self.logits_chunk, low=1)
        _flag("selective_logits", self.selective_logits)
        _choice("task", self.task, TASKS)
        _integer("log_every", self.log_every, low=1)
        _flag("progress", self.progress)
        _flag("release_cpu_memory", self.release_cpu_memory)
        self._check_objective()
        self._check_reporting()

    def _check_restarts(self) -> None:
        """The "cosine_restarts" fields: required / in range with that schedule, unset with any other."""
        fields = ("restart_every", "restart_warmup_steps", "min_lr_ratio")
        if self.schedule != "cosine_restarts":
            for name in fields:
                if getattr(self, name) is not None:
                    raise ValueError(f"TrainConfig {name}={getattr(self, name)!r} is only used by "
                                     f"schedule='cosine_restarts', not schedule={self.schedule!r}")
            return
        if self.restart_every is None:
            raise ValueError("TrainConfig schedule='cosine_restarts' needs restart_every (steps per cycle; the "
                             "same number as graft.ReLoRA(restart_every=...))")
        _integer("restart_every", self.restart_every, low=1)
        if self.restart_warmup_steps is not None:
            _integer("restart_warmup_steps", self.restart_warmup_steps, low=0)
            if self.restart_warmup_steps >= self.restart_every:
                raise ValueError(f"TrainConfig restart_warmup_steps={self.restart_warmup_steps!r} must be less than "
                                 f"restart_every={self.restart_every!r}")
        if self.min_lr_ratio is not None:
            _number("min_lr_ratio", self.min_lr_ratio, low=0.0)
            if self.min_lr_ratio > 1.0:
                raise ValueError(f"TrainConfig min_lr_ratio={self.min_lr_ratio!r} must be in [0, 1]")
        if self.warmup_steps > self.restart_every:
            raise ValueError(f"TrainConfig warmup_steps={self.warmup_steps!r} must not exceed "
                             f"restart_every={self.restart_every!r} with schedule='cosine_restarts'")

    def _check_objective(self) -> None:
        _choice("objective", self.objective, OBJECTIVES)
        _number("beta", self.beta, low=0.0, strict=True)
        _number("label_smoothing", self.label_smoothing, low=0.0)
        if self.label_smoothing >= 0.5:
            raise ValueError(f"TrainConfig label_smoothing={self.label_smoothing!r} must be in [0, 0.5) (the "
                             "probability that a preference label is flipped)")
        _flag("precompute_ref", self.precompute_ref)
        if self.objective == "dpo" and self.task != "causal-lm":
            raise ValueError(f"TrainConfig objective='dpo' trains a causal LM, not task={self.task!r}")
        if self.objective != "dpo":
            for name, default in (("beta", 0.1), ("label_smoothing", 0.0), ("precompute_ref", False)):
                if getattr(self, name) != default:
                    raise ValueError(f"TrainConfig {name}={getattr(self, name)!r} is a DPO setting; "
                                     f"objective={self.objective!r} does not use it (use objective='dpo')")

    def _check_reporting(self) -> None:
        report = self.report_to
        if isinstance(report, (list, tuple)):
            report = ",".join(map(str, report))
        if not isinstance(report, str):
            raise TypeError(f"TrainConfig report_to={self.report_to!r} must be 'none' or names from {REPORTERS}")
        names = [n.strip() for n in report.split(",") if n.strip()] or ["none"]
        if names != ["none"]:
            for name in names:
                _choice("report_to", name, REPORTERS)
        object.__setattr__(self, "report_to", ",".join(names))
        if self.early_stopping_patience is not None:
            _integer("early_stopping_patience", self.early_stopping_patience, low=1)
        _number("early_stopping_threshold", self.early_stopping_threshold, low=0.0)
        _flag("keep_best", self.keep_best)
        _flag("compile", self.compile)
        if (self.early_stopping_patience is not None or self.keep_best) and not self.eval_every:
            what = "early_stopping_patience" if self.early_stopping_patience is not None else "keep_best"
            raise ValueError(f"TrainConfig {what} needs evaluations during training: set eval_every (and give "
                             "eval data)")

    def reporters(self) -> list[str]:
        """The metric backends asked for (``[]`` for "none")."""
        return [] if self.report_to == "none" else self.report_to.split(",")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _integer(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise OptionError(f"{{{name}}} must be an integer >= {low}", where="TrainConfig", **{name: value})


def _number(name: str, value: Any, low: float, strict: bool = False) -> None:
    ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
          and (value > low if strict else value >= low))
    if not ok:
        raise OptionError(f"{{{name}}} must be a finite number {'>' if strict else '>='} {low}", where="TrainConfig",
                          **{name: value})


def _choice(name: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        raise OptionError(f"{{{name}}} is not one of {allowed}", where="TrainConfig", **{name: value})


def _flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"TrainConfig {name}={value!r} must be True or False")
