"""Score fixed continuations (class verbalisers) by their log-likelihood under a model: no generation.

For a prompt ``x`` and a candidate ``y = (y_1..y_m)`` the score is
``log p(y | x) = sum_j log softmax(z_j)[y_j]`` (lm-eval-harness's ``loglikelihood``); the candidate
with the highest score is the prediction. Prompt and candidate are tokenised separately and their
ids concatenated, as in training (METHODS.md §13), so a candidate is always the same tokens
whatever the prompt ends with.

When every candidate is one token (``" positive"`` / ``" negative"``), one forward over the prompt
scores all of them from its last position. Otherwise each (prompt, candidate) pair is a row, rows
are left-padded so candidates end together, and only the last ``max_len + 1`` positions' logits are
computed (a full ``(rows, seq, vocab)`` tensor would be gigabytes for a 49k vocabulary).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from graft.decode.generation import LogitSource, as_source, left_pad

__all__ = ["score_continuations"]


def score_continuations(
    source: nn.Module | LogitSource,
    tokenizer: Any,
    prompts: Sequence[str],
    candidates: Sequence[str],
    *,
    batch_size: int = 8,
    add_special_tokens: bool = True,
    reduce: str = "sum",
) -> tuple[torch.Tensor, int]:
    """Log-likelihood of each candidate after each prompt.

    Args:
        source: A causal LM, a :class:`~graft.decode.generation.Member` or a proxy-tuner.
        tokenizer: Its tokenizer.
        prompts: Prompt texts.
        candidates: Continuations scored after every prompt, e.g. ``[" negative", " positive"]``
            (including the delimiter the prompt format puts before an answer).
        batch_size: Rows per forward.
        add_special_tokens: Let the tokenizer add BOS to prompts (``False`` for chat prompts).
        reduce: ``"sum"`` (the log-likelihood) or ``"mean"`` (per token, for candidates of very
            different lengths).

    Returns:
        ``(scores, tokens)``: a ``(len(prompts), len(candidates))`` float tensor, and the number of
        tokens the model processed.

    Raises:
        ValueError: No candidates, a candidate with no tokens, an empty prompt, or a bad ``reduce``.
    """
    if reduce not in ("sum", "mean"):
        raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")
    if not candidates:
        raise ValueError("no candidates to score")
    source = as_source(source)
    prompt_ids = tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"]
    cand_ids = tokenizer(list(candidates), add_special_tokens=False)["input_ids"]
    empty = [c for c, ids in zip(candidates, cand_ids) if not ids]
    if empty:
        raise ValueError(f"candidates {empty} have no tokens")
    if any(not ids for ids in prompt_ids):
        raise ValueError("an empty prompt has nothing to condition on")
    if all(len(ids) == 1 for ids in cand_ids):
        return _single_token(source, tokenizer.pad_token_id, prompt_ids, [c[0] for c in cand_ids], batch_size)
    scores, tokens = _multi_token(source, tokenizer.pad_token_id, prompt_ids, cand_ids, batch_size)
    if reduce == "mean":
        scores = scores / torch.tensor([len(c) for c in cand_ids], dtype=scores.dtype)
    return scores, tokens


def _single_token(
    source: LogitSource, pad_id: int, prompt_ids: list[list[int]], cand: list[int], batch_size: int
) -> tuple[torch.Tensor, int]:
    """One forward per prompt; every candidate's log-prob read off the last position."""
    out = torch.empty(len(prompt_ids), len(cand))
    index = torch.tensor(cand)
    for start, rows in _batches(prompt_ids, batch_size):
        ids, mask, positions = left_pad(rows, pad_id)
        logits, _ = source.forward(ids, mask, positions, None, keep=1, cache=False)
        out[start : start + len(rows)] = torch.log_softmax(logits[:, -1], dim=-1)[:, index]
    return out, sum(map(len, prompt_ids))


def _multi_token(
    source: LogitSource, pad_id: int, prompt_ids: list[list[int]], cand_ids: list[list[int]], batch_size: int
) -> tuple[torch.Tensor, int]:
    """One row per (prompt, candidate), left-padded so every candidate ends at the last position."""
    pairs = [(p, c) for p in range(len(prompt_ids)) for c in range(len(cand_ids))]
    rows = [prompt_ids[p] + cand_ids[c] for p, c in pairs]
    scores = torch.empty(len(pairs))
    for start, batch in _batches(rows, batch_size):
        lengths = [len(cand_ids[c]) for _, c in pairs[start : start + len(batch)]]
        width = max(lengths)
        ids, mask, positions = left_pad(batch, pad_id)
        logits, _ = source.forward(ids, mask, positions, None, keep=width + 1, cache=False)
        logprobs = torch.log_softmax(logits, dim=-1)  # (rows, width + 1, vocab)
        for r, length in enumerate(lengths):
            targets = torch.tensor(batch[r][-length:])
            # kept index of the logit that predicts candidate token j: width - length + j
            at = torch.arange(width - length, width)
            scores[start + r] = logprobs[r, at, targets].sum()
    return scores.view(len(prompt_ids), len(cand_ids)), sum(map(len, rows))


def _batches(rows: list[list[int]], size: int):
    """(start, rows) chunks of ``size`` rows."""
    for start in range(0, len(rows), size):
        yield start, rows[start : start + size]
