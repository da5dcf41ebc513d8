"""Soak `graft serve` with good and hostile clients at once: no bad request may hurt another user.

    .venv/bin/python benchmarks/serve_soak.py                       # tiny random Llama, 1,000 requests
    .venv/bin/python benchmarks/serve_soak.py --model smollm2-135m  # the real model (slower)
    .venv/bin/python benchmarks/serve_soak.py --requests 200 --concurrency 16   # quicker

The server is the real command line (``python -m graft serve``) in a child process on 127.0.0.1,
with an API key, four LoRA adapters given on the command line and an adapter root. Before the
soak every distinct valid request (4 adapters and the base x prompts x greedy / seeded sampling
x completion / chat x streamed or not) is sent alone: its reply is the reference. Then
``--requests`` requests, ``--hostile`` of them hostile, in a fixed shuffled order, from
``--concurrency`` client threads:

* hostile: a temperature of 1e-40 or 1e-300 (valid: answered, 200), NaN and x1e30 adapter loads,
  an adapter directory whose files link outside the root, a NUL byte in ``lora_path``, lone
  surrogates in prompts and chat messages, malformed JSON, huge prompts (token ids past the limit,
  and bodies past the byte limit), prompt + max_tokens past the per-request token budget, ``seed`` 2**70, a prompt of
  ``[true, false]``, ``text/plain`` bodies, a wrong API key, and abandoned connections (a
  400-token request closed after a moment, streamed or not);
* valid: must equal its solo reference exactly (greedy, and seeded sampling);
* hostile: must get its exact 4xx status (or 200 where the request is valid), never a 5xx.

It reports the counts, latency percentiles, the server's RSS before and after (it must come
back within 10%), and the server's CPU while idle after the soak (abandoned requests that kept
decoding would show there). Everything is bounded: a fixed number of requests with timeouts,
then SIGTERM; the process exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

KEY = "soak-key"
ADAPTERS = ("a0", "a1", "a2", "a3")
PROMPTS = ("Tell me a story about", "The capital of France is", "SELECT name FROM", "Once upon a time",
           "Write a haiku about rain", "def fibonacci(n):")
HOSTILE = ("tiny_temperature", "tinier_temperature", "nan_adapter", "huge_adapter", "escaping_links", "nul_path",
           "surrogate_prompt", "surrogate_chat", "malformed_json", "huge_prompt", "huge_body", "over_context",
           "seed_2_70", "bool_prompt", "text_plain", "wrong_key", "abandoned", "abandoned_stream")


def prepare(args, work: Path) -> tuple[str, Path, Path]:
    """The model (a directory or a built-in name), the adapter root and a directory outside it."""
    import graft
    from graft import models

    root, outside = work / "root", work / "outside"
    if args.model == "tiny":
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tok = AutoTokenizer.from_pretrained(models.resolve("smollm2-135m"))
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512,
                          eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
        torch.manual_seed(0)
        base = LlamaForCausalLM(cfg).eval()
        model_ref = str(work / "model")
        base.save_pretrained(model_ref)
        tok.save_pretrained(model_ref)
        scale, r = 0.3, 8
    else:
        base, _ = models.load(args.model)
        model_ref, scale, r = args.model, 0.02, 8
    state = {k: v.clone() for k, v in base.state_dict().items()}
    for i, name in enumerate((*ADAPTERS, "spare")):
        base.load_state_dict(state)
        graft.attach(base, graft.LoRA(r=r, targets="all-linear"), name="x")
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in base.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * scale)
        graft.save(base, (outside if name == "spare" else root) / name, "x")
        graft.core.detach(base, "x")
    from safetensors.torch import load_file, save_file

    for kind, how in {"nan": lambda t: t.fill_(float("nan")), "huge": lambda t: t * 1e30}.items():
        shutil.copytree(root / "a0", root / kind)
        tensors = load_file(root / kind / "adapter_model.safetensors")
        key = min(k for k in tensors if "lora_B" in k)
        tensors[key] = how(tensors[key].clone())
        save_file(tensors, root / kind / "adapter_model.safetensors")
    (root / "links").mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (root / "links" / f).symlink_to(outside / "spare" / f)
    (work / "keys.txt").write_text(KEY + "\n")
    return model_ref, root, outside


def start_server(args, model_ref: str, root: Path, work: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "graft", "serve", "--model", model_ref, "--host", "127.0.0.1", "--port", str(port),
           "--served-name", "base", "--adapter-root", str(root), "--api-key-file", str(work / "keys.txt"),
           "--max-prompt-tokens", "256", "--max-tokens", "512", "--max-request-tokens", "512", "--max-body-bytes", "65536",
           "--kv-cache-budget", args.kv_budget, "--shutdown-grace", "5"]
    for name in ADAPTERS:
        cmd += ["--adapter", f"{name}={root / name}"]
    log = open(work / "serve.log", "w")  # noqa: SIM115 - the child writes it until it exits
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if args.server_threads:
        env["OMP_NUM_THREADS"] = str(args.server_threads)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"graft serve did not come up:\n{(work / 'serve.log').read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.3)


def proc_status(pid: int) -> tuple[int, float]:
    """(RSS bytes, CPU seconds) of a process."""
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return rss, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------------------------
# Requests


def valid_specs() -> list[dict]:
    """Every distinct valid request of the soak."""
    specs = []
    for i, (model, prompt) in enumerate((m, p) for m in (*ADAPTERS, "base") for p in PROMPTS):
        sampled = i % 3 == 2
        specs.append({"model": model, "chat": i % 4 == 1, "stream": i % 5 == 3, "prompt": prompt,
                      "max_tokens": 6 + (i * 7) % 19, "temperature": 0.8 if sampled else 0.0,
                      "seed": 1000 + i if sampled else None, "ignore_eos": True})
    return specs


def send_valid(http: httpx.Client, spec: dict) -> tuple[int, str | None, str]:
    """(status, text, problem): the text from a whole reply or a stream's joined deltas."""
    body = {"model": spec["model"], "max_tokens": spec["max_tokens"], "temperature": spec["temperature"],
            "ignore_eos": spec["ignore_eos"], "stream": spec["stream"]}
    if spec["seed"] is not None:
        body["seed"] = spec["seed"]
    if spec["chat"]:
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": spec["prompt"]}]
    else:
        path, body["prompt"] = "/v1/completions", spec["prompt"]
    if not spec["stream"]:
        r = http.post(path, json=body)
        if r.status_code != 200:
            return r.status_code, None, r.text[:200]
        choice = r.json()["choices"][0]
        return 200, choice["message"]["content"] if spec["chat"] else choice["text"], ""
    parts, done = [], False
    with http.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            return r.status_code, None, r.read().decode()[:200]
        for line in r.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return 200, None, f"error event: {chunk['error']['message']}"
                for c in chunk["choices"]:
                    parts.append((c["delta"].get("content") or "") if spec["chat"] else c["text"])
    return 200, "".join(parts), "" if done else "no [DONE]"


def send_hostile(http: httpx.Client, url: str, kind: str, root: Path, i: int) -> tuple[int, int | None]:
    """(status, expected status); an abandoned connection has no status (0, None)."""
    post = http.post
    plain = {"model": ADAPTERS[i % 4], "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 8}

    def raw(path: str, text: str, content_type: str = "application/json") -> httpx.Response:
        return post(path, content=text.encode("utf-8", "surrogatepass"), headers={"content-type": content_type})

    if kind in ("tiny_temperature", "tinier_temperature"):
        t = 1e-40 if kind == "tiny_temperature" else 1e-300
        return post("/v1/completions", json={**plain, "temperature": t}).status_code, 200
    if kind in ("nan_adapter", "huge_adapter", "escaping_links", "nul_path"):
        path = {"nan_adapter": root / "nan", "huge_adapter": root / "huge", "escaping_links": root / "links",
                "nul_path": f"{root}/a0\x00"}[kind]
        r = post("/v1/load_lora_adapter", json={"lora_name": f"h{i}", "lora_path": str(path)})
        return r.status_code, 403 if kind == "escaping_links" else 400
    if kind == "surrogate_prompt":
        return raw("/v1/completions", json.dumps({**plain, "prompt": "\ud800abc"})).status_code, 400
    if kind == "surrogate_chat":
        body = {"model": plain["model"], "messages": [{"role": "user", "content": "x\udfffy"}], "max_tokens": 4}
        return raw("/v1/chat/completions", json.dumps(body)).status_code, 400
    if kind == "malformed_json":
        return raw("/v1/completions", json.dumps(plain)[: 10 + i % 20]).status_code, 400
    if kind == "huge_prompt":
        return post("/v1/completions", json={**plain, "prompt": list(range(300, 300 + 257 + i % 50))}).status_code, 400
    if kind == "huge_body":
        return post("/v1/completions", json={**plain, "prompt": "word " * 20000}).status_code, 413
    if kind == "over_context":
        return post("/v1/completions", json={**plain, "max_tokens": 300, "prompt": list(range(300, 556))}).status_code, 400
    if kind == "seed_2_70":
        return post("/v1/completions", json={**plain, "seed": 2**70}).status_code, 400
    if kind == "bool_prompt":
        return post("/v1/completions", json={**plain, "prompt": [True, False]}).status_code, 400
    if kind == "text_plain":
        return raw("/v1/completions", json.dumps(plain), "text/plain").status_code, 415
    if kind == "wrong_key":
        return post("/v1/completions", json=plain, headers={"Authorization": "Bearer nope"}).status_code, 401
    if kind in ("abandoned", "abandoned_stream"):
        abandon(url, {**plain, "max_tokens": 400, "ignore_eos": True, "temperature": 0, "stream": kind == "abandoned_stream"},
                0.05 + (i % 5) * 0.05)
        return 0, None
    raise ValueError(kind)


def abandon(url: str, body: dict, after_s: float) -> None:
    """Send a request on a raw socket and close it after ``after_s`` seconds, reply or not."""
    host, port = url.removeprefix("http://").split(":")
    text = json.dumps(body)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: soak\r\nAuthorization: Bearer {KEY}\r\n"
                   f"Content-Type: application/json\r\nContent-Length: {len(text)}\r\n\r\n{text}").encode())
        time.sleep(after_s)


# --------------------------------------------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="'tiny' (a random 2-layer Llama) or a graft model name")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--hostile", type=float, default=0.2, help="fraction of hostile requests")
    p.add_argument("--concurrency", type=int, default=24)
    p.add_argument("--kv-budget", default="512MB")
    p.add_argument("--seed", type=int, default=21)
    p.add_argument("--server-threads", type=int, default=1,
                   help="torch threads of the server (OMP_NUM_THREADS; 0: torch's default). One is 4-6x faster for "
                        "the tiny model on a loaded 2-core machine, where two threads wait on each other")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="graft-soak-"))
    began = time.monotonic()
    proc = None
    try:
        model_ref, root, _ = prepare(args, work)
        proc, url = start_server(args, model_ref, root, work)
        local = threading.local()
        clients: list[httpx.Client] = []

        def client() -> httpx.Client:
            if not hasattr(local, "http"):
                local.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
                clients.append(local.http)
            return local.http

        specs = valid_specs()
        references = []
        for spec in specs:  # each alone: the reference its batched twin must equal
            status, text, problem = send_valid(client(), {**spec, "stream": False})
            assert status == 200 and text is not None, (spec, problem)
            references.append(text)
        rss_start, _ = proc_status(proc.pid)

        rng = random.Random(args.seed)
        n_hostile = round(args.requests * args.hostile)
        plan = [("hostile", HOSTILE[i % len(HOSTILE)]) for i in range(n_hostile)]
        plan += [("valid", rng.randrange(len(specs))) for _ in range(args.requests - n_hostile)]
        rng.shuffle(plan)

        def run(i: int) -> dict:
            kind, what = plan[i]
            t0 = time.perf_counter()
            try:
                if kind == "valid":
                    status, text, problem = send_valid(client(), specs[what])
                    ok = status == 200 and text == references[what] and not problem
                    if status == 200 and text is not None and text != references[what]:
                        problem = f"text differs from the solo reference: {text!r} != {references[what]!r}"
                    return {"kind": "valid", "status": status, "ok": ok, "problem": problem, "s": time.perf_counter() - t0}
                status, expected = send_hostile(client(), url, what, root, i)
                ok = expected is None or status == expected
                return {"kind": what, "status": status, "ok": ok, "problem": "" if ok else f"got {status}, want {expected}",
                        "s": time.perf_counter() - t0}
            except Exception as err:  # noqa: BLE001 - a transport failure is a finding, not a crash of the soak
                return {"kind": kind if kind == "valid" else what, "status": -1, "ok": False,
                        "problem": f"{type(err).__name__}: {err}", "s": time.perf_counter() - t0}

        soak_began = time.monotonic()
        with ThreadPoolExecutor(args.concurrency) as pool:
            results = list(pool.map(run, range(len(plan))))
        soak_s = time.monotonic() - soak_began
        for c in clients:
            c.close()
        time.sleep(2.0)  # abandoned requests were cancelled within a step; give the allocator a moment
        rss_end, cpu0 = proc_status(proc.pid)
        time.sleep(3.0)
        _, cpu1 = proc_status(proc.pid)
        healthy = httpx.get(f"{url}/health", timeout=10).status_code == 200
        proc.send_signal(signal.SIGTERM)
        exit_code = proc.wait(60)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(30)

    valid = [r for r in results if r["kind"] == "valid"]
    hostile = [r for r in results if r["kind"] != "valid"]
    figures = {
        "model": args.model, "server_threads": args.server_threads, "requests": len(results), "valid": len(valid), "hostile": len(hostile),
        "concurrency": args.concurrency, "soak_s": round(soak_s, 1), "total_s": round(time.monotonic() - began, 1),
        "valid_correct": sum(r["ok"] for r in valid), "hostile_as_expected": sum(r["ok"] for r in hostile),
        "server_errors_5xx": sum(r["status"] >= 500 for r in results),
        "transport_errors": sum(r["status"] == -1 for r in results),
        "cross_request_failures": sum(not r["ok"] for r in valid),
        "latency_valid_p50_s": round(statistics.median(r["s"] for r in valid), 3),
        "latency_valid_p99_s": round(sorted(r["s"] for r in valid)[int(0.99 * (len(valid) - 1))], 3),
        "rss_start_mib": round(rss_start / 2**20, 1), "rss_end_mib": round(rss_end / 2**20, 1),
        "rss_change": round(rss_end / rss_start - 1, 4), "idle_cpu_s_over_3s": round(cpu1 - cpu0, 3),
        "healthy_after": healthy, "exit_code_after_sigterm": exit_code,
        "hostile_kinds": {k: sum(r["kind"] == k for r in hostile) for k in HOSTILE},
    }
    problems = [r for r in results if not r["ok"]][:10]
    print(json.dumps(figures, indent=2))
    for r in problems:
        print("PROBLEM", r)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    passed = (figures["valid_correct"] == len(valid) and figures["hostile_as_expected"] == len(hostile)
              and figures["server_errors_5xx"] == 0 and abs(figures["rss_change"]) <= 0.10 and healthy and exit_code == 0)
    shutil.rmtree(work, ignore_errors=True)
    print("PASS" if passed else "FAIL")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
