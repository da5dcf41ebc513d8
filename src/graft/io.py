"""Save and load adapters in the PEFT format (``adapter_config.json`` + ``adapter_model.safetensors``).

Only safetensors is read: nothing is unpickled. Writes are atomic: a save builds the new files in
a temporary sibling directory and swaps it in, so a failed or interrupted save leaves the previous
checkpoint as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from graft.core import adapter_layers, attach, detach, method_for_peft_type, state_of

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
RESUME_NAME = "graft_resume.safetensors"  # tensors training needs that the PEFT format drops (peft ignores it)
PREFIX = "base_model.model."
FORMAT_VERSION = "1"

TASK_TYPES = (
    ("ForCausalLM", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
    ("ForConditionalGeneration", "SEQ_2_SEQ_LM"), ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
    ("LMHeadModel", "CAUSAL_LM"),  # GPT2LMHeadModel and other causal LMs named before the ForCausalLM convention
)


def task_type(model: nn.Module) -> str | None:
    cls = type(model).__name__
    for suffix, task in TASK_TYPES:
        if cls.endswith(suffix):
            return task
    return "FEATURE_EXTRACTION" if hasattr(model, "config") else None


# --------------------------------------------------------------------------------------------
# Collecting tensors


def key_prefixes(method: Any) -> tuple[str, str]:
    """(module prefix, extra-tensor prefix) of a method's keys in the PEFT file.

    peft keys module tensors ``base_model.model.<module>``; a prompt-learning adapter keys them
    ``base_model.<module>`` and its table at the top level, which such a method declares with the
    ``peft_key_prefix`` and ``extra_key_prefix`` class attributes.
    """
    module = getattr(method, "peft_key_prefix", PREFIX)
    return module, getattr(method, "extra_key_prefix", module)


def adapter_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Every tensor of adapter ``name`` under its PEFT key (``base_model.model.<module>.<tensor>``)."""
    state = state_of(model)
    prefix, extra_prefix = key_prefixes(state.methods[name])
    out: dict[str, torch.Tensor] = {}
    for lname, layer in adapter_layers(model):
        if name in layer.configs:
            for key, tensor in layer.adapter_state(name).items():
                out[f"{prefix}{lname}.{key}"] = tensor
    for key, p in state.methods[name].trainable_base_parameters(model, name).items():
        out[prefix + key] = p.detach()
    extra = getattr(state.methods[name], "extra_tensors", None)
    if extra is not None:
        out.update({extra_prefix + k: v for k, v in extra(model, name).items()})
    return out


def _loadable_parameters(model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """The parameters a checkpoint of adapter ``name`` fills, under the same keys as ``adapter_tensors``."""
    state = state_of(model)
    prefix, extra_prefix = key_prefixes(state.methods[name])
    out: dict[str, nn.Parameter] = {}
    for lname, layer in adapter_layers(model):
        if name in layer.configs:
            for key, p in layer.adapter_parameters(name).items():
                out[f"{prefix}{lname}.{key}"] = p
    for key, p in state.methods[name].trainable_base_parameters(model, name).items():
        out[prefix + key] = p
    extra = getattr(state.methods[name], "extra_parameters", None)
    if extra is not None:
        out.update({extra_prefix + k: v for k, v in extra(model, name).items()})
    return out


# --------------------------------------------------------------------------------------------
# Save


def save(model: nn.Module, path: str | os.PathLike, name: str | None = None) -> Path:
    """Write adapter ``name`` (default: the only one, or every one in its own sub-directory) to ``path``.

    Returns:
        The directory written.
    """
    state = state_of(model)
    path = Path(path)
    if name is None and len(state.methods) > 1:
        path.mkdir(parents=True, exist_ok=True)
        for adapter in state.methods:
            save(model, path / adapter, adapter)
        return path
    name = name if name is not None else next(iter(state.methods))
    if name not in state.methods:
        raise ValueError(f"no adapter named {name!r}; attached adapters: {sorted(state.methods)}")
    method = state.methods[name]
    config = method.to_peft(model, name)
    config.update(
        task_type=task_type(model),
        base_model_name_or_path=getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        inference_mode=True,
    )
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in adapter_tensors(model, name).items()}
    # A method may keep more than the PEFT format holds (P-tuning's encoder) in RESUME_NAME; both
    # files carry the id of this save, so a resume file left from an older save is never mixed in.
    resume = getattr(method, "resume_tensors", None)
    resume = {k: v.detach().to("cpu").contiguous().clone() for k, v in resume(model, name).items()} if resume else {}
    metadata = {"format": "pt", "graft_format": FORMAT_VERSION, "graft_method": type(method).__name__,
                "graft_save_id": uuid.uuid4().hex}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata=metadata)
        if resume:
            save_file(resume, str(tmp / RESUME_NAME), metadata=metadata)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True, default=_json_default) + "\n")

    atomic_dir_write(path, write)
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"cannot write {type(value).__name__} into adapter_config.json")


def atomic_dir_write(path: Path, write: Any) -> None:
    """Build the directory's files in a temporary sibling, fsync them, then swap it into ``path``.

    Files already in ``path`` that the new write does not produce (logs, a README) are kept.
    If the process dies at any point, either the old or the new directory is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = path.parent / f".{path.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        write(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if path.exists():
            for f in path.iterdir():
                if not (tmp / f.name).exists():
                    (shutil.copytree if f.is_dir() else shutil.copy2)(f, tmp / f.name)
            old = path.parent / f".{path.name}.old-{tag}"
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_file_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write one file so that a reader sees the old content or the new, never a part: write a
    temporary sibling, fsync it, then rename it over ``path`` (a manifest rewritten after each step)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


# --------------------------------------------------------------------------------------------
# Load


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``adapter_config.json`` of an adapter directory."""
    path = Path(path)
    _recover_interrupted_swap(path)
    if not path.exists():
        raise FileNotFoundError(f"adapter directory {str(path)!r} does not exist")
    if not path.is_dir():
        raise NotADirectoryError(f"{str(path)!r} is not a directory; pass the directory holding {CONFIG_NAME}")
    cfg_file = path / CONFIG_NAME
    if not cfg_file.exists():
        found = sorted(p.name for p in path.iterdir())[:10]
        raise FileNotFoundError(f"{str(path)!r} has no {CONFIG_NAME} (found: {found})")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file} is not valid JSON: {e}") from None
    if not isinstance(config, dict) or "peft_type" not in config:
        raise ValueError(f"{cfg_file} has no 'peft_type'; it is not a PEFT/graft adapter config")
    return config


def _recover_interrupted_swap(path: Path) -> None:
    """If a save died between its two renames, put the previous checkpoint back."""
    if path.exists() or not path.parent.exists():
        return
    olds = sorted(path.parent.glob(f".{path.name}.old-*"))
    if olds:
        os.rename(olds[-1], path)


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read ``adapter_model.safetensors``; a truncated or corrupted file is a clear error."""
    path = Path(path)
    file = path / WEIGHTS_NAME
    if not file.exists():
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = f" It has {pickled}: graft never unpickles checkpoints; re-save them as safetensors." if pickled else ""
        raise FileNotFoundError(f"{str(path)!r} has no {WEIGHTS_NAME}.{hint}")
    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    except Exception as e:  # noqa: BLE001 (safetensors raises several error types for damaged files)
        raise ValueError(f"{file} is truncated or corrupted and cannot be read as safetensors ({e})") from None


def read_resume_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The resume file written by the same save as ``adapter_model.safetensors``, or {} (none, or stale)."""
    path = Path(path)
    if not (path / RESUME_NAME).exists():
        return {}
    try:
        with safe_open(str(path / WEIGHTS_NAME), framework="pt") as f:
            save_id = (f.metadata() or {}).get("graft_save_id")
        with safe_open(str(path / RESUME_NAME), framework="pt") as f:
            if save_id is None or (f.metadata() or {}).get("graft_save_id") != save_id:
                return {}  # left from another save (e.g. peft re-saved the adapter here)
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    except Exception as e:  # noqa: BLE001 (safetensors raises several error types for damaged files)
        raise ValueError(f"{path / RESUME_NAME} is truncated or corrupted and cannot be read ({e})") from None


def _normalise_key(key: str, peft_name: str) -> str:
    """Map the key variants peft has written over the years onto the current layout."""
    key = key.replace(f".{peft_name}.", ".")
    if key.endswith(f".{peft_name}"):
        key = key[: -len(peft_name) - 1]
    if key.endswith("lora_magnitude_vector.weight"):
        key = key[: -len(".weight")]
    return key


def load(
    model: nn.Module,
    path: str | os.PathLike,
    name: str = "default",
    *,
    trainable: bool = False,
    activate: bool = True,
) -> nn.Module:
    """Attach the adapter stored at ``path`` (written by graft or by peft) under ``name``.

    Args:
        model: The base model (plain, or already carrying other adapters).
        path: Directory with ``adapter_config.json`` and ``adapter_model.safetensors`` (and
            ``graft_resume.safetensors`` when the method keeps more than peft does, e.g. an encoder),
            or, when no such path exists, a Hugging Face hub adapter id ``org/name`` (``graft push``).
        name: Name for the loaded adapter.
        trainable: Leave the loaded tensors trainable (to continue training).
        activate: Make it the only active adapter.

    Raises:
        FileNotFoundError, ValueError: missing files, unknown method, corrupted file, or tensors
            whose shapes do not fit the model (the module and both shapes are named). The model
            is left exactly as it was.
    """
    path = _local_or_hub(path)
    config = read_config(path)
    return load_tensors(model, config, read_tensors(path), name, trainable=trainable, activate=activate,
                        resume=lambda: read_resume_tensors(path), source=path)


def load_tensors(
    model: nn.Module,
    config: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    name: str = "default",
    *,
    trainable: bool = False,
    activate: bool = True,
    resume: Any = dict,
    source: str | os.PathLike = "<tensors>",
) -> nn.Module:
    """:func:`load` from a config and tensors already read (a server reads them through checked descriptors).

    ``resume`` is called for the resume tensors when the method asks for them (default: none);
    ``source`` names where they came from in errors.
    """
    method = method_for_peft_type(config["peft_type"]).from_peft(config)
    try:
        attach(model, method, name, activate=activate)
    except ValueError:  # e.g. its targets match no module: first, is this the adapter of another model?
        _check_modules(model, source, config, tensors)
        raise
    try:
        prepare = getattr(method, "prepare_load", None)
        if prepare is not None:  # the method picks what it fills from the PEFT and resume tensors
            tensors = prepare(model, name, tensors, resume())
        _fill(model, name, tensors)
    except Exception:
        detach(model, name)
        raise
    if not trainable:
        for p in _loadable_parameters(model, name).values():
            p.requires_grad_(False)
    return model


def _local_or_hub(path: str | os.PathLike) -> str | os.PathLike | Path:
    """``path`` itself, unless it does not exist and reads as a hub id (``org/name``): then its snapshot."""
    text = os.fspath(path)
    if Path(text).expanduser().exists() or "/" not in text or text.startswith((".", "~", "/")):
        return path
    from graft import hub

    if not hub.is_repo_id(text):
        return path
    try:
        return hub.adapter_snapshot(text)
    except hub.HubError as err:
        raise hub.HubError(f"no adapter directory {text!r}, so it was read as a hub adapter id: {err}") from None


def _check_modules(model: nn.Module, path: str | os.PathLike, config: dict[str, Any],
                   tensors: dict[str, torch.Tensor]) -> None:
    """An adapter made for another architecture: say so, naming its base and the modules it adapts
    that this model lacks (rather than the target matcher's advice to pick other targets)."""
    have = {n for n, _ in model.named_modules()}
    wanted = sorted({_module_of(k) for k in tensors} - {""})
    lacking = [m for m in wanted if m not in have and not any(h.endswith("." + m) for h in have)]
    if not wanted or len(lacking) < len(wanted):
        return  # some module fits: not a question of architecture
    base = config.get("base_model_name_or_path") or "an unnamed base model"
    kinds = sorted({m.rsplit(".", 1)[-1] for m in wanted})
    raise ValueError(f"the adapter in {os.fspath(path)} was trained on {base}, another architecture than this "
                     f"{type(model).__name__}: it adapts modules such as {_short(wanted, 3)} ({', '.join(kinds)}), "
                     f"which this model does not have; load it onto {base}")


def _module_of(key: str) -> str:
    """The module a PEFT tensor key belongs to: 'base_model.model.x.q_proj.lora_A.weight' -> 'x.q_proj'."""
    parts = key.removeprefix(PREFIX).split(".")
    for i, part in enumerate(parts):
        if part.startswith(("lora_", "ia3_", "adapter_", "hada_", "oft_")) or part in ("weight", "bias"):
            return ".".join(parts[:i])
    return ".".join(parts[:-1])


def _fill(model: nn.Module, name: str, tensors: dict[str, torch.Tensor]) -> None:
    params = _loadable_parameters(model, name)
    given: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        key = _normalise_key(key, "default")
        if key.endswith(".base_layer.weight"):
            continue  # peft also stores full embedding weights when embeddings are targeted; the base has them
        given[key] = value
    # Layers that save a transformed form (e.g. Child-Tuning's sparse delta) read their own tensors back.
    for lname, layer in adapter_layers(model):
        custom = getattr(layer, "load_adapter_state", None)
        if custom is None or name not in layer.configs:
            continue
        prefix = f"{PREFIX}{lname}."
        own = {k[len(prefix):]: given.pop(k) for k in [k for k in given if k.startswith(prefix)
                                                       and "." not in k[len(prefix):]]}
        for key in [k for k in params if k.startswith(prefix) and k[len(prefix):].split(".")[0]
                    in layer.adapter_param_names]:
            del params[key]
        custom(name, own, lname)
    missing = sorted(set(params) - set(given))
    unexpected = sorted(set(given) - set(params))
    if missing or unexpected:
        raise ValueError(
            f"adapter tensors do not match the model: missing {_short(missing)}, unexpected {_short(unexpected)}"
        )
    for key, p in params.items():
        value = given[key]
        if tuple(value.shape) != tuple(p.shape):
            module = key.removeprefix(PREFIX)
            raise ValueError(
                f"adapter tensor for '{module}' has shape {tuple(value.shape)} but the model expects "
                f"{tuple(p.shape)}: the adapter was trained for a different base model"
            )
    with torch.no_grad():
        for key, p in params.items():
            p.copy_(given[key].to(p.dtype))


def _short(keys: list[str], n: int = 5) -> str:
    keys = [k.removeprefix(PREFIX) for k in keys]
    return str(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")
