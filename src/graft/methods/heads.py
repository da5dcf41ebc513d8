"""Modules trained in full next to an adapter (``modules_to_save``), e.g. a classification head.

Each adapter gets its own copy of the module; the original stays as the base. This is the
same layout as peft (``original_module`` / ``modules_to_save.<adapter>``), so a head saved with an
adapter interchanges.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from graft import targets as tg
from graft.core import AdapterLayer, GraftState, set_submodule

HEAD_NAMES = ("classifier", "score")


def heads_to_save(model: nn.Module, requested: Sequence[str] | None) -> list[str]:
    """Suffixes of the modules to train in full: the request, or a classification model's head."""
    if requested is not None:
        return list(requested)
    if type(model).__name__.endswith("ForSequenceClassification"):
        return [h for h in HEAD_NAMES if any(n.split(".")[-1] == h for n, _ in model.named_modules())]
    return []


def _resolve(model: nn.Module, suffixes: Sequence[str], *, wrapped_ok: bool = False) -> list[str]:
    found = [n for n, m in model.named_modules() if n and tg.matches(n, list(suffixes))
             and not tg._inside_adapter(n) and not isinstance(m, AdapterLayer)]
    if wrapped_ok:  # a head another adapter already copies: this adapter gets its own copy too
        found += [n for n, m in model.named_modules() if isinstance(m, ModulesToSave) and tg.matches(n, list(suffixes))]
    if suffixes and not found:
        raise ValueError(f"modules_to_save={list(suffixes)} matches no module of {type(model).__name__}")
    return found


def modules_to_save_count(model: nn.Module, suffixes: Sequence[str]) -> int:
    modules = [model.get_submodule(n) for n in _resolve(model, suffixes, wrapped_ok=True)]
    return sum(p.numel() for m in modules for p in getattr(m, "base_layer", m).parameters())


def apply_modules_to_save(model: nn.Module, name: str, state: GraftState, suffixes: Sequence[str]) -> None:
    """Give adapter ``name`` a trainable copy of every module in ``suffixes``."""
    if not suffixes:
        return
    names = set(_resolve(model, suffixes, wrapped_ok=True))
    for module_name in sorted(names):
        module = model.get_submodule(module_name)
        if not isinstance(module, ModulesToSave):
            module = ModulesToSave(module, state)
            set_submodule(model, module_name, module)
        module.add(name, None)


class ModulesToSave(AdapterLayer):
    """A module with one full trainable copy per adapter; the active adapter's copy runs."""

    adapter_param_names = ("modules_to_save",)
    mergeable = True  # nothing to fold: the trained copy replaces the module on unload

    def __init__(self, base_layer: nn.Module, state: GraftState) -> None:
        super().__init__(base_layer, state)
        self.modules_to_save = nn.ModuleDict()

    def add(self, name: str, config: Any) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.base_layer)
        self.configs[name] = config

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        if name not in self.modules_to_save:
            return {}
        return dict(self.modules_to_save[name].named_parameters())

    def _pick(self) -> str | None:
        names = [n for n in self._state.active if n in self.modules_to_save] if not self._state.disabled else []
        if len(names) > 1:
            raise RuntimeError(f"adapters {names} each carry their own copy of this module; activate only one")
        return names[0] if names else None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.routed():
            return self._routed(x, *args, **kwargs)
        name = self._pick()
        module = self.base_layer if name is None else self.modules_to_save[name]
        return module(x, *args, **kwargs)

    def _routed(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        idx = self.row_index(x.shape[0], x.device)
        for i, name in enumerate(self._state.route_names()):
            rows = (idx == i).nonzero(as_tuple=True)[0]
            if name in self.modules_to_save and rows.numel():
                out = out.index_copy(0, rows, self.modules_to_save[name](x[rows], *args, **kwargs))
        return out

    def merge(self, names: Sequence[str]) -> None:
        """Nothing to fold: the copy simply replaces the module on unload."""

    def unmerge(self) -> None:
        """Nothing was folded into the base."""

    def unloaded(self, merge: bool) -> nn.Module:
        name = self._pick() if merge else None
        return self.base_layer if name is None else self.modules_to_save[name]
