"""An adapter library: a directory of adapters for one base model, with a manifest, searchable by
description.

Layout of a library directory::

    lib/
      manifest.json             format version, the base model, one entry per adapter (below)
      embeddings.safetensors    the description embeddings (cached; rebuilt when stale)
      <name>/                   one adapter per sub-directory, in PEFT format
        adapter_config.json
        adapter_model.safetensors

Every adapter is an ordinary PEFT-format directory, so ``graft serve --adapter-root lib`` serves
any of them (``POST /v1/load_lora_adapter`` with ``lora_path = lib/<name>``), ``graft.load`` and
peft load them, and LoraHub / Text-to-LoRA read them through :class:`Library`.

A manifest entry records what the adapter is (method, rank, targets), what it is for (the task's
description and other wordings), what it was trained on (task file, rows used, split seed, how many
rows were held out), how (the training settings), and how well it does: its accuracy on held-out
rows next to the base model's zero-shot accuracy on the same rows (both by
:func:`graft.compose.tasks.evaluate`).

:func:`build` trains one LoRA per task of a task collection (:mod:`graft.compose.tasks`) with
graft's own training loop. It is resumable: an adapter whose directory and manifest entry are both
complete is skipped; one interrupted mid-way (no entry yet) is trained again from the start.

Example:
    >>> lib = build("smollm2-135m", "../shared/data/tasks/index.json", "lib/")
    >>> lib = Library.open("lib/")
    >>> [(e.name, round(s, 2)) for e, s in lib.search("translate to German", k=3)]
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graft.compose import tasks as T

__all__ = ["FORMAT_VERSION", "BuildConfig", "Entry", "Library", "build", "select_rows"]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
EMBEDDINGS = "embeddings.safetensors"
EMBEDDER = "minilm"  # all-MiniLM-L6-v2, bundled (graft.data.prompting.sentence_embedder)

Embedder = Callable[[Sequence[str]], Any]  # texts -> (len(texts), d) tensor


@dataclass(frozen=True)
class BuildConfig:
    """How :func:`build` trains and scores each adapter of a library.

    Args:
        r: LoRA rank.
        alpha: LoRA alpha (scaling alpha / r).
        targets: Module names the LoRA adapts.
        dropout: LoRA dropout.
        epochs: Passes over each task's training rows.
        lr: Peak learning rate (cosine schedule after ``warmup_ratio`` of the steps).
        batch_size: Rows per optimizer step.
        max_length: Tokens per row (the prompt is cut first, never the answer).
        warmup_ratio: Linear warmup as a fraction of the steps.
        max_train_rows: Train on at most this many of a task's training rows (a seeded sample);
            None uses them all.
        heldout: Rows held out of training per task: a fraction (of at most ``max_heldout`` rows)
            or a count (:func:`graft.compose.tasks.split_rows`).
        max_heldout: Cap on the held-out rows when ``heldout`` is a fraction.
        split_seed: Seed of the train / held-out split.
        eval_rows: Score adapter and base on at most this many held-out rows (a seeded sample);
            None scores them all.
        seed: Seed of the LoRA initialisation, the data order and the row samples.
    """

    r: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    dropout: float = 0.0
    epochs: int = 2
    lr: float = 1e-3
    batch_size: int = 8
    max_length: int = 384
    warmup_ratio: float = 0.1
    max_train_rows: int | None = 160
    heldout: float | int = 0.2
    max_heldout: int = 60
    split_seed: int = 0
    eval_rows: int | None = 30
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", tuple(t.strip() for t in self.targets.split(",") if t.strip()))
        object.__setattr__(self, "targets", tuple(self.targets))
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise ValueError(f"BuildConfig targets={self.targets!r} must name at least one module, e.g. q_proj,v_proj")
        for name in ("r", "epochs", "batch_size", "max_heldout"):
            _positive_int(name, getattr(self, name))
        if not isinstance(self.max_length, int) or isinstance(self.max_length, bool) or self.max_length < 8:
            raise ValueError(f"BuildConfig max_length={self.max_length!r} must be an integer >= 8")
        for name in ("max_train_rows", "eval_rows"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        for name in ("split_seed", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"BuildConfig {name}={value!r} must be an integer >= 0")
        if not self.lr > 0 or not self.alpha > 0:
            raise ValueError(f"BuildConfig lr={self.lr!r} and alpha={self.alpha!r} must be > 0")
        if not 0.0 <= self.dropout < 1.0 or not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"BuildConfig dropout={self.dropout!r} and warmup_ratio={self.warmup_ratio!r} "
                             "must be in [0, 1)")
        if isinstance(self.heldout, bool) or not isinstance(self.heldout, (int, float)):
            raise ValueError(f"BuildConfig heldout={self.heldout!r} must be a fraction in (0, 1) or a row count")  # noqa: TRY004
        if isinstance(self.heldout, float) and not 0.0 < self.heldout < 1.0:
            raise ValueError(f"BuildConfig heldout={self.heldout!r}: a fraction must be in (0, 1)")
        if isinstance(self.heldout, int) and self.heldout < 1:
            raise ValueError(f"BuildConfig heldout={self.heldout!r}: a count must be >= 1")

    def method(self) -> dict[str, Any]:
        return {"type": "lora", "r": self.r, "alpha": self.alpha, "targets": list(self.targets),
                "dropout": self.dropout}

    def split(self) -> dict[str, Any]:
        return {"heldout": self.heldout, "max_heldout": self.max_heldout, "split_seed": self.split_seed,
                "max_train_rows": self.max_train_rows, "eval_rows": self.eval_rows, "sample_seed": self.seed}

    def training(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "lr": self.lr, "batch_size": self.batch_size, "max_length": self.max_length,
                "schedule": "cosine", "warmup_ratio": self.warmup_ratio, "optimizer": "adamw", "seed": self.seed,
                "loss": "answer tokens only (rows rendered by tasks.messages through the chat template)"}


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"BuildConfig {name}={value!r} must be an integer >= 1")


def _sample(rows: list[dict], n: int | None, seed: int) -> list[dict]:
    """At most ``n`` of ``rows``, a seeded sample kept in file order (all of them when None)."""
    if n is None or n >= len(rows):
        return list(rows)
    keep = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in keep]


def select_rows(rows: Sequence[dict], split: dict[str, Any]) -> tuple[list[dict], list[dict], list[dict]]:
    """The rows an entry was built from: (training rows used, all held-out rows, held-out rows scored).

    ``split`` is an entry's ``data["split"]`` (or :meth:`BuildConfig.split`), so anyone holding the
    manifest recovers exactly the rows an adapter was trained and scored on.
    """
    train, held = T.split_rows(rows, split["heldout"], seed=split["split_seed"], max_heldout=split["max_heldout"])
    used = _sample(train, split["max_train_rows"], split["sample_seed"])
    scored = _sample(held, split["eval_rows"], split["sample_seed"])
    return used, held, scored


@dataclass(frozen=True)
class Entry:
    """One adapter of a library, as its manifest records it.

    Attributes:
        name: The adapter's name (the task's name for a built library).
        path: Its directory, relative to the library.
        description: What it does, in words (the task's description).
        alt_descriptions: Other wordings.
        method: ``{"type": "lora", "r", "alpha", "targets", "dropout"}``.
        data: What it was trained on: ``task``, ``tasks`` (the index), ``file``, ``rows`` (in the
            file), ``train_rows`` (after the held-out split), ``rows_used``, ``heldout_rows``,
            ``scored_rows``, ``split`` (the settings :func:`select_rows` takes), ``family``.
        training: The training settings and what the run did (steps, final loss, seconds).
        scores: ``{"metric", "rows", "adapter", "base"}``: held-out accuracy of the adapter and the
            base model's zero-shot accuracy on the same rows.
        created: When it was written (UTC, ISO 8601).
    """

    name: str
    path: str
    description: str
    alt_descriptions: tuple[str, ...] = ()
    method: dict[str, Any] = field(default_factory=dict, hash=False)
    data: dict[str, Any] = field(default_factory=dict, hash=False)
    training: dict[str, Any] = field(default_factory=dict, hash=False)
    scores: dict[str, Any] = field(default_factory=dict, hash=False)
    created: str = ""

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["alt_descriptions"] = list(self.alt_descriptions)
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any], where: str) -> Entry:
        missing = [k for k in ("name", "path", "description") if not isinstance(obj.get(k), str)]
        if missing:
            raise ValueError(f"{where}: an entry lacks {', '.join(missing)}")
        if Path(obj["path"]).is_absolute() or ".." in Path(obj["path"]).parts:
            raise ValueError(f"{where}: path {obj['path']!r} must be relative to the library, inside it")
        known = {f.name for f in dataclasses.fields(cls)}
        args = {k: v for k, v in obj.items() if k in known}
        args["alt_descriptions"] = tuple(args.get("alt_descriptions") or ())
        return cls(**args)


class Library:
    """An adapter library on disk (see the module docstring); open one with :meth:`open`."""

    def __init__(self, path: Path, base: dict[str, Any], entries: list[Entry], info: dict[str, Any],
                 embed: Embedder | None = None) -> None:
        self.path = path
        self.base = base
        self.info = info
        self._entries = {e.name: e for e in entries}
        self._embed = embed
        self._custom = embed is not None
        self._embeddings = None

    # ---- reading

    @classmethod
    def open(cls, path: str | os.PathLike, *, embed: Embedder | None = None) -> Library:
        """Read the library at ``path``.

        Args:
            path: The library directory (holding ``manifest.json``).
            embed: Sentence embedder for search (default: the bundled all-MiniLM-L6-v2); a library
                caches the embeddings of one embedder, named in its manifest.

        Raises:
            FileNotFoundError: No library there.
            ValueError: A manifest of another format version, or a malformed one.
        """
        path = Path(path)
        file = path / MANIFEST
        if not file.is_file():
            hint = " (the directory does not exist)" if not path.exists() else ""
            raise FileNotFoundError(f"{str(path)!r} is not an adapter library: it has no {MANIFEST}{hint}; "
                                    "build one with `graft library build`")
        try:
            manifest = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{file} is not valid JSON: {e}") from None
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        if version != FORMAT_VERSION:
            raise ValueError(f"{file} has format_version {version!r}; this graft reads version {FORMAT_VERSION}")
        if not isinstance(manifest.get("base"), dict) or not isinstance(manifest.get("adapters"), list):
            raise ValueError(f"{file} needs a 'base' object and an 'adapters' list")  # noqa: TRY004 (a file)
        entries = [Entry.from_json(obj, f"{file} adapters[{i}]") for i, obj in enumerate(manifest["adapters"])]
        info = {k: v for k, v in manifest.items() if k not in ("format_version", "base", "adapters")}
        return cls(path, manifest["base"], entries, info, embed)

    @property
    def entries(self) -> list[Entry]:
        """The adapters, in the order they were added."""
        return list(self._entries.values())

    @property
    def names(self) -> list[str]:
        return list(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def entry(self, name: str) -> Entry:
        if name not in self._entries:
            raise KeyError(f"no adapter {name!r} in library {str(self.path)!r}; it has {len(self)}: "
                           f"{', '.join(list(self._entries)[:8])}{'...' if len(self) > 8 else ''}")
        return self._entries[name]

    def path_of(self, name: str) -> Path:
        """The adapter's directory (PEFT format), for ``graft.load`` / ``graft serve``."""
        return self.path / self.entry(name).path

    def is_complete(self, name: str) -> bool:
        """Whether ``name`` has a manifest entry and both files of its adapter directory."""
        if name not in self._entries:
            return False
        from graft.io import CONFIG_NAME, WEIGHTS_NAME

        where = self.path_of(name)
        return (where / CONFIG_NAME).is_file() and (where / WEIGHTS_NAME).is_file()

    # ---- search by description

    @property
    def embeddings(self):
        """(len(entries), d) tensor: each entry's description embedded and L2-normalised, in entry order.

        Read from ``embeddings.safetensors`` when it matches the entries' descriptions, else computed
        with the library's embedder and cached there.
        """
        if self._embeddings is None:
            texts = [e.description for e in self.entries]
            key = _texts_key(self.names, texts)
            cached = _read_embeddings(self.path / EMBEDDINGS, key, self.embedder_name)
            if cached is None:
                cached = self._embedder()(texts).float() if texts else _empty()
                _write_embeddings(self.path / EMBEDDINGS, cached, key, self.embedder_name)
            self._embeddings = cached
        return self._embeddings

    @property
    def embedder_name(self) -> str:
        """The name the description embeddings are cached under (a custom embedder: its qualified name)."""
        if not self._custom:
            return self.info.get("embedder", EMBEDDER)
        return f"custom:{getattr(self._embed, '__module__', '')}.{getattr(self._embed, '__qualname__', '?')}"

    def _embedder(self) -> Embedder:
        if self._embed is None:
            from graft.data.prompting import sentence_embedder

            self._embed = sentence_embedder(self.info.get("embedder", EMBEDDER))
        return self._embed

    def search(self, text: str, k: int = 5, *, exclude: Sequence[str] = ()) -> list[tuple[Entry, float]]:
        """The ``k`` entries whose descriptions are nearest to ``text`` (cosine similarity), nearest first.

        Args:
            text: What the user wants, in words.
            k: How many entries.
            exclude: Names to leave out (e.g. the task being searched for).
        """
        import torch

        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k={k!r} must be an integer >= 1")
        if not self._entries:
            return []
        unknown = sorted(set(exclude) - set(self._entries))
        if unknown:
            raise KeyError(f"exclude names adapters the library does not have: {unknown}")
        query = torch.nn.functional.normalize(self._embedder()([text]).float(), dim=-1)[0]  # (d,)
        similarity = torch.nn.functional.normalize(self.embeddings, dim=-1) @ query  # (entries,)
        order = torch.argsort(-similarity, stable=True).tolist()
        entries = self.entries
        hits = [(entries[i], float(similarity[i])) for i in order if entries[i].name not in set(exclude)]
        return hits[:k]

    # ---- writing

    def _write(self) -> None:
        from graft.io import atomic_file_write

        manifest = {"format_version": FORMAT_VERSION, "base": self.base, **self.info,
                    "adapters": [e.to_json() for e in self.entries]}
        atomic_file_write(self.path / MANIFEST, json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")

    def _add(self, entry: Entry) -> None:
        """Add (or replace) an entry and rewrite the manifest. Under an exclusive lock the manifest is
        read again first, so several builders filling one library with disjoint tasks (``--only``)
        keep each other's entries."""
        import fcntl

        with open(self.path / ".manifest.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if (self.path / MANIFEST).is_file():
                    for other in Library.open(self.path).entries:
                        if other.name not in self._entries:
                            self._entries[other.name] = other
                self._entries.pop(entry.name, None)
                self._entries[entry.name] = entry
                self._embeddings = None
                self.info["updated"] = _now()
                self._write()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _texts_key(names: list[str], texts: list[str]) -> str:
    return hashlib.sha256(json.dumps([names, texts]).encode("utf-8")).hexdigest()


def _empty():
    import torch

    return torch.zeros(0, 0)


def _read_embeddings(file: Path, key: str, embedder: str):
    if not file.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("texts") != key or meta.get("embedder") != embedder:
                return None  # stale: the descriptions (or the embedder) changed since it was written
            return f.get_tensor("descriptions")
    except Exception:  # noqa: BLE001 (a damaged cache is rebuilt, not fatal)
        return None


def _write_embeddings(file: Path, tensor, key: str, embedder: str) -> None:
    from safetensors.torch import save

    from graft.io import atomic_file_write

    data = save({"descriptions": tensor.contiguous()}, metadata={"texts": key, "embedder": embedder})
    try:
        atomic_file_write(file, data)
    except OSError:
        pass  # a read-only library still searches; it just embeds again next time


# --------------------------------------------------------------------------------------------
# Building a library from a task collection


def base_identity(name_or_path: str, config: Any) -> dict[str, Any]:
    """What identifies a base model in a manifest: the id it was loaded by and its architecture
    (``config``: its transformers config, read before the weights so a mismatch fails at once)."""
    from graft import models

    given = str(name_or_path)
    canonical = models._ALIASES.get(given.lower(), given) if given.lower() in {
        *models.BUILTIN, *models._ALIASES} else str(Path(given).resolve())
    cfg = config
    return {"id": canonical, "name": getattr(cfg, "_name_or_path", None) or canonical,
            "model_type": cfg.model_type, "architectures": list(getattr(cfg, "architectures", None) or []),
            "hidden_size": getattr(cfg, "hidden_size", None),
            "num_hidden_layers": getattr(cfg, "num_hidden_layers", None),
            "vocab_size": getattr(cfg, "vocab_size", None)}


def _check_same_base(lib: Library, base: dict[str, Any]) -> None:
    keys = ("id", "model_type", "hidden_size", "num_hidden_layers", "vocab_size")
    diff = {k: (lib.base.get(k), base.get(k)) for k in keys if lib.base.get(k) != base.get(k)}
    if diff:
        what = "; ".join(f"{k}: library {a!r}, given {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"library {str(lib.path)!r} holds adapters of another base model ({what}); "
                         "build into a new directory or pass the library's base model")


def _select(tasks: list[T.Task], only: Sequence[str] | None, exclude: Sequence[str] | None) -> list[T.Task]:
    names = [t.name for t in tasks]
    for flag, given in (("only", only), ("exclude", exclude)):
        unknown = [n for n in (given or ()) if n not in names]
        if unknown:
            raise ValueError(f"--{flag} names tasks the collection does not have: {unknown}")
    chosen = [t for t in tasks if (not only or t.name in only) and t.name not in set(exclude or ())]
    if not chosen:
        raise ValueError("no task left to build (check --only / --exclude)")
    return chosen


def _clean_partial(path: Path, names: Sequence[str]) -> None:
    """Remove the temporary directories a killed save of these adapters left (``.<name>.tmp-*``); only
    theirs, as another builder may be saving its own adapters into the same library right now."""
    for name in names:
        for tmp in path.glob(f".{name}.tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)


def build(
    model: str | os.PathLike,
    tasks: str | os.PathLike,
    out: str | os.PathLike,
    config: BuildConfig | None = None,
    *,
    only: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    embed: Embedder | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> Library:
    """Train one LoRA per task of a task collection into the library ``out`` (resumable).

    Each task's rows are split by :func:`select_rows` (``config``); the LoRA trains on the training
    rows, rendered by :func:`graft.compose.tasks.messages` through the tokenizer's chat template with
    the loss on the answer only, in graft's training loop; then the adapter and the base model are
    scored on the same held-out rows (:func:`graft.compose.tasks.evaluate`). The adapter is saved
    (atomically) before its manifest entry, so an entry always points at a complete adapter.

    Args:
        model: The base model (a :func:`graft.models.load` name, a transformers directory or a GGUF file).
        tasks: The collection's ``index.json`` (or its directory).
        out: The library directory (created, or resumed: complete adapters are skipped).
        config: Training and scoring settings (default :class:`BuildConfig`).
        only: Build only these tasks.
        exclude: Leave these tasks out.
        embed: Sentence embedder for the description embeddings (default all-MiniLM-L6-v2).
        progress: Show a progress bar across tasks.
        log: Where one line per finished task goes (default: written under the progress bar).

    Returns:
        The library.

    Raises:
        FileNotFoundError: No task index there.
        ValueError: ``out`` is a library of another base model, or ``only`` / ``exclude`` name
            unknown tasks.
    """
    from tqdm.auto import tqdm
    from transformers import AutoConfig

    from graft import models

    config = config or BuildConfig()
    chosen = _select(T.read_tasks(tasks), only, exclude)
    out = Path(out)
    base = base_identity(str(model), AutoConfig.from_pretrained(models.resolve(model), local_files_only=True))
    if (out / MANIFEST).exists():
        lib = Library.open(out, embed=embed)
        _check_same_base(lib, base)
    lm, tokenizer = models.load(model)
    if not (out / MANIFEST).exists():
        out.mkdir(parents=True, exist_ok=True)
        lib = Library(out, base, [], {"created": _now(), "embedder": EMBEDDER}, embed)
        lib._write()
    todo = [t for t in chosen if not lib.is_complete(t.name)]
    _clean_partial(out, [t.name for t in todo])
    bar = tqdm(total=len(chosen), initial=len(chosen) - len(todo), desc="library", unit="task",
               disable=not progress, dynamic_ncols=True)
    say = log or bar.write
    if len(todo) < len(chosen):
        say(f"{len(chosen) - len(todo)} of {len(chosen)} adapters already complete in {out}: skipped")
    try:
        for task in todo:
            bar.set_postfix_str(task.name, refresh=True)
            entry = _build_one(lm, tokenizer, task, Path(tasks), out, config)
            lib._add(entry)
            s = entry.scores
            say(f"{task.name}: held-out {s['adapter']:.3f} (base {s['base']:.3f}, {s['rows']} rows), "
                f"{entry.training['steps']} steps, loss {entry.training['final_loss']:.3f}, "
                f"{entry.training['seconds'] + entry.training['eval_seconds']:.0f} s")
            bar.update(1)
    finally:
        bar.close()
    lib.embeddings  # noqa: B018 (computes and caches the description embeddings)
    return lib


def _build_one(lm, tokenizer, task: T.Task, index: Path, out: Path, config: BuildConfig) -> Entry:
    """Train, score and save the adapter of one task; returns its manifest entry (not yet written)."""
    import torch

    import graft
    from graft import data
    from graft.io import save
    from graft.recipe import make_collate
    from graft.train import TrainConfig, train

    rows = task.rows()
    split = config.split()
    used, held, scored = select_rows(rows, split)
    started = time.time()
    lm.eval()
    base_score = T.evaluate(lm, tokenizer, task, scored)
    base_seconds = time.time() - started
    records = [{"messages": [*T.messages(task, row), {"role": "assistant", "content": row["output"]}]} for row in used]
    examples = data.tokenize(records, tokenizer, format="chat", max_length=config.max_length, on_overflow="skip")
    torch.manual_seed(config.seed)  # the LoRA's A initialisation
    graft.attach(lm, graft.LoRA(r=config.r, alpha=config.alpha, dropout=config.dropout, targets=list(config.targets)),
                 task.name)
    try:
        train_cfg = TrainConfig(lr=config.lr, epochs=config.epochs, batch_size=config.batch_size,
                                warmup_ratio=config.warmup_ratio, seed=config.seed, progress=False)
        result = train(lm, examples, make_collate(lm, tokenizer, config.max_length, packed=True), train_cfg)
        lm.eval()
        trained = time.time()
        score = T.evaluate(lm, tokenizer, task, scored)
        save(lm, out / task.name, task.name)
    finally:
        graft.detach(lm, task.name)
    try:
        file = str(task.file.relative_to(index.parent if index.suffix else index))
    except ValueError:
        file = str(task.file)
    return Entry(
        name=task.name, path=task.name, description=task.description, alt_descriptions=task.alt_descriptions,
        method=config.method(),
        data={"task": task.name, "tasks": str(index.resolve()), "file": file, "rows": len(rows),
              "train_rows": len(rows) - len(held), "rows_used": len(used), "examples": len(examples),
              "heldout_rows": len(held), "scored_rows": len(scored), "split": split, "family": T.family(task.name)},
        training={**config.training(), "steps": result.steps, "final_loss": round(result.final_loss, 4),
                  "first_loss": round(result.losses[0], 4) if result.losses else None,
                  "seconds": round(result.seconds, 1), "eval_seconds": round(time.time() - trained + base_seconds, 1)},
        scores={"metric": "accuracy (tasks.evaluate: option log-likelihood where a row lists options, "
                          "else greedy exact match)",
                "rows": len(scored), "adapter": score, "base": base_score},
        created=_now(),
    )
