"""Merge adapters into the base weights, unmerge them, or unload graft entirely."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from graft.core import STATE_ATTR, adapter_layers, set_submodule, state_of
from graft.quant import report_requantization


def merge(model: nn.Module, names: str | Sequence[str] | None = None) -> nn.Module:
    """Fold adapters (default: the active ones) into the base weights. Idempotent.

    Merging into a bitsandbytes-quantized base dequantizes, adds and quantizes again; the rounding
    that introduces is reported in a warning (``graft.quant.merge_error`` has the figures).

    Raises:
        NotImplementedError: For an adapter kind that cannot be merged (named in the message).
    """
    state = state_of(model)
    names = list(state.active) if names is None else ([names] if isinstance(names, str) else list(names))
    unknown = [n for n in names if n not in state.methods]
    if unknown:
        raise ValueError(f"no adapter named {unknown}; attached adapters: {sorted(state.methods)}")
    for n in names:
        if not getattr(state.methods[n], "mergeable", True):
            raise NotImplementedError(
                f"adapter '{n}' ({type(state.methods[n]).__name__}) cannot be merged into the base weights: "
                "it adds inputs or outputs rather than changing weights; keep it attached (or graft.unload without merge)"
            )
    layers = list(adapter_layers(model))
    for lname, layer in layers:
        if not layer.mergeable and any(n in layer.configs for n in names):
            raise NotImplementedError(f"{type(layer).__name__} at '{lname}' cannot be merged into the base weights")
    for _, layer in layers:
        here = [n for n in names if n in layer.configs]
        if here:
            layer.merge(here)
    report_requantization(model)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo every merge: the base weights return to their original values (within dtype rounding)."""
    for _, layer in adapter_layers(model):
        if layer.merged:
            layer.unmerge()
    report_requantization(model)
    return model


def unload(model: nn.Module, merge: bool = False) -> nn.Module:
    """Remove every graft layer and return the plain model (merging the active adapters first if asked).

    Without ``merge`` the base weights are restored, so the result is the original model.
    """
    state = state_of(model)
    if merge:
        for n in state.active:
            if not getattr(state.methods[n], "mergeable", True):
                raise NotImplementedError(f"adapter '{n}' ({type(state.methods[n]).__name__}) cannot be merged into "
                                          "the base weights; unload it with merge=False")
    for n, method in list(state.methods.items()):
        remove = getattr(method, "remove", None)  # input-side methods: hooks and heads off the model
        if remove is not None:
            remove(model, n)
    for lname, layer in reversed(list(adapter_layers(model))):
        plain = layer.unloaded(merge)
        if lname:
            set_submodule(model, lname, plain)
    report_requantization(model)
    object.__delattr__(model, STATE_ATTR)
    for p in model.parameters():
        if p.is_floating_point():  # quantized weights are integer tensors and cannot train
            p.requires_grad_(True)
    return model
