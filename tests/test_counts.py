"""Trainable-parameter counts on a Llama-2-7B-shaped model built on the meta device.

The expected numbers are peft's ``print_trainable_parameters`` for the same configurations; peft
itself is run on the same meta model as an oracle. Attaching to a meta model must allocate
nothing: every parameter stays on the meta device and the process RSS barely moves.
"""

from __future__ import annotations

import gc

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import graft

LLAMA2_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 32, "vocab_size": 32000}
BASE_TOTAL = 6_738_415_616  # Llama-2-7B

# name -> (graft kwargs, peft kwargs, trainable, total, peft's printed line)
CASES = {
    "qv-r8": (
        {"r": 8, "targets": ["q_proj", "v_proj"]},
        {"r": 8, "target_modules": ["q_proj", "v_proj"]},
        4_194_304, 6_742_609_920,
        "trainable params: 4,194,304 || all params: 6,742,609,920 || trainable%: 0.0622",
    ),
    "all-linear-r16": (
        {"r": 16, "targets": "all-linear"},
        {"r": 16, "target_modules": "all-linear"},
        39_976_960, 6_778_392_576,
        "trainable params: 39,976,960 || all params: 6,778,392,576 || trainable%: 0.5898",
    ),
    "dora-qv-r8": (
        {"r": 8, "targets": ["q_proj", "v_proj"], "dora": True},
        {"r": 8, "target_modules": ["q_proj", "v_proj"], "use_dora": True},
        4_456_448, 6_742_872_064,
        "trainable params: 4,456,448 || all params: 6,742,872,064 || trainable%: 0.0661",
    ),
}


def meta_llama2_7b() -> LlamaForCausalLM:
    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(**LLAMA2_7B))


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def test_meta_base_model_size():
    model = meta_llama2_7b()
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == BASE_TOTAL


@pytest.mark.parametrize("case", list(CASES))
def test_graft_counts_on_meta_llama2_7b(case):
    graft_kwargs, _, trainable, total, line = CASES[case]
    model = meta_llama2_7b()
    method = graft.LoRA(**graft_kwargs)
    closed_form = method.count(model)  # before attaching: nothing is wrapped yet
    assert closed_form == trainable

    gc.collect()
    before = rss_bytes()
    graft.attach(model, method)
    gc.collect()
    grown = rss_bytes() - before

    rep = graft.report(model)
    assert (rep.trainable, rep.total) == (trainable, total)
    assert rep.total - rep.trainable == BASE_TOTAL  # the base is all frozen, nothing of it double-counted
    assert str(rep) == line
    # No real memory: every tensor (base and adapter) is still on meta; real fp32 adapters would be
    # 16 MB (q,v r=8) to 160 MB (all-linear r=16).
    not_meta = [n for n, p in model.named_parameters() if not p.is_meta]
    assert not not_meta, f"attach materialised {not_meta[:3]}"
    assert grown < 50 * 2**20, f"attach grew RSS by {grown / 2**20:.1f} MB on a meta model"


@pytest.mark.parametrize("case", list(CASES))
def test_peft_agrees_on_meta_llama2_7b(case, capsys):
    """The oracle: peft's own counts and printed line on the same meta model."""
    _, peft_kwargs, trainable, total, line = CASES[case]
    peft_model = get_peft_model(meta_llama2_7b(), LoraConfig(**peft_kwargs))
    assert peft_model.get_nb_trainable_parameters() == (trainable, total)
    capsys.readouterr()
    peft_model.print_trainable_parameters()
    assert capsys.readouterr().out.strip() == line
