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
from typing import Any

from torch import nn

from graft import quant
from graft import targets as tg
from graft.core import STATE_ATTR, attach
from graft.methods.loftq_init import (
    DEFAULTS,
    DTYPES,
    PENDING_ATTR,
    Decomposition,
    check_settings,
    decompose,
    top_singular,
)
from graft.methods.lora import LoRA

# The decomposition lives in graft.methods.loftq_init (no import of the LoRA layer, which uses it);
# its names stay importable from here.
__all__ = ["DEFAULTS", "Decomposition", "check_settings", "decompose", "loftq", "top_singular"]


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
    quant.quantize(model, full["quant_type"], compute_dtype=DTYPES[full["compute_dtype"]],
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
