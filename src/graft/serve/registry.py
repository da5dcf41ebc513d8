"""Which adapters a server knows, which sit in memory, and where they may be loaded from.

Adapters are known by name (the ``model`` field of a request) and path. At most ``max_loaded``
are attached to the model at once; a request for a known adapter that is not in memory loads it
from disk, evicting the least recently used one that no running request holds. Paths given over
HTTP must resolve inside one of the configured roots, and so must every file read from them: each
file is opened once and the opened file itself is checked (``paths.py``). Every load (also a
reload after eviction) checks that the weights are finite and of a sane magnitude.

Every method that changes the model runs on the engine thread (see ``Engine.call``); the name
table itself is guarded by a lock so request handlers can check names without waiting a step.
"""

from __future__ import annotations

import ctypes
import re
import threading
from collections import Counter, OrderedDict
from pathlib import Path

import torch
from torch import nn

from graft import core, io
from graft.methods.lora import REWRITES_BASE
from graft.serve.paths import PathRefused, check_text, inside, read_adapter_files, read_config

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_:/-]{0,127}")  # no ".": module dict keys cannot hold one
SERVABLE = {"LORA", "IA3"}  # methods whose layers route each batch row to its own adapter


class AdapterError(ValueError):
    """A bad adapter name or path; ``status`` is the HTTP status it maps to."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_adapter") -> None:
        super().__init__(message)
        self.status, self.code = status, code


def check_weights(name: str, tensors: dict[str, torch.Tensor], max_abs: float | None) -> None:
    """Refuse an adapter whose tensors hold NaN or inf, or values beyond ``max_abs`` (``None``: finite is enough).

    One such adapter would not only answer its own requests with garbage: its overflowing rows
    share every decoding step with other clients' requests.
    """
    for key, tensor in tensors.items():
        if not tensor.dtype.is_floating_point:
            continue
        if not bool(torch.isfinite(tensor).all()):
            raise AdapterError(f"adapter {name!r}: tensor {key!r} holds non-finite values (NaN or inf)", code="invalid_weights")
        if max_abs is not None and tensor.numel():
            largest = float(tensor.abs().max())
            if largest > max_abs:
                raise AdapterError(f"adapter {name!r}: tensor {key!r} holds a value of magnitude {largest:.3g}, above "
                                   f"the server's limit {max_abs:g} (--max-adapter-weight)", code="invalid_weights")


def _check_leaves_base_alone(name: str, config: dict) -> None:
    init = getattr(core.method_for_peft_type(config["peft_type"]).from_peft(config), "init", "default")
    # on a base every adapter shares, rewriting it would change every other adapter's and the base's outputs
    if init in REWRITES_BASE:
        raise AdapterError(
            f"adapter {name!r} uses init={init!r}, whose loading rewrites the base weights every served adapter shares; "
            + ("save it with graft.save, which stores PiSSA/OLoRA as a plain LoRA of the original base"
               if init != "loftq" else
               "a LoftQ adapter needs its own base: merge it (graft merge) and serve that model"))


class AdapterRegistry:
    """Adapter names, paths and the in-memory LRU set.

    Args:
        model: The served base model.
        base_name: The name requests use for the base model (not allowed as an adapter name).
        roots: Directories that ``POST /v1/load_lora_adapter`` may load from.
        max_loaded: Most adapters attached at once (``None``: no limit).
        adapter_dtype: Cast each adapter's tensors to this dtype when it is loaded (``None``: keep
            the dtype it loads in, fp32). A bf16 base serves fastest with bf16 adapters: the LoRA
            matmuls then run in bf16 too, with no casts of the activations in and out.
        max_weight_abs: Largest magnitude an adapter weight may have (``None``: any finite value).
        max_adapter_bytes: Largest ``adapter_model.safetensors`` read.
    """

    def __init__(
        self,
        model: nn.Module,
        base_name: str,
        roots: list[str | Path] = (),
        max_loaded: int | None = None,
        adapter_dtype: torch.dtype | None = None,
        max_weight_abs: float | None = 1e4,
        max_adapter_bytes: int = 4 << 30,
    ) -> None:
        if max_loaded is not None and max_loaded < 1:
            raise ValueError(f"max_loaded must be >= 1, got {max_loaded}")
        if max_weight_abs is not None and not max_weight_abs > 0:
            raise ValueError(f"max_weight_abs must be > 0 (or None: no limit), got {max_weight_abs}")
        self.model = model
        self.base_name = base_name
        self.roots = [Path(r).resolve() for r in roots]
        self.max_loaded = max_loaded
        self.adapter_dtype = adapter_dtype
        self.max_weight_abs = max_weight_abs
        self.max_adapter_bytes = max_adapter_bytes
        self.paths: dict[str, Path] = {}
        self._trusted: set[str] = set()  # names given on the command line: read without the roots check
        self._loaded: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self._refs: Counter[str] = Counter()
        self._doomed: set[str] = set()  # unregistered while in use: detach on release
        self._lock = threading.Lock()
        self.loads = 0  # adapters read from disk (tests check LRU reloads)

    # ---- the name table (any thread)
    def names(self) -> list[str]:
        with self._lock:
            return list(self.paths)

    def knows(self, name: str) -> bool:
        with self._lock:
            return name in self.paths

    def register(self, name: str, path: str | Path, *, trusted: bool = False) -> Path:
        """Add a name -> path entry after checking both; ``trusted`` paths (the command line) skip the roots check."""
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise AdapterError(f"bad adapter name {name!r}: use 1-128 letters, digits and _ : / -, starting with a letter or digit")
        if name == self.base_name:
            raise AdapterError(f"{name!r} is the base model's name; choose another adapter name")
        resolved = self._check_path(path, trusted)
        with self._lock:
            if name in self.paths:
                raise AdapterError(f"an adapter named {name!r} is already loaded; unload it first", code="adapter_exists")
            if name in self._doomed:
                raise AdapterError(f"adapter {name!r} was unloaded and still finishes running requests; retry shortly",
                                   status=409, code="adapter_busy")
            self.paths[name] = resolved
            if trusted:
                self._trusted.add(name)
        return resolved

    def unregister(self, name: str) -> None:
        """Forget a name; its tensors go now, or when the last request using it finishes."""
        with self._lock:
            if name not in self.paths:
                raise AdapterError(f"no adapter named {name!r}", status=404, code="model_not_found")
            del self.paths[name]
            self._trusted.discard(name)
            loaded_idle = name in self._loaded and not self._refs[name]
            if name in self._loaded and not loaded_idle:
                self._doomed.add(name)
        if loaded_idle:
            self._evict(name)

    # ---- attaching and detaching (engine thread)
    def load_now(self, name: str, path: str | Path, *, trusted: bool = False) -> None:
        """Register and attach at once, so a bad checkpoint fails its load request, not a later one."""
        self.register(name, path, trusted=trusted)
        try:
            self.acquire(name)
        except Exception as err:
            with self._lock:
                self.paths.pop(name, None)
                self._trusted.discard(name)
            if isinstance(err, AdapterError):
                raise
            raise AdapterError(f"cannot load adapter {name!r} onto this model: {err}") from err
        self.release(name)

    def acquire(self, name: str) -> None:
        """Make sure ``name`` is attached and hold it for one running request."""
        with self._lock:
            if name not in self.paths or name in self._doomed:
                raise AdapterError(f"no adapter named {name!r}", status=404, code="model_not_found")
            path = self.paths[name]
            loaded = name in self._loaded
            roots = None if name in self._trusted else self.roots
        if not loaded:
            try:  # read again at every load: the files may have changed since the name was registered
                config, tensors = read_adapter_files(path, roots, str(path), self.max_adapter_bytes)
            except PathRefused as err:
                raise AdapterError(str(err), err.status, err.code) from None
            _check_leaves_base_alone(name, config)
            check_weights(name, tensors, self.max_weight_abs)
            self._make_room()
            try:
                io.load_tensors(self.model, config, tensors, name=name, activate=False)
                if self.adapter_dtype is not None:
                    for p in core.adapter_parameters(self.model, name).values():
                        p.data = p.data.to(self.adapter_dtype)
            except Exception:
                if name in getattr(self.model, core.STATE_ATTR, core.GraftState()).methods:
                    core.detach(self.model, name)  # half attached: take it off again
                raise
            self.loads += 1
        with self._lock:
            self._loaded[name] = None
            self._loaded.move_to_end(name)
            self._refs[name] += 1

    def release(self, name: str) -> None:
        with self._lock:
            self._refs[name] -= 1
            doomed = not self._refs[name] and name in self._doomed
            if doomed:
                self._doomed.discard(name)
        if doomed:
            self._evict(name)
        if self.max_loaded is not None:
            self._shrink(self.max_loaded)  # over the limit while every slot was busy: back under it now

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._loaded)

    def _make_room(self) -> None:
        if self.max_loaded is not None:
            self._shrink(self.max_loaded - 1)

    def _shrink(self, limit: int) -> None:
        """Evict idle adapters, least recently used first, until at most ``limit`` are loaded."""
        while True:
            with self._lock:
                if len(self._loaded) <= limit:
                    return
                idle = [n for n in self._loaded if not self._refs[n]]
            if not idle:
                return  # every slot is busy: go over the limit rather than stall a request
            self._evict(idle[0])

    def _evict(self, name: str) -> None:
        with self._lock:
            self._loaded.pop(name, None)
        core.detach(self.model, name)
        release_memory()

    def _check_path(self, path: str | Path, trusted: bool) -> Path:
        """The resolved adapter directory; over HTTP it must lie inside a root (its files are checked when read)."""
        try:
            check_text(str(path), "the adapter path")
        except PathRefused as err:
            raise AdapterError(str(err), err.status, err.code) from None
        resolved = Path(path).expanduser().resolve() if trusted else Path(path).resolve()
        if not trusted and not inside(resolved, self.roots):
            allowed = ", ".join(str(r) for r in self.roots) or "none configured (start the server with --adapter-root)"
            raise AdapterError(f"adapter path {str(path)!r} is outside the adapter roots; allowed roots: {allowed}", status=403, code="path_not_allowed")
        if not resolved.is_dir():
            raise AdapterError(f"{str(path)!r} is not an adapter directory (needs adapter_config.json and adapter_model.safetensors)", status=404, code="adapter_not_found")
        try:
            peft_type = read_config(resolved, None if trusted else self.roots, str(path)).get("peft_type", "LORA")
        except PathRefused as err:
            raise AdapterError(str(err), err.status, err.code) from None
        if peft_type not in SERVABLE:
            raise AdapterError(f"{peft_type} adapters cannot be served batched; servable: {sorted(SERVABLE)}")
        return resolved


def release_memory() -> None:
    """Hand freed heap pages back to the OS (glibc), so RSS follows unloads.

    No ``gc.collect()``: detached adapter tensors are freed by reference counting, and a full
    collection on the engine thread would pause every running request for ~0.3 s per unload.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
