"""benchmarks/profile_step.py on a tiny model: its categories add up to the step, and its FLOP count is exact."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import graft
import graft.models
from graft import data, recipe
from graft.train import TrainConfig
from graft.train.packed_attention import segments

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "profile_step.py"
DATA = Path(__file__).resolve().parent / "data" / "gsm8k_train_sample.jsonl"
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "tie_word_embeddings": True}
R = 4


@pytest.fixture(scope="module")
def ps():
    spec = importlib.util.spec_from_file_location("profile_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["profile_step"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("profile_step", None)


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(graft.models.resolve("smollm2-135m"), local_files_only=True)


def tiny_side(ps, tok):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), **TINY))
    graft.attach(model, graft.LoRA(r=R, alpha=2 * R, targets="all-linear"))
    examples = data.tokenize(ps.train_bench.rows(8, DATA), tok, format="alpaca", max_length=512)
    collate = recipe.make_collate(model, tok, 512, packed=True)
    cfg = TrainConfig(lr=1e-3, epochs=1, batch_size=2, progress=False, max_grad_norm=1.0)
    return ps.graft_side(model, examples, collate, cfg)


def expected_matmul_flops(model: LlamaForCausalLM, positions: int, supervised: int) -> int:
    """Forward, input gradients and LoRA factor gradients of every linear, and the selective head.

    Layer 0's q/k/v read the (frozen) embedding's normalised output, which needs no gradient: their
    base matmul and their lora_A have no input-gradient matmul in backward.
    """
    flops = 0
    for name, layer in graft.core.adapter_layers(model):
        d_in, d_out = layer.base_layer.in_features, layer.base_layer.out_features
        input_grad = not (name.startswith("model.layers.0.self_attn.") and name.split(".")[-1] in ("q_proj", "k_proj",
                                                                                                  "v_proj"))
        flops += 2 * positions * d_in * d_out * (2 if input_grad else 1)  # x Wᵀ, and dy W
        flops += 2 * positions * R * (d_in + d_out)  # forward through A then B
        flops += 2 * positions * R * (d_in + d_out)  # dA and dB
        flops += 2 * positions * R * (d_out + (d_in if input_grad else 0))  # gradients through B, through A
    head = model.get_output_embeddings().weight
    return flops + 2 * 2 * supervised * head.shape[0] * head.shape[1]  # logits and their input gradient


def test_categories_cover_the_step_and_flops_are_exact(ps, tok):
    side = tiny_side(ps, tok)
    batches = ps.step_batches(len(side.items), 2, 2, seed=0)
    out = ps.measure(side, batches, profiled=1, timed=1)
    cats = out["categories_s"]
    assert set(cats) == set(ps.CATEGORIES)
    # every microsecond of the profiled step is in exactly one category
    assert sum(cats.values()) == pytest.approx(out["profiled_step_s"], rel=1e-6)
    for name in ("base matmul fwd", "base matmul bwd (input grads)", "attention (sdpa)", "LoRA", "head + loss",
                 "norms / act / rotary / elementwise", "optimizer", "data / collate"):
        assert cats[name] > 0, name
    assert out["matmul_op_s"] >= cats["base matmul fwd"] + cats["base matmul bwd (input grads)"]

    batch = side.collate([side.items[i] for i in batches[1]])
    positions = batch["input_ids"].numel()
    supervised = int((batch["labels"][:, 1:] != -100).sum())
    assert out["flops"]["matmul"] == expected_matmul_flops(side.model, positions, supervised)
    cfg = side.model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    # graft's trainer runs packed rows one example at a time (graft.train.packed_attention): forward Q Kᵀ
    # and P V, backward four matmuls of the same size, 12·h·n²·d per example of n tokens and layer
    squares = sum((e - s) ** 2 for row in segments(batch["position_ids"]) for s, e in row)
    assert side.model.config._attn_implementation == "graft_packed_sdpa"
    assert out["flops"]["attention"] == 12 * cfg.num_attention_heads * squares * head_dim * cfg.num_hidden_layers


def test_backward_ops_take_their_forward_scope(ps, tok):
    """A base linear's MmBackward0 is 'base matmul bwd'; a LoRA factor's is 'LoRA'; nothing is left unmapped."""
    from torch.profiler import profile

    side = tiny_side(ps, tok)
    items = [side.items[i] for i in ps.step_batches(len(side.items), 2, 1, seed=0)[0]]
    side.step(items)
    with ps.module_scopes(side.model), profile() as prof:
        side.step(items)
    events = prof.events()
    chains = {id(e): ps._chain(e) for e in events}
    regions = ps.forward_regions(events, chains)
    mapped: dict[str, set[str]] = {}
    for e in events:
        node = next((a for a in chains[id(e)] if a.name.startswith(ps.EVALUATE)), None)
        if e.name == "aten::mm" and node is not None:
            mapped.setdefault(node.name[len(ps.EVALUATE):], set()).add(ps._op_category(e, chains[id(e)], regions))
    assert mapped["MmBackward0"] == {"base matmul bwd (input grads)", "LoRA"}
    # every backward node of the step's forward (the model and the loss) finds the module scope it came from
    nodes = [a for a in events if a.name.startswith(ps.EVALUATE) and "AccumulateGrad" not in a.name]
    unmapped = {a.name[len(ps.EVALUATE):] for a in nodes if regions.get(a.sequence_nr) is None}
    assert unmapped <= {"DivBackward0", "TBackward0"}, unmapped  # the step's `loss / count`, outside the loss scope
    assert {a.name[len(ps.EVALUATE):] for a in nodes if regions.get(a.sequence_nr) == ps.HEAD} >= {
        "_HeadCrossEntropyBackward"}


def test_script_runs_both_sides(tmp_path, tok):
    """The command line end to end (graft and peft + Trainer, each in its own process) on a tiny model."""
    pytest.importorskip("peft")
    torch.manual_seed(0)
    model_dir = tmp_path / "tiny"
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), **TINY)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    out = tmp_path / "profile.json"
    cmd = [sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--model", str(model_dir), "--data", str(DATA),
           "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    graft_run, ref_run = report["results"]
    assert (graft_run["impl"], ref_run["impl"]) == ("graft", "peft+Trainer")
    # the same examples on both sides; graft packs them (fewer computed positions) and scores the same tokens
    assert graft_run["tokens"]["real"] == ref_run["tokens"]["real"]
    assert graft_run["tokens"]["supervised"] == ref_run["tokens"]["supervised"]
    assert graft_run["tokens"]["positions"] <= ref_run["tokens"]["positions"]
    # the reference computes full logits: more head FLOPs than graft's selective ones
    assert ref_run["flops"]["matmul"] > graft_run["flops"]["matmul"]
    for run in (graft_run, ref_run):
        assert run["categories_s"]["LoRA"] > 0 and run["categories_s"]["base matmul bwd (input grads)"] > 0
    assert "| base matmul fwd |" in report["markdown"]
