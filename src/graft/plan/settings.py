"""graft plan: what a plan is asked for (goals, dtypes, settings) and what it advises."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

GOALS = ("instructions", "reasoning", "classification", "multi-task", "no-training")
ROWS = ("full", "lora", "qlora", "dora", "ia3", "prompt-tuning", "prefix-tuning", "adapter", "bitfit")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}


@dataclass(frozen=True)
class _Settings:
    memory: int
    seq_len: int
    batch: int
    dtype: str
    optimizer: str
    gradient_checkpointing: bool | None
    logits_chunk: int
    device: str
    reserve: int
    goal: str | None
    tasks: int


@dataclass(frozen=True)
class Recommendation:
    """What to do, and why (each reason carries the numbers that drove it)."""

    method: str  # a row's method name, or "icl"
    approach: str  # one line: e.g. "instruction tuning with LoRA (r=8) + gradient checkpointing"
    fits: bool
    gradient_checkpointing: bool | None
    reasons: list[str]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
