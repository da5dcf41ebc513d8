"""`graft serve`: one frozen base model, many adapters, an OpenAI-compatible HTTP server.

Example:
    >>> from graft.serve import build, serve
    >>> serve("smollm2-135m", adapters={"sql": "runs/sql/adapter"}, port=8000)   # blocks
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from graft.data import promptformat
from graft.serve.app import create_app
from graft.serve.engine import Engine, EngineBusy, EngineClosed, Event, Result, Sampling
from graft.serve.protocol import Limits
from graft.serve.registry import AdapterError, AdapterRegistry

__all__ = [
    "AdapterError", "AdapterRegistry", "Engine", "EngineBusy", "EngineClosed", "Event", "Limits",
    "Result", "Sampling", "build", "create_app", "default_kv_budget", "read_api_keys", "serve",
]

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def read_api_keys(path: str | os.PathLike[str]) -> list[str]:
    """One key per line; blank lines and ``#`` comments are skipped. An empty file is an error."""
    lines = Path(path).read_text().splitlines()
    keys = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not keys:
        raise ValueError(f"{path} holds no API keys (one per line)")
    return keys


def build(
    model: str | Any,
    *,
    tokenizer: Any = None,
    adapters: Mapping[str, str | os.PathLike[str]] | None = None,
    adapter_roots: Sequence[str | os.PathLike[str]] = (),
    max_loaded: int | None = None,
    api_keys: Sequence[str] | None = None,
    limits: Limits | None = None,
    max_batch: int = 64,
    dtype: str = "auto",
    served_name: str | None = None,
    adapter_dtype: str = "auto",
    device: str = "auto",
    kv_budget: int | str | None = "auto",
    max_weight_abs: float | None = 1e4,
    max_waiting: int = 1024,
    expose_paths: bool = False,
    hypernet: Any = None,
    library: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[Any, Engine]:
    """The app and its (started) engine, for embedding in your own ASGI server or tests.

    Args:
        model: A model name or path for :func:`graft.models.load`, or a loaded causal LM.
        tokenizer: Required when ``model`` is a loaded model.
        adapters: Name -> adapter directory, loaded at start (trusted: no roots check).
        adapter_roots: Directories that ``POST /v1/load_lora_adapter`` may load from.
        max_loaded: Most adapters held in memory; others reload from disk when asked for.
        api_keys: Bearer keys; none = open server.
        max_batch: Most requests decoded together.
        dtype: ``auto``, ``fp32``, ``bf16`` or ``fp16`` when ``model`` is a name
            (:func:`graft.runtime.resolve`; auto: bf16 or fp16 on a GPU, fp32 on a CPU).
        served_name: The ``model`` name of the base (default: the name or path given).
        adapter_dtype: The dtype adapters are served in: ``auto`` (the base model's floating
            dtype: bf16 adapters on a bf16 base), or ``fp32``, ``bf16``, ``fp16``.
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N`` when ``model`` is a name.
        kv_budget: Most bytes of key/value cache (a size like ``"2GB"``, bytes, ``"auto"``: half the
            memory available at start, see :func:`default_kv_budget`; ``None``: no limit).
        max_weight_abs: Largest adapter weight magnitude admitted (``None``: any finite value).
        max_waiting: Most requests queued for admission (more get a 429).
        expose_paths: Show adapter paths in ``GET /v1/models`` (an admin option).
        hypernet: A Text-to-LoRA hypernetwork (or its directory): ``POST /v1/generate_lora_adapter``
            makes an adapter from a description (:mod:`graft.serve.dispatch`).
        library: An adapter library (``manifest.json``): its adapters are served by name, and
            ``POST /v1/pick_lora_adapter`` loads the one nearest to a description.
        cache_dir: Where generated adapters are written (default: a temporary directory).
    """
    from graft import models

    if adapter_dtype != "auto" and adapter_dtype not in DTYPES:
        raise ValueError(f"adapter_dtype must be 'auto' or one of {sorted(DTYPES)}, got {adapter_dtype!r}")
    if isinstance(model, (str, os.PathLike)):
        from graft import runtime

        choice = runtime.resolve(device, dtype)
        runtime.announce(choice, "graft serve")
        name = served_name or str(model)
        model, tokenizer = models.load(model, dtype=choice.torch_dtype)
        runtime.place(model, choice)
    else:
        if tokenizer is None:
            raise ValueError("pass the tokenizer with a loaded model")
        name = served_name or getattr(model.config, "_name_or_path", None) or "base"
    registry = AdapterRegistry(model, name, list(adapter_roots), max_loaded, _adapter_dtype(model, adapter_dtype),
                               max_weight_abs=max_weight_abs)
    if kv_budget == "auto":
        kv_budget = default_kv_budget(next(model.parameters()).device)
    elif isinstance(kv_budget, str):
        from graft.plan import parse_memory

        kv_budget = parse_memory(kv_budget)
    engine = Engine(model, tokenizer, registry=registry, max_batch=max_batch, kv_budget_bytes=kv_budget,
                    max_waiting=max_waiting)
    for adapter, path in (adapters or {}).items():
        registry.register(adapter, path, trusted=True)
        fmt = promptformat.read(path)
        if fmt is not None:
            print(f"graft serve: adapter {adapter}: chat requests rendered in its training format ({fmt.describe()})",
                  file=sys.stderr)
        if max_loaded is None or len(registry.loaded()) < max_loaded:
            registry.acquire(adapter)  # the engine thread is not running yet: attach here
            registry.release(adapter)
    dispatcher = None
    if hypernet is not None or library is not None:
        from graft.serve.dispatch import Dispatcher

        if hypernet is not None and not hasattr(hypernet, "generate_one"):
            from graft.compose.t2l import TextToLoRA

            hypernet = TextToLoRA.load(hypernet, model=model)  # refuses a hypernetwork for another base
        elif hypernet is not None:
            hypernet.layout.check(model)
        dispatcher = Dispatcher(hypernet, library, cache_dir)
    engine.start()
    app = create_app(engine, registry, api_keys=list(api_keys or []), limits=limits, expose_paths=expose_paths)
    if dispatcher is not None:
        from graft.serve.dispatch import install

        install(app, dispatcher)
    return app, engine


def default_kv_budget(device: Any) -> int | None:
    """Half the memory free at start (``MemAvailable`` on the CPU, free device memory on CUDA): the
    cache alone cannot take what the rest of the process (prefill activations, adapters) and the
    machine need; ``None`` where it cannot be read."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return int(torch.cuda.mem_get_info(device)[0] * 0.5)
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None
    return available // 2


def _adapter_dtype(model: Any, choice: str) -> Any:
    import torch

    if choice != "auto":
        return getattr(torch, DTYPES[choice])
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    if weight is not None and weight.dtype.is_floating_point:
        return weight.dtype  # the dtype the activations flow in (a 4-bit base keeps fp32 or bf16 embeddings)
    return None


def serve(model: str | Any, *, host: str = "127.0.0.1", port: int = 8000, shutdown_grace: float = 30, **kwargs: Any) -> None:
    """Build the server and run it with uvicorn until interrupted.

    SIGINT/SIGTERM: stop accepting, let in-flight requests finish for ``shutdown_grace`` seconds,
    then end the rest with an error the client can read (see :class:`graft.serve.lifecycle.DrainingServer`).
    """
    import signal
    import threading

    import uvicorn

    from graft.serve.lifecycle import DrainingServer

    if shutdown_grace < 0:
        raise ValueError(f"shutdown_grace must be >= 0 seconds, got {shutdown_grace}")
    app, engine = build(model, **kwargs)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    server = DrainingServer(uvicorn.Config(app, host=host, port=port, log_level="info"), engine, shutdown_grace)

    def stop(signum: int, frame: Any) -> None:
        # uvicorn takes SIGINT/SIGTERM while it runs (in-flight requests finish), then raises the signal again
        # for the handler it found: the default ones would kill the process before the engine shuts down (exit
        # status -15) or raise KeyboardInterrupt. Here that repeat, or a signal before uvicorn took over, stops.
        server.should_exit = True

    main = threading.current_thread() is threading.main_thread()  # signal handlers live in the main thread
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        server.run()
    finally:
        engine.shutdown()
        if getattr(app.state, "dispatcher", None) is not None:
            app.state.dispatcher.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:
        raise SystemExit(3)  # as uvicorn.run: the server failed to start (the error is in the log)
