"""Text-to-LoRA (Charakorn et al. 2025, "Text-to-LoRA: Instant Transformer Adaption"): a hypernetwork
that turns a sentence describing a task into a LoRA adapter in one forward pass.

For every target module (layer ``l``, module type ``m``, e.g. ``q_proj``) the hypernetwork sees the
description's sentence embedding joined with learned embeddings of the depth and the type
(SakanaAI/text-to-lora ``hyper_modulator.py``, METHODS.md §11; the "L" variant)::

    e_task  = LN(Linear(E -> l/2)(embed(description)))       (all-MiniLM-L6-v2, mean-pooled: E = 384)
    e_depth = LN(Embedding(n_layers, l/4)[layer])
    e_type  = LN(Embedding(n_types, l - l/2 - l/4)[type])
    z = mixer(cat(e_task, e_depth, e_type))                  Linear(l, 4l) SiLU Linear(4l, l) SiLU
    z = z + block_k(z)  for k in 1..blocks                   LN Linear(l, 4l) SiLU Linear(4l, l) SiLU
    h = LN Linear(l, 4l) SiLU Linear(4l, H) SiLU
    [A ; B] = shift_ml + scale_ml * head_m(h)                one head per module type, A (r, d_in), B (d_out, r)

The adapter it emits is an ordinary LoRA (rsLoRA scaling alpha / sqrt(r) by default, as T2L): the
same shapes and scaling as ``graft.LoRA`` on those targets, written in the PEFT format.

``shift``/``scale`` are fixed per module and coordinate: zero and one for SFT training (the head's
bias then starts at a standard LoRA init, T2L's bias-HyperInit), and the mean and standard deviation
over a library of LoRAs for reconstruction training (the head regresses per-coordinate z-scores).
Training lives in :mod:`graft.compose.t2l_train`.

Example:
    >>> net = TextToLoRA.for_model(model, T2LConfig(r=8, targets=("q_proj", "v_proj")))
    >>> text_to_lora(model, net, "Translate English to Spanish.", name="es")   # attached, active
    >>> net.write_peft("Translate English to Spanish.", "adapters/es")        # peft / vLLM can load it
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from graft import targets as tg
from graft.io import PREFIX, atomic_dir_write

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "HypernetError", "Layout", "T2LConfig", "TextToLoRA", "describe",
           "is_hypernet", "read_library", "text_to_lora"]

CONFIG_NAME = "t2l_config.json"
WEIGHTS_NAME = "t2l_model.safetensors"
FORMAT_VERSION = 1
Embedder = Callable[[Sequence[str]], torch.Tensor]
_ARCH_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "intermediate_size", "vocab_size")


class HypernetError(ValueError):
    """A hypernetwork that does not fit the model or input it is used with; nothing was changed."""


@dataclass(frozen=True)
class T2LConfig:
    """What the hypernetwork emits and how big it is.

    Args:
        r: Rank of the generated LoRAs (> 0).
        alpha: LoRA alpha (> 0).
        rslora: Scale by alpha / sqrt(r) (rsLoRA, T2L's choice) instead of alpha / r.
        targets: Module-type suffixes the generated LoRA adapts; each must name modules of one shape.
        latent: Width ``l`` of the trunk (divisible by 4; T2L: 128).
        head_in: Width ``H`` the heads read (T2L: 512).
        blocks: Residual MLP blocks in the trunk (T2L: 2).
        dropout: Dropout in the trunk while training, in [0, 1).
        embedder: The sentence embedder: a name for :func:`graft.models.load` (``"minilm"``, bundled,
            or a local sentence-embedding model's directory), mean-pooled and L2-normalised.
        max_description_chars: Longest description accepted.
    """

    r: int = 8
    alpha: float = 16.0
    rslora: bool = True
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    latent: int = 128
    head_in: int = 512
    blocks: int = 2
    dropout: float = 0.05
    embedder: str = "minilm"
    max_description_chars: int = 2000

    def __post_init__(self) -> None:
        for name in ("r", "latent", "head_in", "max_description_chars"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"T2LConfig {name}={value!r} must be a positive integer")
        if self.latent % 4:
            raise ValueError(f"T2LConfig latent={self.latent!r} must be divisible by 4 (task l/2, depth l/4, type l/4)")
        if isinstance(self.blocks, bool) or not isinstance(self.blocks, int) or self.blocks < 0:
            raise ValueError(f"T2LConfig blocks={self.blocks!r} must be an integer >= 0")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"T2LConfig alpha={self.alpha!r} must be a positive number")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"T2LConfig dropout={self.dropout!r} is outside [0, 1)")
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        if not targets or any(not isinstance(t, str) or not re.fullmatch(r"[A-Za-z0-9_]+", t) for t in targets):
            raise ValueError(f"T2LConfig targets={self.targets!r} must be module-type names such as ('q_proj', 'v_proj')")
        if len(set(targets)) != len(targets):
            raise ValueError(f"T2LConfig targets={self.targets!r} repeats a name")
        if not isinstance(self.embedder, str) or not self.embedder:
            raise ValueError(f"T2LConfig embedder={self.embedder!r} must be a model name or directory")
        object.__setattr__(self, "targets", targets)
        object.__setattr__(self, "alpha", float(self.alpha))

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r


@dataclass(frozen=True)
class Layout:
    """The base model a hypernetwork was built for: its identity and every target module's shape.

    Attributes:
        base_model: The model's ``name_or_path`` (informative; not compared).
        arch: Architecture numbers (model type, widths, depth, vocabulary) that must match.
        fingerprint: Mean |w| and std of the input embedding: tells apart bases of one architecture.
        modules: ``(module name, type, layer index, d_in, d_out)`` per target module.
        embed_dim: Width of the description embedding.
    """

    base_model: str
    arch: dict[str, Any]
    fingerprint: tuple[float, float]
    modules: tuple[tuple[str, str, int, int, int], ...]
    embed_dim: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "modules", tuple(tuple(m) for m in self.modules))
        object.__setattr__(self, "fingerprint", tuple(float(x) for x in self.fingerprint))
        if not self.modules:
            raise ValueError("a Layout needs at least one target module")
        if not isinstance(self.embed_dim, int) or self.embed_dim <= 0:
            raise ValueError(f"Layout embed_dim={self.embed_dim!r} must be a positive integer")
        shapes: dict[str, tuple[int, int]] = {}
        for name, kind, _layer, d_in, d_out in self.modules:
            if shapes.setdefault(kind, (d_in, d_out)) != (d_in, d_out):
                raise ValueError(f"target type {kind!r} has modules of shapes {shapes[kind]} and {(d_in, d_out)} "
                                 f"({name}): one output head per type needs one shape")

    @property
    def kinds(self) -> list[str]:
        return sorted({m[1] for m in self.modules})

    @property
    def n_layers(self) -> int:
        return max(m[2] for m in self.modules) + 1

    @classmethod
    def of(cls, model: nn.Module, targets: Sequence[str], embed_dim: int) -> Layout:
        """Read the layout of ``model`` for ``targets``; a type that matches nothing is an error."""
        modules = []
        for kind in targets:
            found = [(n, m) for n, m in model.named_modules()
                     if n.split(".")[-1] == kind and tg.is_linear(m) and not tg._inside_adapter(n)]
            if not found:
                linear = sorted({n.split(".")[-1] for n, m in model.named_modules() if tg.is_linear(m)})
                raise HypernetError(f"target {kind!r} matches no linear module of this model; its linear module "
                                    f"types are {linear}")
            for name, module in found:
                layer = tg.layer_index(name)
                if layer is None:
                    raise HypernetError(f"target module {name!r} is not inside a numbered transformer block")
                d_in, d_out = _in_out(module)
                modules.append((name, kind, layer, d_in, d_out))
        config = getattr(model, "config", None)
        arch = {k: getattr(config, k) for k in _ARCH_KEYS if isinstance(getattr(config, k, None), (int, str))}
        return cls(str(getattr(config, "_name_or_path", "") or ""), arch, _fingerprint(model), tuple(modules), embed_dim)

    def check(self, model: nn.Module) -> None:
        """Raise :class:`HypernetError` unless ``model`` is the base this layout was read from."""
        config = getattr(model, "config", None)
        arch = {k: getattr(config, k) for k in _ARCH_KEYS if isinstance(getattr(config, k, None), (int, str))}
        if arch != self.arch:
            diff = {k: (self.arch.get(k), arch.get(k)) for k in set(arch) | set(self.arch) if self.arch.get(k) != arch.get(k)}
            raise HypernetError(f"this hypernetwork was built for another base model ({self.base_model or 'unnamed'}): "
                                f"architecture differs in {diff} (hypernetwork, model)")
        mine = _fingerprint(model)
        if any(not math.isclose(a, b, rel_tol=5e-3, abs_tol=1e-8) for a, b in zip(mine, self.fingerprint)):
            raise HypernetError(f"this hypernetwork was built for another base model ({self.base_model or 'unnamed'}): "
                                f"same architecture, different weights (embedding mean |w|, std {self.fingerprint} vs "
                                f"{tuple(round(x, 6) for x in mine)})")
        names = dict(model.named_modules())
        for name, _kind, _layer, d_in, d_out in self.modules:
            module = names.get(name)
            if module is None or not tg.is_linear(module):
                raise HypernetError(f"the model has no linear module {name!r}, a target of this hypernetwork")
            if _in_out(module) != (d_in, d_out):
                raise HypernetError(f"module {name!r} has shape (d_in, d_out) {_in_out(module)}, the hypernetwork "
                                    f"emits {(d_in, d_out)}")


def _in_out(module: nn.Module) -> tuple[int, int]:
    from graft.methods.lora import in_out_features

    return in_out_features(module)


def _fingerprint(model: nn.Module) -> tuple[float, float]:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    if weight is None or not weight.dtype.is_floating_point or weight.is_meta:
        return (0.0, 0.0)
    with torch.no_grad():
        w = weight.float()
        return (float(w.abs().mean()), float(w.std()))


class _Block(nn.Module):
    """z + MLP(LN(z)): T2L's residual block (``MLPResidualBlock``)."""

    def __init__(self, width: int, dropout: float) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.SiLU(), nn.Dropout(dropout),
                                 nn.Linear(4 * width, width), nn.SiLU(), nn.Dropout(dropout))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z + self.mlp(z)


class TextToLoRA(nn.Module):
    """The hypernetwork: descriptions in, one LoRA (A, B per target module) per description out.

    Build one with :meth:`for_model`, train it with :func:`graft.compose.t2l_train.train`, save it
    with :meth:`save`, read it back with :meth:`load`.
    """

    def __init__(self, config: T2LConfig, layout: Layout, embedder: Embedder | None = None) -> None:
        super().__init__()
        self.config, self.layout = config, layout
        self._embedder = embedder
        l, kinds = config.latent, layout.kinds
        if set(kinds) != set(config.targets):
            raise HypernetError(f"layout covers {kinds}, config targets {list(config.targets)}")
        self.task_proj = nn.Sequential(nn.Linear(layout.embed_dim, l // 2), nn.LayerNorm(l // 2))
        self.depth = nn.Embedding(layout.n_layers, l // 4)
        self.depth_norm = nn.LayerNorm(l // 4)
        self.kind = nn.Embedding(len(kinds), l - l // 2 - l // 4)
        self.kind_norm = nn.LayerNorm(l - l // 2 - l // 4)
        drop = config.dropout
        self.mixer = nn.Sequential(nn.Dropout(drop), nn.Linear(l, 4 * l), nn.SiLU(), nn.Dropout(drop),
                                   nn.Linear(4 * l, l), nn.SiLU(), nn.Dropout(drop))
        self.blocks = nn.ModuleList(_Block(l, drop) for _ in range(config.blocks))
        self.trunk_out = nn.Sequential(nn.LayerNorm(l), nn.Linear(l, 4 * l), nn.SiLU(), nn.Dropout(drop),
                                       nn.Linear(4 * l, config.head_in), nn.SiLU())
        self.heads = nn.ModuleDict()
        for kind in kinds:
            d_in, d_out = self.shape(kind)
            self.heads[kind] = nn.Linear(config.head_in, config.r * (d_in + d_out))
        for kind in kinds:  # per module and coordinate: the generated [A; B] = shift + scale * head(h)
            rows = [m for m in layout.modules if m[1] == kind]
            width = self.heads[kind].out_features
            self.register_buffer(f"shift_{kind}", torch.zeros(len(rows), width))
            self.register_buffer(f"scale_{kind}", torch.ones(len(rows), width))
            self.register_buffer(f"layers_{kind}", torch.tensor([m[2] for m in rows], dtype=torch.long), persistent=False)
        self.hyper_init()

    # ---- construction
    @classmethod
    def for_model(cls, model: nn.Module, config: T2LConfig | None = None, *, embedder: Embedder | None = None,
                  seed: int | None = 0) -> TextToLoRA:
        """A new (untrained) hypernetwork for ``model``'s target modules.

        Args:
            model: The frozen base model the generated LoRAs are for.
            config: Sizes and targets (default: rank 8, rsLoRA, q_proj and v_proj).
            embedder: A callable ``texts -> (n, E)`` to use instead of ``config.embedder`` (tests, a
                custom encoder); it is not saved, so pass it again to :meth:`load`.
            seed: Seed of the initial weights (None: the global RNG).
        """
        config = config or T2LConfig()
        embed = embedder or _embedder(config.embedder)
        probe = embed(["probe"])
        layout = Layout.of(model, config.targets, int(probe.shape[-1]))
        if seed is None:
            return cls(config, layout, embed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(config, layout, embed)

    def hyper_init(self) -> None:
        """Head weights 0, head bias = a standard LoRA init flattened (T2L's bias-HyperInit):
        every generated adapter starts as kaiming-uniform A and zero B, i.e. the base model."""
        for kind, head in self.heads.items():
            d_in, d_out = self.shape(kind)
            a = torch.empty(self.config.r, d_in)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            with torch.no_grad():
                head.weight.zero_()
                head.bias.copy_(torch.cat([a.flatten(), torch.zeros(d_out * self.config.r)]))

    def shape(self, kind: str) -> tuple[int, int]:
        """(d_in, d_out) of the modules of one type."""
        return next((m[3], m[4]) for m in self.layout.modules if m[1] == kind)

    @property
    def scaling(self) -> float:
        return self.config.scaling

    # ---- descriptions
    def check_descriptions(self, descriptions: Sequence[str]) -> list[str]:
        """Stripped descriptions; an empty, non-string or overlong one is an error."""
        if isinstance(descriptions, str):
            raise TypeError("pass a list of descriptions (or use generate_one for a single string)")
        out = []
        for d in descriptions:
            if not isinstance(d, str) or not d.strip():
                raise HypernetError(f"a task description must be a non-empty string, got {d!r}")
            if len(d) > self.config.max_description_chars:
                raise HypernetError(f"the task description has {len(d)} characters; at most "
                                    f"{self.config.max_description_chars} are accepted")
            out.append(d.strip())
        if not out:
            raise HypernetError("no task description given")
        return out

    def embed(self, descriptions: Sequence[str]) -> torch.Tensor:
        """(n, E) description embeddings (no gradient: the sentence encoder stays frozen)."""
        if self._embedder is None:
            self._embedder = _embedder(self.config.embedder)
        emb = self._embedder(self.check_descriptions(descriptions)).float()
        if emb.shape[-1] != self.layout.embed_dim:
            raise HypernetError(f"the embedder gives {emb.shape[-1]}-d vectors; this hypernetwork reads "
                                f"{self.layout.embed_dim}-d ones ({self.config.embedder})")
        return emb.to(self.heads[self.layout.kinds[0]].weight.device)

    # ---- the forward pass
    def forward(self, emb: torch.Tensor, normalised: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Factors for every target module from ``emb`` (n, E).

        Args:
            emb: Description embeddings.
            normalised: Return the heads' raw output (per-coordinate z-scores, what reconstruction
                regresses) as one (n, modules, r*(d_in+d_out)) tensor per type under key ``kind``.

        Returns:
            ``{module name: (A (n, r, d_in), B (n, d_out, r))}``, or with ``normalised`` the raw
            outputs ``{kind: (z, None)}``.
        """
        n, r = emb.shape[0], self.config.r
        task = self.task_proj(emb)  # (n, l/2)
        kinds = self.layout.kinds
        rows = []
        for k, kind in enumerate(kinds):  # every (layer, type) pair of every kind goes through the trunk at once
            layers = getattr(self, f"layers_{kind}")  # (L_k,)
            depth = self.depth_norm(self.depth(layers))  # (L_k, l/4)
            kind_e = self.kind_norm(self.kind.weight[k]).expand(len(layers), -1)  # (L_k, l/4)
            rows.append(torch.cat([depth, kind_e], dim=-1))
        pairs = torch.cat(rows)  # (M, l/2), M = all target modules
        z = torch.cat([task[:, None, :].expand(n, pairs.shape[0], -1), pairs[None].expand(n, -1, -1)], dim=-1)
        z = self.mixer(z)  # (n, M, l)
        for block in self.blocks:
            z = block(z)
        h = self.trunk_out(z)  # (n, M, H)
        out: dict[str, Any] = {}
        start = 0
        for kind, part in zip(kinds, rows):
            raw = self.heads[kind](h[:, start:start + part.shape[0]])  # (n, L_k, r*(d_in+d_out))
            start += part.shape[0]
            if normalised:
                out[kind] = (raw, None)
                continue
            flat = getattr(self, f"shift_{kind}") + getattr(self, f"scale_{kind}") * raw
            d_in, d_out = self.shape(kind)
            a = flat[..., : r * d_in].reshape(n, -1, r, d_in)
            b = flat[..., r * d_in:].reshape(n, -1, d_out, r)  # stored as B (d_out, r), peft's layout
            for i, m in enumerate(m for m in self.layout.modules if m[1] == kind):
                out[m[0]] = (a[:, i], b[:, i])
        return out

    def flat_targets(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Inverse of the head layout: ``{kind: (n, modules, r*(d_in+d_out))}`` from per-module A, B."""
        out = {}
        for kind in self.layout.kinds:
            rows = [m[0] for m in self.layout.modules if m[1] == kind]
            out[kind] = torch.stack([torch.cat([factors[n][0].flatten(-2), factors[n][1].flatten(-2)], dim=-1)
                                     for n in rows], dim=-2)
        return out

    @torch.inference_mode()
    def generate(self, descriptions: Sequence[str]) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """One ``{module: (A, B)}`` per description, in eval mode (no dropout), fp32 on the CPU."""
        was = self.training
        self.eval()
        try:
            factors = self(self.embed(descriptions))
        finally:
            self.train(was)
        n = len(next(iter(factors.values()))[0])
        return [{name: (a[i].detach().cpu().contiguous(), b[i].detach().cpu().contiguous())
                 for name, (a, b) in factors.items()} for i in range(n)]

    def generate_one(self, description: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return self.generate([description])[0]

    # ---- adapters out
    def lora(self) -> Any:
        """The ``graft.LoRA`` config of the generated adapters (exact module names as targets)."""
        from graft.methods.lora import LoRA

        return LoRA(r=self.config.r, alpha=self.config.alpha, rslora=self.config.rslora,
                    targets=tuple(m[0] for m in self.layout.modules))

    def peft_config(self) -> dict[str, Any]:
        return {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": self.config.r, "lora_alpha": self.config.alpha,
            "lora_dropout": 0.0, "target_modules": list(self.layout.kinds), "exclude_modules": None, "bias": "none",
            "use_rslora": self.config.rslora, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {},
            "modules_to_save": None, "fan_in_fan_out": False, "init_lora_weights": True,
            "layers_to_transform": sorted({m[2] for m in self.layout.modules}) if self._partial_layers() else None,
            "layers_pattern": None, "lora_bias": False, "inference_mode": True,
            "base_model_name_or_path": self.layout.base_model or None,
        }

    def _partial_layers(self) -> bool:
        return False  # the layout holds every module of each target type (Layout.of)

    def write_peft(self, description: str, out: str | os.PathLike[str],
                   factors: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> Path:
        """Generate the adapter for ``description`` and write it as a PEFT-format LoRA (atomically).

        The directory loads in ``graft.load``, ``peft.PeftModel.from_pretrained``, transformers'
        ``load_adapter`` and vLLM's ``--lora-modules`` / ``/v1/load_lora_adapter``.
        """
        factors = factors if factors is not None else self.generate_one(description)
        tensors = {}
        for name, (a, b) in factors.items():
            tensors[f"{PREFIX}{name}.lora_A.weight"] = a.float().contiguous()
            tensors[f"{PREFIX}{name}.lora_B.weight"] = b.float().contiguous()
        config = self.peft_config()
        meta = {"format": "pt", "graft_format": "1", "graft_method": "LoRA", "t2l_description": description[:1000]}

        def write(tmp: Path) -> None:
            save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata=meta)
            (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            (tmp / "t2l_description.txt").write_text(description + "\n")

        atomic_dir_write(Path(out), write)
        return Path(out)

    # ---- files
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``t2l_config.json`` and ``t2l_model.safetensors`` into ``path`` atomically."""
        atomic_dir_write(Path(path), self.write_files)
        return Path(path)

    def write_files(self, directory: Path) -> None:
        """Write the two files into an existing directory (the caller makes it atomic)."""
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in self.state_dict().items()}
        doc = {"format": FORMAT_VERSION, "kind": "graft-text-to-lora", "config": asdict(self.config),
               "layout": asdict(self.layout)}
        save_file(tensors, str(Path(directory) / WEIGHTS_NAME), metadata={"format": "pt"})
        (Path(directory) / CONFIG_NAME).write_text(json.dumps(doc, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, embedder: Embedder | None = None,
             model: nn.Module | None = None) -> TextToLoRA:
        """Read a saved hypernetwork; with ``model``, refuse one built for another base.

        Raises:
            FileNotFoundError: No hypernetwork at ``path``.
            HypernetError: A damaged file, or (with ``model``) another base model.
        """
        config, layout = read_config(path)
        file = Path(path) / WEIGHTS_NAME
        if not file.is_file():
            raise FileNotFoundError(f"{str(path)!r} has no {WEIGHTS_NAME}")
        try:
            with safe_open(str(file), framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
        except Exception as e:  # noqa: BLE001 (safetensors raises several error types for damaged files)
            raise HypernetError(f"{file} is truncated or corrupted and cannot be read as safetensors ({e})") from None
        if model is not None:
            layout.check(model)
        net = cls(config, layout, embedder)
        expected = net.state_dict()
        missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        bad = [k for k in expected if k in tensors and tuple(tensors[k].shape) != tuple(expected[k].shape)]
        if missing or unexpected or bad:
            raise HypernetError(f"{file} does not match its {CONFIG_NAME}: missing {missing[:4]}, unexpected "
                                f"{unexpected[:4]}, wrong shapes {bad[:4]}")
        if any(not torch.isfinite(t).all() for t in tensors.values() if t.dtype.is_floating_point):
            raise HypernetError(f"{file} holds non-finite values; it is corrupted")
        net.load_state_dict(tensors)
        return net.eval()


def read_config(path: str | os.PathLike[str]) -> tuple[T2LConfig, Layout]:
    """The config and layout saved in a hypernetwork directory, checked."""
    path = Path(path)
    file = path / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{str(path)!r} is not a Text-to-LoRA hypernetwork directory (no {CONFIG_NAME})")
    try:
        doc = json.loads(file.read_text())
        if doc.get("kind") != "graft-text-to-lora":
            raise HypernetError(f"{file} is not a graft Text-to-LoRA config (kind={doc.get('kind')!r})")
        if doc.get("format") != FORMAT_VERSION:
            raise HypernetError(f"{file} has format {doc.get('format')!r}; this graft reads {FORMAT_VERSION}")
        config = T2LConfig(**{**doc["config"], "targets": tuple(doc["config"]["targets"])})
        layout = Layout(**doc["layout"])
    except HypernetError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise HypernetError(f"{file} is damaged or not a Text-to-LoRA config: {e}") from None
    return config, layout


def is_hypernet(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def describe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What a hypernetwork directory holds (for ``graft inspect``)."""
    config, layout = read_config(path)
    with safe_open(str(Path(path) / WEIGHTS_NAME), framework="pt") as f:
        params = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118
    trained = json.loads((Path(path) / "t2l_training.json").read_text()) if (Path(path) / "t2l_training.json").is_file() else None
    return {
        "path": str(path),
        "method": "Text-to-LoRA hypernetwork",
        "base_model": layout.base_model or None,
        "architecture": layout.arch,
        "emits": f"LoRA r={config.r} alpha={config.alpha:g} ({'rsLoRA' if config.rslora else 'LoRA'} scaling "
                 f"{config.scaling:.4f})",
        "targets": {k: list(next((m[3], m[4]) for m in layout.modules if m[1] == k)) for k in layout.kinds},
        "target_modules": len(layout.modules),
        "embedder": f"{config.embedder} ({layout.embed_dim}-d)",
        "trunk": f"latent {config.latent}, {config.blocks} residual blocks, head input {config.head_in}",
        "parameters": sum(math.prod(s) for k, s in params.items() if not k.startswith(("shift_", "scale_"))),
        "trained": trained,
        "bytes": sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file()),
    }


def read_library(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The entries of an adapter library's ``manifest.json`` (a list, or ``{"adapters": [...]}``).

    Each entry has ``name``, ``path`` (relative to the manifest's directory, made absolute here) and
    ``description``; other keys (``task``, ``alt_descriptions``, scores...) are kept.
    """
    path = Path(path)
    manifest = path / "manifest.json" if path.is_dir() else path
    if not manifest.is_file():
        raise FileNotFoundError(f"no adapter library at {str(path)!r} (expected a manifest.json)")
    try:
        doc = json.loads(manifest.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{manifest} is not valid JSON: {e}") from None
    entries = doc.get("adapters", doc.get("entries")) if isinstance(doc, dict) else doc
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{manifest} lists no adapters (a list of {{name, path, description}} entries)")
    out = []
    for i, entry in enumerate(entries):
        missing = [k for k in ("name", "path", "description") if not isinstance(entry.get(k) if isinstance(entry, dict) else None, str)]
        if missing:
            raise ValueError(f"{manifest}: entry {i} lacks {', '.join(missing)} (strings)")
        out.append({**entry, "path": str((manifest.parent / entry["path"]).resolve())})
    return out


_EMBEDDERS: dict[str, Embedder] = {}


def _embedder(name: str) -> Embedder:
    """One shared sentence embedder per model name (loaded on first use)."""
    if name not in _EMBEDDERS:
        from graft.data.prompting import sentence_embedder

        _EMBEDDERS[name] = sentence_embedder(name)
    return _EMBEDDERS[name]


def text_to_lora(model: nn.Module, hypernet: TextToLoRA | str | os.PathLike[str], description: str,
                 name: str = "t2l", *, activate: bool = True) -> nn.Module:
    """Generate a LoRA for ``description`` and attach it to ``model`` as adapter ``name``.

    Args:
        model: The base model the hypernetwork was built for.
        hypernet: A :class:`TextToLoRA` or its directory.
        description: What the task is, in words.
        name: The adapter's name.
        activate: Make it the only active adapter.

    Returns:
        ``model``, changed in place (as ``graft.attach``).

    Raises:
        HypernetError: A bad description or a hypernetwork for another base; the model is unchanged.
    """
    from graft.core import STATE_ATTR, adapter_layers, attach, detach

    net = hypernet if isinstance(hypernet, TextToLoRA) else TextToLoRA.load(hypernet, model=model)
    net.layout.check(model)
    state = getattr(model, STATE_ATTR, None)
    if state is not None and name in state.methods:
        raise HypernetError(f"the model already carries an adapter named {name!r}")
    factors = net.generate_one(description)
    attach(model, net.lora(), name, activate=activate)
    try:
        layers = dict(adapter_layers(model))
        with torch.no_grad():
            for module, (a, b) in factors.items():
                layer = layers[module]
                layer.lora_A[name].weight.copy_(a.to(layer.lora_A[name].weight.dtype))
                layer.lora_B[name].weight.copy_(b.to(layer.lora_B[name].weight.dtype))
        for p in (p for layer in layers.values() if name in layer.configs for p in layer.adapter_parameters(name).values()):
            p.requires_grad_(False)
    except Exception:
        detach(model, name)
        raise
    return model
