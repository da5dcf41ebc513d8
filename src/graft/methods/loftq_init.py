"""LoftQ's decomposition (Li et al. 2023): the LoRA initialisation that fits a low-rank correction to what a
4-bit quantization of the base weight loses. Pure math on one weight; :func:`graft.loftq` quantizes a whole
model with it and attaches the LoRA, and the LoRA layer's init="loftq" calls it for a full-precision base.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from graft import quant

__all__ = ["DEFAULTS", "PENDING_ATTR", "Decomposition", "check_settings", "decompose", "top_singular"]

# iters: LoftQ's T. peft defaults to 1; 5 is what the base loss above kept improving up to.
# svd: "randomized" finds the top r singular triplets by a seeded randomized range finder (4 power
# iterations, 8 extra columns; deterministic, so a checkpoint's base is rebuilt exactly); "exact" runs a
# full SVD. On this CPU a full SVD of a 4096 x 11008 matrix took 37 s, the randomized one 0.27 s (a 7B
# model: hours vs minutes at 5 iterations); on a SmolLM2 quantization error it captured 0.080 of the
# energy against the optimum's 0.085.
DEFAULTS = {"quant_type": "nf4", "iters": 5, "compute_dtype": "bfloat16", "double_quant": True, "svd": "randomized"}
SVDS = ("randomized", "exact")
PENDING_ATTR = "_graft_loftq_factors"  # (A, B) handed from loftq() to the LoRA init of a quantized layer
DTYPES = {str(d).removeprefix("torch."): d for d in quant.COMPUTE_DTYPES}  # "bfloat16" -> torch.bfloat16


def check_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The full settings (defaults filled in), or a ValueError naming the bad key and what is allowed."""
    unknown = sorted(set(settings) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"loftq settings {unknown} are unknown; allowed keys: {', '.join(DEFAULTS)}")
    out = {**DEFAULTS, **settings}
    named = str(out["compute_dtype"]).removeprefix("torch.")
    if isinstance(out["compute_dtype"], torch.dtype) and named in DTYPES:  # torch.bfloat16, as quant.quantize takes it
        out["compute_dtype"] = named
    if out["quant_type"] not in ("nf4", "fp4"):
        raise ValueError(f"loftq quant_type={out['quant_type']!r} is not supported; allowed: nf4, fp4 (4-bit bases)")
    iters = out["iters"]
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"loftq iters={iters!r} must be an integer >= 1")
    if out["compute_dtype"] not in DTYPES:
        raise ValueError(f"loftq compute_dtype={out['compute_dtype']!r} is not one of {', '.join(DTYPES)}")
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

    codes, state = bnbf.quantize_4bit(weight.to(DTYPES[s["compute_dtype"]]).contiguous(), blocksize=quant.BLOCKSIZE,
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
