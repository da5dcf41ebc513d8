"""`make demo`: graft end to end on SmolLM2-135M-Instruct, on this machine, in a few minutes.

Attach LoRA, report trainable parameters, fine-tune on a bundled set of facts about fictional
countries (the model cannot know them), save in the PEFT format, reload into a fresh model and
check the outputs are identical, then merge and export a plain transformers model.
"""

from __future__ import annotations

import argparse
import json
import time
from importlib import resources
from pathlib import Path

import torch
from torch import nn

import graft
from graft import models

ASSETS = resources.files("graft") / "assets"


def read_jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in (ASSETS / name).read_text().splitlines() if line.strip()]


def encode(tokenizer, row: dict) -> tuple[list[int], list[int]]:
    """Chat-formatted ids and labels; only the answer (and its end-of-turn token) is supervised."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": row["instruction"]}],
                                           tokenize=False, add_generation_prompt=True)
    full = prompt + row["output"] + "<|im_end|>"
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    return ids, [-100] * len(p_ids) + ids[len(p_ids):]


def batches(tokenizer, rows: list[dict], batch_size: int, steps: int, seed: int):
    encoded = [encode(tokenizer, r) for r in rows]
    g = torch.Generator().manual_seed(seed)
    pad = tokenizer.pad_token_id
    for step in range(steps):
        if step % (len(encoded) // batch_size) == 0:
            order = torch.randperm(len(encoded), generator=g).tolist()
        start = (step % (len(encoded) // batch_size)) * batch_size
        chunk = [encoded[i] for i in order[start:start + batch_size]]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in chunk])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in chunk])
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in chunk])
        yield ids, mask, labels


@torch.no_grad()
def answer(model: nn.Module, tokenizer, questions: list[str], max_new_tokens: int = 24) -> list[str]:
    tokenizer.padding_side = "left"
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                             add_generation_prompt=True) for q in questions]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    return [tokenizer.decode(o[enc["input_ids"].shape[1]:], skip_special_tokens=True).strip() for o in out]


def show(title: str, questions: list[str], answers: list[str]) -> None:
    print(f"\n{title}")
    for q, a in zip(questions, answers):
        print(f"  Q: {q}\n  A: {a}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    t0 = time.time()

    model, tokenizer = models.load("smollm2-135m")
    held = read_jsonl("demo_facts_heldout.jsonl")
    questions = [r["instruction"] for r in held[::5]][:6]
    show("Before fine-tuning (held-out questions):", questions, answer(model, tokenizer, questions))

    graft.attach(model, graft.LoRA(r=16, alpha=32, targets="all-linear"))
    print(f"\nLoRA r=16 on every linear layer: {graft.report(model)}")

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5) * max(0.05, 1 - s / args.steps))
    for step, (ids, mask, labels) in enumerate(batches(tokenizer, read_jsonl("demo_facts.jsonl"), 8, args.steps, args.seed)):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == args.steps - 1:
            print(f"  step {step:3d}  loss {loss.item():.4f}  ({time.time() - t0:.0f}s)")
    model.eval()
    show("After fine-tuning (same held-out questions):", questions, answer(model, tokenizer, questions))

    adapter_dir = graft.save(model, out / "adapter")
    size = sum(f.stat().st_size for f in adapter_dir.iterdir())
    print(f"\nSaved the adapter in PEFT format to {adapter_dir} ({size / 1e6:.1f} MB)")

    fresh, _ = models.load("smollm2-135m")
    graft.load(fresh, adapter_dir)
    probe = tokenizer(["The capital of Veloria is"], return_tensors="pt")
    with torch.no_grad():
        diff = (fresh(**probe).logits - model(**probe).logits).abs().max().item()
    print(f"Reloaded into a fresh model: max |logit difference| = {diff:.2e}")

    merged = graft.unload(model, merge=True)
    merged.save_pretrained(out / "merged")
    tokenizer.save_pretrained(out / "merged")
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(out / "merged", local_files_only=True).eval()
    with torch.no_grad():
        diff_m = (exported(**probe).logits - fresh(**probe).logits).abs().max().item()
    print(f"Merged and exported a plain transformers model to {out / 'merged'}: "
          f"max |logit difference| vs adapter = {diff_m:.2e}")
    print(f"\nDone in {time.time() - t0:.0f}s.")


if __name__ == "__main__":
    main()
