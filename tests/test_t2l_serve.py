"""graft serve with a Text-to-LoRA hypernetwork and an adapter library, and the same dispatch in front of
a (stand-in) vLLM server. Talked to with the official openai client over loopback HTTP."""

from __future__ import annotations

import json
import socket

import pytest
import torch
from test_serve import LiveServer as ServeLiveServer
from test_t2l import fake_embedder, net_for
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import graft
from graft import models

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
fastapi = pytest.importorskip("fastapi")

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from graft.serve import build
from graft.serve.dispatch import Dispatcher, vllm_app

KEY = "t2l-key"
DESC = "Translate English sentences to Spanish."
PROMPT = "The quick brown fox jumps over"


def LiveServer(app):
    return ServeLiveServer(app, key=KEY, start_timeout=60)


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(models.resolve("smollm2-135m"))


def base_model(tok):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(cfg).eval()


def make_library(tok, root):
    entries = []
    for i, desc in enumerate(["Classify the sentiment of a movie review.", "Answer arithmetic questions."]):
        model = base_model(tok)
        graft.attach(model, graft.LoRA(r=8, targets=("q_proj", "v_proj")))
        g = torch.Generator().manual_seed(50 + i)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.3)
        graft.save(model, root / f"lib{i}")
        entries.append({"name": f"lib{i}", "path": f"lib{i}", "description": desc})
    (root / "manifest.json").write_text(json.dumps(entries))
    return entries


def post(client, path, body):
    """POST through the openai client; an error status comes back as its response too."""
    try:
        return client.post(path, body=body, cast_to=httpx.Response)
    except openai.APIStatusError as err:
        return err.response


def greedy(client, model, max_tokens=8):
    return client.completions.create(model=model, prompt=PROMPT, max_tokens=max_tokens, temperature=0).choices[0].text


@pytest.fixture(scope="module")
def served(tok, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    entries = make_library(tok, root)
    model = base_model(tok)
    net = net_for(model)
    with torch.no_grad():  # a visible adapter: larger B
        for head in net.heads.values():
            head.weight.mul_(20)
    app, engine = build(model, tokenizer=tok, hypernet=net, library=root, adapter_roots=[root], api_keys=[KEY],
                        served_name="tiny", max_loaded=2)
    server = LiveServer(app)
    yield server, net, root, entries, app
    server.close()
    engine.shutdown(timeout=30)
    app.state.dispatcher.close()


def test_generated_adapter_serves_what_the_same_adapter_from_disk_serves(served):
    server, net, root, _, _ = served
    client = server.client()
    reply = post(client, "/generate_lora_adapter", {"lora_name": "es", "description": DESC})
    assert reply.status_code == 200, reply.text
    assert reply.json()["lora_name"] == "es" and reply.json()["generate_ms"] < 1000
    net.write_peft(DESC, root / "es-disk")
    assert post(client, "/load_lora_adapter", {"lora_name": "es-disk", "lora_path": str(root / "es-disk")}).status_code == 200
    generated, from_disk, base = greedy(client, "es"), greedy(client, "es-disk"), greedy(client, "tiny")
    assert generated == from_disk
    assert generated != base, "the generated adapter must change the output"
    assert "es" in [m.id for m in client.models.list().data]
    # served like any other adapter: at most max_loaded=2 in memory, the rest reloaded from its cached files
    greedy(client, "lib0"), greedy(client, "lib1")
    assert greedy(client, "es") == generated
    assert len(served[4].state.registry.loaded()) <= 2


def test_pick_loads_the_nearest_library_adapter(served):
    server, _, _, entries, _ = served
    client = server.client()
    reply = post(client, "/pick_lora_adapter", {"description": entries[1]["description"], "lora_name": "picked"})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["library_name"] == "lib1" and body["similarity"] == pytest.approx(1.0, abs=1e-4)
    assert [c["name"] for c in body["candidates"]] == ["lib1", "lib0"]
    assert greedy(client, "picked") == greedy(client, "lib1")


def test_dispatch_errors(served):
    server, _, _, _, _ = served
    client = server.client()
    for body, code in (({"lora_name": "e1", "description": ""}, 400), ({"lora_name": "e2", "description": "x" * 5000}, 400),
                       ({"lora_name": "bad.name", "description": DESC}, 400), ({"lora_name": "tiny", "description": DESC}, 400),
                       ({"lora_name": "e3"}, 400)):
        reply = post(client, "/generate_lora_adapter", body)
        assert reply.status_code == code, reply.text
        assert reply.json()["error"]["message"]
    post(client, "/generate_lora_adapter", {"lora_name": "twice", "description": DESC})
    assert post(client, "/generate_lora_adapter", {"lora_name": "twice", "description": DESC}).status_code == 400
    assert post(server.client("wrong"), "/generate_lora_adapter", {"lora_name": "x", "description": DESC}).status_code == 401
    assert post(client, "/pick_lora_adapter", {"description": " "}).status_code == 400
    names = [m.id for m in client.models.list().data]
    assert "e1" not in names and "e3" not in names


def test_a_hypernetwork_for_another_base_is_refused(tok, tmp_path):
    net = net_for(base_model(tok))
    net.save(tmp_path / "net")
    other = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, vocab_size=len(tok))).eval()
    with pytest.raises(ValueError, match="another base model"):
        build(other, tokenizer=tok, hypernet=tmp_path / "net")


# --------------------------------------------------------------------------------------------
# In front of vLLM: a stand-in speaking the part of vLLM's API the front uses


def vllm_stand_in():
    """/v1/load_lora_adapter (reads the PEFT files as vLLM would), /v1/unload_lora_adapter, /v1/models and
    /v1/completions answering with the adapter's name and a checksum of its weights."""
    from graft.io import read_config, read_tensors

    app = FastAPI()
    adapters: dict[str, float] = {}
    app.state.loads = []

    @app.post("/v1/load_lora_adapter")
    async def load(request: Request):
        body = await request.json()
        if body["lora_name"] in adapters:
            return JSONResponse({"error": {"message": f"The lora adapter '{body['lora_name']}' has already been loaded."}},
                                status_code=400)
        config = read_config(body["lora_path"])
        assert config["peft_type"] == "LORA"
        adapters[body["lora_name"]] = round(sum(float(t.double().sum()) for t in read_tensors(body["lora_path"]).values()), 6)
        app.state.loads.append(body)
        return PlainTextResponse(f"Success: LoRA adapter '{body['lora_name']}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload(request: Request):
        adapters.pop((await request.json())["lora_name"], None)
        return PlainTextResponse("Success")

    @app.get("/v1/models")
    async def listed():
        return {"object": "list", "data": [{"id": n, "object": "model"} for n in ["base", *adapters]]}

    @app.post("/v1/completions")
    async def complete(request: Request):
        body = await request.json()
        if body["model"] not in adapters and body["model"] != "base":
            return JSONResponse({"error": {"message": "not found"}}, status_code=404)
        text = f"{body['model']}:{adapters.get(body['model'], 0.0)}"
        return {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

    return app


def test_dispatch_in_front_of_vllm(tok, tmp_path):
    make_library(tok, tmp_path / "lib")
    net = net_for(base_model(tok))
    upstream_app = vllm_stand_in()
    upstream = LiveServer(upstream_app)
    front = LiveServer(vllm_app(Dispatcher(net, tmp_path / "lib", cache_dir=tmp_path / "cache"), upstream.url,
                                api_keys=[KEY]))
    try:
        client = front.client()
        reply = post(client, "/generate_lora_adapter", {"lora_name": "es", "description": DESC})
        assert reply.status_code == 200 and reply.json()["engine"] == "vllm", reply.text
        loaded = upstream_app.state.loads[-1]
        assert loaded["lora_name"] == "es" and loaded["lora_path"].startswith(str(tmp_path / "cache"))
        net.write_peft(DESC, tmp_path / "ref")
        from graft.io import read_tensors

        checksum = round(sum(float(t.double().sum()) for t in read_tensors(tmp_path / "ref").values()), 6)
        assert client.completions.create(model="es", prompt="hi", max_tokens=4).choices[0].text == f"es:{checksum}"
        picked = post(client, "/pick_lora_adapter", {"description": "Classify the sentiment of a movie review."}).json()
        assert picked["library_name"] == "lib0" and upstream_app.state.loads[-1]["lora_path"] == str((tmp_path / "lib" / "lib0").resolve())
        assert "lib0" in [m.id for m in client.models.list().data]
        assert post(client, "/generate_lora_adapter", {"lora_name": "es", "description": DESC}).status_code == 400
        assert post(front.client("nope"), "/generate_lora_adapter", {"lora_name": "x", "description": DESC}).status_code == 401
    finally:
        front.close()
        upstream.close()


def test_the_front_says_when_vllm_is_unreachable(tok, tmp_path):
    net = net_for(base_model(tok))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    front = LiveServer(vllm_app(Dispatcher(net, cache_dir=tmp_path / "cache", embedder=fake_embedder), dead))
    try:
        reply = post(front.client(), "/generate_lora_adapter", {"lora_name": "es", "description": DESC})
        assert reply.status_code == 502 and "did not answer" in reply.json()["error"]["message"]
    finally:
        front.close()
