"""Mixed batches: one forward, each row through its own adapter (or none)."""

from __future__ import annotations

import pytest
import torch
from conftest import FACTORIES, VOCAB

import graft
from graft.core import adapter_parameters

NAMES = ["a", "b", "c"]


def three_adapters(arch: str = "llama", **extra):
    model = FACTORIES[arch]()
    targets = {"llama": "all-linear", "gpt2": ["c_attn", "c_proj"]}[arch]
    ranks = {"a": 2, "b": 4, "c": 8}  # different ranks in one batch
    for i, name in enumerate(NAMES):
        graft.attach(model, graft.LoRA(r=ranks[name], targets=targets, **extra.get(name, {})), name=name)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in adapter_parameters(model, name).values():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def alone(model, ids_row, name):
    if name is None:
        with graft.disabled(model):
            return model(ids_row).logits
    graft.activate(model, name)
    return model(ids_row).logits


@torch.no_grad()
def generate_alone(model, row, name, kw):
    if name is None:
        with graft.disabled(model):
            return model.generate(row, attention_mask=torch.ones_like(row), **kw)
    graft.activate(model, name)
    return model.generate(row, attention_mask=torch.ones_like(row), **kw)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_route_logits_match_rows_alone(arch):
    model = three_adapters(arch)
    ids = torch.randint(0, VOCAB, (6, 9), generator=torch.Generator().manual_seed(0))
    routing = ["a", "b", None, "c", "a", None]
    with torch.no_grad():
        with graft.route(model, routing):
            mixed = model(ids).logits
        for i, name in enumerate(routing):
            torch.testing.assert_close(mixed[i : i + 1], alone(model, ids[i : i + 1], name), atol=1e-5, rtol=0)
    # The routing context restores normal behaviour.
    graft.activate(model, "b")
    assert torch.allclose(model(ids[:1]).logits, alone(model, ids[:1], "b"))


def test_route_greedy_generation_matches_rows_alone():
    model = three_adapters()
    prompts = torch.randint(3, VOCAB, (4, 5), generator=torch.Generator().manual_seed(1))
    routing = ["c", None, "a", "b"]
    kw = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad(), graft.route(model, routing):
        mixed = model.generate(prompts, attention_mask=torch.ones_like(prompts), **kw)
    for i, name in enumerate(routing):
        single = generate_alone(model, prompts[i : i + 1], name, kw)
        n = single.shape[1]  # a row that hit EOS alone is padded (pad_token_id 0) in the batch
        assert torch.equal(mixed[i, :n], single[0]), f"row {i} ({name}) generated differently in the mixed batch"
        assert (mixed[i, n:] == 0).all()
    # Rows really differ between adapters: otherwise the test proves nothing.
    assert len({tuple(r.tolist()) for r in mixed}) > 1


def test_route_with_dora_and_dropout_falls_back_correctly():
    model = three_adapters(extra={"b": {"dora": True}, "c": {"dropout": 0.1}})
    ids = torch.randint(0, VOCAB, (3, 6), generator=torch.Generator().manual_seed(2))
    routing = ["b", "c", "a"]
    with torch.no_grad(), graft.route(model, routing):
        mixed = model(ids).logits
    with torch.no_grad():
        for i, name in enumerate(routing):
            torch.testing.assert_close(mixed[i : i + 1], alone(model, ids[i : i + 1], name), atol=1e-5, rtol=0)


def test_route_trains_each_adapter_on_its_rows():
    model = three_adapters()
    for name in NAMES:
        for p in adapter_parameters(model, name).values():
            p.requires_grad_(True)
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    with graft.route(model, ["a", None]):
        model(ids).logits.pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter_parameters(model, "a").values())
    assert all(p.grad is None for n in ("b", "c") for p in adapter_parameters(model, n).values())


def test_route_rejects_bad_input():
    model = three_adapters()
    with pytest.raises(ValueError, match="no adapter named 'zzz'"), graft.route(model, ["a", "zzz"]):
        pass
    ids = torch.randint(0, VOCAB, (3, 4))
    with pytest.raises(ValueError, match="2 adapter names but the batch has 3 rows"), graft.route(model, ["a", "b"]):
        model(ids)
    graft.merge(model)
    with pytest.raises(RuntimeError, match="unmerge"), graft.route(model, ["a", None]):
        pass


def test_route_cache_follows_weight_updates():
    model = three_adapters()
    ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), graft.route(model, ["a", "b"]):
        first = model(ids).logits
        for p in adapter_parameters(model, "a").values():
            p.mul_(2.0)  # in place, as an optimizer step would
        second = model(ids).logits
    assert not torch.allclose(first[0], second[0], atol=1e-4)  # row "a" sees its new weights
    torch.testing.assert_close(first[1], second[1], atol=0, rtol=0)  # row "b" is untouched
    with torch.no_grad():
        torch.testing.assert_close(second[:1], alone(model, ids[:1], "a"), atol=1e-5, rtol=0)


def test_route_beam_search_copies_follow_their_row():
    """Beam search expands each row into num_beams copies: every copy takes its row's adapter."""
    model = three_adapters()
    prompts = torch.randint(3, VOCAB, (3, 5), generator=torch.Generator().manual_seed(5))
    routing = ["b", None, "c"]
    kw = {"max_new_tokens": 6, "num_beams": 3, "do_sample": False, "pad_token_id": 0, "early_stopping": True}
    with torch.no_grad(), graft.route(model, routing):
        mixed = model.generate(prompts, attention_mask=torch.ones_like(prompts), **kw)
    for i, name in enumerate(routing):
        single = generate_alone(model, prompts[i : i + 1], name, kw)
        n = single.shape[1]
        assert torch.equal(mixed[i, :n], single[0]), f"row {i} ({name}) differs under beam search"


def test_base_rows_stay_exact_when_an_adapter_row_overflows():
    """A base row in a routed batch gets no adapter term at all: not even a NaN from another row's
    overflowing delta (fp16 adapters can overflow)."""
    model = three_adapters()
    ids = torch.randint(0, VOCAB, (3, 6), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        for name, p in adapter_parameters(model, "a").items():
            if "lora_B" in name:
                p.fill_(float("inf"))
        with graft.route(model, ["a", None, "b"]):
            mixed = model(ids).logits
        with graft.disabled(model):
            base = model(ids[1:2]).logits
    assert not torch.isfinite(mixed[0]).all()  # the overflowing row really overflows
    torch.testing.assert_close(mixed[1:2], base, atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[2:3], alone(model, ids[2:3], "b"), atol=1e-5, rtol=0)


def test_merged_check_follows_attach_and_deep_copies():
    """route/disabled check merged layers on a cached layer list: it must see new adapters and a
    deep copy's own layers (the copy carries the cache along)."""
    import copy

    model = three_adapters()
    with graft.route(model, ["a", "b"]):  # fills the cache
        pass
    graft.attach(model, graft.LoRA(r=2, targets=["lm_head"]), name="d")  # a new layer, after the cache
    graft.activate(model, "d")
    graft.merge(model)
    with pytest.raises(RuntimeError, match="unmerge"), graft.route(model, ["a", None]):
        pass
    graft.unmerge(model)
    twin = copy.deepcopy(model)
    graft.activate(twin, "a")
    graft.merge(twin)  # only the copy is merged
    with graft.route(model, ["a", None]):
        pass
    with pytest.raises(RuntimeError, match="unmerge"), graft.route(twin, ["a", None]):
        pass
    with pytest.raises(RuntimeError, match="unmerge"), graft.disabled(twin):
        pass
