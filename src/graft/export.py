"""Export a LoRA adapter to llama.cpp's GGUF LoRA format (``llama-cli --lora adapter.gguf``).

The file is what llama.cpp's ``convert_lora_to_gguf.py`` writes for a Llama-family base:

* metadata ``general.architecture = "llama"``, ``general.type = "adapter"``, ``adapter.type = "lora"`` and
  ``adapter.lora.alpha``; llama.cpp scales each pair by ``alpha / rank`` (``rank`` read per tensor).
* for every adapted linear layer two tensors named after the base tensor in gguf's naming
  (``model.layers.3.self_attn.q_proj`` -> ``blk.3.attn_q.weight``): ``<name>.lora_a`` holding PEFT's
  ``lora_A`` (torch shape ``(r, in)``, GGUF dims ``[in, r]``) and ``<name>.lora_b`` holding ``lora_B``
  (``(out, r)``, dims ``[r, out]``).
* ``q_proj`` / ``k_proj``: llama.cpp stores these weights with their rows permuted per head (the
  converter's ``LlamaModel.permute``: each head's two rotary halves interleaved), so ``lora_B``'s rows are
  permuted the same way; ``lora_A`` is unchanged.

graft's adapters may scale modules differently from ``alpha / r`` (rsLoRA's ``alpha / sqrt(r)``, or an
``alpha_pattern``); llama.cpp has one ``alpha`` per file, so the file's alpha is chosen to be exact for the
adapter's main rank and any other module's correction is folded into its ``lora_B``. The delta llama.cpp
adds, ``(alpha_file / r_m) * B' A``, then equals graft's ``scaling_m * B A`` for every module.

Names come from gguf-py's own tensor map (``gguf.get_tensor_name_map``), so they follow the installed
``gguf`` package rather than a copied table.

Example:
    >>> export_gguf("runs/x/adapter", "x.gguf")  # base config from adapter_config.json
    >>> export_gguf("runs/x/adapter", "x.gguf", base="HuggingFaceTB/SmolLM2-135M-Instruct", dtype="f16")
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["ARCHITECTURES", "DTYPES", "ExportError", "GgufLora", "export_gguf", "gguf_tensors"]

#: transformers architectures this exporter supports -> (gguf architecture, q/k rows permuted as llama.cpp does).
ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "LlamaForCausalLM": ("llama", True),
    "MistralForCausalLM": ("llama", True),
}
#: ``dtype`` names -> numpy dtype names.
DTYPES = {"f32": "float32", "f16": "float16"}

_PREFIX = "base_model.model."
_A, _B = ".lora_A.weight", ".lora_B.weight"


class ExportError(ValueError):
    """An adapter, base model or option the GGUF export cannot handle; the message says what is supported."""


@dataclass(frozen=True)
class GgufLora:
    """The tensors and metadata of a GGUF LoRA file, before writing.

    Attributes:
        architecture: gguf's architecture name (``"llama"``).
        alpha: ``adapter.lora.alpha``.
        tensors: GGUF tensor name -> torch tensor in the shape written (``lora_a``: ``(r, in)``,
            ``lora_b``: ``(out, r)``), float32.
    """

    architecture: str
    alpha: float
    tensors: dict[str, torch.Tensor]


def export_gguf(adapter_dir: str | os.PathLike[str], out: str | os.PathLike[str], *,
                base: str | os.PathLike[str] | dict[str, Any] | None = None, dtype: str = "f32",
                revision: str | None = None) -> Path:
    """Write a PEFT-format LoRA adapter as a llama.cpp GGUF LoRA file.

    Args:
        adapter_dir: The adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``).
        out: The ``.gguf`` file to write (atomically: a failed export leaves no partial file).
        base: The base model (a graft model name, a directory, a hub id, or its config as a dict); only its
            config is read. Default: ``base_model_name_or_path`` from the adapter's config.
        dtype: ``"f32"`` (default, exact) or ``"f16"``.
        revision: The base model's hub revision, when ``base`` is a hub id.

    Returns:
        The path written.

    Raises:
        ExportError: A non-LoRA or DoRA adapter, an unsupported architecture, adapted embeddings or
            a tied output head, an unknown ``dtype``, or a missing base model config.
    """
    import gguf

    if dtype not in DTYPES:
        raise ExportError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    lora = gguf_tensors(adapter_dir, _base_config(adapter_dir, base, revision))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        writer = gguf.GGUFWriter(tmp, lora.architecture)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, lora.alpha)
        writer.add_name(Path(adapter_dir).resolve().name)
        writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
        for name, tensor in lora.tensors.items():
            writer.add_tensor(name, tensor.numpy().astype(DTYPES[dtype]))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def gguf_tensors(adapter_dir: str | os.PathLike[str], base_config: dict[str, Any]) -> GgufLora:
    """The GGUF tensors and alpha of a LoRA adapter for a base model's config (nothing is written).

    Args:
        adapter_dir: The adapter directory.
        base_config: The base model's ``config.json`` contents.

    Returns:
        The file's contents; see :class:`GgufLora`.
    """
    import gguf

    from graft.io import read_config, read_tensors
    from graft.methods.lora import pattern_value

    config = read_config(adapter_dir)
    arch, permute = _architecture(base_config)
    _check_adapter(config)
    pairs = _pairs(read_tensors(adapter_dir))
    ranks = {module: a.shape[0] for module, (a, _) in pairs.items()}
    main_rank = int(config.get("r") or max(ranks.values()))
    alpha = float(config["lora_alpha"])
    rslora = bool(config.get("use_rslora"))
    # llama.cpp applies file_alpha / r_m; make that exact for modules at the main rank and alpha.
    file_alpha = alpha * math.sqrt(main_rank) if rslora else alpha
    names = gguf.get_tensor_name_map(_arch_enum(arch), int(base_config["num_hidden_layers"]))
    heads = int(base_config["num_attention_heads"])
    kv_heads = int(base_config.get("num_key_value_heads") or heads)
    tensors: dict[str, torch.Tensor] = {}
    for module, (a, b) in pairs.items():
        target = _gguf_name(names, module, base_config)
        r = ranks[module]
        module_alpha = float(pattern_value(config.get("alpha_pattern") or {}, module, alpha))
        scaling = module_alpha / (math.sqrt(r) if rslora else r)
        b = b.float() * (scaling * r / file_alpha)  # 1.0 unless this module is scaled unlike the file's alpha
        if permute and module.endswith(".q_proj"):
            b = _rope_permute(b, heads)
        elif permute and module.endswith(".k_proj"):
            b = _rope_permute(b, kv_heads)
        tensors[f"{target}.lora_a"] = a.float().contiguous()
        tensors[f"{target}.lora_b"] = b.contiguous()
    return GgufLora(arch, file_alpha, tensors)


def _arch_enum(name: str) -> Any:
    import gguf

    return next(arch for arch, text in gguf.MODEL_ARCH_NAMES.items() if text == name)


def _check_adapter(config: dict[str, Any]) -> None:
    """Only plain LoRA on linear layers has a GGUF LoRA form."""
    kind = config.get("peft_type")
    if kind != "LORA":
        raise ExportError(f"this is a {kind} adapter; llama.cpp's GGUF adapters are LoRA only. Merge it into the "
                          "base instead (graft merge) and convert the merged model with llama.cpp's convert_hf_to_gguf.py")
    if config.get("use_dora"):
        raise ExportError("DoRA adapters have a magnitude vector that llama.cpp's LoRA format cannot hold; merge it "
                          "(graft merge) and convert the merged model with llama.cpp's convert_hf_to_gguf.py")
    for key in ("lora_bias", "fan_in_fan_out"):
        if config.get(key):
            raise ExportError(f"adapters with {key}=true cannot be exported to GGUF (llama.cpp has no such LoRA)")
    if config.get("modules_to_save"):
        raise ExportError(f"the adapter trains whole modules ({', '.join(config['modules_to_save'])}), which "
                          "llama.cpp's LoRA format cannot hold; merge it (graft merge) instead")


def _architecture(base_config: dict[str, Any]) -> tuple[str, bool]:
    """gguf's architecture name and whether q/k are rope-permuted, or an error listing what is supported."""
    archs = base_config.get("architectures") or []
    for arch in archs:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    if not archs and base_config.get("model_type") in ("llama", "mistral"):  # a config never saved names none
        return ARCHITECTURES["LlamaForCausalLM"]
    raise ExportError(f"GGUF LoRA export supports the Llama family ({', '.join(ARCHITECTURES)}); the base model is "
                      f"{', '.join(archs) or 'of unknown architecture (no architectures in its config)'}")


def _pairs(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module name -> (lora_A, lora_B), or an error naming a tensor that is not a linear layer's LoRA pair."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name = key.removeprefix(_PREFIX)
        if name.endswith((_A, _B)):
            pairs.setdefault(name[: -len(_A)], {})[name[-len(_A):]] = value
        elif "lora_embedding_" in name:
            raise ExportError(f"{key}: LoRA on token embeddings is not exported to GGUF; train with targets that "
                              "leave embed_tokens out")
        else:
            raise ExportError(f"{key} is not a LoRA A/B tensor of a linear layer; GGUF LoRA files hold only those")
    out = {}
    for module, pair in pairs.items():
        if set(pair) != {_A, _B}:
            raise ExportError(f"{module} has {'lora_A' if _A in pair else 'lora_B'} without its partner")
        a, b = pair[_A], pair[_B]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ExportError(f"{module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are not a LoRA pair")
        out[module] = (a, b)
    if not out:
        raise ExportError("the adapter holds no LoRA tensors")
    return out


def _gguf_name(names: Any, module: str, base_config: dict[str, Any]) -> str:
    """gguf's name for a module's weight (``blk.N.attn_q.weight``), or an error for one llama.cpp has not."""
    if module.endswith("embed_tokens"):
        raise ExportError(f"{module}: LoRA on token embeddings is not exported to GGUF")
    if module == "lm_head" and base_config.get("tie_word_embeddings", True):
        raise ExportError("the adapter changes lm_head, but this base ties it to the token embeddings, which "
                          "llama.cpp's LoRA loader ignores; train without lm_head in the targets")
    name = names.get_name(f"{module}.weight", try_suffixes=(".weight",))
    if name is None:
        raise ExportError(f"{module} has no tensor in llama.cpp's naming for this architecture")
    return name


def _rope_permute(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder output rows as llama.cpp stores q/k weights: per head, interleave the two rotary halves.

    ``(out, ...)`` -> view ``(n_head, 2, head_dim / 2, ...)``, swap axes 1 and 2, flatten back.
    """
    out = rows.shape[0]
    if out % (2 * n_head):
        raise ExportError(f"{out} output rows do not split into {n_head} heads of two rotary halves")
    return rows.reshape(n_head, 2, out // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _base_config(adapter_dir: str | os.PathLike[str], base: str | os.PathLike[str] | dict[str, Any] | None,
                 revision: str | None) -> dict[str, Any]:
    """The base model's config.json as a dict: given, or resolved from a name / path / hub id."""
    from graft import models
    from graft.io import read_config

    if isinstance(base, dict):
        return base
    if base is None:
        base = read_config(adapter_dir).get("base_model_name_or_path")
        if not base:
            raise ExportError("the adapter's config names no base model (base_model_name_or_path); pass the base "
                              "model (--model) so its config can be read")
    try:
        path = models.resolve(base, revision=revision)
    except (FileNotFoundError, ValueError) as err:
        raise ExportError(f"cannot read the base model {str(base)!r}'s config ({err}); pass --model") from None
    return json.loads((path / "config.json").read_text())
