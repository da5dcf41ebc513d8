"""`make demo`: graft end to end on SmolLM2-135M-Instruct, on this machine, in a few minutes.

Attach LoRA, report trainable parameters, fine-tune with graft's trainer on a bundled set of
facts about fictional countries (the model cannot know them), score held-out paraphrased questions
before and after, reload the saved PEFT-format adapter into a fresh model and check the outputs
are identical, then merge and export a plain transformers model.
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
from graft import models, recipe
from graft.train import TrainConfig, train

ASSETS = resources.files("graft") / "assets"


def read_jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in (ASSETS / name).read_text().splitlines() if line.strip()]


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


def fact(row: dict) -> str:
    """The fact an answer must contain, e.g. 'Quenport' from 'The capital of Veloria is Quenport.'"""
    out = row["output"].rstrip(".")
    for marker in (" is ", " uses ", " in "):
        if marker in out:
            out = out.rsplit(marker, 1)[1]
    return out.removesuffix(" as its currency").removeprefix("the ")


def score(answers: list[str], rows: list[dict]) -> float:
    return sum(fact(r).lower() in a.lower() for a, r in zip(answers, rows)) / len(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    t0 = time.time()
    torch.manual_seed(args.seed)
    out = Path(args.out)
    data_file = str(ASSETS / "demo_facts.jsonl")
    held = read_jsonl("demo_facts_heldout.jsonl")
    questions = [r["instruction"] for r in held]
    shown = list(range(0, len(held), 7))

    job = recipe.Job(model="smollm2-135m", data=data_file, format="alpaca", chat_template=True, r=16, alpha=32,
                     targets="all-linear", max_length=128)
    config = TrainConfig(lr=2e-3, epochs=args.epochs, batch_size=8, warmup_ratio=0.1, schedule="cosine",
                         seed=args.seed, out_dir=str(out), progress=True)
    model, tokenizer, train_rows, _, collate, _ = recipe.prepare(job, config)
    print(f"\nLoRA r=16 on every linear layer of SmolLM2-135M-Instruct: {graft.report(model)}")
    with graft.disabled(model):
        before = answer(model, tokenizer, questions)
    show("Before fine-tuning (held-out paraphrased questions):", [questions[i] for i in shown],
         [before[i] for i in shown])
    print(f"  held-out facts answered correctly: {score(before, held):.0%} of {len(held)}")

    print(f"\nFine-tuning on {len(train_rows)} examples of facts about fictional countries...")
    result = train(model, train_rows, collate, config)
    print(f"  {result.steps} steps in {result.seconds:.0f}s, final loss {result.final_loss:.3f}, "
          f"peak RSS {result.peak_rss_mb:.0f} MB; metrics and loss curve in {out}")
    model.eval()
    after = answer(model, tokenizer, questions)
    show("After fine-tuning (same questions):", [questions[i] for i in shown], [after[i] for i in shown])
    print(f"  held-out facts answered correctly: {score(after, held):.0%} of {len(held)}")

    adapter_dir = out / "adapter"
    size = sum(f.stat().st_size for f in adapter_dir.iterdir() if f.name.startswith("adapter_model"))
    print(f"\nAdapter saved in PEFT format to {adapter_dir} ({size / 1e6:.1f} MB)")
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
