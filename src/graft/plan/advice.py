"""graft plan: which method to use, and why."""

from __future__ import annotations

from graft.plan.estimate import Estimate
from graft.plan.settings import Recommendation, _Settings
from graft.plan.sizes import format_bytes


def recommend(rows: list[Estimate], s: _Settings, inference: float, encoder: bool = False) -> Recommendation:
    """The decision path practitioners use: no training budget -> ICL; instructions -> instruction
    tuning + LoRA; reasoning -> CoT data + LoRA; tight memory -> QLoRA; many tasks -> one adapter each."""
    budget = s.memory - s.reserve
    mem = f"{format_bytes(s.memory)}" + (f" ({format_bytes(s.reserve)} kept for the runtime)" if s.reserve else "")
    if s.goal == "no-training":
        return _recommend_icl(rows, s, inference, budget, mem)
    by = {r.method: r for r in rows}
    lora, qlora, full = by["lora"], by["qlora"], by["full"]
    if not lora.applicable:
        return Recommendation("lora", "LoRA with explicit targets", False, None,
                              [f"LoRA could not be planned: {lora.note}"])
    reasons: list[str] = []
    if lora.fits:
        pick = lora
        reasons.append(f"LoRA needs {_cost(lora)} of {mem}: it fits" + _ckpt_reason(lora))
    elif qlora.fits:
        pick = qlora
        reasons.append(f"tight memory: 16-bit LoRA needs {format_bytes(_best(lora))} (its frozen weights alone "
                       f"{format_bytes(lora.weights_bytes)}), more than {mem}; QLoRA keeps the frozen base in NF4 "
                       f"({format_bytes(qlora.weights_bytes)} of weights) and needs {_cost(qlora)}"
                       + _ckpt_reason(qlora))
    else:
        pick = qlora
        reasons.append(f"nothing fits: even QLoRA needs {format_bytes(_best(qlora))} with gradient checkpointing, "
                       f"more than {mem}; shorten --seq-len (now {s.seq_len}), use --batch 1 (now {s.batch}) "
                       f"with gradient accumulation, or pick a smaller model")
    if full.fits and pick is lora:
        reasons.append(f"full fine-tuning would fit too ({format_bytes(full.total_bytes)}); LoRA trains "
                       f"{lora.trainable_params:,} parameters instead of {full.trainable_params:,} and saves a "
                       f"{format_bytes(lora.adapter_file_bytes)} adapter instead of a "
                       f"{format_bytes(full.adapter_file_bytes)} model")
    elif not full.fits:
        reasons.append(f"full fine-tuning would need {format_bytes(_best(full))}, more than {mem}")
    name = "QLoRA" if pick is qlora else "LoRA"
    ckpt = " + gradient checkpointing" if pick.gradient_checkpointing else ""
    approach, extra = _goal_advice(s, encoder, name, pick, full)
    reasons.extend(extra)
    return Recommendation(pick.method, approach + ckpt, pick.fits, pick.gradient_checkpointing, reasons)


def _goal_advice(s: _Settings, encoder: bool, name: str, pick: Estimate, full: Estimate) -> tuple[str, list[str]]:
    if s.goal == "instructions":
        return f"instruction tuning with {name}", [(
            "instruction following: train on instruction -> response pairs (alpaca or chat template, loss on the "
            f"response only); a low-rank update is enough to teach the format ({pick.trainable_params:,} "
            f"trainable parameters, {pick.trainable_percent:.3f}% of the model)")]
    if s.goal == "reasoning":
        return f"chain-of-thought data + {name}", [(
            "reasoning: train on worked solutions that end in the answer (--format cot), so the model learns to "
            f"write the steps; with seq-len {s.seq_len} the rationale must fit in a row")]
    if s.goal == "classification":
        what = "a classification head (task classification)" if encoder else "the label as the response"
        return f"{name} with {what}", [
            f"classification: {name} plus {what}; the head is trained in full and saved with the adapter"]
    if s.goal == "multi-task":
        n = max(s.tasks, 2)
        return f"one {name} adapter per task on one shared base, served together", [(
            f"many tasks on one base: {n} tasks cost one {format_bytes(pick.weights_bytes)} base plus "
            f"{n} x {format_bytes(pick.adapter_file_bytes)} adapters, instead of {n} x "
            f"{format_bytes(full.adapter_file_bytes)} fully fine-tuned models; graft.route serves several "
            "adapters in one batch")]
    return name, []


def _recommend_icl(rows: list[Estimate], s: _Settings, inference: float, budget: int, mem: str) -> Recommendation:
    by = {r.method: r for r in rows}
    fits = inference <= budget
    reasons = [("no training budget: in-context learning (instructions and a few worked examples in the prompt, "
                "chain-of-thought for reasoning) changes no weights"),
               (f"serving needs about {format_bytes(inference)} (weights + KV cache for {s.batch} x {s.seq_len} "
                f"tokens) of {mem}: ") + ("it fits" if fits else "it does not fit; load the weights in 4 bits")]
    cheapest = min((r for r in rows if r.applicable and r.total_bytes is not None), key=lambda r: r.total_bytes,
                   default=None)
    if cheapest is not None:
        reasons.append(f"when training becomes possible, the cheapest method is {cheapest.label} "
                       f"({format_bytes(cheapest.total_bytes)}); LoRA needs {format_bytes(by['lora'].total_bytes)}")
    return Recommendation("icl", "in-context learning (few-shot / chain-of-thought prompts), no training", fits,
                          None, reasons)


def _best(r: Estimate) -> int:
    options = [t for t in (r.total_bytes_no_checkpointing, r.total_bytes_checkpointing) if t is not None]
    return min(options) if options else 0


def _cost(r: Estimate) -> str:
    return (f"{format_bytes(r.total_bytes)} (weights {format_bytes(r.weights_bytes)}, activations "
            f"{format_bytes(r.activation_bytes)}, optimizer {format_bytes(r.optimizer_bytes)})")


def _ckpt_reason(r: Estimate) -> str:
    if r.gradient_checkpointing and r.total_bytes_no_checkpointing is not None:
        return (f"; only with gradient checkpointing: without it activations take "
                f"{format_bytes(r.activation_bytes_no_checkpointing)} and the total "
                f"{format_bytes(r.total_bytes_no_checkpointing)}")
    return ""
