"""Feature extraction (a linear probe): the whole backbone frozen, only a pooling head trains.

    h = backbone(x)                      (batch, seq, d), frozen
    z = mean of h over real tokens       (pooling="mean")   or   h[:, 0]   (pooling="first")
    logits = W z + b                     (task="classification": W ∈ R^{labels×d})
    embedding = normalise(W z + b)       (task="embedding": W ∈ R^{dim×d}, initialised to the identity
                                          when dim == d, so the untrained probe is plain mean pooling)

The cheapest baseline a method must beat: one forward of the frozen model per example, no
gradient through the backbone. The head lives in ``model.graft_probe[name]`` and is applied by a
forward hook on the top model, which replaces ``logits`` (and ``loss``, when labels are passed) or
adds ``embeddings``; the base model's code is untouched. Not mergeable: pooling is not a weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from graft.core import GraftState, Method, register

POOLINGS = ("mean", "first")
TASKS = ("classification", "embedding")
PROBE_ATTR = "graft_probe"


@register
@dataclass(frozen=True)
class Probe(Method):
    """A trainable pooling head on a frozen backbone.

    Args:
        task: "classification" (logits over ``num_labels``) or "embedding" (L2-normalised vectors).
        num_labels: Classes; None takes ``model.config.num_labels`` (sequence-classification models).
        pooling: "mean" over unmasked tokens, or "first" (the [CLS] position).
        dim: Embedding size for task="embedding" (None: the model's hidden size).
    """

    task: str = "classification"
    num_labels: int | None = None
    pooling: str = "mean"
    dim: int | None = None

    peft_type: ClassVar[str] = "PROBE"
    mergeable: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"Probe task={self.task!r} is not one of {TASKS}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"Probe pooling={self.pooling!r} is not one of {POOLINGS}")
        for key in ("num_labels", "dim"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"Probe {key}={value!r} must be a positive integer")

    # ---- shapes
    def _hidden(self, model: nn.Module) -> int:
        cfg = getattr(model, "config", None)
        for key in ("hidden_size", "d_model", "n_embd"):
            if isinstance(getattr(cfg, key, None), int):
                return getattr(cfg, key)
        raise ValueError(f"Probe: cannot find the hidden size of {type(model).__name__} (no config.hidden_size)")

    def _out(self, model: nn.Module) -> int:
        if self.task == "embedding":
            return self.dim or self._hidden(model)
        labels = self.num_labels or getattr(getattr(model, "config", None), "num_labels", None)
        if not labels:
            raise ValueError("Probe(task='classification') needs num_labels (the model's config has none)")
        return labels

    def count(self, model: nn.Module) -> int:
        return self._out(model) * self._hidden(model) + self._out(model)

    # ---- the method protocol
    def apply(self, model: nn.Module, name: str, state: GraftState) -> None:
        if type(model).__name__.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")):
            raise TypeError(f"Probe pools a sequence into one vector; {type(model).__name__} is a generative model. "
                            "Use an encoder (e.g. graft.models.load('minilm')) or a *ForSequenceClassification model")
        if not hasattr(model, PROBE_ATTR):
            model.add_module(PROBE_ATTR, nn.ModuleDict())
            hooks = (model.register_forward_pre_hook(_remember_mask, with_kwargs=True),
                     model.register_forward_hook(_apply_probe, with_kwargs=True))
            object.__setattr__(model, "_graft_probe_hooks", hooks)
        hidden, out = self._hidden(model), self._out(model)
        ref = next(model.parameters())
        dtype = ref.dtype if ref.dtype.is_floating_point and ref.dtype != torch.float16 else torch.float32
        head = nn.Linear(hidden, out, device=ref.device if ref.device.type != "meta" else "meta", dtype=dtype)
        if self.task == "embedding" and out == hidden and ref.device.type != "meta":
            with torch.no_grad():
                head.weight.copy_(torch.eye(hidden, dtype=dtype))
                head.bias.zero_()
        getattr(model, PROBE_ATTR)[name] = head
        object.__setattr__(head, "_graft_probe", self)

    def extra_parameters(self, model: nn.Module, name: str) -> dict[str, nn.Parameter]:
        heads = getattr(model, PROBE_ATTR, None)
        if heads is None or name not in heads:
            return {}
        # Keyed without the adapter name (as peft keys its tensors): the file holds one adapter.
        return {f"{PROBE_ATTR}.{k}": p for k, p in heads[name].named_parameters()}

    def extra_tensors(self, model: nn.Module, name: str) -> dict[str, torch.Tensor]:
        return {k: p.detach() for k, p in self.extra_parameters(model, name).items()}

    def remove(self, model: nn.Module, name: str) -> None:
        heads = getattr(model, PROBE_ATTR, None)
        if heads is None:
            return
        if name in heads:
            del heads[name]
        if not len(heads):
            for hook in getattr(model, "_graft_probe_hooks", ()):
                hook.remove()
            object.__delattr__(model, "_graft_probe_hooks")
            delattr(model, PROBE_ATTR)

    def to_peft(self, model: nn.Module, name: str) -> dict[str, Any]:
        return {"peft_type": self.peft_type, "task": self.task, "num_labels": self._out(model) if self.task ==
                "classification" else None, "pooling": self.pooling, "dim": self.dim}

    @classmethod
    def from_peft(cls, config: dict[str, Any]) -> Probe:
        return cls(task=config.get("task", "classification"), num_labels=config.get("num_labels"),
                   pooling=config.get("pooling", "mean"), dim=config.get("dim"))


def pool(hidden: torch.Tensor, mask: torch.Tensor | None, how: str) -> torch.Tensor:
    """(batch, seq, d) -> (batch, d): mean over real tokens, or the first position."""
    if how == "first":
        return hidden[:, 0]
    if mask is None:
        return hidden.mean(dim=1)
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


def _remember_mask(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    object.__setattr__(model, "_graft_probe_mask", kwargs.get("attention_mask"))
    state = getattr(model, "_graft_state", None)
    if state is not None and not state.disabled and any(n in getattr(model, PROBE_ATTR) for n in state.active):
        kwargs["output_hidden_states"] = True  # the top model's last hidden state is what the probe pools
    return (args, kwargs)


def _apply_probe(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
    state = getattr(model, "_graft_state", None)
    heads = getattr(model, PROBE_ATTR)
    if state is None or state.disabled:
        return output
    if state.routing is not None and any(n in heads for n in state.route_names()):
        raise NotImplementedError("graft.route does not support Probe adapters; activate one probe at a time")
    names = [n for n in state.active if n in heads]
    if not names:
        return output
    if len(names) > 1:
        raise RuntimeError(f"probes {names} are all active; a model outputs one probe's result, activate only one")
    head = heads[names[0]]
    method: Probe = head._graft_probe
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is None:
        hidden = output.hidden_states[-1]
    mask = getattr(model, "_graft_probe_mask", None)
    z = head(pool(hidden, mask, method.pooling).to(head.weight.dtype))
    if method.task == "embedding":
        output["embeddings"] = F.normalize(z, dim=-1)
        return output
    output["logits"] = z
    labels = kwargs.get("labels")
    if labels is not None:
        output["loss"] = F.cross_entropy(z.float(), labels)
    return output
