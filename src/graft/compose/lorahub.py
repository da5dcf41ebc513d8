"""LoraHub (Huang et al. 2023, "LoraHub: Efficient Cross-Task Generalization via Dynamic LoRA Composition").

Given k LoRA adapters and a few examples of a new task, find weights w ∈ [-1.5, 1.5]^k that minimise

    f(w) = L(w) + 0.05 · mean_i |w_i|          (paper §3, eq. 3; L: loss on the examples)

without gradients, with nevergrad's NGOpt and a budget of 40 evaluations, from w = 0 (these are the
paper's settings and the defaults; sail-sg/lorahub's ``lorahub_learning`` is the reference code). The
composition is the paper's: the weighted sum taken over the A's and over the B's separately,

    Â = Σ_i w_i s_i A_i,   B̂ = Σ_i w_i B_i,   ΔW = B̂ Â = s (Σ_i w_i B_i)(Σ_j w_j A_j)  (equal scalings s)

which needs equal ranks and has cross terms B_i A_j. ``form="cat"`` offers the exact Σ_i w_i s_i B_i A_i
instead (rank Σ r_i; ``graft.combine``'s ``cat``).

Each evaluation is cheap: the combined adapter is allocated once, its A and B are views into one flat
buffer, and a candidate w is written into that buffer by one matrix-vector product over the stacked
factors of every module (``cat``: one gather and one multiply). The examples go through the model in one
left-padded batch, and the output head runs only on the completion positions.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from graft.compose.combine import _check_combinable, _layer_factors, _result_lora
from graft.core import adapter_layers, adapter_parameters, attach, detach, state_of
from graft.methods.lora import LoRA, LoraEmbedding, LoraLinear

__all__ = ["FORMS", "LoraHubResult", "example_batch", "example_loss", "lorahub"]

FORMS = ("factors", "cat")


@dataclass(frozen=True)
class LoraHubResult:
    """What a LoraHub search found.

    Attributes:
        name: The adapter attached to the model, holding the composition at ``weights``.
        adapters: The adapters composed, in the order of ``weights``.
        weights: The weights found (nevergrad's recommendation).
        objective: f(weights) = loss + regulariser.
        loss: The example loss at ``weights``.
        start_loss: The example loss at w = 0 (the base model).
        trace: f of every evaluation, in order (``budget`` values).
        eval_seconds: Wall time of every evaluation (writing w into the factors + the forward).
        setup_seconds: Tokenising the examples and stacking the factors.
        search_seconds: The whole search (the evaluations and the optimizer's own work).
    """

    name: str
    adapters: tuple[str, ...]
    weights: tuple[float, ...]
    objective: float
    loss: float
    start_loss: float
    trace: tuple[float, ...]
    eval_seconds: tuple[float, ...]
    setup_seconds: float
    search_seconds: float

    @property
    def best_trace(self) -> list[float]:
        """The lowest f seen after each evaluation."""
        out, best = [], float("inf")
        for value in self.trace:
            best = min(best, value)
            out.append(best)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "weights": dict(zip(self.adapters, self.weights))}


# --------------------------------------------------------------------------------------------
# The examples: one left-padded batch, the loss on the completion tokens only


@dataclass(frozen=True)
class ExampleBatch:
    """Examples tokenised for :func:`example_loss`.

    ``input_ids`` / ``attention_mask`` / ``position_ids`` (rows, width), left-padded so every completion
    ends at the last position; ``targets`` (rows, keep - 1): the completion tokens right-aligned, -100
    elsewhere; ``keep``: the positions whose logits are computed (the longest completion + 1).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    targets: torch.Tensor
    keep: int

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())


def _pairs(examples: Sequence[Any]) -> list[tuple[str, str]]:
    """(prompt, completion) pairs from pairs or dicts with ``prompt`` / ``completion``."""
    if isinstance(examples, (str, bytes)) or not isinstance(examples, Sequence) or not examples:
        raise ValueError("examples must be a non-empty list of (prompt_text, completion_text) pairs")
    pairs = []
    for i, ex in enumerate(examples):
        if isinstance(ex, dict):
            ex = (ex.get("prompt"), ex.get("completion"))
        if not (isinstance(ex, (tuple, list)) and len(ex) == 2 and all(isinstance(t, str) for t in ex)):
            raise ValueError(f"example {i} is not a (prompt_text, completion_text) pair of strings: {ex!r}")
        if not ex[1].strip():
            raise ValueError(f"example {i} has an empty completion: there is nothing to score")
        pairs.append((ex[0], ex[1]))
    return pairs


def example_batch(tokenizer: Any, examples: Sequence[Any], *, add_eos: bool = True,
                  max_length: int = 1024, device: torch.device | str = "cpu") -> ExampleBatch:
    """Tokenise (prompt, completion) pairs into one batch; the prompt is masked out of the loss.

    Prompt and completion are tokenised separately and concatenated (no BPE merge across the
    boundary can shift the mask); neither gets special tokens (a chat-rendered prompt has its own),
    and the completion ends with EOS when ``add_eos``. A row longer than ``max_length`` loses the
    start of its prompt.
    """
    pairs = _pairs(examples)
    rows, lengths = [], []
    eos = getattr(tokenizer, "eos_token_id", None)
    for prompt, completion in pairs:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c = tokenizer(completion, add_special_tokens=False)["input_ids"] + ([eos] if add_eos and eos is not None else [])
        if len(c) >= max_length:
            raise ValueError(f"a completion of {len(c)} tokens does not fit max_length={max_length}")
        row = (p + c)[-max_length:]
        rows.append(row)
        lengths.append(len(c))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    width, keep = max(map(len, rows)), max(lengths) + 1
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    targets = torch.full((len(rows), keep - 1), -100, dtype=torch.long)
    for i, (row, n) in enumerate(zip(rows, lengths)):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
        targets[i, keep - 1 - n:] = torch.tensor(row[-n:])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ExampleBatch(ids.to(device), mask.to(device), positions.to(device), targets.to(device), keep)


def example_loss(model: nn.Module, batch: ExampleBatch) -> float:
    """Mean cross-entropy over the completion tokens of the batch, in one forward (no gradients).

    The head runs on the last ``keep`` positions only (``logits_to_keep``): the logit at kept position
    j predicts kept position j + 1.
    """
    from graft.decode.generation import contiguous_head

    with torch.no_grad(), contiguous_head(model):
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                    use_cache=False, logits_to_keep=batch.keep)
    logits = out.logits[:, -batch.keep:-1].float()  # (rows, keep - 1, vocab)
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.targets.reshape(-1), ignore_index=-100))


# --------------------------------------------------------------------------------------------
# The combined adapter whose factors a candidate w is written into


class _Swap:
    """The composed adapter's factors as views into one flat buffer, rewritten per candidate w.

    factors: ``stack`` (n, k) holds every module's s_i A_i and B_i flattened, one column per adapter;
    stack @ w is the whole adapter. cat: ``stack`` (n,) holds w-free blocks [s_i A_i]_i per module, ``owner`` (n,)
    the adapter of each entry, so the buffer is stack * w[owner]; the B's are written once.
    """

    def __init__(self, model: nn.Module, name: str, adapters: list[str], form: str) -> None:
        self.form = form
        layers = [(lname, layer) for lname, layer in adapter_layers(model) if name in layer.configs]
        pieces, targets, owners = [], [], []
        for lname, layer in layers:
            factors = _layer_factors(layer, adapters)
            a_param, b_param = _params(layer, name)
            if form == "factors":
                pieces.append(torch.stack([(fa * s).reshape(-1) for fa, _, s in factors], dim=1))  # (n_a, k)
                pieces.append(torch.stack([fb.reshape(-1) for _, fb, _ in factors], dim=1))  # (n_b, k)
                targets += [a_param, b_param]
            else:
                pieces.append(torch.cat([(fa * s).reshape(-1) for fa, _, s in factors]))  # (Σ r_i d_in,)
                owners += [torch.full((fa.numel(),), i, dtype=torch.long) for i, (fa, _, _) in enumerate(factors)]
                targets.append(a_param)
                with torch.no_grad():
                    b_param.copy_(torch.cat([fb for _, fb, _ in factors], dim=1))
        ref = targets[0]
        self.stack = torch.cat(pieces).to(ref.dtype)  # factors: (n, k) ; cat: (n,)
        self.owner = torch.cat(owners).to(ref.device) if form == "cat" else None
        self.buffer = torch.zeros(self.stack.shape[0], dtype=ref.dtype, device=ref.device)
        offset = 0
        for p in targets:  # the adapter's parameters become views into the buffer
            p.data = self.buffer[offset: offset + p.numel()].view(p.shape)
            offset += p.numel()

    def write(self, w: torch.Tensor) -> None:
        """Put the composition at weights ``w`` (k,) into the adapter."""
        w = w.to(self.buffer)
        if self.form == "factors":
            torch.mv(self.stack, w, out=self.buffer)  # Σ_i w_i (s_i A_i | B_i), every module at once
        else:
            torch.mul(self.stack, w.index_select(0, self.owner), out=self.buffer)


def _params(layer: nn.Module, name: str) -> tuple[nn.Parameter, nn.Parameter]:
    if isinstance(layer, LoraLinear):
        return layer.lora_A[name].weight, layer.lora_B[name].weight
    if isinstance(layer, LoraEmbedding):
        return layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    raise TypeError(f"LoraHub composes LoRA layers, not {type(layer).__name__}")


# --------------------------------------------------------------------------------------------
# The search


def _nevergrad() -> Any:
    try:
        import nevergrad
    except ImportError:
        raise ImportError("LoraHub's gradient-free search needs nevergrad: pip install nevergrad") from None
    return nevergrad


def _check(model: nn.Module, adapters: Sequence[str], name: str, form: str, budget: int, bound: float,
           l1: float, optimizer: str) -> list[str]:
    state = state_of(model)
    if isinstance(adapters, str) or not adapters:
        raise ValueError(f"adapters must be a non-empty list of adapter names on the model, got {adapters!r}")
    adapters = list(adapters)
    if len(set(adapters)) != len(adapters):
        raise ValueError(f"adapters {adapters} name an adapter twice")
    unknown = [n for n in adapters if n not in state.methods]
    if unknown:
        raise ValueError(f"no adapter named {unknown}; attached adapters: {sorted(state.methods)}")
    if not isinstance(name, str) or not name or "." in name or name in state.methods:
        raise ValueError(f"name={name!r} must be a new adapter name (non-empty, no '.'); attached: {sorted(state.methods)}")
    if form not in FORMS:
        raise ValueError(f"form={form!r} is not one of {FORMS}")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget={budget!r} must be a positive number of evaluations")
    if not bound > 0:
        raise ValueError(f"bound={bound!r} must be positive (weights are searched in [-bound, bound])")
    if not l1 >= 0:
        raise ValueError(f"l1={l1!r} must be >= 0")
    if optimizer not in _nevergrad().optimizers.registry:
        raise ValueError(f"optimizer={optimizer!r} is not a nevergrad optimizer (e.g. NGOpt, CMA, TwoPointsDE)")
    for n in adapters:
        if not isinstance(state.methods[n], LoRA):
            raise ValueError(  # noqa: TRY004 (a user's choice of adapters)
                f"adapter '{n}' is {type(state.methods[n]).__name__}; LoraHub composes LoRA adapters")
        _check_combinable(model, n, state.methods[n])
    return adapters


def _ranks(model: nn.Module, adapters: list[str], form: str) -> dict[str, int]:
    """The composed adapter's rank per module; refuses different targets, and unequal ranks for ``factors``."""
    ranks = {}
    for lname, layer in adapter_layers(model):
        present = [n for n in adapters if n in layer.configs]
        if not present:
            continue
        if len(present) != len(adapters):
            raise ValueError(f"adapters {present} adapt '{lname}' but {sorted(set(adapters) - set(present))} do "
                             "not: LoraHub needs adapters with the same targets")
        if layer.merged:
            raise ValueError(f"adapters {layer.merged} are merged into '{lname}'; call graft.unmerge(model) first")
        rs = [fa.shape[0] for fa, _, _ in _layer_factors(layer, adapters)]
        if form == "factors" and len(set(rs)) > 1:
            raise ValueError(f"form='factors' sums the A's and the B's, so the adapters need equal ranks, but at "
                             f"'{lname}' they are {dict(zip(adapters, rs))}; use form='cat'")
        ranks[lname] = rs[0] if form == "factors" else sum(rs)
    if not ranks:
        raise ValueError(f"adapters {adapters} adapt no module")
    return ranks


def lorahub(
    model: nn.Module,
    tokenizer: Any,
    adapters: Sequence[str],
    examples: Sequence[Any],
    *,
    name: str = "lorahub",
    budget: int = 40,
    bound: float = 1.5,
    l1: float = 0.05,
    form: str = "factors",
    optimizer: str = "NGOpt",
    seed: int = 0,
    add_eos: bool = True,
    max_length: int = 1024,
    per_example: bool = False,
    activate: bool = True,
) -> LoraHubResult:
    """Compose LoRA adapters on ``model`` for a new task from a few examples (LoraHub).

    Args:
        model: A causal LM carrying the adapters (``graft.load(model, dir, name, activate=False)``).
        tokenizer: Its tokenizer.
        adapters: Names of the k adapters to compose (same targets; equal ranks for ``factors``).
        examples: (prompt_text, completion_text) pairs (or dicts with ``prompt`` / ``completion``):
            prompts as the model sees them (e.g. chat-rendered), scored on the completion only.
        name: Name of the composed adapter attached to the model.
        budget: Objective evaluations (forwards of the examples).
        bound: Weights are searched in [-bound, bound].
        l1: Weight of the mean |w| regulariser.
        form: ``factors`` (the paper's Σ w A, Σ w B) or ``cat`` (the exact Σ w ΔW).
        optimizer: A nevergrad optimizer name.
        seed: Seeds the optimizer's random draws; the same seed gives the same search.
        add_eos: End each completion with EOS (the model learns to stop).
        max_length: Tokens per example; longer prompts lose their start.
        per_example: Divide the loss by the number of examples, as the reference code does (its
            loss is a batch mean divided by the dataset size), which weighs the regulariser more.
        activate: Leave the composed adapter as the only active one (else restore the active set).

    Returns:
        A :class:`LoraHubResult`; the composed adapter is attached under ``name`` (save it with
        ``graft.save(model, dir, name)``).

    Raises:
        ValueError: Unknown or unsuitable adapters (not LoRA, DoRA, different targets, unequal ranks
            for ``factors``), a taken name, bad options or examples. The model is left as it was.
        ImportError: nevergrad is not installed.
    """
    started = time.perf_counter()
    adapters = _check(model, adapters, name, form, budget, bound, l1, optimizer)
    ranks = _ranks(model, adapters, form)
    device = next(model.parameters()).device
    batch = example_batch(tokenizer, examples, add_eos=add_eos, max_length=max_length, device=device)
    ng = _nevergrad()
    import numpy as np

    state = state_of(model)
    first = state.methods[adapters[0]]
    was_active, was_composition, was_training = list(state.active), state.composition, model.training
    attach(model, _result_lora(first, ranks), name, activate=True)
    try:
        for p in adapter_parameters(model, name).values():
            p.requires_grad_(False)
        swap = _Swap(model, name, adapters, form)
        model.eval()
        scale = 1.0 / len(batch.targets) if per_example else 1.0
        setup = time.perf_counter() - started

        trace: list[float] = []
        seconds: list[float] = []

        def objective(w: np.ndarray) -> tuple[float, float]:
            swap.write(torch.as_tensor(w, dtype=torch.float32))
            loss = example_loss(model, batch) * scale
            return loss + l1 * float(np.abs(w).mean()), loss

        search_start = time.perf_counter()
        start_loss = objective(np.zeros(len(adapters)))[1]
        param = ng.p.Array(init=np.zeros(len(adapters)), lower=-bound, upper=bound)
        param.random_state = np.random.RandomState(seed)
        opt = ng.optimizers.registry[optimizer](parametrization=param, budget=budget)
        with warnings.catch_warnings():
            # NGOpt picks COBYLA at small budgets, which warns when it adjusts its own settings to the budget
            warnings.filterwarnings("ignore", message="COBYLA: Invalid")
            for _ in range(budget):
                t0 = time.perf_counter()
                candidate = opt.ask()
                value, _ = objective(candidate.value)
                seconds.append(time.perf_counter() - t0)
                opt.tell(candidate, value)
                trace.append(value)
            weights = np.asarray(opt.provide_recommendation().value, dtype=np.float64)
        value, loss = objective(weights)
        search = time.perf_counter() - search_start
    except BaseException:
        detach(model, name)
        state.active, state.composition = was_active, was_composition
        model.train(was_training)
        raise
    model.train(was_training)
    if not activate:
        state.active, state.composition = was_active, was_composition
    return LoraHubResult(
        name=name, adapters=tuple(adapters), weights=tuple(float(x) for x in weights), objective=value, loss=loss,
        start_loss=start_loss, trace=tuple(trace), eval_seconds=tuple(seconds), setup_seconds=setup,
        search_seconds=search,
    )

