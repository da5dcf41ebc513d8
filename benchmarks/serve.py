"""graft serve vs peft's mixed-batch generate vs one request at a time: many adapters, one base.

    .venv/bin/python benchmarks/serve.py                   # 64 requests over 8 adapters, 64 new tokens
    .venv/bin/python benchmarks/serve.py --dtype bf16      # both sides in bf16
    .venv/bin/python benchmarks/serve.py --requests 16 --sequential 4   # quicker

Model SmolLM2-135M-Instruct on the CPU. Eight LoRA adapters (ranks 8 and 16 alternating, all
linear layers, B drawn small so answers stay fluent) are saved in the PEFT format; peft loads the
same files. Requests are the first Alpaca instructions (``../shared/data/alpaca``, or the bundled
demo questions when that folder is absent) in the chat template, request i on adapter i mod 8,
greedy, at most ``--max-tokens`` new tokens (a request ends early at EOS, as a server's would).

* **graft serve**: the real HTTP server (uvicorn in this process, loopback), all requests sent
  at once by an asyncio client; continuous batching, each prompt prefilled unpadded.
* **(a) peft mixed batch**: ``PeftModel.generate(..., adapter_names=[...])`` on all requests in
  one left-padded batch, the best case for peft (one call, largest batch); every request's
  latency is the batch's. It runs in a child process while the server sits idle (run in the
  server's process it was measured to slow graft's following run by ~20%).
* **(b) one at a time**: the same server, one request after another (``--sequential`` of them;
  throughput is tokens per second, so a subset measures it).

graft and peft alternate for ``--rounds`` rounds and the median of the paired ratios is reported (this machine's speed drifts by 15% or more from minute to minute), with
every round's figures; the table shows the median round. Throughput counts generated tokens (EOS
excluded) per wall second. The peft and graft outputs
are compared token by token as a check that both serve the same adapters. Run on an idle machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
ALPACA = ROOT.parent / "shared" / "data" / "alpaca" / "alpaca_first100.json"
FALLBACK = ROOT / "src" / "graft" / "assets" / "demo_facts_heldout.jsonl"


def instructions(n: int) -> list[str]:
    if ALPACA.exists():
        rows = json.loads(ALPACA.read_text())
        texts = [r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "") for r in rows]
    else:
        texts = [json.loads(line)["question"] for line in FALLBACK.read_text().splitlines() if line.strip()]
    return [texts[i % len(texts)] for i in range(n)]


def make_adapters(model, root: Path, count: int, seed: int) -> list[str]:
    import graft

    names = []
    for i in range(count):
        name = f"a{i}"
        graft.attach(model, graft.LoRA(r=8 if i % 2 == 0 else 16, alpha=16, targets="all-linear"), name=name)
        g = torch.Generator().manual_seed(seed + i)
        with torch.no_grad():
            for key, p in graft.core.adapter_parameters(model, name).items():
                if "lora_B" in key:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.01)
        graft.save(model, root / name, name)
        graft.detach(model, name)
        names.append(name)
    return names


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def load_peft(root: Path, adapters: list[str], dtype):
    from peft import PeftModel

    from graft import models

    model, tok = models.load("smollm2-135m", dtype=dtype)
    names = sorted(set(adapters))
    peft_model = PeftModel.from_pretrained(model, root / names[0], adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(root / name, adapter_name=name)
    return peft_model.eval(), tok


def run_peft(args, peft_model, tok, prompts: list[list[int]], adapters: list[str]) -> dict:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    eos = peft_model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos]) | {tok.eos_token_id}
    began = time.perf_counter()
    with torch.no_grad():
        out = peft_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.max_tokens,
                                  do_sample=False, adapter_names=adapters, pad_token_id=tok.pad_token_id,
                                  **({"min_new_tokens": args.max_tokens} if args.ignore_eos else {}))
    wall = time.perf_counter() - began
    outputs = []
    for row in out[:, width:].tolist():
        kept = []
        for t in row:
            if t in eos and not args.ignore_eos:
                break
            kept.append(t)
        outputs.append(kept)
    return {"wall": wall, "tokens": sum(map(len, outputs)), "latencies": [wall] * len(prompts), "outputs": outputs}


def peft_in_subprocess(args, root: Path) -> dict:
    """Run (a) in a child process (it loads the model and the saved adapters itself) and read its result."""
    import subprocess
    import sys

    cmd = [sys.executable, __file__, "--peft-child", str(root), "--requests", str(args.requests), "--adapters",
           str(args.adapters), "--max-tokens", str(args.max_tokens), "--dtype", args.dtype]
    if args.ignore_eos:
        cmd.append("--ignore-eos")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def start_server(args, root: Path, names: list[str], dtype_name: str):
    import uvicorn

    from graft.serve import Limits, build

    app, engine = build("smollm2-135m", adapters={n: root / n for n in names}, dtype=dtype_name,
                        served_name="smollm2-135m", max_batch=args.max_batch, limits=Limits(max_tokens=4096))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, thread, engine, f"http://127.0.0.1:{port}/v1"


async def send_all(url: str, prompts: list[list[int]], adapters: list[str], max_tokens: int, concurrent: bool,
                   ignore_eos: bool = False) -> dict:
    import httpx

    async def one(client, p, a):
        began = time.perf_counter()
        r = await client.post(f"{url}/completions", json={"model": a, "prompt": p, "max_tokens": max_tokens, "temperature": 0,
                                                           "ignore_eos": ignore_eos})
        r.raise_for_status()
        body = r.json()
        return time.perf_counter() - began, body["usage"]["completion_tokens"], body["choices"][0]["text"]

    async with httpx.AsyncClient(timeout=3600, limits=httpx.Limits(max_connections=256)) as client:
        began = time.perf_counter()
        if concurrent:
            results = await asyncio.gather(*(one(client, p, a) for p, a in zip(prompts, adapters)))
        else:
            results = [await one(client, p, a) for p, a in zip(prompts, adapters)]
        wall = time.perf_counter() - began
    return {"wall": wall, "tokens": sum(r[1] for r in results), "latencies": [r[0] for r in results], "texts": [r[2] for r in results]}


def row(name: str, r: dict) -> str:
    lat = r["latencies"]
    return (f"| {name} | {len(lat)} | {r['tokens']} | {r['wall']:.1f} | {r['tokens'] / r['wall']:.1f} | "
            f"{statistics.median(lat):.2f} | {percentile(lat, 0.95):.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--sequential", type=int, default=16, help="requests sent one at a time for (b)")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=3, help="graft and peft runs alternate this many times; the median ratio is reported")
    p.add_argument("--ignore-eos", action="store_true", help="every request decodes exactly --max-tokens tokens")
    p.add_argument("--peft-child", type=Path, help=argparse.SUPPRESS)  # internal: run (a) on the adapters saved there
    args = p.parse_args()
    torch.manual_seed(args.seed)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]

    from graft import models

    def chat_prompts(tok) -> list[list[int]]:
        return [list(tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"]) for t in instructions(args.requests)]

    if args.peft_child is not None:
        adapters = [f"a{i % args.adapters}" for i in range(args.requests)]
        peft_model, tok = load_peft(args.peft_child, adapters, dtype)
        print(json.dumps(run_peft(args, peft_model, tok, chat_prompts(tok), adapters)))
        return
    model, tok = models.load("smollm2-135m", dtype=dtype)
    prompts = chat_prompts(tok)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        names = make_adapters(model, root, args.adapters, args.seed)
        del model
        adapters = [names[i % len(names)] for i in range(args.requests)]
        lengths = [len(q) for q in prompts]
        print(f"{args.requests} requests over {len(names)} adapters, prompt tokens mean {statistics.mean(lengths):.0f} "
              f"max {max(lengths)}, max_tokens {args.max_tokens}, {args.dtype}, torch threads {torch.get_num_threads()}")

        server, thread, engine, url = start_server(args, root, names, args.dtype)
        asyncio.run(send_all(url, prompts[:2], adapters[:2], 4, True))  # warm-up
        # graft and peft alternate, round after round: a machine whose speed drifts (shared cores,
        # a noisy VM) then moves both sides of each paired ratio alike.
        rounds = []
        for i in range(args.rounds):
            engine.timing = dict.fromkeys(engine.timing, 0)
            steps0 = engine.steps
            graft_run = asyncio.run(send_all(url, prompts, adapters, args.max_tokens, True, args.ignore_eos))
            t = engine.timing
            print(f"round {i + 1} graft serve: {graft_run['wall']:.1f} s, batch up to {engine.max_rows_seen} rows; engine: "
                  f"prefill {t['prefill_s']:.1f} s ({t['prefill_positions']} positions in {t['prefill_batches']} batches), "
                  f"decode {t['decode_s']:.1f} s ({engine.steps - steps0} steps, {t['decode_rows']} rows)", flush=True)
            # In a fresh process while this one sits idle: peft's generate run in this process (on
            # the main thread, or on the engine's) was measured to slow graft's next run by ~20%.
            peft_run = peft_in_subprocess(args, root)
            print(f"round {i + 1} peft mixed batch: {peft_run['wall']:.1f} s", flush=True)
            rounds.append((graft_run, peft_run))
        k = min(args.sequential, args.requests)
        seq_run = asyncio.run(send_all(url, prompts[:k], adapters[:k], args.max_tokens, False, args.ignore_eos))
        print(f"one at a time ({k}): {seq_run['wall']:.1f} s", flush=True)
        server.should_exit = True
        thread.join()
        engine.shutdown()
        del engine, server

    def tps(r: dict) -> float:
        return r["tokens"] / r["wall"]

    ratios = [tps(g) / tps(p_) for g, p_ in rounds]
    median = statistics.median(ratios)
    graft_run, peft_run = rounds[ratios.index(sorted(ratios)[(len(ratios) - 1) // 2])]  # the median round (lower middle)
    peft_texts = [tok.decode(o, skip_special_tokens=True) for o in peft_run["outputs"]]
    same = sum(a == b for a, b in zip(graft_run["texts"], peft_texts))
    print()
    print("| run | requests | generated tokens | wall s | tokens/s | latency p50 s | latency p95 s |")
    print("|---|---|---|---|---|---|---|")
    print(row("graft serve (continuous batching, HTTP)", graft_run))
    print(row("(a) peft mixed-batch generate, one batch", peft_run))
    print(row("(b) graft serve, one request at a time", seq_run))
    print()
    print("per round, graft s / peft s / ratio: " + "; ".join(
        f"{g['wall']:.1f} / {p_['wall']:.1f} / {r:.2f}x" for (g, p_), r in zip(rounds, ratios)))
    print(f"throughput graft / (a) peft mixed batch: median {median:.2f}x over {len(ratios)} rounds "
          f"(min {min(ratios):.2f}x, max {max(ratios):.2f}x; target >= 2x)")
    print(f"throughput graft / (b) one at a time:   {tps(graft_run) / tps(seq_run):.2f}x (median round; target >= 4x)")
    print(f"identical texts graft vs peft (median round): {same}/{args.requests}")


if __name__ == "__main__":
    main()
