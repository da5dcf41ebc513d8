"""graft serve: the OpenAI-compatible server over one tiny Llama and four LoRA adapters of different ranks.

Most tests share one in-process server (uvicorn in a thread, loopback only) and talk to it with the
official ``openai`` client or raw ``httpx``; the CLI test starts ``python -m graft serve`` for real.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import graft
from graft import models

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from graft.serve import Limits, Sampling, build

KEY = "test-key-123"
BASE = "tiny"
ADAPTERS = {  # different ranks, targets and scalings, served side by side
    "q4": {"r": 4, "targets": ("q_proj", "v_proj")},
    "all8": {"r": 8, "targets": "all-linear"},
    "all16": {"r": 16, "targets": "all-linear"},
    "rs8": {"r": 8, "targets": "all-linear", "rslora": True},
}
NAMES = [BASE, *ADAPTERS]
LIMITS = Limits(max_body_bytes=32 * 1024, max_prompt_tokens=200, max_tokens=400, max_n=4)
PROMPT = "The quick brown fox jumps over"
AUTH = {"Authorization": f"Bearer {KEY}"}


# --------------------------------------------------------------------------------------------
# Fixtures and helpers


def tiny_config(tok) -> LlamaConfig:
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512,
                       eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)


def fresh_base(cfg, state) -> LlamaForCausalLM:
    model = LlamaForCausalLM(cfg).eval()
    model.load_state_dict(state)
    return model


def save_adapters(cfg, state, root, seed: int = 0, names=ADAPTERS) -> None:
    """Each adapter perturbed from its (B = 0) init, so it visibly changes what the base says."""
    for i, name in enumerate(names):
        model = fresh_base(cfg, state)
        graft.attach(model, graft.LoRA(**ADAPTERS[name]))
        g = torch.Generator().manual_seed(seed + i)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.3)
        graft.save(model, root / name)


class LiveServer:
    """uvicorn in a daemon thread on a loopback socket bound before it starts (no port race)."""

    def __init__(self, app, key: str = KEY, start_timeout: float = 30) -> None:
        self.key = key
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + start_timeout
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)

    def client(self, key: str | None = None):
        key = self.key if key is None else key
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=120)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(models.resolve("smollm2-135m"))


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tok):
    """A served tiny Llama with four adapters under an adapter root, behind an API key."""
    cfg = tiny_config(tok)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).eval()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    root = tmp_path_factory.mktemp("adapters")
    save_adapters(cfg, state, root)
    outside = tmp_path_factory.mktemp("outside")
    shutil.copytree(root / "all8", outside / "adapter")
    app, engine = build(base, tokenizer=tok, adapters={n: root / n for n in ADAPTERS}, adapter_roots=[root],
                        api_keys=[KEY], limits=LIMITS, served_name=BASE)
    server = LiveServer(app)
    http = httpx.Client(base_url=server.url, headers=AUTH, timeout=120)
    yield SimpleNamespace(cfg=cfg, state=state, root=root, outside=outside, app=app, engine=engine,
                          registry=app.state.registry, server=server, url=server.url, client=server.client(), http=http)
    http.close()
    server.close()
    engine.shutdown(timeout=30)


def greedy(client, model, prompt, max_tokens, **kw):
    return client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, **kw)


def error_body(response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    return body["error"]


def jobs(tok, count: int = 32, seed: int = 5) -> list[tuple[str, list[int], int]]:
    """(model, prompt token ids, max_tokens): spread over the base and the adapters, all different."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        ids = torch.randint(200, len(tok), (3 + (i * 5) % 17,), generator=g).tolist()
        out.append((NAMES[i % len(NAMES)], ids, 3 + (i * 7) % 18))
    return out


def reference_ids(model, ids: list[int], max_tokens: int, eos: int) -> list[int]:
    """Plain transformers greedy decoding of one prompt, cut before EOS as the server does."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_tokens, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    new = out[0, len(ids):].tolist()
    return new[: new.index(eos)] if eos in new else new


@pytest.fixture(scope="module")
def references(stack, tok):
    """Expected token ids of every job: a fresh base copy carrying only that job's adapter (or none)."""
    work = jobs(tok)
    expected: list[list[int] | None] = [None] * len(work)
    for name in NAMES:
        model = fresh_base(stack.cfg, stack.state)
        if name != BASE:
            graft.load(model, stack.root / name)
        for i, (who, ids, max_tokens) in enumerate(work):
            if who == name:
                expected[i] = reference_ids(model, ids, max_tokens, tok.eos_token_id)
    return work, expected


# --------------------------------------------------------------------------------------------
# 1. The OpenAI client


def test_models_lists_base_and_adapters(stack):
    """GET /v1/models: the base first, then every adapter with the base as parent."""
    listed = stack.client.models.list().data
    assert [m.id for m in listed] == NAMES
    assert all(m.parent == BASE for m in listed[1:])


def test_adapters_change_greedy_output(stack):
    """Each adapter (and the base) answers the same prompt differently: the perturbation matters."""
    texts = [greedy(stack.client, name, PROMPT, 8).choices[0].text for name in NAMES]
    assert len(set(texts)) == len(NAMES), texts


def test_completion_text_finish_reason_and_usage(stack, tok):
    """A greedy completion: 'length' after max_tokens, prompt tokens as the tokenizer counts them."""
    r = greedy(stack.client, "all8", PROMPT, 7)
    assert r.object == "text_completion" and r.model == "all8" and len(r.choices) == 1
    prompt_ids = tok(PROMPT)["input_ids"]
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert r.usage.completion_tokens == 7 and r.usage.total_tokens == len(prompt_ids) + 7
    assert r.choices[0].finish_reason == "length"
    alone = stack.engine.generate(prompt_ids, "all8", Sampling(7, 0.0), timeout=60)
    assert r.choices[0].text == alone.text == tok.decode(alone.token_ids, skip_special_tokens=True)


def test_token_id_prompt_equals_text_prompt(stack, tok):
    """A prompt given as token ids is served exactly like the text it encodes."""
    ids = tok(PROMPT)["input_ids"]
    by_ids = greedy(stack.client, "q4", ids, 9)
    by_text = greedy(stack.client, "q4", PROMPT, 9)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)


def test_chat_completion(stack, tok):
    """Chat: the template is applied (prompt tokens), the reply is an assistant message."""
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    r = stack.client.chat.completions.create(model="rs8", messages=messages, max_completion_tokens=6, temperature=0)
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids if isinstance(ids, list) else ids["input_ids"]
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 6)
    assert r.choices[0].message.content == stack.engine.generate(ids, "rs8", Sampling(6, 0.0), timeout=60).text


def test_streamed_completion_equals_unstreamed(stack):
    """Streaming: the deltas join to the non-streamed text, the last choice chunk ends it, usage comes last."""
    plain = greedy(stack.client, "all16", PROMPT, 12)
    chunks = list(greedy(stack.client, "all16", PROMPT, 12, stream=True, stream_options={"include_usage": True}))
    with_choices = [c for c in chunks if c.choices]
    assert len(with_choices) > 1
    assert "".join(c.choices[0].text for c in with_choices) == plain.choices[0].text
    assert [c.choices[0].finish_reason for c in with_choices][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens


def test_streamed_chat_equals_unstreamed(stack):
    """Chat streaming: a role chunk first, content deltas equal to the whole message, usage on request."""
    messages = [{"role": "user", "content": "Tell me a story."}]
    kw = {"model": "q4", "messages": messages, "max_tokens": 10, "temperature": 0}
    plain = stack.client.chat.completions.create(**kw)
    chunks = list(stack.client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choices = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == plain.choices[0].message.content
    assert with_choices[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 10 == plain.usage.completion_tokens
    # Without include_usage there is no usage chunk.
    assert all(c.usage is None for c in stack.client.chat.completions.create(**kw, stream=True))


def test_n_and_seed(stack):
    """n=2 gives two sampled choices; the same seed gives the same two texts again."""
    kw = {"model": "all16", "prompt": PROMPT, "max_tokens": 8, "temperature": 1.0, "n": 2, "seed": 7}
    first = stack.client.completions.create(**kw)
    again = stack.client.completions.create(**kw)
    assert sorted(c.index for c in first.choices) == [0, 1]
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert texts == [c.text for c in sorted(again.choices, key=lambda c: c.index)]
    assert texts[0] != texts[1]  # each choice samples with its own stream
    assert first.usage.completion_tokens == 16
    other = stack.client.completions.create(**{**kw, "seed": 8})
    assert [c.text for c in sorted(other.choices, key=lambda c: c.index)] != texts


def test_stop_string_cuts_output(stack):
    """A stop string taken from the middle of a greedy output ends the text right before it."""
    full = greedy(stack.client, "rs8", PROMPT, 24).choices[0].text
    candidates = [full[k : k + 3] for k in range(len(full) // 3, len(full) - 3)]
    stop = next(s for s in candidates if "\ufffd" not in s and full.find(s) > 0)
    expected = full[: full.find(stop)]
    cut = greedy(stack.client, "rs8", PROMPT, 24, stop=[stop, "never-seen-xyz"])
    assert cut.choices[0].text == expected and cut.choices[0].finish_reason == "stop"
    streamed = list(greedy(stack.client, "rs8", PROMPT, 24, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"


# --------------------------------------------------------------------------------------------
# 2. Errors


def test_client_errors_have_the_right_class_status_and_code(stack):
    """The openai client raises the exception class that matches each refusal."""
    c = stack.client
    with pytest.raises(openai.AuthenticationError) as err:
        stack.server.client("wrong-key").completions.create(model=BASE, prompt=PROMPT, max_tokens=2)
    assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        stack.server.client("wrong-key").models.list()
    with pytest.raises(openai.NotFoundError) as err:
        greedy(c, "no-such-adapter", PROMPT, 2)
    assert err.value.status_code == 404 and err.value.code == "model_not_found" and err.value.param == "model"
    with pytest.raises(openai.BadRequestError) as err:
        greedy(c, "all8", list(range(300, 300 + LIMITS.max_prompt_tokens + 1)), 2)
    assert err.value.status_code == 400 and err.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model="all8", messages=[{"role": "user", "content": "word " * 600}], max_tokens=2)
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as err:
        greedy(c, "all8", PROMPT, LIMITS.max_tokens + 1)
    assert err.value.status_code == 400 and err.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as err:
        greedy(c, "all8", PROMPT, 2, logprobs=2)
    assert err.value.param == "logprobs"
    with pytest.raises(openai.BadRequestError) as err:
        c.completions.create(model="all8", prompt=PROMPT, max_tokens=2, temperature=2.5)
    assert err.value.status_code == 400 and err.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as err:
        c.completions.create(model="all8", prompt=PROMPT, max_tokens=2, n=LIMITS.max_n + 1)
    assert err.value.param == "n"
    with pytest.raises(openai.BadRequestError):
        greedy(c, "all8", [len(stack.engine.tokenizer) + 5], 2)  # a token id outside the vocabulary


def test_raw_http_errors_keep_the_openai_shape(stack):
    """Malformed requests get a 4xx with {"error": {message, type, param, code}}, never a crash."""
    url = stack.url
    r = httpx.post(f"{url}/v1/completions", json={"model": BASE, "prompt": PROMPT})
    assert r.status_code == 401 and error_body(r)["code"] == "invalid_api_key"  # no key at all
    r = httpx.post(f"{url}/v1/completions", json={"model": BASE, "prompt": PROMPT}, headers={"Authorization": KEY})
    assert r.status_code == 401  # the key without "Bearer "
    r = stack.http.post("/v1/completions", content=b'{"model": "tiny", "prompt": ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and error_body(r)["code"] == "invalid_json"
    r = stack.http.post("/v1/completions", json={"prompt": PROMPT})
    assert r.status_code == 400 and error_body(r)["param"] == "model"
    r = stack.http.post("/v1/completions", json={"model": BASE, "prompt": PROMPT, "max_tokens": "many"})
    assert r.status_code == 400 and error_body(r)["param"] == "max_tokens"
    r = stack.http.post("/v1/completions", json={"model": BASE, "prompt": []})
    assert r.status_code == 400
    r = stack.http.post("/v1/chat/completions", json={"model": BASE, "messages": []})
    assert r.status_code == 400 and error_body(r)
    big = {"model": BASE, "prompt": "x" * (LIMITS.max_body_bytes + 10)}
    r = stack.http.post("/v1/completions", json=big)
    assert r.status_code == 413 and error_body(r)["code"] == "body_too_large"

    def chunked():  # no content-length: the limit must hold while reading
        for _ in range(LIMITS.max_body_bytes // 1024 + 2):
            yield b" " * 1024

    r = stack.http.post("/v1/completions", content=chunked(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and error_body(r)["code"] == "body_too_large"
    r = stack.http.get("/v1/nothing-here")
    assert r.status_code == 404 and error_body(r)["type"] == "not_found_error"
    r = stack.http.get("/v1/completions")
    assert r.status_code == 405 and error_body(r)
    # ... and the server still answers a good request the same as before.
    r = stack.http.post("/v1/completions", json={"model": "all8", "prompt": PROMPT, "max_tokens": 7, "temperature": 0})
    assert r.status_code == 200
    assert r.json()["choices"][0]["text"] == greedy(stack.client, "all8", PROMPT, 7).choices[0].text
    assert stack.http.get("/health").json() == {"status": "ok"}


# --------------------------------------------------------------------------------------------
# 3. Isolation: no row sees another row's adapter


def test_concurrent_requests_equal_requests_sent_alone(stack, tok, references):
    """32 concurrent requests over four adapters and the base, batched, each exactly as when sent alone."""
    work, expected = references
    stack.engine.max_rows_seen = 0
    alone = [greedy(stack.client, name, ids, k) for name, ids, k in work]
    assert stack.engine.max_rows_seen == 1  # sent one by one: nothing to batch with
    with ThreadPoolExecutor(len(work)) as pool:
        together = list(pool.map(lambda job: greedy(stack.client, *job), work))
    assert stack.engine.max_rows_seen > 1, "the concurrent requests were never batched"
    for (name, ids, k), a, b, ref in zip(work, alone, together, expected):
        assert a.choices[0].text == tok.decode(ref, skip_special_tokens=True), name
        assert a.usage.completion_tokens == len(ref)
        assert a.choices[0].finish_reason == ("length" if len(ref) == k else "stop")
        assert (b.choices[0].text, b.choices[0].finish_reason, b.usage.completion_tokens, b.model) == (
            a.choices[0].text, a.choices[0].finish_reason, a.usage.completion_tokens, name)


def test_batched_tokens_equal_single_adapter_reference(stack, references):
    """Token for token, batched decoding through each adapter equals transformers' generate on a fresh
    base copy that carries only that adapter (and the base rows equal the plain base)."""
    work, expected = references
    stack.engine.max_rows_seen = 0
    with ThreadPoolExecutor(len(work)) as pool:
        results = list(pool.map(
            lambda job: stack.engine.generate(job[1], None if job[0] == BASE else job[0], Sampling(job[2], 0.0), timeout=60),
            work,
        ))
    assert stack.engine.max_rows_seen > 1
    for (name, _, _), result, ref in zip(work, results, expected):
        assert result.token_ids == ref, name
    # Guard against a vacuous pass: the references of different adapters differ on the same prompt.
    ids = work[0][1]
    outputs = {name: tuple(stack.engine.generate(ids, None if name == BASE else name, Sampling(6, 0.0)).token_ids)
               for name in NAMES}
    assert len(set(outputs.values())) == len(NAMES)


def test_bf16_base_serves_adapters_in_bf16(stack, tok):
    """``adapter_dtype="auto"`` casts adapters to a bf16 base's dtype (so LoRA runs in bf16, no casts), and
    what it serves equals transformers' generate on a bf16 base carrying that adapter cast the same way;
    ``fp32`` keeps them as loaded."""
    base = fresh_base(stack.cfg, stack.state).to(torch.bfloat16)
    _, engine = build(base, tokenizer=tok, adapters={"all8": stack.root / "all8"}, served_name=BASE)
    _, kept = build(fresh_base(stack.cfg, stack.state).to(torch.bfloat16), tokenizer=tok,
                    adapters={"all8": stack.root / "all8"}, served_name=BASE, adapter_dtype="fp32")
    try:
        served = graft.core.adapter_parameters(base, "all8")
        assert served and {p.dtype for p in served.values()} == {torch.bfloat16}
        assert {p.dtype for p in graft.core.adapter_parameters(kept.model, "all8").values()} == {torch.float32}
        ref = fresh_base(stack.cfg, stack.state).to(torch.bfloat16)
        graft.load(ref, stack.root / "all8", name="all8")
        with torch.no_grad():
            for p in graft.core.adapter_parameters(ref, "all8").values():
                p.data = p.data.to(torch.bfloat16)
        for _, ids, max_tokens in jobs(tok, count=4, seed=11):
            got = engine.generate(ids, "all8", Sampling(max_tokens, 0.0), timeout=60).token_ids
            assert got == reference_ids(ref, ids, max_tokens, tok.eos_token_id)
    finally:
        engine.shutdown(timeout=30)
        kept.shutdown(timeout=30)
    with pytest.raises(ValueError, match="adapter_dtype must be 'auto' or one of"):
        build(base, tokenizer=tok, adapter_dtype="int8")


def test_idle_engine_gives_back_its_cache(stack, tok):
    """Once a burst has drained, the batch's key/value buffers (sized for the burst) are freed."""
    work = jobs(tok, count=24, seed=9)
    peak = []

    def run(job):
        result = stack.engine.generate(job[1], None if job[0] == BASE else job[0], Sampling(job[2], 0.0), timeout=60)
        peak.append(stack.engine._kv.nbytes())
        return result

    with ThreadPoolExecutor(len(work)) as pool:
        list(pool.map(run, work))
    assert max(peak) > 0
    deadline = time.monotonic() + 10
    while stack.engine._kv.nbytes() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stack.engine._kv.nbytes() == 0


# --------------------------------------------------------------------------------------------
# 4. Loading and unloading adapters


def test_an_adapter_gone_before_admission_is_a_404_for_its_request(stack):
    """Between the HTTP check and the engine's admission an adapter can be unloaded: that request gets the
    registry's 404 (status carried on the event), not a 500."""
    done = threading.Event()
    events = []

    def sink(event):
        events.append(event)
        if event.finish_reason is not None:
            done.set()

    stack.engine.submit([520, 3075, 314], sink, adapter="unloaded-meanwhile", sampling=Sampling(max_tokens=2),
                        stream=False)
    assert done.wait(60)
    last = events[-1]
    assert last.finish_reason == "error" and last.status == 404 and "unloaded-meanwhile" in last.error


def test_that_404_reaches_the_http_client(stack, monkeypatch):
    from graft.serve.registry import AdapterError

    def gone(name):
        raise AdapterError(f"no adapter named {name!r}", status=404, code="model_not_found")

    monkeypatch.setattr(stack.registry, "acquire", gone)  # the HTTP check passed; the adapter went before admission
    r = stack.http.post("/v1/completions", json={"model": "all8", "prompt": PROMPT, "max_tokens": 2})
    assert r.status_code == 404 and error_body(r)["code"] == "model_not_found", r.text


def test_adapters_that_rewrite_the_base_are_refused(stack):
    """A checkpoint whose loading rewrites the shared base weights (peft PiSSA/OLoRA saved unconverted, LoftQ)
    is refused with a 400 that says why, and the base answers exactly as before."""
    root, http = stack.root, stack.http
    before = greedy(stack.client, BASE, PROMPT, 8).choices[0].text
    for init in ("pissa", "loftq"):
        path = root / f"rewrites-{init}"
        shutil.copytree(root / "all8", path)
        config = json.loads((path / "adapter_config.json").read_text())
        config["init_lora_weights"] = init
        if init == "loftq":
            config["loftq_config"] = {"loftq_bits": 4, "loftq_iter": 1, "graft": {"iters": 1}}
        (path / "adapter_config.json").write_text(json.dumps(config))
        r = http.post("/v1/load_lora_adapter", json={"lora_name": f"rw-{init}", "lora_path": str(path)})
        assert r.status_code == 400, r.text
        assert "rewrites the base weights" in error_body(r)["message"]
    assert not [m.id for m in stack.client.models.list() if m.id.startswith("rw-")]
    assert greedy(stack.client, BASE, PROMPT, 8).choices[0].text == before


def test_load_and_unload_over_http(stack):
    """Loading from inside the root works; outside paths, traversal and escaping symlinks are refused."""
    root, http = stack.root, stack.http

    def load(name, path):
        return http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})

    r = load("extra", root / "all16")
    assert r.status_code == 200, r.text
    assert "extra" in [m.id for m in stack.client.models.list()]
    assert greedy(stack.client, "extra", PROMPT, 8).choices[0].text == greedy(stack.client, "all16", PROMPT, 8).choices[0].text

    (root / "escape").symlink_to(stack.outside / "adapter", target_is_directory=True)
    (root / "not-an-adapter").mkdir()
    for path in [stack.outside / "adapter", f"{root}/../{stack.outside.name}/adapter", root / "escape", "/etc"]:
        r = load("evil", path)
        assert r.status_code == 403 and error_body(r)["code"] == "path_not_allowed", path
    r = load("evil", root / "not-an-adapter")
    assert r.status_code == 404 and error_body(r)["code"] == "adapter_not_found"
    r = load("evil", root / "missing")
    assert r.status_code == 404
    r = load("extra", root / "all8")
    assert r.status_code == 400 and error_body(r)["code"] == "adapter_exists"
    assert load(BASE, root / "all8").status_code == 400  # the base model's name
    assert load("bad name", root / "all8").status_code == 400
    assert "evil" not in [m.id for m in stack.client.models.list()]

    r = http.post("/v1/unload_lora_adapter", json={"lora_name": "extra"})
    assert r.status_code == 200, r.text
    assert "extra" not in [m.id for m in stack.client.models.list()]
    assert "extra" not in stack.registry.loaded()
    with pytest.raises(openai.NotFoundError):
        greedy(stack.client, "extra", PROMPT, 2)
    r = http.post("/v1/unload_lora_adapter", json={"lora_name": "extra"})
    assert r.status_code == 404 and error_body(r)["code"] == "model_not_found"
    # The name is free again; the other adapters were never disturbed.
    assert load("extra", root / "q4").status_code == 200
    assert greedy(stack.client, "extra", PROMPT, 8).choices[0].text == greedy(stack.client, "q4", PROMPT, 8).choices[0].text
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "extra"}).status_code == 200
    assert [m.id for m in stack.client.models.list()] == NAMES


def test_lru_reloads_evicted_adapters(stack, tok):
    """max_loaded=2 over four adapters: round-robin requests all succeed with unchanged outputs,
    at most two adapters stay in memory, and evicted ones are read from disk again."""
    model = fresh_base(stack.cfg, stack.state)
    app, engine = build(model, tokenizer=tok, adapters={n: stack.root / n for n in ADAPTERS}, max_loaded=2,
                        limits=LIMITS, served_name=BASE)
    registry = app.state.registry
    server = LiveServer(app)
    try:
        client = server.client("unused")  # this server has no keys
        prompts = [PROMPT, "Once upon a time", "SELECT * FROM"]
        want = {(n, p): greedy(stack.client, n, p, 6).choices[0].text for n in ADAPTERS for p in prompts}
        assert len(registry.loaded()) == 2
        loads = registry.loads
        for i in range(8):
            name, prompt = list(ADAPTERS)[i % 4], prompts[i % 3]
            assert greedy(client, name, prompt, 6).choices[0].text == want[name, prompt]
            assert len(registry.loaded()) <= 2
        assert registry.loads >= loads + 6  # round-robin over 4 with room for 2: nearly every request reloads
        work = [(list(ADAPTERS)[i % 4], prompts[i % 3]) for i in range(12)]
        with ThreadPoolExecutor(12) as pool:
            texts = list(pool.map(lambda job: greedy(client, job[0], job[1], 6).choices[0].text, work))
        assert texts == [want[job] for job in work]
        assert len(registry.loaded()) <= 2
        assert sorted(registry.names()) == sorted(ADAPTERS)
    finally:
        server.close()
        engine.shutdown(timeout=30)


# --------------------------------------------------------------------------------------------
# 5. The command line


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serve_rejects_bad_adapter_flag():
    """`graft serve --adapter bad` (no NAME=) exits with status 2 and says what it wants."""
    done = subprocess.run([sys.executable, "-m", "graft", "serve", "--model", "unused", "--adapter", "bad"],
                          check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "NAME=DIR" in done.stderr and "'bad'" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_cli_serve_finishes_in_flight_request_on_sigterm(stack, tok, tmp_path):
    """SIGTERM during a 300-token request: the request still completes in full, then the process exits 0."""
    model_dir = tmp_path / "model"
    fresh_base(stack.cfg, stack.state).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    (tmp_path / "keys.txt").write_text(f"# keys\n\n{KEY}\n")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "serve.log", "w+")  # noqa: SIM115 - read after the process ends
    proc = subprocess.Popen(
        [sys.executable, "-m", "graft", "serve", "--model", str(model_dir), "--port", str(port), "--served-name", BASE,
         "--api-key-file", str(tmp_path / "keys.txt"), "--max-tokens", "400"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"graft serve exited early:\n{(tmp_path / 'serve.log').read_text()}"
            assert time.monotonic() < deadline, "graft serve did not come up"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        assert httpx.get(f"{url}/v1/models").status_code == 401  # the key file is in force

        chunks, arrived, started, outcome = [], [], threading.Event(), {}

        def request():
            body = {"model": BASE, "prompt": PROMPT, "max_tokens": 300, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=AUTH, timeout=120) as r:
                outcome["status"] = r.status_code
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        outcome["done"] = True
                    elif line.startswith("data: "):
                        chunks.append(json.loads(line[6:]))
                        arrived.append(time.monotonic())
                        started.set()

        thread = threading.Thread(target=request)
        thread.start()
        assert started.wait(60), "the request never started streaming"
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        thread.join(120)
        assert not thread.is_alive()
        code = proc.wait(60)
        output = (tmp_path / "serve.log").read_text()
        assert outcome == {"status": 200, "done": True}, output
        assert arrived[-1] > signalled  # the request really was in flight when the signal came
        finished = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
        assert finished[-1] == "length"
        assert chunks[-1]["usage"]["completion_tokens"] == 300
        assert code == 0, output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        log.close()


# --------------------------------------------------------------------------------------------
# 6. Soak


def test_soak_mixed_good_and_malformed_requests(stack):
    """500 requests from 16 threads, 10% malformed in a fixed mix: every one gets its exact status."""
    rng = random.Random(20240601)
    bad = ["bad_json", "unknown_model", "too_long", "bad_key"]
    kinds = ["good"] * 450 + [bad[i % 4] for i in range(50)]
    rng.shuffle(kinds)
    expected = {"good": 200, "bad_json": 400, "unknown_model": 404, "too_long": 400, "bad_key": 401}
    codes = {"bad_json": "invalid_json", "unknown_model": "model_not_found", "too_long": "context_length_exceeded",
             "bad_key": "invalid_api_key"}
    local, clients = threading.local(), []

    def send(i: int):
        if not hasattr(local, "http"):
            local.http = httpx.Client(base_url=stack.url, headers=AUTH, timeout=120)
            clients.append(local.http)
        kind = kinds[i]
        body = {"model": NAMES[i % len(NAMES)], "prompt": f"Request number {i} says", "max_tokens": 4, "temperature": 0}
        headers = {}
        if kind == "unknown_model":
            body["model"] = f"ghost-{i}"
        elif kind == "too_long":
            body["prompt"] = list(range(500, 500 + LIMITS.max_prompt_tokens + 1 + i % 7))
        elif kind == "bad_key":
            headers["Authorization"] = f"Bearer not-{KEY}"
        if kind == "bad_json":
            r = local.http.post("/v1/completions", content=json.dumps(body)[:-3].encode(),
                                headers={"content-type": "application/json"})
        else:
            r = local.http.post("/v1/completions", json=body, headers=headers)
        return kind, r.status_code, r.json()

    try:
        with ThreadPoolExecutor(16) as pool:
            replies = list(pool.map(send, range(len(kinds))))
    finally:
        for client in clients:
            client.close()
    for i, (kind, status, body) in enumerate(replies):
        assert status == expected[kind], (i, kind, body)
        if kind == "good":
            assert body["usage"]["completion_tokens"] == 4 and body["choices"][0]["finish_reason"] == "length"
        else:
            assert body["error"]["code"] == codes[kind], (i, kind, body)
    assert sum(k != "good" for k in kinds) == 50
    assert greedy(stack.client, "all8", PROMPT, 3).usage.completion_tokens == 3


# --------------------------------------------------------------------------------------------
# 7. Memory


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        lines = f.read().splitlines()
    for line in lines:
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads RSS from /proc")
def test_rss_returns_after_loading_and_unloading_fifty_adapters(tmp_path):
    """SmolLM2 served in-process: 50 r=16 adapters loaded, used and unloaded over HTTP leave RSS
    within 10% of where it started (and it did grow while they were loaded)."""
    from graft.core import detach

    model, tok = models.load("smollm2-135m")
    root = tmp_path / "root"
    graft.attach(model, graft.LoRA(r=16, targets="all-linear"), name="proto")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.01)
    graft.save(model, root / "proto", "proto")
    detach(model, "proto")
    adapter_bytes = (root / "proto" / "adapter_model.safetensors").stat().st_size
    for i in range(50):
        (root / f"a{i}").mkdir()
        for f in (root / "proto").iterdir():
            (root / f"a{i}" / f.name).symlink_to(f)

    app, engine = build(model, tokenizer=tok, adapter_roots=[root], served_name="smol")
    server = LiveServer(app)
    http = httpx.Client(base_url=server.url, timeout=120)
    try:
        def cycle(names, during=None):
            for name in names:
                r = http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(root / name)})
                assert r.status_code == 200, r.text
            for name in names:
                r = http.post("/v1/completions", json={"model": name, "prompt": "Hello", "max_tokens": 2, "temperature": 0})
                assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text
            if during is not None:
                during.append(_rss_bytes())
            for name in names:
                assert http.post("/v1/unload_lora_adapter", json={"lora_name": name}).status_code == 200

        cycle(["proto"])  # warm-up: allocator pools, code paths, the first request
        start = _rss_bytes()
        peak: list[int] = []
        cycle([f"a{i}" for i in range(50)], during=peak)
        end = _rss_bytes()
        assert not app.state.registry.names() and not app.state.registry.loaded()
        assert peak[0] - start > 25 * adapter_bytes, (start, peak, end)  # the measurement can see a leak
        assert abs(end - start) < 0.10 * start, f"RSS {start / 2**20:.0f} MiB -> {end / 2**20:.0f} MiB"
    finally:
        http.close()
        server.close()
        engine.shutdown(timeout=30)
