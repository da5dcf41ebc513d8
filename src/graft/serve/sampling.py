"""How one request picks its next token: the validated parameters and a sampler that cannot
produce inf or NaN from any valid input.

The limits and messages follow vLLM's ``SamplingParams``: a temperature below ``MIN_TEMPERATURE``
(but above zero) is raised to it, since dividing logits by 1e-40 overflows every float type; a
temperature below ``GREEDY_BELOW`` is greedy; seeds are 64-bit integers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["GREEDY_BELOW", "MIN_TEMPERATURE", "SEED_RANGE", "NonFiniteLogits", "Sampling", "choose", "sample"]

GREEDY_BELOW = 1e-5  # vLLM's _SAMPLING_EPS: below this a temperature means greedy decoding
MIN_TEMPERATURE = 1e-2  # vLLM's _MAX_TEMP: smaller positive temperatures are raised to this
SEED_RANGE = (-(2**63), 2**63 - 1)  # torch.long, as vLLM's OpenAI server bounds ``seed``


class NonFiniteLogits(ArithmeticError):
    """The model's output for one row holds NaN or inf (a numerically broken adapter, or an overflow)."""

    status = 500


@dataclass(frozen=True)
class Sampling:
    """How one request decodes (OpenAI's parameters), checked as vLLM checks them."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}.")
        if not (math.isfinite(self.temperature) and 0 <= self.temperature <= 2):
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}.")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise ValueError(f"seed must be in [{SEED_RANGE[0]}, {SEED_RANGE[1]}], got {self.seed}.")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @classmethod
    def from_request(cls, max_tokens: int, temperature: float, top_p: float, stop: tuple[str, ...], seed: int | None,
                     ignore_eos: bool) -> Sampling:
        """vLLM's normalisation of what a client sent: a tiny temperature is greedy or raised to ``MIN_TEMPERATURE``."""
        if temperature < GREEDY_BELOW:
            temperature = 0.0
        elif temperature < MIN_TEMPERATURE:
            temperature = MIN_TEMPERATURE
        return cls(max_tokens, temperature, top_p, stop, seed, ignore_eos)


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """One token from finite ``logits`` (vocab,) at ``temperature`` > 0 with nucleus ``top_p``.

    Computed in fp64 on the CPU after subtracting the maximum: every scaled logit is <= 0 and the
    largest is exactly 0, so no division overflows to NaN, ``exp`` never overflows, and the sum of
    the weights is at least 1 (never 0/0), whatever the temperature.
    """
    z = logits.detach().to("cpu", torch.float64)
    weights = torch.exp((z - z.max()) / temperature)  # (vocab,) in [0, 1], max 1
    if top_p < 1.0:
        probs = weights / weights.sum()
        sorted_probs, order = torch.sort(probs, descending=True)
        outside = sorted_probs.cumsum(0) - sorted_probs > top_p  # the mass before a token already reaches top_p
        outside[0] = False
        weights = weights.masked_fill(torch.zeros_like(outside).scatter(0, order, outside), 0.0)
    return int(torch.multinomial(weights, 1, generator=generator))


def choose(logits: torch.Tensor, rows: Sequence[Any]) -> list[int | Exception]:
    """The next token of each row (``row.sampling``, ``row.generator``), or the error that row alone hit.

    A row whose logits are not finite, or whose sampling raises, gets its exception back; the
    other rows are decided exactly as they would be without it.
    """
    # One reduction gives both the greedy tokens and the check: a NaN or +inf anywhere in a row is its max
    # (torch.max propagates NaN); -inf entries are harmless (zero weight). Checking every logit with isfinite
    # cost more than the whole forward of a small model.
    top, greedy_t = logits.max(-1)  # (rows,), (rows,); first maximal index, as argmax
    finite, greedy = torch.isfinite(top).tolist(), greedy_t.tolist()
    out: list[int | Exception] = []
    for i, row in enumerate(rows):
        s = row.sampling
        if not finite[i]:
            out.append(NonFiniteLogits("the model's output for this request is not finite (NaN or inf); "
                                       "its adapter may hold weights too large for this dtype"))
        elif s.greedy:
            out.append(greedy[i])
        else:
            try:
                out.append(sample(logits[i], s.temperature, s.top_p, row.generator))
            except Exception as err:  # noqa: BLE001 - this row's failure, reported to it alone
                out.append(err)
    return out
