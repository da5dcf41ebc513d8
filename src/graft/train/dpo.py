"""Direct Preference Optimization with any graft adapter; the reference is the base, adapters disabled.

DPO (Rafailov et al. 2023, eq. 7) trains the policy pi on pairs (x, y_w, y_l) against a frozen
reference pi_ref:

    Δ = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]
    loss = -(1 - ε) log σ(β Δ) - ε log σ(-β Δ)

with ε = 0 for DPO and ε > 0 for conservative DPO (Mitchell 2023, "A note on DPO with noisy
preferences": labels flipped with probability ε). log pi(y|x) is the *sum* of the response tokens'
log-probabilities (prompt tokens masked), as in the paper and TRL's ``DPOTrainer``. The implicit
rewards are β (log pi - log pi_ref); their mean, the margin and the fraction of pairs whose chosen
reward is higher (the reward accuracy) are logged.

With an adapter, pi_ref is the same model under ``graft.disabled``: no second copy of the weights.
The reference forward runs under ``torch.no_grad`` in the step, or once before training
(:func:`precompute_reference`, ``TrainConfig.precompute_ref``): the base is frozen, so its
log-probabilities never change. (ReLoRA merges its adapter into the base as it trains, so there the
reference moves unless it is precomputed.)

A batch holds 2n sequences (``graft.data.collate_pairs``): n chosen, then n rejected, packed or
padded; ``sequence_ids`` assigns each token to its sequence. The loss returned is the *sum* over
pairs, and the trainer divides by the number of pairs in the optimizer step, so a step's loss is the
mean over its pairs (TRL's ``per_sequence_loss.mean()``) however it is split into micro-batches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from graft import core
from graft.train.loss import IGNORE_INDEX, softcap

NOT_MODEL_INPUTS = ("labels", "sequence_ids", "ref_logps")
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected")


def pair_count(batch: dict[str, torch.Tensor]) -> int:
    """Pairs in a batch of 2n sequences."""
    return (int(batch["sequence_ids"].max()) + 1) // 2


def sequence_logps(model: nn.Module, batch: dict[str, torch.Tensor], *, logits_chunk: int = 512,
                   selective: bool = True) -> torch.Tensor:
    """Summed log-probabilities of each sequence's supervised tokens, in fp32: shape (2n,).

    Position t scores ``labels[t + 1]``, the token it predicts (labels are not shifted). On the
    selective path only the supervised positions go through the output head, a chunk at a time,
    each chunk's logits rebuilt in backward (``torch.utils.checkpoint``); otherwise the model's own
    full logits are used (see :func:`graft.train.loss.selective_fallback_reason`).
    """
    inputs = {k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS}
    targets = batch["labels"][:, 1:]  # (rows, seq - 1)
    keep = targets != IGNORE_INDEX
    owner = batch["sequence_ids"][:, 1:][keep]  # (n,): the sequence each scored token belongs to
    count = int(batch["sequence_ids"].max()) + 1
    targets = targets[keep]
    if selective:
        out = getattr(model, model.base_model_prefix)(**inputs, use_cache=False)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # (rows, seq, dim)
        rows = hidden[:, :-1][keep]  # (n, dim)
        head, cap = model.get_output_embeddings(), softcap(model)
        pieces = []
        for start in range(0, rows.shape[0], logits_chunk):
            x, t = rows[start:start + logits_chunk], targets[start:start + logits_chunk]
            if torch.is_grad_enabled():
                pieces.append(checkpoint(_token_logps, head, x, t, cap, use_reentrant=False))
            else:
                pieces.append(_token_logps(head, x, t, cap))
        token_logps = torch.cat(pieces) if pieces else rows.new_zeros(0, dtype=torch.float32)
    else:
        logits = model(**inputs, use_cache=False).logits[:, :-1][keep].float()  # (n, vocab)
        token_logps = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)
    return token_logps.new_zeros(count).index_add(0, owner, token_logps)


def _token_logps(head: nn.Module, x: torch.Tensor, targets: torch.Tensor, cap: float | None) -> torch.Tensor:
    logits = head(x).float()  # (chunk, vocab); a module call, so an adapter on the head applies
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)  # (chunk,)


def reference_logps(model: nn.Module, batch: dict[str, torch.Tensor], *, logits_chunk: int = 512,
                    selective: bool = True) -> torch.Tensor:
    """:func:`sequence_logps` of the base model (every adapter disabled), without gradients."""
    if "ref_logps" in batch:
        return batch["ref_logps"].to(torch.float32)
    with torch.no_grad(), core.disabled(model):
        return sequence_logps(model, batch, logits_chunk=logits_chunk, selective=selective)


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float, label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair (conservative) DPO loss and the implicit rewards, all shape (n,).

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``; the rewards are detached.
    """
    delta = (chosen - ref_chosen) - (rejected - ref_rejected)  # (n,)
    losses = (-(1 - label_smoothing) * F.logsigmoid(beta * delta)
              - label_smoothing * F.logsigmoid(-beta * delta))
    return losses, beta * (chosen - ref_chosen).detach(), beta * (rejected - ref_rejected).detach()


class DPOLoss:
    """The trainer's loss for ``objective="dpo"``: ``(model, batch) -> summed per-pair loss``.

    It keeps the sums of the metrics of the pairs seen since :meth:`take_metrics` last ran, which the
    trainer calls once per optimizer step (and around an evaluation).
    """

    def __init__(self, beta: float, label_smoothing: float = 0.0, logits_chunk: int = 512,
                 selective: bool = True) -> None:
        self.beta, self.label_smoothing = beta, label_smoothing
        self.logits_chunk, self.selective = logits_chunk, selective
        self._sums: dict[str, float] = dict.fromkeys(METRICS, 0.0)
        self._pairs = 0

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        kw = {"logits_chunk": self.logits_chunk, "selective": self.selective}
        ref = reference_logps(model, batch, **kw)
        policy = sequence_logps(model, batch, **kw)
        n = policy.shape[0] // 2
        losses, chosen, rejected = dpo_loss(policy[:n], policy[n:], ref[:n], ref[n:], self.beta,
                                            self.label_smoothing)
        values = {"rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margins": chosen - rejected,
                  "rewards/accuracies": (chosen > rejected).float(), "logps/chosen": policy[:n].detach(),
                  "logps/rejected": policy[n:].detach()}
        for key, value in values.items():
            self._sums[key] += float(value.sum())
        self._pairs += n
        return losses.sum()

    def take_metrics(self) -> dict[str, float]:
        """Mean of each metric over the pairs since the last call; resets the sums."""
        out = {k: v / self._pairs for k, v in self._sums.items()} if self._pairs else {}
        self._sums, self._pairs = dict.fromkeys(METRICS, 0.0), 0
        return out


def check_model(model: nn.Module) -> None:
    """DPO's reference is the base with the adapters disabled: refuse a model without adapters."""
    if getattr(model, core.STATE_ATTR, None) is None:
        raise ValueError("objective='dpo' trains an adapter against the base model (the adapter disabled) as "
                         "reference; attach an adapter method (graft.attach), not full fine-tuning")


def precompute_reference(model: nn.Module, pairs: Sequence[Any], collate: Callable[[list[Any]], dict],
                         batch_size: int = 8, *, logits_chunk: int = 512, selective: bool = True) -> list[Any]:
    """The pairs with the base model's log-probabilities attached (``PreferencePair.ref_logps``).

    The base is frozen, so these are computed once instead of on every step; it runs in eval mode.
    """
    check_model(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[Any] = []
    try:
        for start in range(0, len(pairs), batch_size):
            chunk = [dataclasses.replace(p, ref_logps=None) for p in pairs[start:start + batch_size]]
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in collate(chunk).items()}
            ref = reference_logps(model, batch, logits_chunk=logits_chunk, selective=selective).tolist()
            n = len(chunk)
            out += [p.with_reference(ref[i], ref[n + i]) for i, p in enumerate(chunk)]
    finally:
        model.train(was_training)
    return out
