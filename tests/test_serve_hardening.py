"""graft serve under attack (issue 21): each failure a tester found, reproduced, and answered so that one
bad request never hurts another user.

The tiny Llama and adapters of tests/test_serve.py. Where a hostile request shares a batch with good ones,
the engine is held between two steps while they queue, so they are admitted together (one prefill, the same
decoding steps); the good ones must then produce exactly the texts they produce alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

import graft
from graft import core, models

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from test_serve import LiveServer, error_body, fresh_base, save_adapters, tiny_config

from graft.serve import Limits, Sampling, build, create_app
from graft.serve.kv import BatchKV
from graft.serve.paths import ConfinedFile, PathRefused
from graft.serve.registry import AdapterError, check_weights
from graft.serve.sampling import MIN_TEMPERATURE, sample

BASE = "tiny"
PROMPT = "Tell me a story about"
LIMITS = Limits(max_body_bytes=32 * 1024, max_prompt_tokens=200, max_tokens=400, max_n=4)


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(models.resolve("smollm2-135m"))


@pytest.fixture(scope="module")
def srv(tmp_path_factory, tok):
    """A tiny Llama with adapters q4 and all8 from an adapter root; no API key (auth is test_serve's)."""
    cfg = tiny_config(tok)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    root = tmp_path_factory.mktemp("root")
    save_adapters(cfg, state, root, names=["q4", "all8"])
    outside = tmp_path_factory.mktemp("outside")
    save_adapters(cfg, state, outside, seed=7, names=["all8"])
    app, engine = build(model, tokenizer=tok, adapters={"a1": root / "q4", "a2": root / "all8"}, adapter_roots=[root],
                        limits=LIMITS, served_name=BASE)
    server = LiveServer(app)
    http = httpx.Client(base_url=server.url, timeout=60)
    yield SimpleNamespace(cfg=cfg, state=state, root=root, outside=outside, app=app, engine=engine, server=server,
                          url=server.url, http=http, registry=app.state.registry)
    http.close()
    server.close()
    engine.shutdown(timeout=30)


def complete(http, model: str, prompt, max_tokens: int = 8, **kw):
    return http.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                              "temperature": 0, **kw})


@contextlib.contextmanager
def held(engine, queued: int):
    """Hold the engine thread between two steps until ``queued`` requests wait, then let them in together."""
    gate, inside = threading.Event(), threading.Event()
    engine.call(lambda: (inside.set(), gate.wait(60)))
    assert inside.wait(30)
    try:
        yield
        deadline = time.monotonic() + 30
        while len(engine._waiting) < queued:
            assert time.monotonic() < deadline, f"only {len(engine._waiting)} of {queued} requests queued"
            time.sleep(0.01)
    finally:
        gate.set()


def together(engine, jobs):
    """Run ``jobs`` (callables) at once, admitted into the engine in the same step; their results in order."""
    with ThreadPoolExecutor(len(jobs)) as pool:
        with held(engine, len(jobs)):
            futures = [pool.submit(job) for job in jobs]
        return [f.result() for f in futures]


# --------------------------------------------------------------------------------------------
# 1. A tiny temperature in a batch of greedy requests


def test_tiny_temperature_is_served_and_leaves_its_batch_mates_alone(srv):
    """Issue failure 1: temperature 1e-40 (and 1e-300) with ten greedy requests in the same prefill used to fail
    all eleven with 500 'probability tensor contains inf, nan'. Now it is answered (200; vLLM raises a positive
    temperature below 1e-2 to 1e-2) and every batch-mate's text equals its solo reference."""
    prompts = [f"{PROMPT} {word}" for word in ("cats", "dogs", "the sea", "a king", "trains")]
    jobs = [("a1" if i % 2 else "a2", prompts[i % 5], 6 + i % 3) for i in range(10)]
    solo = [complete(srv.http, m, p, k).json()["choices"][0]["text"] for m, p, k in jobs]
    for temperature in (1e-40, 1e-300):
        srv.engine.max_rows_seen = 0
        hostile = lambda t=temperature: complete(srv.http, "a1", PROMPT, 8, temperature=t)
        replies = together(srv.engine, [hostile] + [lambda j=j: complete(srv.http, *j) for j in jobs])
        assert srv.engine.max_rows_seen == 11  # all decoded in one batch
        assert replies[0].status_code == 200, replies[0].text
        assert replies[0].json()["usage"]["completion_tokens"] >= 1
        assert [r.json()["choices"][0]["text"] for r in replies[1:]] == solo
    alone = complete(srv.http, "a1", PROMPT, 8, temperature=1e-40)
    assert alone.status_code == 200


def test_sampler_is_finite_for_any_valid_temperature():
    """The sampler subtracts the max before dividing: no NaN at 1e-40, and near-zero temperatures pick the argmax."""
    logits = torch.tensor([3.0, 9.5, -2.0, 9.4, 0.0])
    g = torch.Generator().manual_seed(0)
    assert {sample(logits, t, 1.0, g) for t in (1e-40, 1e-300, 5e-324) for _ in range(20)} == {1}
    assert {sample(logits, 1e-40, 0.5, g) for _ in range(20)} == {1}
    assert Sampling.from_request(4, 1e-40, 1.0, (), None, False).temperature == 0.0  # below 1e-5: greedy
    assert Sampling.from_request(4, 1e-3, 1.0, (), None, False).temperature == MIN_TEMPERATURE
    drawn = {sample(logits, 1.0, 1.0, g) for _ in range(200)}
    assert drawn >= {1, 3}  # ordinary temperatures still sample


# --------------------------------------------------------------------------------------------
# 2. Rows that fail on their own


@pytest.fixture(scope="module")
def poisoned(srv, tok):
    """An engine over a model carrying a good adapter and one whose lora_B is NaN (attached directly, as a
    checkpoint that slipped past admission would be)."""
    from graft.serve import Engine

    model = fresh_base(srv.cfg, srv.state)
    graft.load(model, srv.root / "q4", name="good")
    graft.load(model, srv.root / "all8", name="nan")
    with torch.no_grad():
        for key, p in core.adapter_parameters(model, "nan").items():
            if "lora_B" in key:
                p.fill_(float("nan"))
    with Engine(model, tok) as engine:
        yield engine


def test_a_nan_row_fails_alone_and_its_batch_mates_equal_their_solo_references(poisoned, tok):
    """Issue failure 2 at the engine: rows through a NaN adapter (greedy and sampled) fail with a clear error,
    the greedy and sampled rows decoded beside them give exactly their solo outputs."""
    engine = poisoned
    ids = [tok(f"{PROMPT} {w}")["input_ids"] for w in ("cats", "dogs", "ships")]
    good = [(ids[i % 3], "good" if i % 2 else None, Sampling(7, 0.0 if i < 4 else 0.8, seed=i)) for i in range(6)]
    solo = [engine.generate(*job, timeout=60).token_ids for job in good]
    bad = [(ids[0], "nan", Sampling(5, 0.0)), (ids[1], "nan", Sampling(5, 0.9, seed=3))]
    outcomes = together(engine, [lambda j=j: _outcome(engine, j) for j in bad + good])
    for outcome in outcomes[:2]:
        assert isinstance(outcome, RuntimeError) and "not finite" in str(outcome), outcome
    assert [o.token_ids for o in outcomes[2:]] == solo


def test_an_exception_in_one_rows_sampling_or_detokenizing_fails_only_that_row(poisoned, tok, monkeypatch):
    """Mid-decode, one row's sampler raises and another's detokenizing raises: those two fail, the rest of the
    batch (sharing every step with them) finishes exactly as alone."""
    from graft.serve import rows, sampling

    engine = poisoned
    ids = [tok(f"{PROMPT} {w}")["input_ids"] for w in ("cats", "dogs", "ships")]
    good = [(ids[i % 3], "good" if i % 2 else None, Sampling(9, 0.0 if i < 3 else 0.7, seed=i)) for i in range(5)]
    solo = [engine.generate(*job, timeout=60).token_ids for job in good]
    real_sample, real_take = sampling.sample, rows.Row.take
    calls = {"sample": 0}

    def failing_sample(logits, temperature, top_p, generator):
        if temperature == 1.5:  # only the hostile row samples at 1.5
            calls["sample"] += 1
            if calls["sample"] == 3:
                raise RuntimeError("sampler blew up")
        return real_sample(logits, temperature, top_p, generator)

    def failing_take(self, token, *args):
        if self.sampling.seed == 666 and len(self.ids) == 2:
            raise TypeError("TextEncodeInput must be Union[...]")  # what a tokenizer error looks like
        return real_take(self, token, *args)

    monkeypatch.setattr(sampling, "sample", failing_sample)
    monkeypatch.setattr(rows.Row, "take", failing_take)
    bad = [(ids[0], "good", Sampling(9, 1.5, seed=1)), (ids[1], None, Sampling(9, 0.0, seed=666))]
    outcomes = together(engine, [lambda j=j: _outcome(engine, j) for j in bad + good])
    assert "sampler blew up" in str(outcomes[0]) and "TextEncodeInput" in str(outcomes[1]), outcomes[:2]
    assert [o.token_ids for o in outcomes[2:]] == solo
    assert engine.steps > 0 and not engine._rows


def _outcome(engine, job):
    try:
        return engine.generate(*job, timeout=60)
    except RuntimeError as err:
        return err


def test_a_failed_rows_cache_slot_is_scrubbed():
    """Masked cache positions still enter attention as 0 * value: a NaN left in a freed slot would reach the next
    row put there. A failed row's slot is zeroed when it leaves."""
    kv = BatchKV(8)
    for fill in (1.0, float("nan"), 3.0):
        kv.add([(torch.full((1, 2, 4, 8), fill), torch.full((1, 2, 4, 8), fill))])
    kv.remove(1, scrub=True)
    kv.add([(torch.ones(1, 2, 2, 8), torch.ones(1, 2, 2, 8))])
    assert all(torch.isfinite(b).all() for b in (*kv.keys, *kv.values))


# --------------------------------------------------------------------------------------------
# 3. Adapters that must not load


def _perturbed_copy(src, dst, how):
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(dst / "adapter_model.safetensors")
    key = min(k for k in tensors if "lora_B" in k)
    tensors[key] = how(tensors[key])
    save_file(tensors, dst / "adapter_model.safetensors")
    return key


def test_nan_or_huge_adapter_weights_are_refused_naming_the_tensor(srv):
    """Issue failure 2: NaN or x1e30 weights used to load with 200. Now 400 naming the tensor; the served
    adapters answer as before."""
    before = complete(srv.http, "a1", PROMPT).json()["choices"][0]["text"]
    for kind, how in {"nan": lambda t: t.clone().fill_(float("nan")), "huge": lambda t: t * 1e30}.items():
        key = _perturbed_copy(srv.root / "all8", srv.root / f"bad-{kind}", how)
        r = srv.http.post("/v1/load_lora_adapter", json={"lora_name": f"bad-{kind}", "lora_path": str(srv.root / f"bad-{kind}")})
        assert r.status_code == 400, r.text
        err = error_body(r)
        assert err["code"] == "invalid_weights" and key in err["message"], err
    assert not [m for m in srv.registry.names() if m.startswith("bad-")]
    assert complete(srv.http, "a1", PROMPT).json()["choices"][0]["text"] == before


def test_weight_limit_is_configurable():
    big = {"w": torch.full((2, 2), 5e4)}
    with pytest.raises(AdapterError, match="'w'.*5e\\+04"):
        check_weights("x", big, 1e4)
    check_weights("x", big, None)  # no magnitude limit: finite is enough
    with pytest.raises(AdapterError, match="non-finite"):
        check_weights("x", {"w": torch.tensor([1.0, float("inf")])}, None)


# --------------------------------------------------------------------------------------------
# 4. Paths


def test_file_symlinks_leaving_the_root_are_refused(srv):
    """Issue failure 3: a directory inside the root whose two files link outside used to load the outside
    adapter. Now 403; links that stay inside the root still load."""
    escape = srv.root / "file-links-out"
    escape.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (escape / name).symlink_to(srv.outside / "all8" / name)
    r = srv.http.post("/v1/load_lora_adapter", json={"lora_name": "escape", "lora_path": str(escape)})
    assert r.status_code == 403 and error_body(r)["code"] == "path_not_allowed", r.text
    half = srv.root / "weights-link-out"  # only the weights leave: refused when they are read
    half.mkdir()
    shutil.copy(srv.root / "q4" / "adapter_config.json", half)
    (half / "adapter_model.safetensors").symlink_to(srv.outside / "all8" / "adapter_model.safetensors")
    r = srv.http.post("/v1/load_lora_adapter", json={"lora_name": "half", "lora_path": str(half)})
    assert r.status_code == 403, r.text
    inside = srv.root / "file-links-in"
    inside.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (inside / name).symlink_to(srv.root / "q4" / name)
    r = srv.http.post("/v1/load_lora_adapter", json={"lora_name": "linked-in", "lora_path": str(inside)})
    assert r.status_code == 200, r.text
    assert complete(srv.http, "linked-in", PROMPT).json()["choices"][0]["text"] == \
        complete(srv.http, "a1", PROMPT).json()["choices"][0]["text"]
    assert srv.http.post("/v1/unload_lora_adapter", json={"lora_name": "linked-in"}).status_code == 200
    assert {"escape", "half"}.isdisjoint(srv.registry.names())


def test_the_file_checked_is_the_file_read(srv, tmp_path):
    """No window between check and read: the bytes come from the descriptor that was checked. A file swapped for
    an outside link after the check still reads the inside file; a link out at open time is refused."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "f").write_bytes(b"inside")
    (tmp_path / "secret").write_bytes(b"outside")
    with ConfinedFile(root / "f", [root.resolve()], "f") as f:
        (root / "f").unlink()
        (root / "f").symlink_to(tmp_path / "secret")  # the swap, after the check
        assert f.read(100) == b"inside"
    with pytest.raises(PathRefused, match="outside the adapter roots"):
        ConfinedFile(root / "f", [root.resolve()], "f")
    os.mkfifo(root / "fifo")  # would block a plain open forever
    with pytest.raises(PathRefused, match="not a regular file"):
        ConfinedFile(root / "fifo", [root.resolve()], "fifo")


def test_control_characters_in_paths_and_names_are_400(srv):
    """Issue failure 5: a NUL byte in lora_path used to give 500 'embedded null byte'."""
    for body in ({"lora_name": "x", "lora_path": f"{srv.root}/q4\x00.txt"},
                 {"lora_name": "x", "lora_path": f"{srv.root}/q4\n"},
                 {"lora_name": "x\n", "lora_path": str(srv.root / "q4")},
                 {"lora_name": "x\x00", "lora_path": str(srv.root / "q4")}):
        r = srv.http.post("/v1/load_lora_adapter", json=body)
        assert r.status_code == 400, (body, r.text)
    r = srv.http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": f"{srv.root}/q4\x00"})
    assert error_body(r)["code"] == "invalid_path" and "control character" in error_body(r)["message"]


def test_models_hide_server_paths_unless_asked(srv):
    listed = srv.http.get("/v1/models").json()["data"]
    assert str(srv.root) not in json.dumps(listed)
    assert [m["root"] for m in listed[1:]] == [m["id"] for m in listed[1:]]
    admin = LiveServer(create_app(srv.engine, srv.registry, expose_paths=True))
    try:
        shown = httpx.get(f"{admin.url}/v1/models").json()["data"]
        assert {m["id"]: m["root"] for m in shown[1:]} == {"a1": str(srv.root / "q4"), "a2": str(srv.root / "all8")}
    finally:
        admin.close()


# --------------------------------------------------------------------------------------------
# 5. Text that cannot be served, and the minor points


def test_lone_surrogates_are_400_and_the_connection_stays_open(srv):
    """Issue failure 4: '\\ud800abc' used to give 500 TypeError and close the connection."""
    def raw(path, body):
        return srv.http.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})

    for path, body, param in [
        ("/v1/completions", {"model": "a1", "prompt": "\ud800abc", "max_tokens": 2}, "prompt"),
        ("/v1/completions", {"model": "a1", "prompt": ["ok", "x\udfff"], "max_tokens": 2}, "prompt"),
        ("/v1/completions", {"model": "a1", "prompt": "ok", "stop": ["\ud800"], "max_tokens": 2}, "stop"),
        ("/v1/completions", {"model": "a\ud800", "prompt": "ok", "max_tokens": 2}, "model"),
        ("/v1/chat/completions", {"model": "a1", "messages": [{"role": "user", "content": "\ud800abc"}]}, "messages"),
    ]:
        r = raw(path, body)
        assert r.status_code == 400, r.text
        err = error_body(r)
        assert err["param"] == param and "surrogate" in err["message"], err
        assert complete(srv.http, "a1", PROMPT, 2).status_code == 200  # the same keep-alive connection


def test_minor_points(srv):
    """seed 2**70 names 'seed'; [true, false] is not a token-id prompt; text/plain is a clear 415; non-finite,
    out-of-range and unsupported sampling parameters are 400 naming their field."""
    def post(body, **kw):
        return srv.http.post("/v1/completions", json={"model": "a1", "prompt": PROMPT, "max_tokens": 2, **body}, **kw)

    cases = [({"seed": 2**70}, "seed"), ({"seed": -(2**63) - 1}, "seed"), ({"prompt": [True, False]}, "prompt"),
             ({"prompt": [1.0, 2.0]}, "prompt"), ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"),
             ({"temperature": -1}, "temperature"), ({"max_tokens": 0}, "max_tokens"), ({"n": 0}, "n"),
             ({"presence_penalty": 0.5}, "presence_penalty"), ({"presence_penalty": 3}, "presence_penalty"),
             ({"top_k": 5}, "top_k"), ({"stop": ["x"] * 17}, "stop"), ({"stop": [""]}, "stop")]
    for body, param in cases:
        r = post(body)
        assert r.status_code == 400 and error_body(r)["param"] == param, (body, r.text)
    deep = '{"model": "a1", "prompt": ' + "[" * 900 + "1" + "]" * 900 + "}"  # a recursive check would hit RecursionError
    r = srv.http.post("/v1/completions", content=deep, headers={"content-type": "application/json"})
    assert r.status_code == 400 and error_body(r)["param"] == "prompt", r.text
    for literal in ("NaN", "Infinity"):
        r = srv.http.post("/v1/completions", content=f'{{"model": "a1", "prompt": "x", "temperature": {literal}}}',
                          headers={"content-type": "application/json"})
        assert r.status_code == 400 and error_body(r)["param"] == "temperature", r.text
    assert post({"seed": 2**63 - 1, "temperature": 1.0, "n": 2}).status_code == 200  # the seed of choice 2 wraps
    r = srv.http.post("/v1/completions", content=json.dumps({"model": "a1", "prompt": "x"}),
                      headers={"content-type": "text/plain"})
    assert r.status_code == 415 and "application/json" in error_body(r)["message"], r.text
    r = srv.http.post("/v1/completions", json=["not", "an", "object"])
    assert r.status_code == 400 and "JSON object" in error_body(r)["message"]


def test_an_unexpected_exception_is_a_json_500_on_an_open_connection(srv, monkeypatch):
    monkeypatch.setattr(srv.registry, "names", lambda: 1 / 0)
    r = srv.http.get("/v1/models")
    assert r.status_code == 500 and "ZeroDivisionError" in error_body(r)["message"]
    monkeypatch.undo()
    assert srv.http.get("/v1/models").status_code == 200


# --------------------------------------------------------------------------------------------
# 6. Clients that go away, and shutdown


def test_an_abandoned_non_streamed_request_stops_decoding(srv):
    """Issue failure 6: a client gone after a moment used to leave its 400-token request decoding to the end.
    Now it is cancelled within a step, its cache freed."""
    engine = srv.engine
    cancelled, steps = engine.cancelled_rows, engine.steps
    body = json.dumps({"model": "a2", "prompt": PROMPT, "max_tokens": 400, "temperature": 0, "ignore_eos": True})
    host, port = srv.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
        deadline = time.monotonic() + 30
        while not engine._rows:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        started = engine.steps
    deadline = time.monotonic() + 10
    while engine._rows or engine.cancelled_rows == cancelled:
        assert time.monotonic() < deadline, "the abandoned request kept decoding"
        time.sleep(0.005)
    assert engine.cancelled_rows == cancelled + 1
    assert engine.steps - steps < 300 and engine.steps - started < 100
    assert engine._kv.rows == 0 and not engine._kv.keys  # the cache went with it
    assert complete(srv.http, "a1", PROMPT).status_code == 200


def test_shutdown_drains_then_ends_what_is_left_with_errors_a_client_can_read(srv, tok):
    """Issue failure 7: past the grace, a non-streamed request used to get a plain-text 500 and a stream was cut
    without an error or [DONE]. Now: a JSON 503, and an error event followed by [DONE]."""
    from graft.serve.lifecycle import DrainingServer

    model = fresh_base(srv.cfg, srv.state)
    app, engine = build(model, tokenizer=tok, limits=LIMITS, served_name=BASE)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = DrainingServer(uvicorn.Config(app, log_level="warning"), engine, grace_s=0.2)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    body = {"model": BASE, "prompt": PROMPT, "max_tokens": 400, "temperature": 0, "ignore_eos": True}
    out: dict = {}

    def plain():
        out["plain"] = httpx.post(f"{url}/v1/completions", json=body, timeout=60)

    def streamed():
        with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
            out["lines"] = [line for line in r.iter_lines() if line]

    workers = [threading.Thread(target=plain), threading.Thread(target=streamed)]
    gate, inside = threading.Event(), threading.Event()
    try:
        for w in workers:
            w.start()
        while len(engine._rows) < 2:
            time.sleep(0.005)
        engine.call(lambda: (inside.set(), gate.wait(30)))  # both stay in flight past the grace
        assert inside.wait(30)
        server.should_exit = True  # what SIGTERM does
        time.sleep(0.6)
        gate.set()
        for w in workers:
            w.join(30)
    finally:
        gate.set()
        server.should_exit = True
        thread.join(30)
        engine.shutdown(timeout=30)
    r = out["plain"]
    assert r.status_code == 503 and "shut down" in error_body(r)["message"], r.text
    lines = out["lines"]
    assert lines[-1] == "data: [DONE]", lines[-3:]
    assert "shut down" in json.loads(lines[-2][6:])["error"]["message"]


# --------------------------------------------------------------------------------------------
# 7. Resource limits


def test_token_budget_kv_budget_and_queue_limit(srv):
    """A request over the per-request token budget, or whose cache cannot fit the KV budget even alone, is a
    400; two that fit alone but not together are both served, one after the other; a full queue is a 429."""
    engine, http = srv.engine, srv.http
    ids = srv.engine.tokenizer(PROMPT)["input_ids"]
    tight = LiveServer(create_app(engine, srv.registry, limits=Limits(max_request_tokens=len(ids) + 10)))
    try:
        r = httpx.post(f"{tight.url}/v1/completions", json={"model": "a1", "prompt": PROMPT, "max_tokens": 11})
        assert r.status_code == 400 and "token budget" in error_body(r)["message"], r.text
        assert httpx.post(f"{tight.url}/v1/completions", json={"model": "a1", "prompt": PROMPT, "max_tokens": 10}).status_code == 200
    finally:
        tight.close()
    solo = [complete(http, m, PROMPT, 12).json()["choices"][0]["text"] for m in ("a1", "a2")]
    old = engine.kv_budget_bytes
    engine.kv_budget_bytes = engine.kv_bytes([len(ids) + 12])  # room for exactly one such request
    try:
        r = complete(http, "a1", PROMPT, 13)
        assert r.status_code == 400 and error_body(r)["code"] == "kv_budget_exceeded", r.text
        engine.max_rows_seen = 0
        replies = together(engine, [lambda m=m: complete(http, m, PROMPT, 12) for m in ("a1", "a2")])
        assert [r.json()["choices"][0]["text"] for r in replies] == solo
        assert engine.max_rows_seen == 1  # queued, never side by side
    finally:
        engine.kv_budget_bytes = old
    engine.max_waiting = 1
    try:
        with ThreadPoolExecutor(2) as pool, held(engine, 1):
            first = pool.submit(complete, http, "a1", PROMPT, 2)
            while not engine._waiting:
                time.sleep(0.005)
            second = complete(http, "a1", PROMPT, 2)
        assert second.status_code == 429 and error_body(second)["code"] == "server_busy", second.text
        assert first.result().status_code == 200
    finally:
        engine.max_waiting = 1024
