"""Which modules a method touches.

A target spec is one of:

* a list of module-name suffixes: ``["q_proj", "v_proj"]`` matches ``model.layers.0.self_attn.q_proj``
  (a name matches an entry when it equals it or ends with ``"." + entry``, as in peft);
* a regex string, matched with ``re.fullmatch`` against the whole module name;
* ``"all-linear"``: every ``nn.Linear`` / GPT-2 ``Conv1D`` except the output head.

``exclude`` takes the same forms and removes matches; ``layers`` keeps only modules inside the
given transformer blocks (the integer after ``layers``/``h``/``layer``/``block``/``blocks``).
A spec that matches nothing is an error that suggests the closest module names.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence

from torch import nn

from graft.options import OptionError

ALL_LINEAR = "all-linear"
LAYER_CONTAINERS = ("layers", "h", "layer", "block", "blocks")
Spec = str | Sequence[str] | None


def matches(name: str, spec: Spec) -> bool:
    """Whether a module name matches a target spec (suffix list or full-match regex)."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == s or name.endswith("." + s) for s in spec)


def layer_index(name: str) -> int | None:
    """The transformer-block index a module lives in, or None (embeddings, head...)."""
    parts = name.split(".")
    for i in range(len(parts) - 1):
        if parts[i] in LAYER_CONTAINERS and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the output head(s): the module that returns output embeddings, plus tied copies."""
    heads: set[str] = set()
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    for name, module in model.named_modules():
        if head is not None and module is head:
            heads.add(name)
    # Classification / LM heads by their usual names, for models without get_output_embeddings.
    for name, _ in model.named_modules():
        if name.split(".")[-1] in ("lm_head", "score", "classifier", "qa_outputs", "cls"):
            heads.add(name)
    return heads


def is_linear(module: nn.Module) -> bool:
    """nn.Linear or a linear-like module (GPT-2 Conv1D, bitsandbytes Linear4bit/8bitLt)."""
    if isinstance(module, nn.Linear):
        return True
    return type(module).__name__ in ("Conv1D", "Linear4bit", "Linear8bitLt")


def resolve(
    model: nn.Module,
    targets: Spec,
    *,
    exclude: Spec = None,
    layers: Iterable[int] | None = None,
    allowed: tuple[type, ...] | None = None,
    what: str = "targets",
) -> list[str]:
    """Resolve a target spec to the list of module names it selects, in model order.

    Args:
        model: The model whose modules are searched.
        targets: Suffix list, regex string, or ``"all-linear"``.
        exclude: Names to drop, same forms as ``targets``.
        layers: Keep only modules inside these block indices.
        allowed: When given, a matched module of another type is an error naming it.
        what: The field name used in error messages.

    Raises:
        ValueError: If nothing matches, with the closest module names as suggestions.
    """
    if targets is None or (not isinstance(targets, str) and len(targets) == 0):
        raise ValueError(f"{what} is empty: name the modules to adapt, e.g. ['q_proj', 'v_proj'] or 'all-linear'")
    layer_set = set(layers) if layers is not None else None
    heads = output_head_names(model) if targets == ALL_LINEAR else set()
    owned = adapter_owned_names(model)
    found: list[str] = []
    for name, module in model.named_modules():
        if not name or _inside_adapter(name) or name in owned:
            continue
        module = getattr(module, "base_layer", module)  # already wrapped by another adapter
        if targets == ALL_LINEAR:
            hit = is_linear(module) and name not in heads
        else:
            hit = matches(name, targets)
        if not hit or matches(name, exclude):
            continue
        if layer_set is not None and layer_index(name) not in layer_set:
            continue
        if allowed is not None and not isinstance(module, allowed) and not is_linear(module):
            names = ", ".join(t.__name__ for t in allowed)
            raise TypeError(
                f"{what}: module '{name}' is a {type(module).__name__}; this method supports {names} "
                "(and GPT-2 Conv1D / bitsandbytes linears)"
            )
        found.append(name)
    if not found:
        raise _no_match_error(model, targets, exclude, layer_set, what)
    if not isinstance(targets, str):
        # A typo next to good entries must not be silently ignored.
        names = [n for n, _ in model.named_modules() if n and not _inside_adapter(n)]
        for entry in targets:
            if not any(matches(n, [entry]) for n in names):
                raise _no_match_error(model, [entry], None, None, what)
    return found


def adapter_owned_names(model: nn.Module) -> set[str]:
    """Every module inside a graft adapter layer (its base layer, its adapters' tensors): never a target.

    Found by structure, so a new method's containers need no entry in a list of names.
    """
    from graft.core import AdapterLayer

    owned: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            owned.update(f"{name}.{sub}" if name else sub for sub, _ in module.named_modules() if sub)
    return owned


def _inside_adapter(name: str) -> bool:
    """Modules that belong to graft's own adapter layers are never targets themselves."""
    parts = name.split(".")
    return any(p in ("base_layer", "original_module", "modules_to_save", "graft_input", "graft_probe")
               for p in parts) or any(
        p.startswith("lora_") for p in parts
    )


def _no_match_error(model: nn.Module, targets: Spec, exclude: Spec, layers: set[int] | None,
                    what: str) -> OptionError:
    """No module matched: the error names the option as its caller does (``LoRA targets=[...]`` in Python,
    ``--targets`` on the command line), suggests close names and lists the linear modules."""
    owner, _, key = what.rpartition(" ")  # "LoRA targets" -> ("LoRA", "targets")
    names = [n for n, _ in model.named_modules() if n and not _inside_adapter(n)]
    suffixes = sorted({n.split(".")[-1] for n in names})
    wanted = [targets] if isinstance(targets, str) else list(targets)
    hints: list[str] = []
    for w in wanted:
        for h in difflib.get_close_matches(str(w).split(".")[-1], suffixes, n=3, cutoff=0.5):
            if h not in hints:
                hints.append(h)  # best match first
    msg = f"{{{key}}} matches no module of {type(model).__name__}"
    if exclude:
        msg += " (after {exclude})"
    if layers is not None:
        msg += f" (restricted to layers {sorted(layers)})"
    if hints:
        msg += f". Did you mean {hints}?"
    linear = sorted({n.split(".")[-1] for n, m in model.named_modules() if n and is_linear(m)})
    msg += f" Linear module names in this model: {linear[:20]}; or use 'all-linear'."
    return OptionError(msg, where=owner,
                       **{key: targets, **({"exclude": exclude} if exclude else {})})


def compact_targets(model: nn.Module, resolved: list[str]) -> list[str]:
    """The shortest suffix list that selects exactly ``resolved`` in ``model`` (for portable configs).

    Falls back to the full names when suffixes would select more modules than were resolved
    (e.g. ``layers`` or ``exclude`` were used).
    """
    suffixes = sorted({n.split(".")[-1] for n in resolved})
    picked = [n for n, _ in model.named_modules() if n and not _inside_adapter(n) and matches(n, suffixes)]
    return suffixes if sorted(picked) == sorted(resolved) else list(resolved)
