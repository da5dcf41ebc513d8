"""The core: the method protocol, the adapter-layer protocol, the registry, and the verbs that
attach, activate, disable, route and report adapters on a plain ``nn.Module``.

State lives in one small object per model (``GraftState``), shared by reference with every
adapter layer, so activating or routing is one assignment, not a walk over the model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

STATE_ATTR = "_graft_state"


# --------------------------------------------------------------------------------------------
# State shared by a model and its adapter layers


@dataclass
class GraftState:
    """Which adapters exist on a model, which are active, and how a batch is routed."""

    methods: dict[str, Method] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    disabled: bool = False
    routing: list[str | None] | None = None  # one adapter name (or None = base) per batch row
    composition: Composition | None = None  # how the active adapters combine, when not simply summed
    _route_index: dict[Any, Any] = field(default_factory=dict)  # routing-derived caches, cleared with it
    version: int = 0  # bumped whenever an adapter is attached or detached (layers key caches on it)
    _layers: Any = field(default=None, repr=False, compare=False)  # (version, weakref to model, layers)

    def layers(self, model: nn.Module) -> list[AdapterLayer]:
        """``model``'s adapter layers, kept until an adapter is attached or detached.

        Walking the model costs milliseconds (every adapter adds modules to every layer it reaches);
        ``route`` and ``disabled`` need the layers on every entry. The model is held by a weak
        reference, so a deep copy (whose state is copied along) walks its own modules once.
        """
        cached = self._layers
        if cached is None or cached[0] != self.version or cached[1]() is not model:
            cached = self._layers = (self.version, weakref.ref(model), [layer for _, layer in adapter_layers(model)])
        return cached[2]

    def route_names(self) -> list[str]:
        """The distinct adapter names of the current routing, sorted (stable as rows come and go)."""
        names = self._route_index.get("names")
        if names is None:
            names = self._route_index["names"] = sorted({n for n in self.routing or [] if n is not None})
        return names

    def route_plan(self, batch: int, device: torch.device) -> RoutePlan:
        """The routing of a ``batch``-row input grouped by adapter, built once per routing and shape.

        Rows repeat in blocks for beam or sampled copies (``batch`` a multiple of the routing's length).
        """
        key = ("plan", batch, device)
        plan = self._route_index.get(key)
        if plan is None:
            plan = self._route_index[key] = _plan(self.route_names(), self._expanded(batch), device)
        return plan

    def _expanded(self, batch: int) -> list[int]:
        names = self.route_names()
        idx = [-1 if n is None else names.index(n) for n in self.routing or []]
        if len(idx) == batch:
            return idx
        if idx and batch % len(idx) == 0:
            return [i for i in idx for _ in range(batch // len(idx))]
        raise ValueError(f"graft.route was given {len(idx)} adapter names but the batch has {batch} rows")


class RoutePlan(NamedTuple):
    """One routed batch grouped by adapter (see ``GraftState.route_plan``).

    ``names``: the adapters, in the order of the groups; ``index`` (batch,): each row's position in
    ``names``, -1 for base rows; ``gather`` (n, g): the rows of adapter j,
    padded to the largest group g by repeating its first row; ``inverse`` (batch,): each row's
    entry in the flattened (n * g) groups, base rows pointing at entry 0; ``base_rows`` (batch,):
    True on base rows, or None when every row has an adapter.
    """

    names: list[str]
    index: torch.Tensor
    gather: torch.Tensor
    inverse: torch.Tensor
    base_rows: torch.Tensor | None


def _plan(names: list[str], index: list[int], device: torch.device) -> RoutePlan:
    groups = [[i for i, j in enumerate(index) if j == k] for k in range(len(names))]
    width = max((len(g) for g in groups), default=0)
    inverse = [0] * len(index)
    for k, g in enumerate(groups):
        for pos, row in enumerate(g):
            inverse[row] = k * width + pos
    gather = [g + [g[0]] * (width - len(g)) if g else [0] * width for g in groups]
    has_base = any(j < 0 for j in index)
    return RoutePlan(
        names=names,
        index=torch.tensor(index, dtype=torch.long, device=device),
        gather=torch.tensor(gather, dtype=torch.long, device=device).view(len(groups), width),
        inverse=torch.tensor(inverse, dtype=torch.long, device=device),
        base_rows=torch.tensor([j < 0 for j in index], dtype=torch.bool, device=device) if has_base else None,
    )


def state_of(model: nn.Module, *, create: bool = False) -> GraftState:
    """The graft state of a model; with ``create``, a fresh one if it has none yet."""
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        if not create:
            raise ValueError(f"{type(model).__name__} has no graft adapters; call graft.attach or graft.load first")
        state = GraftState()
        object.__setattr__(model, STATE_ATTR, state)
    return state


# --------------------------------------------------------------------------------------------
# The two protocols


class AdapterLayer(nn.Module):
    """A frozen base module plus named adapters.

    Subclasses declare their per-adapter parameters in ``adapter_param_names`` (``nn.ModuleDict``
    or ``nn.ParameterDict`` attributes keyed by adapter name) and implement ``add``, ``forward``,
    and, if mergeable, ``delta_weight``/``merge``/``unmerge``. Saving goes through
    ``adapter_state``; nothing ever finds adapter parameters by matching strings in names.
    """

    adapter_param_names: ClassVar[tuple[str, ...]] = ()
    mergeable: ClassVar[bool] = True

    def __init__(self, base_layer: nn.Module, state: GraftState) -> None:
        super().__init__()
        self.base_layer = base_layer
        object.__setattr__(self, "_state", state)  # shared with the model, not a submodule
        self.configs: dict[str, Any] = {}
        self.merged: list[str] = []

    # Model code sometimes reads these straight off the module it called (T5 casts to wo.weight.dtype).
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    # ---- which adapters apply to this call
    def names(self) -> list[str]:
        return list(self.configs)

    def active_here(self) -> list[str]:
        """Active adapters this layer holds and has not merged, or [] when disabled."""
        s = self._state
        if s.disabled:
            return []
        return [n for n in s.active if n in self.configs and n not in self.merged]

    def routed(self) -> bool:
        return self._state.routing is not None and not self._state.disabled

    def row_index(self, batch: int, device: torch.device) -> torch.Tensor:
        """Per-row adapter positions (into ``state.route_names()``, -1 = base), expanded for beam/sample copies."""
        return self._state.route_plan(batch, device).index

    # ---- the protocol
    def add(self, name: str, config: Any) -> None:
        raise NotImplementedError

    def remove(self, name: str) -> None:
        """Delete one adapter's tensors from this layer."""
        if name in self.merged:
            raise RuntimeError(f"adapter '{name}' is merged into the weights; unmerge before detaching it")
        for attr in self.adapter_param_names:
            container = getattr(self, attr)
            if name in container:
                del container[name]
        self.configs.pop(name, None)

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """This adapter's parameters, keyed by PEFT's tensor name relative to the layer."""
        out: dict[str, nn.Parameter] = {}
        for attr in self.adapter_param_names:
            container = getattr(self, attr)
            if name not in container:
                continue
            item = container[name]
            if isinstance(item, nn.Parameter):
                out[attr] = item
            else:
                for pname, p in item.named_parameters():
                    out[f"{attr}.{pname}"] = p
        return out

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        """Tensors to save for one adapter (PEFT names, relative to this layer)."""
        return {k: p.detach() for k, p in self.adapter_parameters(name).items()}

    def delta_weight(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def merge(self, names: Sequence[str]) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot be merged into the base weights")

    def unmerge(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot be unmerged")

    def unloaded(self, merge: bool) -> nn.Module:
        """The plain module that replaces this layer on unload."""
        if merge:
            names = [n for n in self._state.active if n in self.configs and n not in self.merged]
            if names:
                self.merge(names)
        elif self.merged:
            self.unmerge()
        return self.base_layer

    def extra_repr(self) -> str:
        return f"adapters={self.names()}, merged={self.merged}"


@dataclass(frozen=True)
class Method:
    """A frozen, validated, JSON-serialisable description of an adaptation method.

    Subclasses set ``peft_type`` and implement ``apply`` (add this method's adapter ``name`` to a
    model), ``count`` (the closed-form number of trainable parameters it adds to a model), and the
    PEFT-format mapping ``to_peft`` / ``from_peft``. Module-wise methods get ``apply`` for free from
    ``TargetedMethod``; input-side methods (prompt, prefix) implement it with an input hook.
    """

    peft_type: ClassVar[str] = ""
    mergeable: ClassVar[bool] = True  # False: graft.merge refuses it with a clear error (prompts, probes)

    def apply(self, model: nn.Module, name: str, state: GraftState) -> None:
        raise NotImplementedError

    def count(self, model: nn.Module) -> int:
        raise NotImplementedError

    def to_peft(self, model: nn.Module, name: str) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_peft(cls, config: dict[str, Any]) -> Method:
        raise NotImplementedError

    def trainable_base_parameters(self, model: nn.Module, name: str) -> dict[str, nn.Parameter]:
        """Base parameters this method trains and saves (e.g. biases), keyed by state-dict name."""
        return {}

    def to_dict(self) -> dict[str, Any]:
        return {"method": type(self).__name__, **dataclasses.asdict(self)}


REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method loadable from its PEFT ``peft_type``."""
    REGISTRY[cls.peft_type] = cls
    return cls


def method_for_peft_type(peft_type: str) -> type[Method]:
    if peft_type not in REGISTRY:
        close = difflib.get_close_matches(str(peft_type), list(REGISTRY), n=2)
        hint = f" Did you mean {close}?" if close else ""
        raise ValueError(f"unknown method peft_type={peft_type!r}; graft knows {sorted(REGISTRY)}.{hint}")
    return REGISTRY[peft_type]


# --------------------------------------------------------------------------------------------
# Module-wise methods: resolve targets, wrap each in (or add to) an AdapterLayer


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


@dataclass(frozen=True)
class TargetedMethod(Method):
    """Base for methods that wrap named modules (LoRA, IA³, bottleneck adapters...)."""

    def freeze_targeting_fields(self) -> None:
        """Store ``targets`` / ``exclude`` / ``modules_to_save`` / ``layers`` as tuples: copies, never the
        caller's lists, so a frozen config cannot change under us (call from ``__post_init__``)."""
        for name in ("targets", "exclude", "modules_to_save"):
            value = getattr(self, name, None)
            if value is not None and not isinstance(value, str):
                object.__setattr__(self, name, tuple(value))
        if isinstance(getattr(self, "modules_to_save", None), str):
            object.__setattr__(self, "modules_to_save", (self.modules_to_save,))
        layers = getattr(self, "layers", None)
        if layers is not None:
            object.__setattr__(self, "layers", (layers,) if isinstance(layers, int) else tuple(layers))

    def resolve(self, model: nn.Module) -> list[str]:
        raise NotImplementedError

    def layer_class(self, module: nn.Module) -> type[AdapterLayer]:
        """The adapter-layer class for one base module (ordered dispatch lives in the method)."""
        raise NotImplementedError

    def layer_config(self, name: str) -> Any:
        """Per-module settings (e.g. rank after ``rank_pattern``) handed to ``AdapterLayer.add``."""
        return self

    def apply(self, model: nn.Module, name: str, state: GraftState) -> None:
        for module_name in self.resolve(model):
            module = model.get_submodule(module_name)
            if not isinstance(module, AdapterLayer):
                cls = self.layer_class(module)
                module = cls(module, state)
                set_submodule(model, module_name, module)
            elif not isinstance(module, self.layer_class(module.base_layer)):
                raise TypeError(
                    f"module '{module_name}' already carries a {type(module).__name__}; "
                    f"{type(self).__name__} cannot be stacked on it"
                )
            module.add(name, self.layer_config(module_name))


# --------------------------------------------------------------------------------------------
# Public verbs


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    """(qualified name, layer) for every adapter layer, outermost first."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield name, module


def attach(model: nn.Module, method: Method, name: str = "default", *, activate: bool = True) -> nn.Module:
    """Add adapter ``name`` of ``method`` to ``model`` in place; freeze the base; return the model.

    The new adapter's parameters are trainable; every base parameter is frozen except those the
    method trains itself (e.g. biases with ``bias="all"``). With ``activate`` (the default) the
    new adapter becomes the only active one.
    """
    if not isinstance(method, Method):
        raise TypeError(f"method must be a graft method such as graft.LoRA(...), got {type(method).__name__}")
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter name must be a non-empty string without '.', got {name!r}")
    state = state_of(model, create=True)
    if name in state.methods:
        raise ValueError(f"an adapter named '{name}' is already attached; detach it first or pick another name")
    grads = {p: p.requires_grad for p in model.parameters()}
    if not state.methods:
        for p in model.parameters():
            p.requires_grad_(False)
    try:
        method.apply(model, name, state)
    except BaseException:
        _rollback(model, name, state, grads)
        raise
    state.methods[name] = method
    state.version += 1
    for p in adapter_parameters(model, name).values():
        p.requires_grad_(True)
    for p in method.trainable_base_parameters(model, name).values():
        p.requires_grad_(True)
    if activate:
        state.active, state.composition = [name], None
    return model


def _rollback(model: nn.Module, name: str, state: GraftState, grads: dict[nn.Parameter, bool]) -> None:
    """Undo a half-done attach: the model is left exactly as it was."""
    for lname, layer in list(adapter_layers(model)):
        if name in layer.configs:
            layer.remove(name)
        if not layer.configs and lname:
            set_submodule(model, lname, layer.base_layer)
    for p, flag in grads.items():
        p.requires_grad_(flag)
    if not state.methods:
        object.__delattr__(model, STATE_ATTR)


def adapter_parameters(model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """Every parameter of adapter ``name``, keyed by its qualified name in the model."""
    out: dict[str, nn.Parameter] = {}
    for lname, layer in adapter_layers(model):
        for k, p in layer.adapter_parameters(name).items():
            out[f"{lname}.{k}"] = p
    method = state_of(model).methods.get(name)
    extra = getattr(method, "extra_parameters", None)
    if extra is not None:
        out.update(extra(model, name))
    return out


def detach(model: nn.Module, name: str) -> nn.Module:
    """Remove adapter ``name``; layers left with no adapter are replaced by their base module."""
    state = state_of(model)
    _check_names(state, [name])
    for lname, layer in list(adapter_layers(model)):
        if name in layer.configs:
            layer.remove(name)
            if not layer.configs:
                set_submodule(model, lname, layer.base_layer if lname else layer)
    remove = getattr(state.methods[name], "remove", None)
    if remove is not None:
        remove(model, name)
    del state.methods[name]
    state.version += 1
    state.active = [n for n in state.active if n != name]
    if state.composition is not None and name in state.composition.children:
        state.composition = None
    if not state.methods:
        object.__delattr__(model, STATE_ATTR)
    return model


# --------------------------------------------------------------------------------------------
# Composition blocks (AdapterHub's vocabulary), given to ``activate``


@dataclass(frozen=True, init=False)
class Composition:
    """Several adapters active at once, combined in a stated way at every adapted location."""

    children: tuple[str, ...]

    def __init__(self, *children: str) -> None:
        if len(children) == 1 and not isinstance(children[0], str):
            children = tuple(children[0])
        if not children or not all(isinstance(c, str) and c for c in children):
            raise ValueError(f"{type(self).__name__} takes adapter names, got {children!r}")
        if len(set(children)) != len(children):
            raise ValueError(f"{type(self).__name__}{children!r} names an adapter twice")
        object.__setattr__(self, "children", tuple(children))


class Stack(Composition):
    """Sequential: at each location adapter 1's output is adapter 2's input, and so on."""


class Parallel(Composition):
    """Side by side: every adapter sees the same input and their changes add up (the default for
    several active adapters). Unlike AdapterHub's ``Parallel`` the batch is not replicated; use
    ``graft.route`` to send different rows through different adapters."""


@dataclass(frozen=True, init=False)
class Average(Composition):
    """Weighted average of the adapters' changes: sum_i w_i * delta_i, weights normalised to sum to 1
    (default uniform). AdapterHub divides by the number of adapters a second time; graft does not."""

    weights: tuple[float, ...]

    def __init__(self, *children: str, weights: Sequence[float] | None = None) -> None:
        super().__init__(*children)
        n = len(self.children)
        w = [1.0 / n] * n if weights is None else [float(x) for x in weights]
        if len(w) != n:
            raise ValueError(f"Average got {len(w)} weights for {n} adapters {self.children}")
        if any(x < 0 for x in w) or not sum(w) > 0:
            raise ValueError(f"Average weights must be >= 0 with a positive sum, got {w}")
        object.__setattr__(self, "weights", tuple(x / sum(w) for x in w))


def activate(model: nn.Module, names: str | Sequence[str] | Composition) -> nn.Module:
    """Make ``names`` the active adapters.

    One name, a list (several active adapters add up), or a composition block: ``graft.Stack(a, b)``
    (sequential), ``graft.Parallel(a, b)`` (same input, changes add up) or ``graft.Average(a, b,
    weights=...)``. Input-side adapters (prompt, prefix) that are active together are concatenated.
    """
    state = state_of(model)
    composition = names if isinstance(names, Composition) else None
    if composition is not None:
        names = list(composition.children)
    else:
        names = [names] if isinstance(names, str) else list(names)
    _check_names(state, names)
    if composition is not None:
        for n in names:
            check = getattr(state.methods[n], "check_composition", None)
            if check is None:
                raise ValueError(
                    f"adapter '{n}' ({type(state.methods[n]).__name__}) does not support {type(composition).__name__}; "
                    "composition blocks are for bottleneck adapters (graft.Adapter); other methods combine by "
                    "activating a list of names"
                )
            check(composition)
    state.active = names
    state.composition = composition
    return model


def active_adapters(model: nn.Module) -> list[str]:
    return list(state_of(model).active)


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model: every adapter is bypassed inside the block."""
    state = state_of(model)
    if any(layer.merged for layer in state.layers(model)):
        merged = [lname for lname, layer in adapter_layers(model) if layer.merged]
        raise RuntimeError(f"adapters are merged into {merged[:3]}...; call graft.unmerge(model) before disabling")
    previous, state.disabled = state.disabled, True
    try:
        yield model
    finally:
        state.disabled = previous


@contextlib.contextmanager
def route(model: nn.Module, names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Send batch row i through adapter ``names[i]`` (``None`` = the base model), in one forward.

    Works with ``model.generate`` (beam or sampled copies of a row follow that row's adapter).
    """
    state = state_of(model)
    names = list(names)
    _check_names(state, [n for n in names if n is not None])
    if any(layer.merged for layer in state.layers(model)):
        raise RuntimeError("graft.route needs unmerged adapters; call graft.unmerge(model) first")
    with routing_unchecked(state, names):
        yield model


@contextlib.contextmanager
def routing_unchecked(state: GraftState, names: list[str | None]) -> Iterator[None]:
    """``route`` without its checks, for a caller that validated the names and merges once (the server)."""
    previous = state.routing
    state.routing, state._route_index = names, {}
    try:
        yield
    finally:
        state.routing, state._route_index = previous, {}


def _check_names(state: GraftState, names: Sequence[str]) -> None:
    for n in names:
        if n not in state.methods:
            raise ValueError(f"no adapter named {n!r}; attached adapters: {sorted(state.methods)}")


# --------------------------------------------------------------------------------------------
# Report


@dataclass(frozen=True)
class Report:
    """Trainable-parameter report, printed like peft's ``print_trainable_parameters``.

    ``adapter`` counts the parameters of every attached adapter whether or not they require grad (an
    adapter loaded for inference is frozen, so it is not in ``trainable``); ``by_adapter`` per name.
    """

    trainable: int
    total: int
    adapter: int = 0
    by_adapter: tuple[tuple[str, int], ...] = ()

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        text = (
            f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
            f"trainable%: {self.percent:.4f}"
        )
        if self.adapter and self.adapter != self.trainable:  # e.g. a loaded, frozen adapter
            names = ", ".join(f"{n}: {c:,}" for n, c in self.by_adapter)
            text += f" || adapter params: {self.adapter:,} ({names})"
        return text


def _numel(p: torch.Tensor) -> int:
    # bitsandbytes packs two 4-bit values per byte; count the weights, not the bytes.
    if type(p).__name__ == "Params4bit":
        return p.numel() * 2
    return p.numel()


def report(model: nn.Module) -> Report:
    """Count trainable and total parameters (shared tensors once), and each adapter's parameters."""
    trainable = total = 0
    for p in model.parameters():
        n = _numel(p)
        total += n
        if p.requires_grad:
            trainable += n
    by_adapter, seen = [], set()
    state = getattr(model, STATE_ATTR, None)
    for name in state.methods if state is not None else ():
        params = [p for p in adapter_parameters(model, name).values() if id(p) not in seen]
        seen.update(id(p) for p in params)
        by_adapter.append((name, sum(_numel(p) for p in params)))
    return Report(trainable=trainable, total=total, adapter=sum(c for _, c in by_adapter),
                  by_adapter=tuple(by_adapter))
