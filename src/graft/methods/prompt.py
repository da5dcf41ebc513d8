"""Prompt tuning (Lester et al. 2021) and P-tuning (Liu et al. 2021), plus the input hook that every
input-side method (these two and prefix tuning, ``prefix.py``) goes through.

    prompt tuning   inputs_embeds = [P ; E(x)]      P ∈ R^{n×d}, trained directly (Lester et al. §2)
    P-tuning        inputs_embeds = [f(P) ; E(x)]   f = MLP, or bi-LSTM then MLP (peft's PromptEncoder)

How the virtual tokens reach the model: a forward pre-hook and a forward hook on the *backbone*
(``model.<base_model_prefix>``, e.g. ``model.model`` of a Llama), so ``model(**batch)``,
``model.generate(...)`` and graft's selective-logits loss (which calls the backbone) all see them.
The pre-hook turns ``input_ids`` into ``inputs_embeds`` with the n virtual rows in front, prepends n
ones to the attention mask (zeros to ``token_type_ids``) and, when the caller passes ``position_ids``
(generate derives them from the mask), numbers the virtual rows 0..n-1 and shifts the real tokens'
positions by n; without them the model numbers the whole row 0..n+L-1, as peft does. peft drops
``position_ids`` for prompt tokens, so in its batched generation a left-padded row's positions count
its padding and its output depends on what it was batched with; graft's does not (tested). The forward hook removes the n virtual positions
from ``last_hidden_state`` (and ``hidden_states``): the top model's logits stay aligned with
``input_ids``, so ``labels`` work unchanged. Attention weights (``output_attentions``) keep them.

Generation: the first step (empty KV cache) prepends; later steps only extend the mask and shift the
new token's position past the virtual tokens.

Several input-side adapters active at once (``graft.activate(model, ["p1", "p2"])``) are
concatenated in activation order: ``[P_p1 ; P_p2 ; E(x)]``. Prefix adapters live in the KV cache,
so they always come before every virtual input token (among themselves in activation order, which
does not change the output: prefix keys carry no position). Under ``graft.disabled`` the hooks do
nothing. These adapters cannot be merged into weights nor routed per row (``graft.route``): they
change the sequence length of the whole batch.

Checkpoints follow peft: ``prompt_embeddings`` holds the prompt table the model sees (P-tuning: the
encoder's *output*), at the top level of ``adapter_model.safetensors``. The encoder itself (P-tuning's
MLP/LSTM, prefix tuning's projection) goes to graft's resume file so training can continue; a
checkpoint without it (written by peft) loads as a fixed table, as peft does in inference mode.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
from torch import nn

from graft.core import GraftState, Method, register
from graft.methods.heads import apply_modules_to_save, heads_to_save, modules_to_save_count

PROMPT_KEY = "prompt_embeddings"  # peft's key for a prompt-learning adapter's table
INPUT_ATTR = "graft_input"  # where a model keeps its input-side adapters (an InputAdapters module)
PROMPT_INITS = ("random", "text", "vocab")
ENCODERS = ("mlp", "lstm")


# --------------------------------------------------------------------------------------------
# What a model must offer


@dataclass(frozen=True)
class ModelDims:
    """The sizes of a model that prompt-learning tables are shaped by (peft's ``PromptLearningConfig``)."""

    token_dim: int  # d: width of one input embedding
    num_layers: int  # L
    num_heads: int  # attention (query) heads
    kv_heads: int  # key/value heads: fewer than num_heads under grouped-query attention
    head_dim: int

    @property
    def kv_dim(self) -> int:
        """Width of one layer's keys (or values): peft's prefix-tuning ``token_dim`` under GQA."""
        return self.kv_heads * self.head_dim


def backbone_of(model: nn.Module, who: str) -> nn.Module:
    """The module that builds the hidden states (``model.<base_model_prefix>``, or a bare backbone itself).

    Raises:
        TypeError: No config, backbone or input embeddings. ValueError: an encoder-decoder model.
    """
    config = getattr(model, "config", None)
    prefix = getattr(model, "base_model_prefix", None)
    backbone = getattr(model, prefix, None) if isinstance(prefix, str) and prefix else None
    if backbone is None and hasattr(model, "get_input_embeddings"):
        backbone = model  # already a backbone (LlamaModel, BertModel)
    if config is None or not isinstance(backbone, nn.Module):
        raise TypeError(
            f"{who} needs a transformers model with a config and a backbone (model.<base_model_prefix>), "
            f"got {type(model).__name__}"
        )
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"{who} does not support encoder-decoder models ({type(model).__name__}); it supports decoder-only "
            "language models (Llama, GPT-2, ...) and encoders (BERT)"
        )
    embeddings = backbone.get_input_embeddings() if hasattr(backbone, "get_input_embeddings") else None
    if not isinstance(getattr(embeddings, "weight", None), torch.Tensor):
        raise TypeError(f"{who} needs input embeddings, but {type(model).__name__}.get_input_embeddings() has none")
    return backbone


def model_dims(model: nn.Module, who: str) -> ModelDims:
    """Read the sizes from the config, as peft does (``_prepare_prompt_learning_config``, GQA-aware)."""
    config = model.config
    values = {}
    for attr in ("num_hidden_layers", "num_attention_heads", "hidden_size"):
        value = getattr(config, attr, None)
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{who} needs config.{attr} (a positive integer); {type(config).__name__} has {value!r}")
        values[attr] = value
    heads = values["num_attention_heads"]
    head_dim = getattr(config, "head_dim", None) or values["hidden_size"] // heads
    embeddings = backbone_of(model, who).get_input_embeddings()
    return ModelDims(
        token_dim=embeddings.weight.shape[1], num_layers=values["num_hidden_layers"], num_heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads, head_dim=head_dim,
    )


# --------------------------------------------------------------------------------------------
# One adapter's trainable part


class VirtualTokens(nn.Module):
    """One input-side adapter: an ``embedding`` table of ``num_virtual_tokens`` rows, optionally
    re-parametrised by an encoder (the modules named in ``encoder_names``).

    ``forward()`` returns the table the model sees, fp32, (n, width). ``kind`` says what its rows are:
    ``"tokens"`` are input embeddings, ``"kv"`` are per-layer key/value prefixes.
    """

    kind: ClassVar[str] = "tokens"
    encoder_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, num_virtual_tokens: int, width: int, device: torch.device) -> None:
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        # fp32 whatever the model's dtype, as peft; cast when used
        self.embedding = nn.Embedding(num_virtual_tokens, width, device=device, dtype=torch.float32)

    @property
    def has_encoder(self) -> bool:
        return any(getattr(self, n) is not None for n in self.encoder_names)

    def drop_encoder(self) -> None:
        """Keep only the encoder's output as a plain trainable table (what a peft checkpoint holds)."""
        with torch.no_grad():
            table = self().detach().clone()
        for n in self.encoder_names:
            setattr(self, n, None)
        self.embedding = nn.Embedding.from_pretrained(table, freeze=False)

    def checkpoint_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters a checkpoint fills: the table under peft's key, or the encoder's own state."""
        if self.has_encoder:
            return dict(self.named_parameters())
        return {PROMPT_KEY: self.embedding.weight}

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, num_virtual_tokens={self.num_virtual_tokens}"


class PromptEmbedding(VirtualTokens):
    """Prompt tuning: the table is the prompt."""

    def forward(self) -> torch.Tensor:
        return self.embedding.weight  # (n, d)


class PromptEncoder(VirtualTokens):
    """P-tuning (peft's ``PromptEncoder``): the prompt is ``mlp_head(embedding)`` or
    ``mlp_head(lstm_head(embedding))`` (Liu et al. 2021, §3.2; the LSTM is bidirectional)."""

    encoder_names = ("lstm_head", "mlp_head")

    def __init__(self, num_virtual_tokens: int, token_dim: int, encoder: str, hidden: int, lstm_layers: int,
                 dropout: float, device: torch.device) -> None:
        super().__init__(num_virtual_tokens, token_dim, device)
        kw = {"device": device, "dtype": torch.float32}
        self.lstm_head: nn.LSTM | None = None
        if encoder == "lstm":
            self.lstm_head = nn.LSTM(token_dim, hidden, num_layers=lstm_layers, dropout=dropout, bidirectional=True,
                                     batch_first=True, **kw)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden, **kw), nn.ReLU(),
                                          nn.Linear(2 * hidden, token_dim, **kw))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(token_dim, hidden, **kw), nn.ReLU(), nn.Linear(hidden, hidden, **kw),
                                          nn.ReLU(), nn.Linear(hidden, token_dim, **kw))

    def forward(self) -> torch.Tensor:
        x = self.embedding.weight  # (n, d)
        if self.lstm_head is not None:
            x = self.lstm_head(x.unsqueeze(0))[0][0]  # (n, 2h): one sequence of n virtual tokens
        if self.mlp_head is not None:
            x = self.mlp_head(x)  # (n, d)
        return x


# --------------------------------------------------------------------------------------------
# The hook on the backbone


class InputAdapters(nn.Module):
    """A model's input-side adapters and the two backbone hooks that apply the active ones.

    It is registered on the model (``model.graft_input``), so the adapters' parameters are the
    model's own (``graft.report``, ``state_dict``, ``.to(device)``); the hooks sit on the backbone.
    """

    def __init__(self, backbone: nn.Module, state: GraftState) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict()
        object.__setattr__(self, "_state", state)  # shared with the model, not a submodule
        object.__setattr__(self, "_backbone", backbone)
        params = inspect.signature(backbone.forward).parameters.values()
        self._arg_names = tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
        self._cache_key = cache_argument(backbone) or "past_key_values"
        self._strip = 0  # virtual input positions the running forward prepended (removed by _after)
        self._handles = (
            backbone.register_forward_pre_hook(self._before, with_kwargs=True),
            backbone.register_forward_hook(self._after, with_kwargs=True),
        )

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()

    def active(self) -> list[VirtualTokens]:
        """The adapters this forward applies, in activation order ([] when disabled or routed)."""
        state = self._state
        if state.disabled:
            return []
        if state.routing is not None:
            routed = [n for n in state.route_names() if n in self.adapters]
            if routed:
                raise ValueError(
                    f"graft.route does not support prompt or prefix adapters ({routed}): their virtual tokens "
                    "change the sequence length of the whole batch; use graft.activate instead"
                )
            return []
        return [self.adapters[n] for n in state.active if n in self.adapters]

    def _before(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
        """Rewrite the backbone's inputs: prefixes into the cache and prompt rows in front of the
        embeddings on the first step (empty cache); on every step, mask and positions for them."""
        self._strip = 0
        active = self.active()
        if not active:
            return None
        kwargs = {**dict(zip(self._arg_names, args)), **kwargs}
        tokens = [a for a in active if a.kind == "tokens"]
        prefixes = [a for a in active if a.kind == "kv"]
        n_tokens = sum(a.num_virtual_tokens for a in tokens)
        n_prefix = sum(a.num_virtual_tokens for a in prefixes)
        # transformers >= 5.24 names the backbone's KV cache ``cache`` (``past_key_values`` before)
        given = next((k for k in ("cache", "past_key_values") if kwargs.get(k) is not None), self._cache_key)
        cache = kwargs.get(given)
        if cache is not None and not hasattr(cache, "get_seq_length"):
            raise TypeError(f"prompt/prefix adapters need past_key_values as a transformers Cache, got {type(cache)}")
        first = cache is None or cache.get_seq_length() == 0  # else: a later generation step
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        batch = (ids if ids is not None else embeds).shape[0]

        if first and prefixes:
            if module.training and _drops_cache_when_checkpointing(module):
                raise RuntimeError(
                    "prefix tuning cannot train under gradient checkpointing: transformers drops past_key_values "
                    "inside checkpointed layers, which would silently drop the prefix; turn checkpointing off"
                )
            kwargs.pop(given, None)
            cache = kwargs[self._cache_key] = self._prefix_cache(prefixes, cache, batch, module)
        if first and tokens:
            if embeds is None:
                embeds = module.get_input_embeddings()(ids)  # (batch, L, d)
            prompt = torch.cat([a() for a in tokens]).to(embeds.dtype)  # (n_tokens, d)
            kwargs["inputs_embeds"] = torch.cat([prompt.expand(batch, -1, -1), embeds], dim=1)
            kwargs["input_ids"] = None
            types = kwargs.get("token_type_ids")
            if types is not None:
                kwargs["token_type_ids"] = torch.cat([types.new_zeros(batch, n_tokens), types], dim=1)
            self._strip = n_tokens

        mask = kwargs.get("attention_mask")
        if mask is not None:  # the caller's mask covers the real tokens only, at every step
            if mask.dim() != 2:
                raise ValueError(f"prompt/prefix adapters need a 2-D attention mask, got shape {tuple(mask.shape)}")
            kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, n_tokens + n_prefix), mask], dim=1)
        positions = kwargs.get("position_ids")
        if positions is not None:
            # The caller's positions number the real tokens (generate derives them from the mask, so a
            # left-padded row counts from its first token): shift them past the prefix and the prompt, and
            # give the prompt rows the positions just before. A row then sees what it sees alone, unpadded.
            # (peft drops them for prompt tokens, so its positions count the padding.)
            shifted = positions + n_prefix + n_tokens
            if first and tokens:
                virtual = n_prefix + torch.arange(n_tokens, device=positions.device, dtype=positions.dtype)
                shifted = torch.cat([virtual.expand(positions.shape[0], -1), shifted], dim=1)
            kwargs["position_ids"] = shifted
        if kwargs.get("cache_position") is not None:  # models that still take it (remote code)
            past = cache.get_seq_length() if cache is not None else 0
            length = (kwargs["inputs_embeds"] if kwargs.get("input_ids") is None else kwargs["input_ids"]).shape[1]
            kwargs["cache_position"] = torch.arange(past, past + length, device=kwargs["cache_position"].device)
        return (), kwargs

    def _prefix_cache(self, prefixes: Sequence[VirtualTokens], cache: Any, batch: int, module: nn.Module) -> Any:
        """A KV cache (the caller's empty one, or a new DynamicCache) holding every prefix, per layer."""
        if cache is None:
            from transformers import DynamicCache

            cache = DynamicCache(config=module.config)
        dtype = module.get_input_embeddings().weight.dtype
        per_adapter = [a.key_values(batch, dtype) for a in prefixes]  # each: L x (K, V), (batch, kv_heads, n, hd)
        positions = torch.arange(sum(a.num_virtual_tokens for a in prefixes))
        for layer in range(len(per_adapter[0])):
            keys = torch.cat([kv[layer][0] for kv in per_adapter], dim=2)
            values = torch.cat([kv[layer][1] for kv in per_adapter], dim=2)
            cache.update(keys, values, layer, {"cache_position": positions.to(keys.device)})
        return cache

    def _after(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        """Drop the prompt positions from the hidden states, so outputs line up with the real tokens."""
        n, self._strip = self._strip, 0
        if not n:
            return None
        if isinstance(output, tuple):
            return (output[0][:, n:], *output[1:])
        output.last_hidden_state = output.last_hidden_state[:, n:]
        if getattr(output, "hidden_states", None) is not None:
            output.hidden_states = tuple(h[:, n:] for h in output.hidden_states)
        return output


def cache_argument(backbone: nn.Module) -> str | None:
    """The name of the backbone's KV-cache argument: ``cache`` (transformers >= 5.24) or ``past_key_values``."""
    params = inspect.signature(backbone.forward).parameters
    return next((k for k in ("cache", "past_key_values") if k in params), None)


def _drops_cache_when_checkpointing(backbone: nn.Module) -> bool:
    """Whether a checkpointed layer would be called without past_key_values (transformers' rule)."""
    return any(getattr(m, "gradient_checkpointing", False) is True
               and not getattr(m, "_can_checkpoint_with_cache", False) for m in backbone.modules())


def input_adapters(model: nn.Module) -> InputAdapters:
    container = getattr(model, INPUT_ATTR, None)
    if isinstance(container, InputAdapters):
        return container
    raise ValueError(f"{type(model).__name__} has no prompt or prefix adapters")


# --------------------------------------------------------------------------------------------
# The shared method protocol of prompt tuning, P-tuning and prefix tuning


@dataclass(frozen=True)
class PromptLearning(Method):
    """Base of the input-side methods: validation, attach/detach through the backbone hook, counts,
    and the peft checkpoint layout. Subclasses build their ``VirtualTokens`` and count its parameters.

    Args:
        num_virtual_tokens: n, the number of virtual tokens (> 0).
        modules_to_save: Modules trained in full next to the prompt (e.g. a classifier); None takes a
            sequence-classification model's head automatically, as peft does.
    """

    num_virtual_tokens: int
    modules_to_save: tuple[str, ...] | None = field(default=None, kw_only=True)

    input_side: ClassVar[bool] = True  # virtual tokens in front of each row: the recipe turns packing off
    mergeable: ClassVar[bool] = False  # graft.merge refuses: there is no weight to fold a prompt into
    peft_key_prefix: ClassVar[str] = "base_model."  # peft keys a prompt-learning model's modules from here
    extra_key_prefix: ClassVar[str] = ""  # and its table at the top level ("prompt_embeddings")

    def __post_init__(self) -> None:
        n = self.num_virtual_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ValueError(f"{type(self).__name__} num_virtual_tokens={n!r} must be a positive integer")
        if isinstance(self.modules_to_save, str):
            object.__setattr__(self, "modules_to_save", (self.modules_to_save,))
        elif self.modules_to_save is not None:
            object.__setattr__(self, "modules_to_save", tuple(dict.fromkeys(self.modules_to_save)))

    # ---- what subclasses provide
    def build(self, model: nn.Module, dims: ModelDims) -> VirtualTokens:
        """The adapter's trainable part for this model, initialised."""
        raise NotImplementedError

    def table_count(self, dims: ModelDims) -> int:
        """Closed-form number of parameters of what ``build`` returns."""
        raise NotImplementedError

    def peft_fields(self, dims: ModelDims) -> dict[str, Any]:
        """The method's own fields of peft's config."""
        raise NotImplementedError

    def check_model(self, model: nn.Module) -> nn.Module:
        """The backbone, after checking the model can take this method (raises otherwise)."""
        return backbone_of(model, type(self).__name__)

    # ---- the Method protocol
    def apply(self, model: nn.Module, name: str, state: GraftState) -> None:
        backbone = self.check_model(model)
        module = self.build(model, model_dims(model, type(self).__name__))
        apply_modules_to_save(model, name, state, heads_to_save(model, self.modules_to_save))
        container = getattr(model, INPUT_ATTR, None)
        if container is None:
            container = InputAdapters(backbone, state)
            setattr(model, INPUT_ATTR, container)
        container.adapters[name] = module

    def remove(self, model: nn.Module, name: str) -> None:
        """Detach: drop the adapter; the last one out removes the hooks."""
        container = input_adapters(model)
        del container.adapters[name]
        if not len(container.adapters):
            container.close()
            delattr(model, INPUT_ATTR)

    def count(self, model: nn.Module) -> int:
        self.check_model(model)
        dims = model_dims(model, type(self).__name__)
        return self.table_count(dims) + modules_to_save_count(model, heads_to_save(model, self.modules_to_save))

    # ---- checkpoints (hooks read by graft.io)
    def extra_parameters(self, model: nn.Module, name: str) -> dict[str, nn.Parameter]:
        return input_adapters(model).adapters[name].checkpoint_parameters()

    def extra_tensors(self, model: nn.Module, name: str) -> dict[str, torch.Tensor]:
        """The PEFT file's table: what the model sees (for an encoder, its output, as peft saves it)."""
        return {PROMPT_KEY: input_adapters(model).adapters[name]().detach()}

    def resume_tensors(self, model: nn.Module, name: str) -> dict[str, torch.Tensor]:
        """The encoder behind the table, which the PEFT format drops ({} when there is none)."""
        module = input_adapters(model).adapters[name]
        return {k: p.detach() for k, p in module.checkpoint_parameters().items()} if module.has_encoder else {}

    def prepare_load(self, model: nn.Module, name: str, tensors: dict[str, torch.Tensor],
                     resume: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Without a resume file the encoder's output is all there is: keep it as a plain table (the
        adapter then trains that table; ``count`` describes a freshly attached one). With a resume
        file, restore the encoder from it (the PEFT file's table is derived from it)."""
        module = input_adapters(model).adapters[name]
        if module.has_encoder and not resume:
            module.drop_encoder()
        if module.has_encoder:
            return {**{k: v for k, v in tensors.items() if k != PROMPT_KEY}, **resume}
        return tensors

    def to_peft(self, model: nn.Module, name: str) -> dict[str, Any]:
        dims = model_dims(model, type(self).__name__)
        return {
            "peft_type": self.peft_type,
            "num_virtual_tokens": self.num_virtual_tokens,
            "num_transformer_submodules": 1,
            "token_dim": dims.token_dim,
            "num_attention_heads": dims.num_heads,
            "num_layers": dims.num_layers,
            "modules_to_save": heads_to_save(model, self.modules_to_save) or None,
            **self.peft_fields(dims),
        }

    @classmethod
    def common_from_peft(cls, config: dict[str, Any]) -> dict[str, Any]:
        """The fields every prompt-learning config shares, checked."""
        if config.get("num_transformer_submodules") not in (None, 1):
            raise ValueError(
                f"this {config['peft_type']} checkpoint is for an encoder-decoder model "
                f"(num_transformer_submodules={config['num_transformer_submodules']}), which graft does not support"
            )
        saved = config.get("modules_to_save")
        return {"num_virtual_tokens": config.get("num_virtual_tokens"),
                "modules_to_save": tuple(dict.fromkeys(saved)) if saved else None}

    def to_dict(self) -> dict[str, Any]:
        return {"method": type(self).__name__, **{f.name: getattr(self, f.name) for f in fields(self)}}


# --------------------------------------------------------------------------------------------
# Prompt tuning


@register
@dataclass(frozen=True)
class PromptTuning(PromptLearning):
    """Prompt tuning (Lester et al. 2021): n trainable input embeddings in front of every sequence.

    Args:
        num_virtual_tokens: n (> 0). Lester et al. use 100; peft has no default.
        init: "random" (N(0, 1), nn.Embedding's default, as peft; Lester uses U(-0.5, 0.5)), "text" (the
            embeddings of ``init_text``'s tokens, repeated or truncated to n; the tokenizer's special tokens,
            e.g. BOS, are included, as in peft) or "vocab" (rows of the word embedding at ids drawn
            uniformly from the whole vocabulary, as peft; Lester draws from the first 5,000).
        init_text: The text for init="text".
        tokenizer: A tokenizer, or the name or path to load one with ``AutoTokenizer``, for init="text".

    Loading a checkpoint overwrites the table, so ``from_peft`` returns init="random" (peft likewise
    skips the text/vocab init in inference mode).
    """

    init: str = "random"
    init_text: str | None = None
    tokenizer: Any = field(default=None, compare=False)

    peft_type: ClassVar[str] = "PROMPT_TUNING"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init not in PROMPT_INITS:
            raise ValueError(f"PromptTuning init={self.init!r} is not one of {PROMPT_INITS}")
        if self.init == "text":
            if not isinstance(self.init_text, str) or not self.init_text:
                raise ValueError(f"PromptTuning init='text' needs init_text (a non-empty string), got {self.init_text!r}")
            if self.tokenizer is None:
                raise ValueError("PromptTuning init='text' needs tokenizer= (a tokenizer, or its name or path)")
        elif self.init_text is not None:
            raise ValueError(f"PromptTuning init_text is only used with init='text', not init={self.init!r}")

    def build(self, model: nn.Module, dims: ModelDims) -> VirtualTokens:
        embeddings = backbone_of(model, "PromptTuning").get_input_embeddings()
        n = self.num_virtual_tokens
        module = PromptEmbedding(n, dims.token_dim, embeddings.weight.device)
        if self.init == "random":
            return module
        if self.init == "vocab":
            ids = torch.randint(0, embeddings.weight.shape[0], (n,), dtype=torch.long)
        else:
            ids = torch.tensor(text_token_ids(self.init_text, self.tokenizer, n), dtype=torch.long)
        with torch.no_grad():
            module.embedding.weight.copy_(embeddings(ids.to(embeddings.weight.device)).float())
        return module

    def table_count(self, dims: ModelDims) -> int:
        return self.num_virtual_tokens * dims.token_dim

    def peft_fields(self, dims: ModelDims) -> dict[str, Any]:
        tokenizer = tokenizer_name(self.tokenizer)
        # peft's config refuses TEXT without a tokenizer path; the table is in the file either way
        init = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT" if tokenizer else "RANDOM"}[self.init]
        return {
            "prompt_tuning_init": init,
            "prompt_tuning_init_text": self.init_text if init == "TEXT" else None,
            "tokenizer_name_or_path": tokenizer if init == "TEXT" else None,
            "tokenizer_kwargs": None,
        }

    @classmethod
    def from_peft(cls, config: dict[str, Any]) -> PromptTuning:
        return cls(**cls.common_from_peft(config))

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "tokenizer": tokenizer_name(self.tokenizer)}


def tokenizer_name(tokenizer: Any) -> str | None:
    """A tokenizer's name or path (what peft's ``tokenizer_name_or_path`` holds), None when it has none."""
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        return None if tokenizer is None else str(tokenizer)
    return getattr(tokenizer, "name_or_path", None) or None


def text_token_ids(text: str, tokenizer: Any, n: int) -> list[int]:
    """``tokenizer(text)`` ids (special tokens included), cycled or cut to exactly n (peft's TEXT init)."""
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
        except (OSError, ValueError) as e:
            raise ValueError(f"PromptTuning could not load tokenizer {str(tokenizer)!r} for init='text': {e}") from None
    if not callable(tokenizer):
        raise TypeError(f"PromptTuning tokenizer must be a tokenizer or its name/path, got {type(tokenizer).__name__}")
    ids = list(tokenizer(text)["input_ids"])
    if not ids:
        raise ValueError(f"PromptTuning init_text={text!r} has no tokens")
    return (ids * math.ceil(n / len(ids)))[:n]


# --------------------------------------------------------------------------------------------
# P-tuning


@register
@dataclass(frozen=True)
class PTuning(PromptLearning):
    """P-tuning (Liu et al. 2021, "GPT Understands, Too"), as peft's ``PromptEncoder``: the n virtual
    tokens are an embedding table passed through an encoder, and its output is the prompt.

    Args:
        num_virtual_tokens: n (> 0).
        encoder: "mlp": Linear(d,h)-ReLU-Linear(h,h)-ReLU-Linear(h,d); "lstm": a bidirectional LSTM
            (hidden h, ``encoder_num_layers`` layers) then Linear(2h,2h)-ReLU-Linear(2h,d).
        encoder_hidden_size: h; None takes the model's embedding width d (peft's default).
        encoder_num_layers: LSTM layers (encoder="lstm" only; peft ignores it for the MLP).
        encoder_dropout: Dropout between LSTM layers, in [0, 1).

    Unlike THUDM's reference, the prompt is a prefix of the input, not placed at template positions.
    """

    encoder: str = "mlp"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    peft_type: ClassVar[str] = "P_TUNING"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.encoder not in ENCODERS:
            raise ValueError(f"PTuning encoder={self.encoder!r} is not one of {ENCODERS}")
        check_size("PTuning", "encoder_hidden_size", self.encoder_hidden_size, optional=True)
        check_size("PTuning", "encoder_num_layers", self.encoder_num_layers)
        if self.encoder == "mlp" and self.encoder_num_layers != 2:
            raise ValueError(
                f"PTuning encoder_num_layers={self.encoder_num_layers!r} applies to encoder='lstm' only; "
                "the MLP encoder always has 3 linear layers"
            )
        if not isinstance(self.encoder_dropout, (int, float)) or not 0.0 <= self.encoder_dropout < 1.0:
            raise ValueError(f"PTuning encoder_dropout={self.encoder_dropout!r} is outside [0, 1)")

    def hidden(self, dims: ModelDims) -> int:
        return self.encoder_hidden_size or dims.token_dim

    def build(self, model: nn.Module, dims: ModelDims) -> VirtualTokens:
        device = backbone_of(model, "PTuning").get_input_embeddings().weight.device
        return PromptEncoder(self.num_virtual_tokens, dims.token_dim, self.encoder, self.hidden(dims),
                             self.encoder_num_layers, float(self.encoder_dropout), device)

    def table_count(self, dims: ModelDims) -> int:
        d, h = dims.token_dim, self.hidden(dims)
        total = self.num_virtual_tokens * d
        if self.encoder == "mlp":
            return total + (d * h + h) + (h * h + h) + (h * d + d)
        for layer in range(self.encoder_num_layers):
            d_in = d if layer == 0 else 2 * h
            total += 2 * (4 * h * d_in + 4 * h * h + 8 * h)  # two directions; W_ih, W_hh, b_ih, b_hh
        return total + (2 * h * 2 * h + 2 * h) + (2 * h * d + d)

    def peft_fields(self, dims: ModelDims) -> dict[str, Any]:
        return {
            "encoder_reparameterization_type": self.encoder.upper(),
            "encoder_hidden_size": self.hidden(dims),
            "encoder_num_layers": self.encoder_num_layers,
            "encoder_dropout": self.encoder_dropout,
        }

    @classmethod
    def from_peft(cls, config: dict[str, Any]) -> PTuning:
        encoder = str(config.get("encoder_reparameterization_type") or "MLP").lower()
        return cls(
            **cls.common_from_peft(config),
            encoder=encoder,
            encoder_hidden_size=config.get("encoder_hidden_size"),
            encoder_num_layers=int(config.get("encoder_num_layers") or 2) if encoder == "lstm" else 2,
            encoder_dropout=float(config.get("encoder_dropout") or 0.0),
        )


def check_size(who: str, name: str, value: Any, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        allowed = "None or a positive integer" if optional else "a positive integer"
        raise ValueError(f"{who} {name}={value!r} must be {allowed}")

