"""graft.train.packed_attention: per-example attention on packed rows equals the block-masked sdpa."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import graft
from graft import data
from graft.data.tokenize import Example
from graft.train import TrainConfig, train
from graft.train import packed_attention as pa
from graft.train.loss import causal_lm_loss_sum


def tiny() -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))  # grouped K/V heads
    graft.attach(model, graft.LoRA(r=4, alpha=8, targets="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model


def examples(lengths: list[int], seed: int = 1) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, 64, (n,), generator=g).tolist()
        out.append(Example(ids, [-100] * 3 + ids[3:]))
    return out


def test_segments_cut_where_positions_restart():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 0, 1, 2]])
    assert pa.segments(pos) == [[(0, 3), (3, 5), (5, 9)], [(0, 6), (6, 9)]]


@pytest.fixture
def cut(monkeypatch):
    """Counts the forwards that took the per-example path (segments are computed once per forward)."""
    calls = []
    real = pa.segments
    monkeypatch.setattr(pa, "segments", lambda pos: calls.append(1) or real(pos))
    pa._cache.clear()
    return calls


@pytest.mark.parametrize("selective", [True, False])
def test_same_loss_and_gradients_as_the_block_mask(selective, cut):
    model = tiny()
    batch = data.collate(data.pack(examples([13, 9, 11, 4, 15, 7, 6, 10]), 24), pad_id=0, packed=True)
    assert (batch["position_ids"][:, 1:] == 0).any()  # rows of several examples (and trailing padding)
    params = [p for p in model.parameters() if p.requires_grad]
    loss = causal_lm_loss_sum(model, batch, logits_chunk=8, selective=selective)
    grads = torch.autograd.grad(loss, params)
    with pa.packed_attention(model):
        assert model.config._attn_implementation == pa.NAME
        loss2 = causal_lm_loss_sum(model, batch, logits_chunk=8, selective=selective)
        grads2 = torch.autograd.grad(loss2, params)
    assert model.config._attn_implementation == "sdpa"  # restored
    assert len(cut) == 1  # the per-example path ran (one plan for the forward's two layers)
    torch.testing.assert_close(loss2, loss, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, grads2):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_other_inputs_fall_back_to_sdpa(cut):
    """Padded rows with an attention mask, and decoding with a KV cache, give exactly sdpa's result."""
    model = tiny().eval()
    ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        out = model(input_ids=ids[:, :6], attention_mask=mask[:, :6], use_cache=True)
        step_ref = model(input_ids=ids[:, 6:], attention_mask=mask, past_key_values=out.past_key_values).logits
        with pa.packed_attention(model):
            got = model(input_ids=ids, attention_mask=mask).logits
            out = model(input_ids=ids[:, :6], attention_mask=mask[:, :6], use_cache=True)
            step = model(input_ids=ids[:, 6:], attention_mask=mask, past_key_values=out.past_key_values).logits
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(step, step_ref)
    assert cut == []  # a padding mask is not a block-causal one: sdpa ran


def test_trainer_uses_it_for_packed_batches_on_the_cpu_only(cut):
    rows = examples([13, 9, 11, 4])
    cfg = TrainConfig(lr=1e-3, epochs=1, batch_size=4, progress=False)
    results, seen = [], []
    for collate in (lambda b: data.collate(data.pack(b, 24), pad_id=0, packed=True),
                    lambda b: data.collate(b, pad_id=0)):
        model = tiny()
        model.model.layers[0].self_attn.register_forward_pre_hook(
            lambda m, *_: seen.append(m.config._attn_implementation) if m.training else None)
        results.append(train(model, rows, collate, cfg))
        assert model.config._attn_implementation == "sdpa"  # restored after training
    assert seen == [pa.NAME, "sdpa"]  # the training step: packed, then padded
    assert len(cut) == 2  # the trainer's probe, then the packed step
    assert results[0].losses[0] == pytest.approx(results[1].losses[0], rel=1e-5)  # same examples, same loss


def test_applies_only_to_packed_fp32_batches_on_the_cpu_after_a_probe():
    model = tiny()
    packed = data.collate(data.pack(examples([13, 9, 11]), 24), pad_id=0, packed=True)
    padded = data.collate(examples([13, 9, 11]), pad_id=0)
    cpu = torch.device("cpu")
    assert pa.applies(model, packed, cpu)
    assert model.config._attn_implementation == "sdpa" and model.training  # the probe leaves the model as it was
    assert not pa.applies(model, padded, cpu)  # an attention mask: not packed
    assert not pa.applies(model.to(torch.bfloat16), packed, cpu)  # the probe's exactness bar is for fp32


@pytest.mark.parametrize("amx", [False, True])
def test_16_bit_attention_runs_in_fp32_on_a_cpu_without_amx(monkeypatch, amx):
    """Without AMX the CPU's bf16 attention kernel is slower than fp32's: the pieces run in fp32, cast back."""
    monkeypatch.setattr(pa, "_cpu_has_amx", lambda: amx)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, h, 9, 8, generator=g).to(torch.bfloat16) for h in (4, 2, 2))
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4]])
    module = torch.nn.Module()
    module.num_key_value_groups = 2
    pa._cache.clear()
    out, _ = pa.packed_sdpa_forward(module, q, k, v, pa.block_causal(position_ids), position_ids=position_ids)
    assert out.dtype == torch.bfloat16 and out.shape == (1, 9, 4, 8)
    compute = torch.bfloat16 if amx else torch.float32
    want = torch.cat([torch.nn.functional.scaled_dot_product_attention(
        q[..., s:e, :].to(compute), k[..., s:e, :].to(compute), v[..., s:e, :].to(compute), is_causal=True,
        enable_gqa=True) for s, e in ((0, 4), (4, 9))], dim=2).to(torch.bfloat16).transpose(1, 2)
    assert torch.equal(out, want)
    assert pa.upcast(q) is not amx and not pa.upcast(q.float())
