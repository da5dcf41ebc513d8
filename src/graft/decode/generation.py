"""Batched generation with left padding, per-row stopping, and any source of next-token logits.

A *logit source* is anything with ``forward(input_ids, attention_mask, position_ids, past, keep,
cache)`` returning ``(logits, past)`` and a ``vocab_size``: a :class:`Member` (one model in one
adapter state), or a :class:`graft.decode.proxy.ProxyTuner` that combines three members. The loop
here is the same for both, so proxy-tuning gets greedy and sampled decoding, stop strings and
batching for free.

The loop mirrors ``transformers``' ``generate`` for decoder-only models: prompts are left-padded,
positions count real tokens only (``cumsum(mask) - 1``; pads get 0), each step feeds one token per
row with the KV cache. Two things differ:

* Finished rows leave the batch (their cache rows are dropped), so a batch costs what its
  unfinished rows cost.
* ``num_samples > 1`` prefills each prompt once and copies its cache ``num_samples`` times, instead
  of running the prompt ``num_samples`` times (self-consistency's k chains share one prompt).

Example:
    >>> out = generate(model, tokenizer, ["Q: 2+2?\\nA:"], max_new_tokens=32, stop=["\\n\\nQ:"])
    >>> out[0].texts[0]
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from graft import core

__all__ = ["Generation", "LogitSource", "Member", "adapter_off", "adapter_on", "as_source", "contiguous_head", "generate", "select_rows"]


class LogitSource(Protocol):
    """Something that maps token ids to next-token logits, with its own KV cache."""

    vocab_size: int

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past: Any = None,
        keep: int = 1,
        cache: bool = True,
    ) -> tuple[torch.Tensor, Any]:
        """``(logits (batch, keep, vocab) float32, new past)`` for the last ``keep`` positions."""


@dataclass(frozen=True, eq=False)
class Member:
    """One model in one adapter state.

    Attributes:
        model: A causal LM (with or without graft adapters).
        adapters: ``None``: the model as it is at call time; ``()``: every adapter disabled (the
            base model); names: exactly these adapters active. The model's own adapter state is
            restored after every forward, so several members may share one model.
    """

    model: nn.Module
    adapters: tuple[str, ...] | None = None

    @property
    def vocab_size(self) -> int:
        return vocab_size(self.model)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Put the model in this member's adapter state for the duration of the block."""
        has_state = getattr(self.model, core.STATE_ATTR, None) is not None
        if self.adapters is None or (not self.adapters and not has_state):
            yield
            return
        if not self.adapters:
            with core.disabled(self.model):
                yield
            return
        if not has_state:
            raise ValueError(
                f"{type(self.model).__name__} has no adapters, so adapters {list(self.adapters)} cannot be "
                "activated; attach or load one first (graft.load(model, path, name))"
            )
        state = core.state_of(self.model)
        saved = (list(state.active), state.composition, state.disabled)
        try:
            core.activate(self.model, list(self.adapters))
            state.disabled = False
            yield
        finally:
            state.active, state.composition, state.disabled = saved

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past: Any = None,
        keep: int = 1,
        cache: bool = True,
    ) -> tuple[torch.Tensor, Any]:
        # The decode loop keeps its small bookkeeping tensors on the CPU; the model may be on a GPU.
        device = next(self.model.parameters()).device
        with torch.no_grad(), self.applied(), contiguous_head(self.model):
            out = self.model(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                position_ids=position_ids.to(device), past_key_values=past, use_cache=cache, logits_to_keep=keep,
            )
        return out.logits[:, -keep:].float().cpu(), (out.past_key_values if cache else None)


@contextlib.contextmanager
def contiguous_head(model: nn.Module) -> Iterator[None]:
    """Hand the output head a contiguous input while a forward with ``logits_to_keep`` runs.

    transformers slices the last positions of the hidden states (``hidden[:, -k:, :]``, a strided
    view) before the head. For a bf16 ``Linear`` on the CPU, PyTorch turns that 3-D strided input into
    a ``bmm`` against the (vocab x hidden) weight expanded per row, copying the whole head once per
    prompt: on SmolLM2 a prefill of 3 prompts spent 260 ms of 510 ms in that copy. A contiguous input
    takes the plain ``mm`` path; the logits are the same.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Module):
        yield
        return
    hook = head.register_forward_pre_hook(lambda _module, args: (args[0].contiguous(), *args[1:]) if args else None)
    try:
        yield
    finally:
        hook.remove()


def adapter_on(model: nn.Module, name: str | Sequence[str] = "default") -> Member:
    """The model with adapter(s) ``name`` active (an expert, for proxy-tuning)."""
    return Member(model, (name,) if isinstance(name, str) else tuple(name))


def adapter_off(model: nn.Module) -> Member:
    """The model with every adapter disabled: the base model (an anti-expert, for proxy-tuning)."""
    return Member(model, ())


def as_source(source: nn.Module | LogitSource) -> LogitSource:
    """A logit source for a model (as it is) or a source given as such."""
    return Member(source) if isinstance(source, nn.Module) else source


def vocab_size(model: nn.Module) -> int:
    """The number of logits a causal LM produces per position."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


def select_rows(past: Any, rows: torch.Tensor) -> Any:
    """Keep (or repeat) batch rows of a KV cache, or of a tuple of caches (one per proxy member)."""
    if isinstance(past, tuple):
        return tuple(select_rows(p, rows) for p in past)
    if past is not None:
        past.batch_select_indices(rows)
    return past


@dataclass(frozen=True)
class Generation:
    """What one prompt produced.

    Attributes:
        texts: One decoded continuation per sample, cut before the first stop string; special
            tokens (EOS) are not included.
        prompt_tokens: Tokens of the prompt (without padding).
        generated_tokens: Tokens generated per sample, up to and including EOS or the token that
            completed a stop string.
        token_ids: The generated token ids per sample (EOS included when it was produced).
    """

    texts: list[str]
    prompt_tokens: int
    generated_tokens: list[int]
    token_ids: list[list[int]]

    @property
    def text(self) -> str:
        """The first (for greedy decoding, the only) continuation."""
        return self.texts[0]


def generate(
    source: nn.Module | LogitSource,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    num_samples: int = 1,
    stop: Sequence[str] = (),
    batch_size: int = 8,
    seed: int = 0,
    add_special_tokens: bool = True,
    eos_token_ids: Sequence[int] | None = None,
) -> list[Generation]:
    """Generate continuations of many prompts, in left-padded batches.

    Args:
        source: A causal LM (used as it is), a :class:`Member` or a proxy-tuner.
        tokenizer: Its tokenizer (needs a pad token, which :func:`graft.models.load` ensures).
        prompts: Prompt texts.
        max_new_tokens: Tokens generated at most per sample.
        temperature: 0 for greedy decoding; otherwise sample from ``softmax(logits / temperature)``.
        top_p: Nucleus sampling mass (sampling only).
        num_samples: Continuations per prompt (sampling only; self-consistency's k).
        stop: Strings that end a continuation (it is cut before them).
        batch_size: Sequences decoded at once (prompts per batch = ``batch_size // num_samples``).
        seed: Seed of the sampling generator.
        add_special_tokens: Let the tokenizer add BOS; ``False`` for chat-template prompts.
        eos_token_ids: Tokens that end a continuation; default the tokenizer's EOS.

    Returns:
        One :class:`Generation` per prompt, in order.

    Raises:
        ValueError: Bad sizes, ``num_samples > 1`` with greedy decoding, or no pad token.
    """
    if max_new_tokens < 1 or batch_size < 1 or num_samples < 1:
        raise ValueError(
            f"max_new_tokens, batch_size and num_samples must be >= 1; got {max_new_tokens}, {batch_size}, {num_samples}"
        )
    if num_samples > 1 and temperature <= 0:
        raise ValueError(f"num_samples={num_samples} needs sampling (temperature > 0); greedy gives one answer")
    if tokenizer.pad_token_id is None:
        raise ValueError(f"{type(tokenizer).__name__} has no pad token; set tokenizer.pad_token first")
    if not prompts:
        return []
    source = as_source(source)
    eos = set(eos_token_ids if eos_token_ids is not None else [tokenizer.eos_token_id]) - {None}
    ids = tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"]
    if any(len(row) == 0 for row in ids):
        raise ValueError("an empty prompt has nothing to condition on; give it at least one token")
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # similar lengths share a batch
    per_batch = max(1, batch_size // num_samples)
    generator = torch.Generator().manual_seed(seed)
    sampling = _Sampling(temperature, top_p, generator)
    results: dict[int, Generation] = {}
    for start in range(0, len(order), per_batch):
        chunk = order[start : start + per_batch]
        outs = _generate_batch(
            source, tokenizer, [ids[i] for i in chunk], max_new_tokens, num_samples, sampling, eos, list(stop)
        )
        results.update(zip(chunk, outs))
    return [results[i] for i in range(len(ids))]


@dataclass(frozen=True)
class _Sampling:
    temperature: float
    top_p: float
    generator: torch.Generator

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """(batch, vocab) logits -> (batch,) next tokens."""
        if self.temperature <= 0:
            return logits.argmax(-1)
        logits = logits / self.temperature
        if self.top_p < 1.0:
            logits = top_p_filter(logits, self.top_p)
        probs = torch.softmax(logits, dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Set to -inf every logit outside the smallest set of tokens whose probability reaches ``top_p``."""
    sorted_logits, sorted_index = torch.sort(logits, descending=True, dim=-1)
    probs = torch.softmax(sorted_logits, dim=-1)
    outside = probs.cumsum(-1) - probs > top_p  # the mass before a token already reaches top_p
    outside[..., 0] = False  # keep at least one token
    remove = torch.zeros_like(outside).scatter(-1, sorted_index, outside)
    return logits.masked_fill(remove, float("-inf"))


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask, position_ids)`` of left-padded rows; pads get position 0."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            input_ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids, mask, positions


def _generate_batch(
    source: LogitSource,
    tokenizer: Any,
    rows: list[list[int]],
    max_new_tokens: int,
    num_samples: int,
    sampling: _Sampling,
    eos: set[int],
    stop: list[str],
) -> list[Generation]:
    """Decode one batch of prompts; each prompt's samples are consecutive rows."""
    input_ids, mask, positions = left_pad(rows, tokenizer.pad_token_id)
    logits, past = source.forward(input_ids, mask, positions, None, keep=1)
    logits = logits[:, -1]  # (batch, vocab)
    if num_samples > 1:
        repeat = torch.arange(len(rows)).repeat_interleave(num_samples)
        logits, mask, positions = logits[repeat], mask[repeat], positions[repeat]
        past = select_rows(past, repeat)
    total = len(rows) * num_samples
    tokens: list[list[int]] = [[] for _ in range(total)]
    texts: list[str | None] = [None] * total
    alive = list(range(total))  # batch position -> sequence
    for step in range(max_new_tokens):
        chosen = sampling.choose(logits).tolist()
        keep = []
        for position, (sequence, token) in enumerate(zip(alive, chosen)):
            tokens[sequence].append(token)
            text = _finished_text(tokenizer, tokens[sequence], token, eos, stop)
            if text is None:
                keep.append(position)
            else:
                texts[sequence] = text
        if not keep or step == max_new_tokens - 1:
            break
        next_ids = torch.tensor([chosen[p] for p in keep], dtype=torch.long)[:, None]  # (batch, 1)
        if len(keep) < len(alive):
            index = torch.tensor(keep, dtype=torch.long)
            mask, positions, past = mask[index], positions[index], select_rows(past, index)
            alive = [alive[p] for p in keep]
        mask = torch.cat([mask, mask.new_ones((len(alive), 1))], dim=1)
        positions = positions[:, -1:] + 1
        logits, past = source.forward(next_ids, mask, positions, past, keep=1)
        logits = logits[:, -1]
    for sequence in range(total):
        if texts[sequence] is None:  # ran out of tokens
            texts[sequence] = _cut(_decode(tokenizer, tokens[sequence], eos), stop)
    return [
        Generation(
            texts=[texts[i * num_samples + s] for s in range(num_samples)],
            prompt_tokens=len(rows[i]),
            generated_tokens=[len(tokens[i * num_samples + s]) for s in range(num_samples)],
            token_ids=[tokens[i * num_samples + s] for s in range(num_samples)],
        )
        for i in range(len(rows))
    ]


def _finished_text(tokenizer: Any, tokens: list[int], last: int, eos: set[int], stop: list[str]) -> str | None:
    """The continuation's text if it just ended (EOS or a stop string), else ``None``."""
    if last in eos:
        return _cut(_decode(tokenizer, tokens, eos), stop)
    if stop:
        text = _decode(tokenizer, tokens, eos)
        if any(s in text for s in stop):
            return _cut(text, stop)
    return None


def _decode(tokenizer: Any, tokens: list[int], eos: set[int]) -> str:
    return tokenizer.decode([t for t in tokens if t not in eos], skip_special_tokens=True)


def _cut(text: str, stop: list[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]
