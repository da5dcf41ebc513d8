"""``torch.compile`` of a model's decoder layers for the length of a training run (``TrainConfig.compile``).

Inductor fuses the elementwise chains of each block (RMSNorm, SiLU x gate, rotary, residual adds) that eager
PyTorch runs as many small memory-bound kernels. On SmolLM2-135M's training step (CPU, fp32, 2 threads;
``benchmarks/compile_step.py``) a compiled step took 7.56 s against 8.58 s eager (1.135x), with the loss equal
to 6.5e-7, but the first step spent about 24 s compiling. It pays off after a few dozen steps, so it is an
option (``--compile``), not the default: most runs that graft's defaults aim at are shorter than that on a CPU.

Each layer is compiled in place with dynamic shapes (packed batches change width every step) and put back to
eager when the run ends, so the model that is saved, merged or served afterwards is the plain one.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator

import torch
from torch import nn


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks: its longest ``nn.ModuleList`` (``model.layers``, ``encoder.layer``...)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise ValueError(f"compile=True: {type(model).__name__} has no list of layers to compile")
    return list(max(lists, key=len))


def compiler_problem(device: torch.device) -> str | None:
    """Why inductor cannot compile for ``device`` here, or None."""
    if device.type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        return "inductor on the CPU generates C++ and no C++ compiler (g++, c++, clang++) is on PATH"
    return None


def require_compiler(device: torch.device) -> None:
    """Raise ValueError (what is missing, and the way out) when inductor cannot compile for ``device``."""
    problem = compiler_problem(device)
    if problem:
        raise ValueError(f"compile=True: {problem}; install one or train without --compile")


@contextlib.contextmanager
def compiled_layers(model: nn.Module, device: torch.device) -> Iterator[int]:
    """Compile every decoder layer of ``model`` inside the block; how many were compiled.

    Raises:
        ValueError: No compiler for ``device``, or no layers to compile.
    """
    require_compiler(device)
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=True)
    try:
        yield len(layers)
    finally:
        for layer in layers:
            layer._compiled_call_impl = None  # what nn.Module.compile set: back to the eager forward
