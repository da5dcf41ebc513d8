"""graft on a CUDA GPU: correctness against peft, QLoRA, and timings, in one process.

    python benchmarks/gpu.py                                  # SmolLM2-135M-Instruct (its package installed)
    python benchmarks/gpu.py --random-init CONFIG_DIR         # the same shapes, seeded random weights
    python benchmarks/gpu.py --only parity --only qlora       # some sections

``--random-init`` builds the model from a ``config.json`` (and the tokenizer files beside it) with
seeded random weights, for a GPU machine that cannot install the weight package: every check
below compares two computations on the *same* weights, and timings do not depend on weight values.

Sections (each prints its own lines; a section that fails prints its traceback and the next runs):
  parity  fp32 with TF32 off: graft vs peft logits for LoRA (r=16 all-linear) and DoRA, 8 adapters
          routed over 32 rows vs peft's ``adapter_names=`` and vs each row alone, greedy generation
          routed vs alone, merge == unmerged, unmerge restores the base, unload, save/load
          round trip, and one training step that leaves the base bit-identical.
  qlora   NF4 base (double quantisation, bf16 compute) quantized on the GPU, LoRA on it, graft's
          trainer for some steps on GSM8K with bf16 autocast, against LoRA on a bf16 base; LoftQ
          init on the GPU and its rebuild from the saved adapter; DoRA and int8 forward/backward;
          merging into the 4-bit base and the error it reports.
  cli     ``graft train --device cuda --max-steps 2``, ``graft generate --device cuda`` and ``graft eval
          --device cuda`` through the CLI (``graft.cli.main``): the start-up line, the device training
          really ran on, the exit statuses.
  timing  forward latency (b) and mixed-batch prefill/decode (c) of ``benchmarks/core.py`` on the
          GPU, fp32 and bf16: graft vs peft, and against the plain base. Each time is a median of
          interleaved rounds, with ``torch.cuda.synchronize()`` around every call.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from core import N_ADAPTERS, peft_adapters  # benchmarks/ is on sys.path when a script here runs
from train import DATA, rows

DEV = torch.device("cuda")
RESULTS: dict[str, Any] = {}


def say(msg: str) -> None:
    print(msg, flush=True)


def check(key: str, value: float, tol: float | None = None) -> None:
    """Record a measured difference; with ``tol``, say whether it is within it."""
    RESULTS[key] = value
    verdict = "" if tol is None else ("  OK" if value <= tol else f"  FAILED (tolerance {tol:g})")
    say(f"  {key}: {value:.3g}{verdict}")
    if tol is not None and value > tol:
        RESULTS.setdefault("failed", []).append(key)


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def median_times(cases: dict[str, Callable[[], Any]], reps: int, warmup: int = 3) -> dict[str, list[float]]:
    """Seconds per call of each case, interleaved, order rotated every round."""
    names = list(cases)
    for _ in range(warmup):
        for n in names:
            cases[n]()
    sync()
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            sync()
            t0 = time.perf_counter()
            cases[n]()
            sync()
            out[n].append(time.perf_counter() - t0)
    return out


def ratio(times: dict[str, list[float]], ours: str, ref: str) -> float:
    return statistics.median(a / b for a, b in zip(times[ours], times[ref], strict=True))


def timed(key: str, label: str, times: dict[str, list[float]], pairs: tuple[tuple[str, str, float | None], ...]) -> None:
    """Print and record median times (ms) and the paired ratios ``ours/ref`` (with their targets)."""
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    ratios = {f"{a}/{b}": ratio(times, a, b) for a, b, _ in pairs}
    shown = ", ".join(f"{k} {v:.2f} ms" for k, v in med.items())
    verdicts = ", ".join(f"{a}/{b} {ratios[f'{a}/{b}']:.3f}" + (f" (target <= {t})" if t else "") for a, b, t in pairs)
    say(f"  {label}: {shown} | {verdicts}")
    RESULTS[key] = {**med, **ratios}


# --------------------------------------------------------------------------------------------
# model


def random_model_dir(config_dir: Path, dest: Path) -> Path:
    """A transformers directory with seeded random weights of ``config_dir``'s architecture."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(dest)
    for f in config_dir.iterdir():
        if f.name != "config.json" and f.is_file() and not f.name.endswith(".safetensors"):
            shutil.copy(f, dest / f.name)
    return dest


def load_base(model: str, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    import graft.models

    m, tok = graft.models.load(model, dtype=dtype)
    return m.to(DEV).eval(), tok


# --------------------------------------------------------------------------------------------
# parity


def section_parity(args: argparse.Namespace, tmp: Path) -> None:
    import graft
    from graft import data, recipe
    from graft.train import TrainConfig, train

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    base, tok = load_base(args.model)
    vocab = base.config.vocab_size
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, vocab, (4, 24), generator=gen).to(DEV)
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits

    pm, dirs = peft_adapters(base, tmp / "lora")
    g = copy.deepcopy(base)
    for name, d in dirs.items():
        graft.load(g, d, name=name)
    with torch.no_grad():
        graft.activate(g, "a0")
        pm.set_adapter("a0")
        check("parity/lora r16 all-linear: graft vs peft max|dlogits|", diff(g(input_ids=ids).logits, pm(input_ids=ids).logits), 1e-4)
        # mixed batch: 32 rows over 8 adapters + base rows, vs peft adapter_names and vs alone
        n_rows = 32
        names: list[str | None] = [f"a{i % N_ADAPTERS}" if i % 9 != 8 else None for i in range(n_rows)]
        x = torch.randint(0, vocab, (n_rows, 16), generator=gen).to(DEV)
        with graft.route(g, names):
            routed = g(input_ids=x).logits
        ref = pm(input_ids=x, adapter_names=[n if n is not None else "__base__" for n in names]).logits
        check("parity/mixed 32 rows, 8 adapters + base rows: graft.route vs peft adapter_names", diff(routed, ref), 1e-4)
        worst = 0.0
        for i in (0, 5, 8, 17):
            with graft.route(g, [names[i]]):
                worst = max(worst, diff(routed[i : i + 1], g(input_ids=x[i : i + 1]).logits))
        check("parity/mixed rows vs the same row alone", worst, 1e-4)
        # greedy generation, routed vs each row alone
        prompts = x[:4, :8]
        route4 = ["a1", None, "a2", "a3"]
        with graft.route(g, route4):
            out = g.generate(input_ids=prompts, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        same = True
        for i, n in enumerate(route4):
            with graft.route(g, [n]):
                alone = g.generate(input_ids=prompts[i : i + 1], max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
            same &= torch.equal(out[i : i + 1], alone)
        check("parity/routed greedy generation != alone (rows differing)", float(not same), 0.0)

    # merge / unmerge / unload on a single adapter
    one = graft.load(copy.deepcopy(base), dirs["a0"], name="a0")
    with torch.no_grad():
        unmerged = one(input_ids=ids).logits
        graft.merge(one)
        merged = one(input_ids=ids).logits
        check("parity/merged vs unmerged max|dlogits|", diff(merged, unmerged), 1e-3)
        graft.unmerge(one)
        w0 = base.state_dict()
        w1 = graft.unload(copy.deepcopy(one), merge=False).state_dict()
        check("parity/unmerge restores base weights max|dW|", max(diff(w1[k], w0[k]) for k in w0), 1e-6)
        with graft.disabled(one):
            check("parity/disabled (after merge+unmerge) vs base max|dlogits|", diff(one(input_ids=ids).logits, base_logits), 1e-5)
        plain = graft.unload(copy.deepcopy(one), merge=True)
        check("parity/unloaded vs unmerged max|dlogits|", diff(plain(input_ids=ids).logits, unmerged), 1e-3)
    graft.save(one, tmp / "roundtrip")
    again = graft.load(copy.deepcopy(base), tmp / "roundtrip", name="a0")
    with torch.no_grad():
        check("parity/save -> load round trip max|dlogits|", diff(again(input_ids=ids).logits, unmerged), 0.0)
    del pm, g, one, again, plain

    # DoRA
    pd, ddirs = peft_adapters(base, tmp / "dora", dora=True, n=1)
    gd = graft.load(copy.deepcopy(base), ddirs["a0"], name="a0")
    with torch.no_grad():
        check("parity/DoRA r16 all-linear: graft vs peft max|dlogits|", diff(gd(input_ids=ids).logits, pd(input_ids=ids).logits), 1e-4)
    del pd, gd

    # one training step: the base stays bit-identical, every adapter tensor moves
    model = copy.deepcopy(base)
    graft.attach(model, graft.LoRA(r=16, alpha=32, targets="all-linear", init="gaussian"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    examples = data.tokenize(rows(16, args.data), tok, format="alpaca", max_length=512)
    collate = recipe.make_collate(model, tok, 512, packed=True)
    train(model, examples, collate, TrainConfig(lr=1e-3, batch_size=8, max_steps=2, progress=False))
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    frozen_moved = [n for n in moved if "lora_" not in n]
    check("parity/train step: base tensors changed", float(len(frozen_moved)), 0.0)
    check("parity/train step: adapter tensors unchanged", float(sum(1 for n in before if "lora_" in n) - len(moved)), 0.0)


# --------------------------------------------------------------------------------------------
# QLoRA


def _train_run(args: argparse.Namespace, label: str, quantize: str | None, init: str = "default") -> dict:
    import graft
    from graft import data, quant, recipe
    from graft.train import TrainConfig, train

    if DEV.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    base, tok = load_base(args.model, dtype=torch.float32 if quantize or init == "loftq" else torch.bfloat16)
    lora = graft.LoRA(r=16, alpha=32, targets="all-linear")
    if init == "loftq":
        graft.loftq(base, lora, quant_type=quantize, compute_dtype=torch.bfloat16, gradient_checkpointing=False)
    else:
        if quantize:
            quant.quantize(base, quantize, compute_dtype=torch.bfloat16)
            graft.prepare_kbit_training(base, gradient_checkpointing=False)
        graft.attach(base, lora)
    setup = time.perf_counter() - t0
    examples = data.tokenize(rows(args.qlora_examples, args.data), tok, format="alpaca", max_length=512)
    collate = recipe.make_collate(base, tok, 512, packed=True)
    cfg = TrainConfig(lr=2e-4, batch_size=8, schedule="cosine", warmup_ratio=0.1, seed=0, autocast="bf16",
                      progress=False, max_grad_norm=1.0)
    res = train(base, examples, collate, cfg)
    out = {"label": label, "setup_s": setup, "train_s": res.seconds, "steps": res.steps,
           "sup_tok_per_s": res.supervised_tokens / res.seconds, "first_loss": res.losses[0],
           "final_loss": res.final_loss, "losses": res.losses,
           "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if DEV.type == "cuda" else 0.0,
           "weight_bytes": quant.weight_bytes(base)._asdict()}
    say(f"  {label:<28} setup {setup:6.1f}s  train {res.seconds:6.1f}s ({res.steps} steps)  "
        f"{out['sup_tok_per_s']:8.0f} sup tok/s  loss {res.losses[0]:.4f} -> {res.final_loss:.4f}  "
        f"peak GPU {out['peak_gpu_mb']:.0f} MB")
    RESULTS[f"qlora/{label}"] = out
    return {"model": base, "tok": tok, **out}


def section_qlora(args: argparse.Namespace, tmp: Path) -> None:
    import bitsandbytes

    import graft
    from graft import quant

    say(f"  bitsandbytes {bitsandbytes.__version__}")
    ref = _train_run(args, "LoRA, bf16 base", None)
    del ref["model"]
    q = _train_run(args, "QLoRA nf4", "nf4")
    check("qlora/final loss nf4 vs bf16 LoRA (ratio)", q["final_loss"] / ref["final_loss"])
    model = q["model"]
    x = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(3)).to(DEV)
    model.eval()
    with torch.no_grad(), torch.autocast(DEV.type, dtype=torch.bfloat16):
        before = model(input_ids=x).logits.float()
        graft.save(model, tmp / "qlora")
        rep = quant.merge_error(graft.merge(model))
        after = model(input_ids=x).logits.float()
    say(f"  merge into the nf4 base: {rep}")
    check("qlora/merged-into-nf4 vs unmerged max|dlogits|", diff(after, before))
    del model, q
    lq = _train_run(args, "QLoRA nf4 + LoftQ init", "nf4", init="loftq")
    check("qlora/final loss nf4+LoftQ vs bf16 LoRA (ratio)", lq["final_loss"] / ref["final_loss"])
    m = lq["model"].eval()
    graft.save(m, tmp / "loftq")
    with torch.no_grad(), torch.autocast(DEV.type, dtype=torch.bfloat16):
        want = m(input_ids=x).logits.float()
    del lq, m
    fp, _ = load_base(args.model)
    rebuilt = graft.loftq(fp, tmp / "loftq").eval()
    with torch.no_grad(), torch.autocast(DEV.type, dtype=torch.bfloat16):
        check("qlora/LoftQ rebuilt from the saved adapter max|dlogits|", diff(rebuilt(input_ids=x).logits.float(), want), 1e-3)
    del rebuilt, fp
    for mode, dora in (("nf4", True), ("int8", False)):
        base, _ = load_base(args.model)
        quant.quantize(base, mode, compute_dtype=torch.bfloat16)
        graft.prepare_kbit_training(base, gradient_checkpointing=True)
        graft.attach(base, graft.LoRA(r=8, alpha=16, targets="all-linear", dora=dora, init="gaussian"))
        base.train()
        with torch.autocast(DEV.type, dtype=torch.bfloat16):
            loss = base(input_ids=x, labels=x).loss
        loss.backward()
        grads = [p.grad for n, p in base.named_parameters() if p.requires_grad]
        ok = all(gr is not None and torch.isfinite(gr).all() for gr in grads)
        say(f"  {mode}{' DoRA' if dora else ' LoRA'} forward/backward with checkpointing: loss {loss.item():.4f}, "
            f"{len(grads)} trainable tensors, all grads finite: {ok}")
        check(f"qlora/{mode}{'-dora' if dora else ''} grads missing or non-finite", float(not ok), 0.0)
        del base


# --------------------------------------------------------------------------------------------
# timings


def section_timing(args: argparse.Namespace, tmp: Path) -> None:
    torch.backends.cuda.matmul.allow_tf32 = True  # what users run with
    for dtype in (torch.float32, torch.bfloat16):
        _time_dtype(args, tmp, dtype)


def _time_dtype(args: argparse.Namespace, tmp: Path, dtype: torch.dtype) -> None:
    import graft

    dn = str(dtype).removeprefix("torch.")
    base, _ = load_base(args.model, dtype=dtype)
    pm, dirs = peft_adapters(base, tmp / f"t-{dn}")
    vocab = base.config.vocab_size
    g1 = graft.load(copy.deepcopy(base), dirs["a0"], name="a0")
    gm = graft.merge(graft.load(copy.deepcopy(base), dirs["a0"], name="a0"))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        pm.set_adapter("a0")
        for b, s in ((1, 128), (8, 256)):
            x = torch.randint(0, vocab, (b, s), generator=gen).to(DEV)
            t = median_times({"graft": lambda x=x: g1(input_ids=x), "peft": lambda x=x: pm(input_ids=x),
                              "merged": lambda x=x: gm(input_ids=x), "base": lambda x=x: base(input_ids=x)}, args.reps)
            timed(f"timing/{dn}/b/{b}x{s}", f"{dn} (b) forward {b}x{s}", t,
                  (("graft", "peft", 1.0), ("merged", "base", 1.03)))
        g = copy.deepcopy(base)
        for n, d in dirs.items():
            graft.load(g, d, name=n)
        names = [f"a{i % N_ADAPTERS}" for i in range(32)]
        ids = torch.randint(0, vocab, (32, 32), generator=gen).to(DEV)
        nxt = torch.randint(0, vocab, (32, 1), generator=gen).to(DEV)

        def g_fwd(x: torch.Tensor, **kw: Any) -> Any:
            with graft.route(g, names):
                return g(input_ids=x, **kw)

        def p_fwd(x: torch.Tensor, **kw: Any) -> Any:
            return pm(input_ids=x, adapter_names=names, **kw)

        def b_fwd(x: torch.Tensor, **kw: Any) -> Any:
            return base(input_ids=x, **kw)

        og, op = g_fwd(ids, use_cache=True), p_fwd(ids, use_cache=True)
        tol = 1e-3 if dtype == torch.float32 else 0.25
        check(f"timing/{dn} (c) prefill graft vs peft max|dlogits|", diff(og.logits, op.logits), tol)
        cg, cp, cb = og.past_key_values, op.past_key_values, b_fwd(ids, use_cache=True).past_key_values
        t = median_times({"graft": lambda: g_fwd(ids), "peft": lambda: p_fwd(ids), "base": lambda: b_fwd(ids)}, args.reps)
        timed(f"timing/{dn}/c/prefill", f"{dn} (c) mixed prefill, 8 adapters / 32x32", t,
              (("graft", "peft", 0.5), ("graft", "base", None)))

        # decode: a fresh cache copy per call would dominate a GPU decode step; crop the cache back instead
        def step(fwd: Callable[..., Any], cache: Any) -> Callable[[], Any]:
            def run() -> Any:
                out = fwd(nxt, past_key_values=cache)
                cache.crop(-1)
                return out
            return run

        t = median_times({"graft": step(g_fwd, cg), "peft": step(p_fwd, cp), "base": step(b_fwd, cb)}, args.reps)
        timed(f"timing/{dn}/c/decode", f"{dn} (c) mixed decode step, 8 adapters / 32 rows, KV 32", t,
              (("graft", "peft", 0.5), ("graft", "base", None)))


def section_cli(args: argparse.Namespace, tmp: Path) -> None:
    """`graft train --device DEV --max-steps 2` and `graft generate --device DEV` through the CLI's main():
    the start-up line names the device, training runs with the model on it, generation loads onto it."""
    import contextlib
    import io

    import graft.train
    from graft.cli import main as graft_main

    data = tmp / "cli.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows(8, args.data)))
    out = tmp / "cli-run"
    seen = {}
    real_train = graft.train.train

    def train_spy(model, *a, **kw):  # what graft train really trains on
        p = next(model.parameters())
        seen.update(device=str(p.device), dtype=str(p.dtype).removeprefix("torch."))
        return real_train(model, *a, **kw)

    def run(*argv: str) -> tuple[int, str]:
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = graft_main(list(argv))
        return rc, err.getvalue()

    dev = str(DEV)
    graft.train.train = train_spy
    try:
        rc, err = run("train", "--model", args.model, "--data", str(data), "--device", dev, "--max-steps", "2",
                      "--batch-size", "2", "--r", "4", "--out", str(out))
    finally:
        graft.train.train = real_train
    line = next((x for x in err.splitlines() if x.startswith("graft: device")), "(no start-up line)")
    say(f"  train: {line}; trained on {seen.get('device')} with {seen.get('dtype')} base weights")
    check("cli/train exit status", float(rc), 0)
    if rc:
        say(err[-2000:])
    check("cli/train ran on the device asked for (0 = yes)", float(seen.get("device", "").split(":")[0] != DEV.type), 0)
    job = json.loads((out / "job.json").read_text()) if (out / "job.json").exists() else {}
    RESULTS["cli/train choice"] = {"line": line, **seen, "autocast": job.get("train", {}).get("autocast")}
    rc, err = run("generate", "--model", args.model, "--adapter", str(out / "adapter"), "--device", dev,
                  "--prompt", "What is 2 + 3?", "--max-new-tokens", "8")
    line = next((x for x in err.splitlines() if x.startswith("graft generate: device")), "(no start-up line)")
    say(f"  generate: {line}")
    check("cli/generate exit status", float(rc), 0)
    if rc:
        say(err[-2000:])
    check("cli/generate said the device (0 = yes)", float(f"device {DEV.type}" not in line), 0)
    # eval decodes with its own loop (graft.decode), which keeps bookkeeping on the CPU and the model on DEV
    rc, err = run("eval", "--model", args.model, "--adapter", str(out / "adapter"), "--device", dev, "--data",
                  str(data), "--task", "exact", "--limit", "2", "--max-new-tokens", "8", "--out", str(tmp / "cli-eval"))
    check("cli/eval exit status", float(rc), 0)
    if rc:
        say(err[-2000:])


SECTIONS = {"parity": section_parity, "qlora": section_qlora, "timing": section_timing, "cli": section_cli}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--random-init", type=Path, metavar="CONFIG_DIR",
                    help="build the model from this config.json with seeded random weights")
    ap.add_argument("--data", type=Path, default=DATA, help="GSM8K train.jsonl")
    ap.add_argument("--only", choices=list(SECTIONS), action="append")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--qlora-examples", type=int, default=160)
    ap.add_argument("--json", type=Path, help="write every measured value here")
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # "cpu": a smoke test of this script
    args = ap.parse_args()
    global DEV
    DEV = torch.device(args.device)
    if DEV.type == "cuda" and not torch.cuda.is_available():
        print("skipped: no CUDA device")
        return 0
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    import peft
    import transformers

    say(f"{torch.cuda.get_device_name() if DEV.type == 'cuda' else 'cpu'} | torch {torch.__version__} | transformers {transformers.__version__} | "
        f"peft {peft.__version__}")
    with tempfile.TemporaryDirectory(prefix="graft-gpu-") as t:
        tmp = Path(t)
        if args.random_init:
            args.model = str(random_model_dir(args.random_init, tmp / "model"))
            say(f"model: seeded random weights with the shapes of {args.random_init}")
        for name in args.only or list(SECTIONS):
            say(f"\n## {name}")
            t0 = time.perf_counter()
            try:
                SECTIONS[name](args, tmp)
            except Exception:  # noqa: BLE001 (report and go on to the next section)
                traceback.print_exc(file=sys.stdout)
                RESULTS.setdefault("failed", []).append(f"{name}: exception")
            say(f"  ({name}: {time.perf_counter() - t0:.1f} s)")
            if args.json:
                args.json.write_text(json.dumps(RESULTS, indent=1, default=str))
    say(f"\nfailed checks: {RESULTS.get('failed', [])}")
    return 1 if RESULTS.get("failed") else 0


if __name__ == "__main__":
    sys.exit(main())
