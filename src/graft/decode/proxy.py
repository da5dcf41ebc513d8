"""Proxy-tuning (Liu et al. 2024, "Tuning Language Models by Proxy"): steer a base model at decoding
time with the difference between a tuned and an untuned small model.

At every step, with raw next-token logits (METHODS.md §10; ``DExpertsLlama`` in
alisawuffles/proxy-tuning@5f2da2c modeling/dexperts.py)::

    z = z_base + alpha * (z_expert - z_antiexpert)

then temperature / top-p and greedy or sampled choice, as for one model. Each of the three keeps its
own KV cache; all three read the same token ids, so they must share one vocabulary. The reference
truncates the expert's logits to the base's vocabulary size; graft refuses models whose logit
widths (or, when tokenizers are given, vocabularies) differ, because a silently truncated or
misaligned vocabulary produces fluent nonsense.

An adapter on and off is the cheapest expert / anti-expert pair: ``adapter_on(model, "cot")`` and
``adapter_off(model)`` share one set of base weights. With the base equal to the anti-expert and
``alpha=1`` the sum is exactly the expert's logits, which the tests check.

Example:
    >>> graft.load(small, "runs/cot/adapter", name="cot")
    >>> tuner = ProxyTuner(big, adapter_on(small, "cot"), adapter_off(small), alpha=1.0)
    >>> generate(tuner, tokenizer, prompts, max_new_tokens=256)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from graft.decode.generation import LogitSource, as_source

__all__ = ["ProxyTuner", "check_vocabularies", "proxy_logits"]


def proxy_logits(
    base: torch.Tensor, expert: torch.Tensor, anti_expert: torch.Tensor, alpha: float = 1.0
) -> torch.Tensor:
    """``base + alpha * (expert - anti_expert)``, all (..., vocab) raw logits (Liu et al. 2024, eq. 1)."""
    return base + alpha * (expert - anti_expert)


class ProxyTuner:
    """A logit source combining a base, an expert and an anti-expert (see the module docstring).

    Args:
        base: The model to steer (a model as it is, or a :class:`~graft.decode.generation.Member`).
        expert: The tuned small model (e.g. ``adapter_on(small, "cot")``).
        anti_expert: The untuned small model (e.g. ``adapter_off(small)``).
        alpha: Strength of the steering; 1.0 in the paper.
        tokenizers: Optionally the three tokenizers (or one per distinct model); their
            vocabularies must be identical.

    Raises:
        ValueError: The models' logit widths differ, or the tokenizers' vocabularies do.
    """

    def __init__(
        self,
        base: nn.Module | LogitSource,
        expert: nn.Module | LogitSource,
        anti_expert: nn.Module | LogitSource,
        *,
        alpha: float = 1.0,
        tokenizers: Sequence[Any] | None = None,
    ) -> None:
        self.members = (as_source(base), as_source(expert), as_source(anti_expert))
        self.alpha = float(alpha)
        sizes = [m.vocab_size for m in self.members]
        if len(set(sizes)) > 1:
            raise ValueError(
                "proxy-tuning needs one vocabulary shared by all three models, but they produce "
                f"{sizes[0]} (base), {sizes[1]} (expert) and {sizes[2]} (anti-expert) logits per token; "
                "use an expert and anti-expert of the base's model family (same tokenizer)"
            )
        if tokenizers is not None:
            check_vocabularies(tokenizers)
        self.vocab_size = sizes[0]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past: Any = None,
        keep: int = 1,
        cache: bool = True,
    ) -> tuple[torch.Tensor, Any]:
        pasts = past if past is not None else (None, None, None)
        outs = [
            member.forward(input_ids, attention_mask, position_ids, p, keep=keep, cache=cache)
            for member, p in zip(self.members, pasts)
        ]
        logits = proxy_logits(outs[0][0], outs[1][0], outs[2][0], self.alpha)
        return logits, (tuple(o[1] for o in outs) if cache else None)


def check_vocabularies(tokenizers: Sequence[Any]) -> None:
    """Refuse tokenizers whose token -> id maps differ, naming a token that differs.

    Raises:
        ValueError: Two vocabularies differ.
    """
    first = tokenizers[0].get_vocab()
    for i, tokenizer in enumerate(tokenizers[1:], start=1):
        other = tokenizer.get_vocab()
        if other == first:
            continue
        diff = next(
            (t for t in first if other.get(t) != first[t]), next((t for t in other if t not in first), None)
        )
        raise ValueError(
            f"proxy-tuning needs one vocabulary: tokenizer {i} differs from tokenizer 0 "
            f"({len(other)} vs {len(first)} tokens; e.g. {diff!r} -> {other.get(diff)} vs {first.get(diff)}); "
            "use an expert and anti-expert of the base's model family"
        )

