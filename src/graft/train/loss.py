"""Training losses, returned as fp32 *sums* so the caller can normalise a whole optimizer step.

The causal-LM loss has two paths with the same value:

* **selective logits** (the default): run the backbone for hidden states, keep only the positions
  whose next-token label is supervised, and apply the output head to those rows in chunks of
  ``logits_chunk``. The (batch, seq, vocab) logits tensor is never built: at most one (chunk, vocab)
  block exists at a time. With a 49k vocabulary and 4k tokens per batch that is ~0.8 GB of fp32
  logits (plus their gradient) saved. A frozen plain head (``nn.Linear`` without bias) forms each
  chunk's input gradient in the forward pass (:class:`_HeadCrossEntropy`) and keeps only that
  (chunk, dim) gradient; any other head (an adapter on it, a bias, a trainable weight) runs each
  chunk under ``torch.utils.checkpoint``, which rebuilds the chunk's logits in backward (one head
  matmul more).
* **plain**: the model's own forward, then cross-entropy on its logits. Used when the selective path
  cannot reproduce the model's logits (see :func:`selective_fallback_reason`).

Both compute the cross-entropy in fp32, like transformers' ``ForCausalLMLoss``; labels are not
pre-shifted (position t is scored against ``labels[t + 1]``), also the transformers convention.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100

# Config attributes by which some architectures rescale logits after the head (Cohere, MPT:
# logit_scale; Granite: logits_scaling; Falcon-H1: lm_head_multiplier; MiniCPM: scale_width). Their
# semantics differ per model, so graft does not re-implement them: such models take the plain path.
LOGIT_SCALE_ATTRS = ("logit_scale", "logits_scaling", "lm_head_multiplier", "scale_width")


def supervised_count(batch: dict[str, torch.Tensor], task: str) -> int:
    """Items the loss sums over: shifted labels != -100 (causal LM) or labelled rows (classification)."""
    labels = batch["labels"]
    if task == "classification":
        return int((labels != IGNORE_INDEX).sum())
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor], logits_chunk: int = 512,
                   selective: bool = True) -> torch.Tensor:
    """Mean next-token cross-entropy over supervised tokens; equals ``model(**batch).loss``.

    Args:
        model: A transformers causal LM (adapters attached or not).
        batch: ``input_ids``, ``labels`` (-100 = unsupervised, not shifted), and optionally
            ``attention_mask`` / ``position_ids``, passed to the model as given.
        logits_chunk: Rows of the output head computed at once on the selective path.
        selective: Use the selective-logits path (else the model's full logits).
    """
    total = causal_lm_loss_sum(model, batch, logits_chunk=logits_chunk, selective=selective)
    return total / max(supervised_count(batch, "causal-lm"), 1)


def causal_lm_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], *, logits_chunk: int,
                       selective: bool) -> torch.Tensor:
    """Summed fp32 next-token cross-entropy over supervised tokens (a 0-dim tensor with a graph)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if selective:
        return _selective_sum(model, inputs, batch["labels"], logits_chunk)
    return _plain_sum(model, inputs, batch["labels"])


def classification_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed fp32 cross-entropy of a sequence classifier over labelled rows."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits
    if logits.dim() != 2:
        raise ValueError(
            f"task='classification' expects logits of shape (batch, classes), got {tuple(logits.shape)}; "
            "is this a *ForSequenceClassification model?"
        )
    return F.cross_entropy(logits.float(), batch["labels"], ignore_index=IGNORE_INDEX, reduction="sum")


def _plain_sum(model: nn.Module, inputs: dict[str, Any], labels: torch.Tensor) -> torch.Tensor:
    logits = model(**inputs, use_cache=False).logits  # (batch, seq, vocab)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def _selective_sum(model: nn.Module, inputs: dict[str, Any], labels: torch.Tensor, chunk: int) -> torch.Tensor:
    backbone = getattr(model, model.base_model_prefix)
    out = backbone(**inputs, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # (batch, seq, dim)
    targets = labels[:, 1:]  # (batch, seq - 1): position t predicts token t + 1
    keep = targets != IGNORE_INDEX
    rows, targets = hidden[:, :-1][keep], targets[keep]  # (n, dim), (n,)
    if rows.shape[0] == 0:
        return rows.float().sum()  # nothing supervised: an exact zero that still has a graph to backward
    head = model.get_output_embeddings()
    cap = softcap(model)
    # A frozen plain head (LoRA and the like): x's gradient can be formed in forward. A trainable head
    # (full fine-tuning) would have to keep a (vocab, dim) weight gradient per chunk until backward.
    fused = type(head) is nn.Linear and head.bias is None and not head.weight.requires_grad
    total = rows.new_zeros((), dtype=torch.float32)
    for start in range(0, rows.shape[0], chunk):
        x, t = rows[start:start + chunk], targets[start:start + chunk]
        if not torch.is_grad_enabled():
            total = total + _head_loss(head, x, t, cap)
        elif fused:
            total = total + _HeadCrossEntropy.apply(x, head.weight, t, cap)
        else:
            # A head with an adapter, a bias or a trainable weight: only x is saved for backward, and
            # the chunk's logits are rebuilt there, one chunk at a time.
            total = total + checkpoint(_head_loss, head, x, t, cap, use_reentrant=False)
    return total


class _HeadCrossEntropy(torch.autograd.Function):
    """sum CE(softcap(x Wᵀ), t) for one chunk of a frozen head, with x's gradient formed in forward.

    The loss is a scalar, so d loss / d logits = softmax - onehot is known as soon as the logits
    are; multiplying it into W right away leaves only the (chunk, dim) gradient of x to keep, the
    size of the x that checkpointing would keep. The (chunk, vocab) logits never outlive the
    forward, and the backward does not rebuild them: one head matmul fewer per chunk.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                cap: float | None) -> torch.Tensor:
        if ctx.needs_input_grad[1]:
            raise ValueError("_HeadCrossEntropy is for a frozen head; a trainable one takes the checkpointed path")
        logits = F.linear(x, weight).float()  # under autocast, in its dtype: as head(x) would be
        if cap:
            squashed = torch.tanh(logits / cap)
            logits = squashed * cap
        # log_softmax, then exp of it for the softmax: the same arithmetic as cross_entropy's autograd
        logp = torch.log_softmax(logits, dim=-1)
        del logits
        loss = -logp.gather(1, targets[:, None]).sum()
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad = logp.exp_()  # softmax, in place
            grad[torch.arange(grad.shape[0], device=grad.device), targets] -= 1.0
            if cap:
                grad.mul_(1.0 - squashed.square())  # d(cap·tanh(z / cap)) / dz
            grad = grad.to(x.dtype if torch.is_autocast_enabled(x.device.type) else weight.dtype)
            grad_x = F.linear(grad, weight.t()).to(x.dtype)  # grad @ W
        ctx.save_for_backward(grad_x)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (grad_x,) = ctx.saved_tensors
        return None if grad_x is None else grad_x * grad_out.to(grad_x.dtype), None, None, None


def _head_loss(head: nn.Module, x: torch.Tensor, targets: torch.Tensor, cap: float | None) -> torch.Tensor:
    logits = head(x).float()  # (chunk, vocab); called as a module so a LoRA on the head still applies
    if cap:
        logits = torch.tanh(logits / cap) * cap  # Gemma 2/3 final logit softcapping
    return F.cross_entropy(logits, targets, reduction="sum")


def softcap(model: nn.Module) -> float | None:
    """The model's final logit softcapping value, if its config has one."""
    return getattr(getattr(model, "config", None), "final_logit_softcapping", None) or None


def selective_fallback_reason(model: nn.Module, batch: dict[str, torch.Tensor], logits_chunk: int) -> str | None:
    """Why the selective path cannot be used for this model, or None when it can.

    Besides the static checks (a backbone, an output head, no logit scaling in the config), this
    compares both paths once on the first row of a real batch, in eval mode and without gradients:
    any post-processing of logits graft does not know (a custom forward, an input hook on the top
    model) shows up as a different loss. No random numbers are drawn (dropout is off in eval mode).
    """
    prefix = getattr(model, "base_model_prefix", None)
    if not prefix or not isinstance(getattr(model, prefix, None), nn.Module):
        return f"{type(model).__name__} has no backbone attribute (base_model_prefix={prefix!r})"
    if model.get_output_embeddings() is None:
        return f"{type(model).__name__} has no output embeddings (get_output_embeddings() is None)"
    config = getattr(model, "config", None)
    for attr in LOGIT_SCALE_ATTRS:
        value = getattr(config, attr, None)
        if value not in (None, 1, 1.0):
            return f"its config scales logits ({attr}={value!r}), which graft's selective loss does not re-implement"
    ids = batch["input_ids"][:1, :32]
    if ids.shape[1] < 2:
        return None
    probe = {"input_ids": ids, "labels": ids}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            selective = causal_lm_loss(model, probe, logits_chunk, selective=True)
            plain = causal_lm_loss(model, probe, logits_chunk, selective=False)
    finally:
        model.train(was_training)
    if not torch.allclose(selective, plain, rtol=1e-4, atol=1e-5):
        return (f"the model's own logits give a different loss ({plain.item():.6f}) than its output head on the "
                f"backbone's hidden states ({selective.item():.6f}): it post-processes logits")
    return None
