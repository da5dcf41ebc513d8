"""Training: a plain-PyTorch loop with selective-logits loss, LoRA+ groups, 8-bit AdamW, schedules,
gradient accumulation, atomic checkpoints and exact resume.

    from graft.train import TrainConfig, train
    result = train(model, examples, collate, TrainConfig(lr=2e-4, epochs=1, out_dir="runs/x"))
"""

from graft.train.callbacks import EarlyStopping, KeepBest, StepInfo
from graft.train.config import TrainConfig
from graft.train.distributed import DistConfig
from graft.train.dpo import DPOLoss, dpo_loss, precompute_reference
from graft.train.loop import TrainResult, epoch_batches, evaluate, planned_steps, train
from graft.train.loss import causal_lm_loss, supervised_count
from graft.train.optim import (
    Schedule,
    build_optimizer,
    build_scheduler,
    head_parameters,
    lora_b_parameters,
    param_groups,
)

__all__ = [
    "DPOLoss",
    "DistConfig",
    "EarlyStopping",
    "KeepBest",
    "Schedule",
    "StepInfo",
    "TrainConfig",
    "TrainResult",
    "build_optimizer",
    "build_scheduler",
    "causal_lm_loss",
    "dpo_loss",
    "epoch_batches",
    "evaluate",
    "head_parameters",
    "lora_b_parameters",
    "param_groups",
    "planned_steps",
    "precompute_reference",
    "supervised_count",
    "train",
]
