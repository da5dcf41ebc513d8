"""Atomic training checkpoints and exact resume.

Layout of ``out_dir/checkpoint-<step>/``::

    adapter_config.json          the adapter in PEFT format (graft.load / peft can read the
    adapter_model.safetensors    checkpoint directory directly); absent for models without adapters
    trainable.safetensors        every parameter that requires grad, by qualified name: what resume
                                 restores (for full fine-tuning, these are the full weights)
    optimizer.pt  scheduler.pt   torch.save of the state dicts (scaler.pt too with fp16 autocast)
    rng.safetensors              torch CPU (and CUDA) generator states
    rng.json                     python ``random`` and numpy generator states
    trainer_state.json           step, data position, config, metrics, losses

The directory is built under a temporary name and renamed into place (``graft.io.atomic_dir_write``),
so a ``checkpoint-<step>`` directory is always complete. Nothing is unpickled on load: ``.pt`` files are
read with ``torch.load(weights_only=True)``, everything else is safetensors or JSON.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from graft.core import STATE_ATTR
from graft.io import atomic_dir_write
from graft.io import save as save_adapter

STATE_NAME = "trainer_state.json"
TRAINABLE_NAME = "trainable.safetensors"
METHOD_STATE_NAME = "method_state.safetensors"  # e.g. Child-Tuning D's mask: fixed tensors a method trains with
OPTIMIZER_NAME = "optimizer.pt"
SCHEDULER_NAME = "scheduler.pt"
SCALER_NAME = "scaler.pt"
RNG_TENSORS_NAME = "rng.safetensors"
RNG_JSON_NAME = "rng.json"
FORMAT_VERSION = 1
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the graft adapters on ``model`` ([] for a plain model, i.e. full fine-tuning)."""
    state = getattr(model, STATE_ATTR, None)
    return list(state.methods) if state is not None else []


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of every parameter that requires grad, by qualified name (tied tensors once)."""
    return {n: p.detach().to("cpu").contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def method_hooks(model: nn.Module, hook: str) -> list[tuple[str, Any]]:
    """(adapter name, method) for every adapter whose method defines ``hook`` (trainer extension points)."""
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        return []
    return [(n, m) for n, m in state.methods.items() if callable(getattr(m, hook, None))]


def method_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Tensors the methods need to resume exactly, keyed ``<adapter>/<tensor>``."""
    out: dict[str, torch.Tensor] = {}
    for name, method in method_hooks(model, "training_state"):
        for key, t in method.training_state(model, name).items():
            out[f"{name}/{key}"] = t.detach().to("cpu").contiguous()
    return out


def save_checkpoint(out_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, scaler: Any, state: dict[str, Any]) -> Path:
    """Write ``out_dir/checkpoint-<step>`` atomically and return its path."""
    path = Path(out_dir) / f"checkpoint-{step}"
    tensors = trainable_state(model)
    extra = method_state(model)
    rng_tensors, rng_json = rng_state()

    def write(tmp: Path) -> None:
        if len(adapter_names(model)) == 1:
            _export_adapter(model, tmp)
        save_file(tensors, str(tmp / TRAINABLE_NAME), metadata={"format": "pt"})
        if extra:
            save_file(extra, str(tmp / METHOD_STATE_NAME), metadata={"format": "pt"})
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER_NAME)
        torch.save(scheduler.state_dict(), tmp / SCHEDULER_NAME)
        if scaler is not None:
            torch.save(scaler.state_dict(), tmp / SCALER_NAME)
        save_file(rng_tensors, str(tmp / RNG_TENSORS_NAME))
        (tmp / RNG_JSON_NAME).write_text(json.dumps(rng_json))
        (tmp / STATE_NAME).write_text(json.dumps({"format": FORMAT_VERSION, **state}, indent=1) + "\n")

    atomic_dir_write(path, write)
    return path


def _export_adapter(model: nn.Module, tmp: Path) -> None:
    """The PEFT files at the top of the checkpoint directory (the layout of transformers' Trainer).

    ``atomic_dir_write`` syncs the files at the top of its directory only, so the adapter is saved in
    a scratch sub-directory and its files moved up. Models with several adapters keep only
    ``trainable.safetensors`` in checkpoints; their PEFT files are written at the end of training.
    """
    scratch = tmp / f".adapter-{uuid.uuid4().hex[:8]}"
    save_adapter(model, scratch)
    for f in scratch.iterdir():
        os.replace(f, tmp / f.name)
    scratch.rmdir()


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    scaler: Any) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler, scaler and RNG from ``path``; return its trainer state."""
    path = Path(path)
    state = read_state(path)
    load_trainable(model, load_file(str(path / TRAINABLE_NAME)), where=str(path))
    hooks = method_hooks(model, "load_training_state")
    if hooks:
        extra = load_file(str(path / METHOD_STATE_NAME)) if (path / METHOD_STATE_NAME).exists() else {}
        for name, method in hooks:
            mine = {k.split("/", 1)[1]: v for k, v in extra.items() if k.split("/", 1)[0] == name}
            method.load_training_state(model, name, mine)
    optimizer.load_state_dict(torch.load(path / OPTIMIZER_NAME, weights_only=True))
    scheduler.load_state_dict(torch.load(path / SCHEDULER_NAME, weights_only=True))
    if scaler is not None:
        scaler.load_state_dict(torch.load(path / SCALER_NAME, weights_only=True))
    set_rng_state(load_file(str(path / RNG_TENSORS_NAME)), json.loads((path / RNG_JSON_NAME).read_text()))
    return state


def load_trainable(model: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Copy saved trainable tensors into the model; names and shapes must match exactly."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {where} does not match the model's trainable parameters: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}; resume with the same model and adapter configuration"
        )
    for name, p in params.items():
        if tuple(tensors[name].shape) != tuple(p.shape):
            raise ValueError(f"checkpoint {where}: '{name}' has shape {tuple(tensors[name].shape)}, "
                             f"the model expects {tuple(p.shape)}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name])


def read_state(path: Path) -> dict[str, Any]:
    state = json.loads((Path(path) / STATE_NAME).read_text())
    if state.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}/{STATE_NAME} has format {state.get('format')!r}; this graft reads {FORMAT_VERSION}")
    return state


# --------------------------------------------------------------------------------------------
# Finding and pruning checkpoints


def checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``out_dir`` as (step, path), oldest first."""
    out_dir = Path(out_dir)
    found = []
    if out_dir.is_dir():
        for p in out_dir.iterdir():
            m = _CHECKPOINT.fullmatch(p.name)
            if m and p.is_dir() and (p / STATE_NAME).is_file():
                found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The most recent complete checkpoint whose trainer state reads back, or None."""
    for _, path in reversed(checkpoints(out_dir)):
        try:
            read_state(path)
        except (OSError, ValueError):
            continue  # damaged by something outside graft's atomic writes: fall back to an older one
        return path
    return None


def prune_checkpoints(out_dir: Path, keep: int) -> None:
    """Delete all but the ``keep`` most recent checkpoints.

    Each is first renamed to a hidden name (atomic), so a kill during the deletion never leaves a
    half-deleted directory that still looks like a checkpoint.
    """
    for _, path in checkpoints(out_dir)[:-keep]:
        doomed = path.parent / f".{path.name}.deleting-{uuid.uuid4().hex[:8]}"
        os.rename(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def remove_stale_temporaries(out_dir: Path) -> None:
    """Remove what a killed process left half-written (temporary checkpoint directories)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return
    for p in out_dir.iterdir():
        if p.name.startswith(".checkpoint-") and (".tmp-" in p.name or ".deleting-" in p.name):
            shutil.rmtree(p, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Random number generators


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, JSON) capturing torch CPU/CUDA, python ``random`` and numpy generator states."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    data = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    return tensors, data


def set_rng_state(tensors: dict[str, torch.Tensor], data: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[f"torch_cuda_{i}"] for i in range(len(tensors) - 1) if f"torch_cuda_{i}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = data["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = data["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
