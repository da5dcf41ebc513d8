"""Weighted combinations of adapters into a new adapter (model merging, task arithmetic).

A *task vector* is what an adapter adds to the base: τ_i = ΔW_i = s_i·B_i A_i for LoRA (Ilharco et
al. 2023, "Editing Models with Task Arithmetic"). The methods, with peft's ``add_weighted_adapter``
as the oracle for every number:

    linear           Σ w_i over the A's and over the B's, each weighted by √|w_i s_i| (the sign on A):
                     cheap, needs equal ranks, and is *not* Σ w_i ΔW_i (cross terms B_i A_j appear)
    cat              A = [w_i s_i A_i] stacked along the rank, B = [B_i]: exactly Σ w_i ΔW_i, rank Σ r_i
    svd              Σ w_i ΔW_i, truncated to ``rank`` by SVD: B = U_r S_r, A = V_rᵀ
    ties             trim each to ``density`` by magnitude, elect a sign per entry, average the
                     agreeing entries (Yadav et al. 2023, TIES-Merging §3)
    dare_linear      drop entries at random (keep probability ``density``), rescale by 1/density,
                     sum (Yu et al. 2024, DARE eq. 2)
    dare_ties        DARE's drop, then TIES's sign election and disjoint mean
    magnitude_prune  trim by magnitude, then sum
    *_svd            the method on the full ΔW_i, then a truncated SVD (without the suffix, on the
                     factors A and B separately, as ``linear`` does)
    lorahub          A = Σ w_i s_i A_i, B = Σ w_i B_i: the composition LoraHub searches over (Huang et
                     al. 2023; equal ranks; with equal scalings ΔW = s (Σ w_i B_i)(Σ w_j A_j)). Not in peft

Weights may be negative (task negation). (IA)³ adapters combine as Σ w_i l_i, peft's rule.

The math lives in pure functions on tensors (:func:`merge_tensors`, :func:`combine_lora_factors`,
:func:`combine_state_dicts`); :func:`combine` applies them to the adapters on a model and attaches the
result as an ordinary adapter, which ``graft.save`` writes in the PEFT format.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from graft.core import adapter_layers, attach, detach, state_of
from graft.methods.heads import heads_to_save
from graft.methods.ia3 import IA3, IA3Linear
from graft.methods.lora import REWRITES_BASE, LoRA, LoraEmbedding, LoraLinear

__all__ = ["METHODS", "combine", "combine_lora_factors", "combine_state_dicts", "merge_tensors"]

# Methods applied to the factors A and B separately (peft's _generalized_task_arithmetic_weighted_adapter).
FACTOR_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
# Methods applied to the full deltas, then truncated by SVD.
SVD_METHODS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
METHODS = (*FACTOR_METHODS, "cat", *SVD_METHODS, "lorahub")
EQUAL_RANK_METHODS = (*FACTOR_METHODS, "lorahub")
DENSITY_METHODS = tuple(m for m in METHODS if m.removesuffix("_svd") in ("ties", "dare_linear", "dare_ties",
                                                                           "magnitude_prune"))
SIGN_METHODS = ("total", "frequency")


# --------------------------------------------------------------------------------------------
# Task-vector arithmetic on a list of same-shaped tensors


def magnitude_prune(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``int(density · numel)`` entries of largest magnitude, zero the rest (TIES "trim")."""
    if density >= 1.0:
        return tensor
    keep = int(density * tensor.numel())
    mask = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    mask[tensor.abs().reshape(-1).topk(keep).indices] = 1
    return tensor * mask.view(tensor.shape)


def random_prune(tensor: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """Keep each entry with probability ``density`` and divide the kept ones by it (DARE, eq. 2).

    The mask is drawn on the CPU from ``generator`` (or torch's global generator), so a seed gives the
    same mask on every device.
    """
    if density >= 1.0:
        return tensor
    keep = torch.bernoulli(torch.full(tensor.shape, density, dtype=tensor.dtype), generator=generator)
    return tensor * keep.to(tensor.device) / density


def elect_sign(stacked: torch.Tensor, method: str = "total") -> torch.Tensor:
    """(n, ...) bool: where each tensor agrees with the elected sign (TIES "elect"; ≥ 0 counts as +).

    ``total`` elects the sign of the sum, ``frequency`` the sign held by more tensors.
    """
    sign = stacked.sign()
    strength = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    elected = torch.where(strength >= 0, 1.0, -1.0).to(sign.dtype)
    return sign == elected


def merge_tensors(
    tensors: Sequence[torch.Tensor],
    weights: torch.Tensor,
    method: str = "linear",
    *,
    density: float | None = None,
    majority_sign: str = "total",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Combine same-shaped task tensors with per-tensor ``weights`` (n,) by one of ``FACTOR_METHODS``.

    ``linear``: Σ w_i T_i. ``magnitude_prune`` / ``dare_linear``: the same sum after trimming or
    random dropping. ``ties`` / ``dare_ties``: after trimming or dropping, Σ_i m_i w_i T_i / max(1, Σ_i m_i)
    with m_i the entries agreeing with the sign elected on the unweighted tensors.
    """
    if method in ("ties", "magnitude_prune"):
        tensors = [magnitude_prune(t, density) for t in tensors]
    elif method in ("dare_linear", "dare_ties"):
        tensors = [random_prune(t, density, generator) for t in tensors]
    stacked = torch.stack(list(tensors))  # (n, ...)
    weighted = stacked * weights.view(-1, *[1] * (stacked.dim() - 1))
    if method in ("ties", "dare_ties"):
        agree = elect_sign(stacked, majority_sign)
        return (weighted * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1.0)
    return weighted.sum(dim=0)


# --------------------------------------------------------------------------------------------
# LoRA factors of one module


def combine_lora_factors(
    factors: Sequence[tuple[torch.Tensor, torch.Tensor, float]],
    weights: Sequence[float],
    method: str = "linear",
    *,
    density: float | None = None,
    rank: int | None = None,
    majority_sign: str = "total",
    svd_clamp: float | None = None,
    generator: torch.Generator | None = None,
    transposed: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The combined factors of one module, to be used with scaling 1 (alpha = r).

    Args:
        factors: Per adapter ``(A (r_i, d_in), B (d_out, r_i), scaling s_i)``; ΔW_i = s_i B_i A_i.
        weights: One weight per adapter (negative ones subtract).
        method: One of ``METHODS`` (see the module docstring).
        density: Fraction kept by the pruning methods, in (0, 1].
        rank: Rank of the ``*_svd`` results (default: the largest r_i).
        majority_sign: ``total`` or ``frequency`` (TIES sign election).
        svd_clamp: Clamp the SVD factors at this quantile of their entries (peft's ``svd_clamp``).
        generator: Random source of the DARE masks.
        transposed: The base stores W transposed (GPT-2 ``Conv1D``, embeddings): the ``*_svd`` forms
            take task vectors in that layout, as peft does, so a seed draws the same DARE masks.

    Returns:
        ``(A (r, d_in), B (d_out, r))`` in the dtype of the first adapter's A.
    """
    dtype = factors[0][0].dtype
    if method == "cat":
        a = torch.cat([fa * w * s for (fa, _, s), w in zip(factors, weights)], dim=0)  # (Σ r_i, d_in)
        b = torch.cat([fb for _, fb, _ in factors], dim=1)  # (d_out, Σ r_i)
        return a.to(dtype), b.to(dtype)
    if method == "lorahub":
        w = torch.tensor(list(weights), device=factors[0][0].device)
        a = merge_tensors([fa * s for fa, _, s in factors], w)
        b = merge_tensors([fb for _, fb, _ in factors], w)
        return a.to(dtype), b.to(dtype)
    if method in FACTOR_METHODS:
        # √|w s| on both factors, the sign on A only: B A then carries w s exactly once (peft).
        roots = [math.sqrt(abs(w * s)) for (_, _, s), w in zip(factors, weights)]
        signs = [1.0 if w * s >= 0 else -1.0 for (_, _, s), w in zip(factors, weights)]
        w_a = torch.tensor([r * g for r, g in zip(roots, signs)], device=factors[0][0].device)
        w_b = torch.tensor(roots, device=factors[0][0].device)
        kw = {"density": density, "majority_sign": majority_sign, "generator": generator}
        a = merge_tensors([fa for fa, _, _ in factors], w_a, method, **kw)
        b = merge_tensors([fb for _, fb, _ in factors], w_b, method, **kw)
        return a.to(dtype), b.to(dtype)
    if method not in SVD_METHODS:
        raise ValueError(f"combination method={method!r} is not one of {METHODS}")
    deltas = [(fb.float() @ fa.float()) * s for fa, fb, s in factors]  # (d_out, d_in) each
    if transposed:
        deltas = [d.T for d in deltas]  # the stored layout, (d_in, d_out)
    kind = "linear" if method == "svd" else method.removesuffix("_svd")
    delta = merge_tensors(deltas, torch.tensor(list(weights), device=deltas[0].device), kind, density=density,
                          majority_sign=majority_sign, generator=generator)
    if transposed:
        delta = delta.T
    r = rank if rank is not None else max(fa.shape[0] for fa, _, _ in factors)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    b, a = u[:, :r] @ torch.diag(s[:r]), vh[:r]  # (d_out, r), (r, d_in)
    if svd_clamp is not None:
        hi = torch.quantile(torch.cat([b.flatten(), a.flatten()]), svd_clamp)
        b, a = b.clamp(-hi, hi), a.clamp(-hi, hi)
    return a.to(dtype), b.to(dtype)


# --------------------------------------------------------------------------------------------
# Checks shared by the model-level and state-dict-level entry points


def check_options(method: str, n: int, density: float | None, rank: int | None, majority_sign: str,
                  svd_clamp: float | None) -> None:
    """Raise a ValueError naming the bad option and what is allowed."""
    if method not in METHODS:
        raise ValueError(f"combination method={method!r} is not one of {METHODS}")
    if n < 1:
        raise ValueError("combine needs at least one adapter")
    if method in DENSITY_METHODS:
        if density is None:
            raise ValueError(f"method={method!r} needs density (the fraction of entries kept), in (0, 1]")
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
            raise ValueError(f"density={density!r} is outside (0, 1]")
    elif density is not None:
        raise ValueError(f"density is for the pruning methods {DENSITY_METHODS}, not method={method!r}")
    if rank is not None:
        if method not in SVD_METHODS:
            raise ValueError(f"rank is for the SVD methods {SVD_METHODS}, not method={method!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
            raise ValueError(f"rank={rank!r} must be a positive integer")
    if svd_clamp is not None and (method not in SVD_METHODS or not 0.0 < svd_clamp <= 1.0):
        raise ValueError(f"svd_clamp={svd_clamp!r}: a quantile in (0, 1], for the SVD methods only")
    if majority_sign not in SIGN_METHODS:
        raise ValueError(f"majority_sign={majority_sign!r} is not one of {SIGN_METHODS}")


def _check_weights(weights: Sequence[float], n: int) -> list[float]:
    weights = list(weights)
    if len(weights) != n:
        raise ValueError(f"got {len(weights)} weights for {n} adapters")
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ValueError(f"weight {w!r} is not a finite number")
    return [float(w) for w in weights]


def _check_ranks(method: str, where: str, ranks: Sequence[int], names: Sequence[str]) -> None:
    if method in EQUAL_RANK_METHODS and len(set(ranks)) > 1:
        detail = ", ".join(f"{n}: r={r}" for n, r in zip(names, ranks))
        raise ValueError(
            f"method={method!r} sums the A's and the B's, so every adapter needs the same rank, but at {where} "
            f"the ranks differ ({detail}); use 'cat' (exact, rank Σ r) or 'svd' (rank of your choice)"
        )


def _check_svd_rank(rank: int | None, where: str, shape: tuple[int, int]) -> None:
    if rank is not None and rank > min(shape):
        raise ValueError(f"rank={rank} exceeds min(d_out, d_in)={min(shape)} of {where} {tuple(shape)}")


# --------------------------------------------------------------------------------------------
# State dicts (no model needed)

_LORA_KEYS = (("lora_A.weight", "lora_B.weight"), ("lora_embedding_A", "lora_embedding_B"))


def _modules_of(state_dict: Mapping[str, torch.Tensor]) -> dict[str, tuple[str, str] | str]:
    """module prefix -> (A key suffix, B key suffix) for LoRA, or "ia3_l" for (IA)³."""
    out: dict[str, tuple[str, str] | str] = {}
    for key in state_dict:
        for a_key, b_key in _LORA_KEYS:
            if key.endswith("." + a_key):
                out[key[: -len(a_key) - 1]] = (a_key, b_key)
        if key.endswith(".ia3_l"):
            out[key[: -len(".ia3_l")]] = "ia3_l"
    return out


def combine_state_dicts(
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    method: str = "linear",
    *,
    scalings: Sequence[float | Mapping[str, float]] | None = None,
    density: float | None = None,
    rank: int | None = None,
    majority_sign: str = "total",
    svd_clamp: float | None = None,
    seed: int | None = 0,
    fan_in_fan_out: bool = False,
) -> dict[str, torch.Tensor]:
    """Combine adapters given as PEFT-format state dicts (same keys), without a model.

    Args:
        state_dicts: One per adapter, keyed like ``adapter_model.safetensors``
            (``...lora_A.weight`` / ``...lora_B.weight``, ``lora_embedding_A/B``, or ``...ia3_l``).
        weights: One per adapter.
        method: One of ``METHODS`` (LoRA) or ``linear`` ((IA)³).
        scalings: Per adapter, its LoRA scaling s = alpha / r as a number, or per module prefix (the key
            without ``.lora_A.weight``) as a mapping; None: 1.0 (the factors already include it).
        density, rank, majority_sign, svd_clamp: See :func:`combine_lora_factors`.
        seed: Seed of the DARE masks (drawn module by module in the first state dict's key order).
        fan_in_fan_out: The base stores its linear weights transposed (GPT-2 ``Conv1D``; peft's config
            field of that name), which fixes the layout the DARE masks of the ``*_svd`` forms are drawn in.

    Returns:
        The combined state dict under the same key names. For LoRA it is meant for scaling 1: write
        ``r = lora_alpha =`` the new rank (the A tensors' first dimension) in its config.

    Raises:
        ValueError: Bad options, a wrong number of weights or scalings, or state dicts whose keys
            or shapes differ (adapters of different bases, methods or targets).
    """
    check_options(method, len(state_dicts), density, rank, majority_sign, svd_clamp)
    weights = _check_weights(weights, len(state_dicts))
    if scalings is not None and len(scalings) != len(state_dicts):
        raise ValueError(f"got {len(scalings)} scalings for {len(state_dicts)} adapters")
    keys = list(state_dicts[0])
    for i, sd in enumerate(state_dicts[1:], 1):
        if set(sd) != set(keys):
            diff = sorted(set(sd) ^ set(keys))[:3]
            raise ValueError(f"state dict {i} does not hold the same tensors as state dict 0 (e.g. {diff}): "
                             "adapters of different methods or targets cannot be combined")
        for k in keys:  # LoRA factors may differ in rank; their other dimension is checked per module below
            if k.endswith(".ia3_l") and sd[k].shape != state_dicts[0][k].shape:
                raise ValueError(f"{k}: shape {tuple(sd[k].shape)} in state dict {i} but "
                                 f"{tuple(state_dicts[0][k].shape)} in state dict 0: different base models")
    modules = _modules_of(state_dicts[0])
    covered = {f"{m}.{s}" for m, kind in modules.items() for s in ((kind,) if isinstance(kind, str) else kind)}
    if set(keys) - covered:
        raise ValueError(f"tensors that are neither LoRA nor (IA)³ cannot be combined: {sorted(set(keys) - covered)[:3]}")
    if any(isinstance(kind, str) for kind in modules.values()) and method != "linear":
        raise ValueError(f"(IA)³ adapters combine by method='linear' (a weighted sum of the vectors), not {method!r}")

    def scale(i: int, module: str) -> float:
        if scalings is None:
            return 1.0
        s = scalings[i]
        return float(s[module]) if isinstance(s, Mapping) else float(s)

    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    out: dict[str, torch.Tensor] = {}
    for module, kind in modules.items():
        if isinstance(kind, str):
            key = f"{module}.{kind}"
            out[key] = _sum_vectors([sd[key] for sd in state_dicts], weights)
            continue
        a_key, b_key = (f"{module}.{kind[0]}", f"{module}.{kind[1]}")
        factors = [(sd[a_key], sd[b_key], scale(i, module)) for i, sd in enumerate(state_dicts)]
        _check_factor_shapes(factors, module)
        _check_ranks(method, module, [fa.shape[0] for fa, _, _ in factors], [f"#{i}" for i in range(len(factors))])
        _check_svd_rank(rank, module, (factors[0][1].shape[0], factors[0][0].shape[1]))
        out[a_key], out[b_key] = combine_lora_factors(
            factors, weights, method, density=density, rank=rank, majority_sign=majority_sign,
            svd_clamp=svd_clamp, generator=generator, transposed=fan_in_fan_out or kind == _LORA_KEYS[1])
    return out


def _check_factor_shapes(factors: Sequence[tuple[torch.Tensor, torch.Tensor, float]], where: str) -> None:
    d_in, d_out = factors[0][0].shape[1], factors[0][1].shape[0]
    for i, (fa, fb, _) in enumerate(factors):
        if fa.shape[1] != d_in or fb.shape[0] != d_out or fa.shape[0] != fb.shape[1]:
            raise ValueError(f"{where}: adapter #{i} has A {tuple(fa.shape)}, B {tuple(fb.shape)} but adapter #0 "
                             f"maps {d_in} -> {d_out}: adapters of different base models cannot be combined")


def _sum_vectors(vectors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Σ w_i l_i, accumulated in order as peft does for (IA)³."""
    out = torch.zeros_like(vectors[0])
    for vec, w in zip(vectors, weights):
        out += vec * w
    return out


# --------------------------------------------------------------------------------------------
# On a model


def combine(
    model: nn.Module,
    weights: Mapping[str, float],
    method: str = "linear",
    name: str = "combined",
    *,
    density: float | None = None,
    rank: int | None = None,
    majority_sign: str = "total",
    svd_clamp: float | None = None,
    seed: int | None = 0,
    activate: bool = True,
) -> str:
    """Attach a new adapter ``name``: the weighted combination of adapters already on ``model``.

    The math of peft's ``add_weighted_adapter`` (same numbers; see the module docstring). The result
    is an ordinary LoRA with alpha = r (scaling 1) or an (IA)³ adapter: ``graft.save`` writes it in the
    PEFT format, peft and ``graft serve`` load it, ``graft.merge`` folds it in. Its tensors are frozen.

    Args:
        model: A model carrying the adapters (attached or loaded with ``graft.load``).
        weights: Adapter name -> weight; negative weights subtract (task negation).
        method: One of ``METHODS``. (IA)³ adapters take ``linear`` only.
        name: Name of the new adapter.
        density: Fraction of entries kept by ``ties``, ``dare_*`` and ``magnitude_prune``, in (0, 1].
        rank: Rank of the ``*_svd`` results (default: the largest rank combined).
        majority_sign: ``total`` (sign of the sum) or ``frequency`` (most common sign), for TIES.
        svd_clamp: Clamp the SVD factors at this quantile of their entries.
        seed: Seed of the DARE masks (None: torch's global generator).
        activate: Make the new adapter the only active one.

    Returns:
        ``name``.

    Raises:
        ValueError: An unknown method or adapter, a taken name, density outside (0, 1], unequal ranks
            for a method that sums factors, adapters of different methods or targets, merged or
            base-rewriting adapters. Nothing on the model changes when it raises.
    """
    state = state_of(model)
    if not isinstance(weights, Mapping) or not weights:
        raise ValueError(f"weights must map adapter names to numbers, e.g. {{'a': 0.7, 'b': 0.3}}; got {weights!r}")
    names = list(weights)
    check_options(method, len(names), density, rank, majority_sign, svd_clamp)
    values = _check_weights(list(weights.values()), len(names))
    unknown = [n for n in names if n not in state.methods]
    if unknown:
        raise ValueError(f"no adapter named {unknown}; attached adapters: {sorted(state.methods)}")
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter name must be a non-empty string without '.', got {name!r}")
    if name in state.methods:
        raise ValueError(f"an adapter named '{name}' is already attached; detach it first or pick another name")
    kinds = {type(state.methods[n]) for n in names}
    if len(kinds) > 1 or not kinds <= {LoRA, IA3}:
        found = ", ".join(f"{n}: {type(state.methods[n]).__name__}" for n in names)
        raise ValueError(f"combine takes LoRA adapters or (IA)³ adapters, all of one method; got {found}")
    for n in names:
        _check_combinable(model, n, state.methods[n])
    if kinds == {IA3} and method != "linear":
        raise ValueError(f"(IA)³ adapters combine by method='linear' (a weighted sum of the vectors), not {method!r}")

    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    new_tensors: dict[str, dict[str, torch.Tensor]] = {}
    ranks: dict[str, int] = {}
    for lname, layer in adapter_layers(model):
        present = [n for n in names if n in layer.configs]
        if not present:
            continue
        if len(present) != len(names):
            missing = [n for n in names if n not in layer.configs]
            raise ValueError(f"adapters {present} adapt '{lname}' but {missing} do not: adapters with different "
                             "targets cannot be combined")
        if layer.merged:
            raise ValueError(f"adapters {layer.merged} are merged into '{lname}'; call graft.unmerge(model) first")
        if isinstance(layer, IA3Linear):
            kinds_here = {layer.configs[n].feedforward for n in names}
            if len(kinds_here) > 1:
                raise ValueError(f"at '{lname}' some (IA)³ adapters scale the input and some the output; "
                                 "adapters with different feedforward modules cannot be combined")
            new_tensors[lname] = {"ia3_l": _sum_vectors([layer.ia3_l[n].detach() for n in names], values)}
            continue
        factors = _layer_factors(layer, names)
        _check_ranks(method, f"'{lname}'", [fa.shape[0] for fa, _, _ in factors], names)
        _check_svd_rank(rank, f"'{lname}'", (factors[0][1].shape[0], factors[0][0].shape[1]))
        transposed = isinstance(layer, LoraEmbedding) or layer.fan_in_fan_out
        a, b = combine_lora_factors(factors, values, method, density=density, rank=rank, majority_sign=majority_sign,
                                    svd_clamp=svd_clamp, generator=generator, transposed=transposed)
        new_tensors[lname] = {"A": a, "B": b}
        ranks[lname] = a.shape[0]
    if not new_tensors:
        raise ValueError(f"adapters {names} adapt no module that combine can handle")
    first = state.methods[names[0]]
    new_method = first if isinstance(first, IA3) else _result_lora(first, ranks)
    attach(model, new_method, name, activate=activate)
    try:
        _fill(model, name, new_tensors)
    except BaseException:
        detach(model, name)
        raise
    return name


def _check_combinable(model: nn.Module, n: str, method: Any) -> None:
    if isinstance(method, LoRA):
        if method.dora:
            raise ValueError(f"adapter '{n}' is DoRA: its magnitude vector has no weighted combination; "
                             "combine plain LoRA adapters")
        if method.init in REWRITES_BASE:
            raise ValueError(f"adapter '{n}' (init={method.init!r}) is relative to a rewritten base; save it "
                             "(graft.save converts it to a plain LoRA), load it on the original base, then combine")
        if method.bias != "none":
            raise ValueError(f"adapter '{n}' trains biases (bias={method.bias!r}), which are shared base "
                             "parameters and have no weighted combination; combine adapters with bias='none'")
    if heads_to_save(model, method.modules_to_save):
        raise ValueError(f"adapter '{n}' trains whole modules (modules_to_save), which combine does not weight; "
                         "combine adapters without modules_to_save")


def _layer_factors(layer: nn.Module, names: Sequence[str]) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """(A, B, scaling) of each adapter at one LoRA layer (embeddings: A (r, vocab), B (dim, r))."""
    if isinstance(layer, LoraLinear):
        return [(layer.lora_A[n].weight.detach(), layer.lora_B[n].weight.detach(), layer.scaling[n]) for n in names]
    if isinstance(layer, LoraEmbedding):
        return [(layer.lora_embedding_A[n].detach(), layer.lora_embedding_B[n].detach(), layer.scaling[n])
                for n in names]
    raise TypeError(f"combine handles LoRA and (IA)³ layers, not {type(layer).__name__}")


def _result_lora(first: LoRA, ranks: dict[str, int]) -> LoRA:
    """The first adapter's config (same targets) with scaling 1 at every module's new rank."""
    counts: dict[int, int] = {}
    for r in ranks.values():
        counts[r] = counts.get(r, 0) + 1
    r = max(counts, key=lambda k: (counts[k], k))
    pattern = {m: rm for m, rm in ranks.items() if rm != r}
    return dataclasses.replace(
        first, r=r, alpha=r, rank_pattern=pattern, alpha_pattern=dict(pattern), rslora=False, dora=False,
        init="default", loftq_config={},
    )


def _fill(model: nn.Module, name: str, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
    with torch.no_grad():
        for lname, layer in adapter_layers(model):
            if name not in layer.configs:
                continue
            new = tensors[lname]
            if isinstance(layer, IA3Linear):
                targets = [(layer.ia3_l[name], new["ia3_l"])]
            elif isinstance(layer, LoraLinear):
                targets = [(layer.lora_A[name].weight, new["A"]), (layer.lora_B[name].weight, new["B"])]
            else:
                targets = [(layer.lora_embedding_A[name], new["A"]), (layer.lora_embedding_B[name], new["B"])]
            for param, value in targets:
                if param.shape != value.shape:
                    raise RuntimeError(f"internal: '{lname}' expects {tuple(param.shape)}, combined {tuple(value.shape)}")
                param.copy_(value.to(param.dtype))
                param.requires_grad_(False)
