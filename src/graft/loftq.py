"""LoftQ (Li et al. 2023): quantize the base and initialise its LoRA together, so that Q + s·BA ≈ W.

Plain QLoRA starts from Q = quant(W) and B = 0, so training first has to make up the whole
quantisation error. LoftQ alternates T times

    Q_t = quant(W − L_{t−1})            L_0 = 0
    L_t = SVD_r(W − Q_t)                (best rank-r approximation of what Q_t misses)

then trains from Q_T and s·B A = L_T. On SmolLM2-135M (NF4, blocks of 64, r=16 all-linear) the
base loss on GSM8K goes from 1.92 (plain NF4) to 1.86 after 1 iteration and 1.78 after 5, against
1.62 in full precision; docs/benchmarks.md, "QLoRA", has the training runs.

    model, tok = graft.models.load("smollm2-135m")                    # full precision first
    graft.loftq(model, graft.LoRA(r=16, alpha=32, targets="all-linear"), quant_type="nf4")
    ...train...; graft.save(model, "out/")
    graft.loftq(fresh_full_precision_model, "out/")   # the same 4-bit base, the trained adapter
    graft.load(fresh_full_precision_model, "out/")    # or: Q dequantized into the fp weights

The adapter belongs to its LoftQ base: Q_T is not quant(W), so a LoftQ adapter is not loaded onto
a plainly quantized model (that is an error). The checkpoint says ``init_lora_weights: "loftq"``
and records the quantisation settings; graft rebuilds the same Q_T from the full-precision weights
(the quantisation and the SVD are deterministic), either as a 4-bit base (:func:`loftq`) or written
into the full-precision weights (``graft.load``, as peft does).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, NamedTuple

import torch
from torch import nn

from graft import quant
from graft import targets as tg

__all__ = ["DEFAULTS", "Decomposition", "check_settings", "decompose", "loftq", "top_singular"]

# iters: LoftQ's T. peft defaults to 1; 5 is what the base loss above kept improving up to.
# svd: "randomized" finds the top r singular triplets by a seeded randomized range finder (4 power
# iterations, 8 extra columns; deterministic, so a checkpoint's base is rebuilt exactly); "exact" runs a
# full SVD. On this CPU a full SVD of a 4096 x 11008 matrix took 37 s, the randomized one 0.27 s (a 7B
# model: hours vs minutes at 5 iterations); on a SmolLM2 quantization error it captured 0.080 of the
# energy against the optimum's 0.085.
DEFAULTS = {"quant_type": "nf4", "iters": 5, "compute_dtype": "bfloat16", "double_quant": True, "svd": "randomized"}
SVDS = ("randomized", "exact")
PENDING_ATTR = "_graft_loftq_factors"  # (A, B) handed from loftq() to the LoRA init of a quantized layer
_DTYPES = {str(d).removeprefix("torch."): d for d in quant.COMPUTE_DTYPES}  # "bfloat16" -> torch.bfloat16


def check_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The full settings (defaults filled in), or a ValueError naming the bad key and what is allowed."""
    unknown = sorted(set(settings) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"loftq settings {unknown} are unknown; allowed keys: {', '.join(DEFAULTS)}")
    out = {**DEFAULTS, **settings}
    named = str(out["compute_dtype"]).removeprefix("torch.")
    if isinstance(out["compute_dtype"], torch.dtype) and named in _DTYPES:  # torch.bfloat16, as quant.quantize takes it
        out["compute_dtype"] = named
    if out["quant_type"] not in ("nf4", "fp4"):
        raise ValueError(f"loftq quant_type={out['quant_type']!r} is not supported; allowed: nf4, fp4 (4-bit bases)")
    iters = out["iters"]
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"loftq iters={iters!r} must be an integer >= 1")
    if out["compute_dtype"] not in _DTYPES:
        raise ValueError(f"loftq compute_dtype={out['compute_dtype']!r} is not one of {', '.join(_DTYPES)}")
    if not isinstance(out["double_quant"], bool):
        raise TypeError(f"loftq double_quant={out['double_quant']!r} must be true or false")
    if out["svd"] not in SVDS:
        raise ValueError(f"loftq svd={out['svd']!r} is not one of {', '.join(SVDS)}")
    return out


class Decomposition(NamedTuple):
    """One layer's LoftQ result: quantize ``source`` to get the base, whose dequantized value is
    ``quantized``; ``a`` (r, d_in) and ``b`` (d_out, r) with s·b@a = L_T."""

    source: torch.Tensor
    quantized: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor


def _roundtrip(weight: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    """dequantize(quantize(weight)) exactly as graft.quant builds the 4-bit layer (same dtype, blocks)."""
    import bitsandbytes.functional as bnbf

    codes, state = bnbf.quantize_4bit(weight.to(_DTYPES[s["compute_dtype"]]).contiguous(), blocksize=quant.BLOCKSIZE,
                                      compress_statistics=s["double_quant"], quant_type=s["quant_type"])
    return bnbf.dequantize_4bit(codes, state).float()


def top_singular(a: torch.Tensor, r: int, method: str = "randomized", oversample: int = 8, power_iters: int = 4
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The r largest singular triplets (U_r, S_r, Vh_r) of a 2-D fp32 matrix.

    "randomized": Halko, Martinsson & Tropp (2011), Alg. 4.4: a Gaussian test matrix from a fixed seed (so
    the result is a function of ``a`` alone), ``power_iters`` subspace iterations re-orthonormalised by QR,
    then an exact SVD of the small projected matrix. "exact": ``torch.linalg.svd``.
    """
    if method == "exact" or r + oversample >= min(a.shape):
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        return u[:, :r], s[:r], vh[:r]
    g = torch.Generator().manual_seed(0)
    y = a @ torch.randn(a.shape[1], r + oversample, generator=g).to(a.device)
    for _ in range(power_iters):
        y = a @ (a.T @ torch.linalg.qr(y).Q)
    q = torch.linalg.qr(y).Q  # (d_out, r + oversample), orthonormal: a ≈ q qᵀ a
    u, s, vh = torch.linalg.svd(q.T @ a, full_matrices=False)
    return (q @ u)[:, :r], s[:r], vh[:r]


def decompose(weight: torch.Tensor, r: int, scaling: float, settings: dict[str, Any]) -> Decomposition:
    """LoftQ for one (d_out, d_in) weight; the split of L_T into A and B is PiSSA's, √S on each side, / s."""
    s = check_settings(settings)
    w = weight.detach().float()
    low = torch.zeros_like(w)
    for _ in range(s["iters"]):
        source = (w - low).to(weight.dtype)  # what the layer will hold and quantize
        quantized = _roundtrip(source, s)
        u, sv, vh = top_singular(w - quantized, r, s["svd"])
        low = (u * sv) @ vh
    root = torch.sqrt(sv / scaling)
    return Decomposition(source, quantized, root[:, None] * vh, u * root[None, :])


def loftq(
    model: nn.Module,
    method: Any,
    name: str = "default",
    *,
    prepare: bool = True,
    gradient_checkpointing: bool = True,
    **settings: Any,
) -> nn.Module:
    """Quantize a full-precision model to 4 bits and attach a LoRA initialised by LoftQ, in place.

    Every ``nn.Linear`` but the output head is quantized, as :func:`graft.quant.quantize` does; the
    LoRA's targets get the LoftQ base Q_T, the other layers quant(W).

    Args:
        model: A plain full-precision model (no adapters, nothing quantized yet).
        method: A :class:`graft.LoRA` (its ``init`` becomes "loftq"), or the directory of an adapter
            saved from a LoftQ run: the same base is rebuilt and the saved tensors are loaded.
        name: The adapter's name.
        prepare: Run :func:`graft.prepare_kbit_training` between quantizing and attaching (freeze,
            fp32 norms; checkpointing as ``gradient_checkpointing`` says).
        gradient_checkpointing: Passed to ``prepare_kbit_training``.
        **settings: LoftQ settings overriding the method's ``loftq_config``: ``quant_type`` ("nf4",
            "fp4"), ``iters`` (T >= 1), ``compute_dtype`` ("bfloat16", "float32", "float16"),
            ``double_quant``, ``svd`` ("randomized" or "exact"). Not allowed with a directory (its settings are the ones it was trained with).

    Returns:
        The same model.

    Raises:
        ValueError / TypeError: the model already carries adapters or quantized layers, a target would not
            be quantized (an output head, an embedding, a GPT-2 Conv1D), DoRA, or a bad setting.
    """
    from graft import io
    from graft.core import STATE_ATTR, attach
    from graft.methods.lora import LoRA

    path = method if isinstance(method, (str, os.PathLike)) else None
    if path is not None:
        if settings:
            raise ValueError(f"loftq({str(path)!r}) rebuilds the base the adapter was trained on; settings "
                             f"{sorted(settings)} cannot change it")
        method = LoRA.from_peft(io.read_config(path))
        if method.init != "loftq":
            raise ValueError(f"{path} holds a LoRA with init={method.init!r}, not a LoftQ adapter; quantize the "
                             "model with graft.quant.quantize and use graft.load")
    if not isinstance(method, LoRA):
        raise TypeError(f"loftq initialises a graft.LoRA, not {type(method).__name__}")
    if method.dora:
        raise ValueError("loftq with dora=True is not supported: the magnitude vector would have to be fitted too")
    if getattr(model, STATE_ATTR, None) is not None:
        raise ValueError("loftq quantizes the base: call it on a plain model, before graft.attach")
    if any(True for _ in quant.quantized_modules(model)):
        raise ValueError("loftq needs the full-precision weights, and this model is already quantized; load it "
                         "without quantize=")
    full = check_settings({**method.loftq_config, **settings})
    method = dataclasses.replace(method, init="loftq", loftq_config=full)
    heads = tg.output_head_names(model)
    names = method.resolve(model)
    for n in names:
        module = model.get_submodule(n)
        if type(module) is not nn.Linear or n in heads:
            raise ValueError(f"loftq target '{n}' ({type(module).__name__}) would not be quantized (graft quantizes "
                             "every nn.Linear but the output head); leave it out of the LoRA targets")
    factors = {}
    for n in names:
        linear = model.get_submodule(n)
        spec = method.layer_config(n)
        d = decompose(linear.weight, spec.r, spec.scaling, full)
        linear.weight.data = d.source  # a new tensor: writing into a memory-mapped checkpoint would dirty its pages
        factors[n] = (d.a, d.b)
    quant.quantize(model, full["quant_type"], compute_dtype=_DTYPES[full["compute_dtype"]],
                   double_quant=full["double_quant"])
    quant.own_memory(model)  # let go of the checkpoint's memory map, as models.load(quantize=...) does
    if prepare:
        quant.prepare_kbit_training(model, gradient_checkpointing=gradient_checkpointing)
    try:
        for n, ab in factors.items():
            setattr(model.get_submodule(n), PENDING_ATTR, ab)
        if path is not None:
            io.load(model, path, name)
        else:
            attach(model, method, name)
    finally:  # init_loftq pops what it used; a failed attach leaves the rest on the quantized layers
        for n in factors:
            layer = model.get_submodule(n)
            getattr(layer, "base_layer", layer).__dict__.pop(PENDING_ATTR, None)
    return model
