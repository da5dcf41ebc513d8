"""graft plan: architectures from presets, local configs and built-in models, built on the meta device."""

from __future__ import annotations

import copy
import difflib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

PRESETS: dict[str, dict[str, Any]] = {
    "llama-2-7b": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
                   "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False},
    "llama-2-13b": {"model_type": "llama", "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
                    "num_attention_heads": 40, "num_key_value_heads": 40, "vocab_size": 32000,
                    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False},
    "llama-2-70b": {"model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                    "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 32000,
                    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False},
    "llama-3-8b": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                   "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
                   "tie_word_embeddings": False},
    "llama-3-70b": {"model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                    "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
                    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
                    "tie_word_embeddings": False},
    "mistral-7b": {"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
                   "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                   "sliding_window": 4096, "tie_word_embeddings": False},
    "qwen2-7b": {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                 "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                 "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                 "tie_word_embeddings": False},
    "smollm2-135m": {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
                     "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
                     "tie_word_embeddings": True},
    "gpt2": {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257,
             "n_positions": 1024, "activation_function": "gelu_new"},
    "bert-base": {"model_type": "bert", "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                  "intermediate_size": 3072, "vocab_size": 30522, "max_position_embeddings": 512,
                  "type_vocab_size": 2, "hidden_act": "gelu"},
}

# Fields a config must give explicitly (a missing one would silently take the config class's default).
_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
_REQUIRED_GATED = ("intermediate_size",)
_ENCODERS = ("bert", "roberta", "distilbert", "xlm-roberta", "electra", "deberta", "deberta-v2")


def load_config(model_or_config: Any) -> tuple[str, Any]:
    """(display name, transformers config) for a preset, built-in name, directory, config.json file,
    dict of config fields, transformers config, or model (its config; the model itself is untouched).

    Raises:
        ValueError: An unknown name (with close presets suggested), a directory without config.json,
            or a config without the fields the architecture needs.
    """
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(model_or_config, nn.Module):
        config = getattr(model_or_config, "config", None)
        if config is None:
            raise ValueError(f"{type(model_or_config).__name__} has no .config; pass a transformers model or config")
        return getattr(config, "name_or_path", "") or type(model_or_config).__name__, config
    if isinstance(model_or_config, PretrainedConfig):
        return getattr(model_or_config, "name_or_path", "") or model_or_config.model_type, model_or_config
    if isinstance(model_or_config, dict):
        name = str(model_or_config.get("model_type", "config"))
        return name, _config_from_fields(dict(model_or_config), "the dict")
    if not isinstance(model_or_config, (str, os.PathLike)):
        raise TypeError("graft.plan takes a preset name, a path, a config or a model, "
                        f"got {type(model_or_config).__name__}")
    from graft import models

    text = os.fspath(model_or_config)
    key = models._ALIASES.get(text.lower(), text.lower())
    if key in PRESETS:  # a preset wins over a same-named directory, as a built-in name does in models.load
        return key, AutoConfig.for_model(**PRESETS[key])
    path = Path(text).expanduser()
    if not path.exists():
        path = _builtin_path(key) or path
    if not path.exists() and "/" in text and not text.startswith((".", "~", "/")):
        from graft import hub

        if hub.is_repo_id(text):  # a hub model id: only its config.json is fetched (or read from the cache)
            path = hub.config_file(text)
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise ValueError(f"{path.parent} has no config.json; graft plan needs the model's config to build "
                             "its shape")
    if path.is_file():
        try:
            fields = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read {path} as a JSON config: {e}") from None
        return text, _config_from_fields(fields, str(path))
    raise ValueError(_unknown_model_message(text))


def _builtin_path(name: str) -> Path | None:
    """The directory of a graft built-in model that needs no conversion (a GGUF one has a preset)."""
    from graft import models

    if name in PRESETS or name not in models.BUILTIN:
        return None
    try:
        return models.resolve(name)
    except (ModuleNotFoundError, FileNotFoundError, ValueError):
        return None


def _unknown_model_message(text: str) -> str:
    from graft import models

    names = [*PRESETS, *(n for n in models.BUILTIN if n not in PRESETS)]
    close = difflib.get_close_matches(text.lower(), names, n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return (f"unknown model {text!r}.{hint} Presets: {', '.join(PRESETS)}; built-in models: "
            f"{', '.join(models.BUILTIN)}; or a directory (or config.json file) with the model's config.")


def _config_from_fields(fields: dict[str, Any], where: str) -> Any:
    from transformers import CONFIG_MAPPING, AutoConfig

    model_type = fields.get("model_type")
    if not model_type:
        raise ValueError(f"{where} has no model_type; graft plan needs it to build the architecture (e.g. 'llama')")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"{where}: transformers does not know model_type={model_type!r}")
    # attribute_map: standard name -> this config's own name (GPT-2: hidden_size -> n_embd)
    aliases = getattr(CONFIG_MAPPING[model_type], "attribute_map", {}) or {}
    given = set(fields) | {standard for standard, own in aliases.items() if own in fields}
    need = _REQUIRED + (() if model_type == "gpt2" else _REQUIRED_GATED)
    missing = [f for f in need if f not in given]
    if missing:
        raise ValueError(f"{where} lacks {', '.join(missing)}, which graft plan needs to build the architecture "
                         f"(model_type={model_type!r})")
    return AutoConfig.for_model(model_type, **{k: v for k, v in fields.items() if k != "model_type"})


def build_meta(config: Any, dtype: torch.dtype) -> nn.Module:
    """The architecture with every tensor on the meta device: shapes only, no memory."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = copy.deepcopy(config)  # never change the caller's config
    with torch.device("meta"):
        if config.model_type in _ENCODERS:
            return AutoModelForSequenceClassification.from_config(config, dtype=dtype)
        return AutoModelForCausalLM.from_config(config, dtype=dtype)
