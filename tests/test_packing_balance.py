"""pack(..., balance=True): even rows (less padding, less attention over the row), the same loss and gradients."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import graft
from graft import data
from graft.data.tokenize import Example
from graft.train.loss import causal_lm_loss_sum


def synthetic(lengths: list[int], seed: int = 0, vocab: int = 64) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        out.append(Example(ids, [-100] * (n // 3) + ids[n // 3:], source=f"synthetic {n}"))
    return out


def test_balance_evens_the_rows_and_keeps_every_example_once():
    examples = synthetic([7, 3, 5, 2, 6, 4, 1, 8])
    plain = data.pack(examples, max_length=10)
    even = data.pack(examples, max_length=10, balance=True)
    assert [r.seq_lens for r in plain] == [[8, 2], [7, 3], [6, 4], [5, 1]]  # width 10
    assert [r.seq_lens for r in even] == [[8, 1], [7, 2], [6, 3], [5, 4]]  # width 9, same row count
    assert sorted(i for r in even for i in r.indices) == list(range(8))
    for row in even:  # each example's tokens, positions and labels as pack lays them out
        assert row.input_ids == [t for i in row.indices for t in examples[i].input_ids]
        assert row.position_ids == [p for i in row.indices for p in range(len(examples[i]))]
    assert data.stats(even).supervised_tokens == data.stats(plain).supervised_tokens


def test_balance_keeps_best_fit_when_evening_out_would_widen_a_row():
    examples = synthetic([5, 5, 4, 3, 3])  # best fit: [5, 5] [4, 3, 3]; shortest-row-first would give 5+4 | 5+3+3
    assert [r.seq_lens for r in data.pack(examples, 10, balance=True)] == [[5, 5], [4, 3, 3]]


def test_balanced_rows_give_the_same_loss_and_gradients():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    graft.attach(model, graft.LoRA(r=4, alpha=8, targets="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # B = 0 would make the adapter's gradients trivial
    examples = synthetic([13, 9, 11, 4, 15, 7, 6, 10], seed=1)
    plain = data.collate(data.pack(examples, 24), pad_id=0, packed=True)
    even = data.collate(data.pack(examples, 24, balance=True), pad_id=0, packed=True)
    assert even["input_ids"].numel() < plain["input_ids"].numel()
    params = [p for p in model.parameters() if p.requires_grad]
    for selective in (True, False):
        results = []
        for batch in (plain, even):
            loss = causal_lm_loss_sum(model, batch, logits_chunk=8, selective=selective)
            grads = torch.autograd.grad(loss, params)
            results.append((loss.detach(), grads))
        (l1, g1), (l2, g2) = results
        torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-5)
        for a, b in zip(g1, g2):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
