"""Prefix tuning's real-token initialisation (Li & Liang 2021 §7.2).

A prefix initialised from a text holds exactly the keys and values the frozen model computes for
that text, so the adapted model on X equals the base model on text + X (an exact check of the
layout and positions), and an untrained vocabulary-sampled prefix moves the base far less than
peft's N(0, 1) one.
"""

from __future__ import annotations

import pytest
import torch
from conftest import FACTORIES, VOCAB

import graft
from graft.methods.prefix import PrefixTuning
from graft.methods.prompt import input_adapters


class CharTokenizer:
    """Token ids = character codes modulo the tiny vocabulary (enough for text_token_ids)."""

    name_or_path = "char"

    def __call__(self, text: str) -> dict:
        return {"input_ids": [ord(c) % VOCAB for c in text]}


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_text_prefix_equals_the_text_in_context(arch):
    torch.manual_seed(0)
    base = FACTORIES[arch]().eval()
    text = "abcd"
    context = torch.tensor([CharTokenizer()(text)["input_ids"]])
    x = torch.randint(0, VOCAB, (2, 7))
    expected = _logits(base, torch.cat([context.expand(2, -1), x], dim=1))[:, context.shape[1]:]
    graft.attach(base, PrefixTuning(len(text), init="text", init_text=text, tokenizer=CharTokenizer()))
    torch.testing.assert_close(_logits(base, x), expected, atol=1e-5, rtol=1e-5)


def test_vocab_init_is_default_and_moves_the_base_less_than_random():
    torch.manual_seed(0)
    x = torch.randint(0, VOCAB, (4, 12))
    base = FACTORIES["llama"]().eval()
    reference = _logits(base, x)
    shifts = {}
    for init in ("vocab", "random"):
        model = FACTORIES["llama"]().eval()
        model.load_state_dict(base.state_dict())
        torch.manual_seed(1)
        graft.attach(model, PrefixTuning(8, init=init))
        shifts[init] = (_logits(model, x) - reference).abs().mean().item()
    assert PrefixTuning(8).init == "vocab"
    # a random tiny model's own activations are near N(0, 1) too, so the gap is smaller here than on a
    # trained model (SmolLM2: docs/benchmarks.md); it must still be clear
    assert shifts["vocab"] < 0.75 * shifts["random"], shifts


def test_projection_starts_at_the_activations_and_trains():
    torch.manual_seed(0)
    model = FACTORIES["llama"]()
    graft.attach(model, PrefixTuning(3, projection=True, encoder_hidden_size=16, init="text", init_text="zzz",
                                     tokenizer=CharTokenizer()))
    encoder = input_adapters(model).adapters["default"]
    table = encoder()
    assert torch.allclose(table[0], table[1]) and table.abs().sum() > 0  # every row at the text's mean activation
    x = torch.randint(0, VOCAB, (2, 5))
    model(input_ids=x, use_cache=False).logits.square().mean().backward()
    assert encoder.transform[-1].weight.grad.abs().sum() > 0  # zero output weight still gets a gradient


def test_loading_runs_no_forward_and_keeps_the_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = FACTORIES["llama"]()
    graft.attach(model, PrefixTuning(4))
    graft.save(model, tmp_path / "p")
    saved = input_adapters(model).adapters["default"]().detach().clone()
    fresh = FACTORIES["llama"]()
    fresh.load_state_dict(model.state_dict(), strict=False)
    calls = []
    fresh.model.register_forward_pre_hook(lambda *a: calls.append(1))
    graft.load(fresh, tmp_path / "p")
    assert not calls
    torch.testing.assert_close(input_adapters(fresh).adapters["default"](), saved)


@pytest.mark.parametrize("kwargs, message", [
    ({"init": "words"}, r"init='words' is not one of"),
    ({"init": "text"}, r"init='text' needs init_text"),
    ({"init": "text", "init_text": "hi"}, r"needs tokenizer="),
    ({"init_text": "hi"}, r"init_text is only used with init='text'"),
])
def test_bad_init_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PrefixTuning(4, **kwargs)
