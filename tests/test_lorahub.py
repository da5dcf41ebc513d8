"""graft.lorahub on a tiny Llama with the SmolLM2 tokenizer.

The constructed case: adapter "right" is fitted to the examples, the others are random; the search
must lower the example loss from w = 0 and lean on "right". The adapter it leaves equals
``graft.combine`` with the weights it reports (``lorahub`` form and ``cat`` form), a seed reproduces a
search, and bad input fails before the model changes.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import graft
import graft.models
from graft.compose.lorahub import example_batch, example_loss
from graft.core import adapter_parameters, state_of

pytest.importorskip("nevergrad")

EXAMPLES = [(f"Q: colour of item {i}?\nA:", " blue") for i in range(5)]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(graft.models.resolve("smollm2-135m"), local_files_only=True)


def tiny(tokenizer) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=256,
                      initializer_range=0.2)  # logits wide enough for an adapter to matter
    return LlamaForCausalLM(cfg).eval()


def fit(model, tokenizer, name: str, steps: int = 20) -> None:
    """Train adapter ``name`` on EXAMPLES (the completion tokens only)."""
    graft.activate(model, name)
    batch = example_batch(tokenizer, EXAMPLES)
    params = list(adapter_parameters(model, name).values())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=0.05)
    for _ in range(steps):
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    position_ids=batch.position_ids, logits_to_keep=batch.keep)
        logits = out.logits[:, -batch.keep:-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.targets.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p in params:
        p.requires_grad_(False)


@pytest.fixture(scope="module")
def hub(tokenizer):
    """A tiny model with adapters noise0, right, noise1 (r=4, q/v), "right" fitted to EXAMPLES."""
    model = tiny(tokenizer)
    for i, n in enumerate(["noise0", "right", "noise1"]):
        graft.attach(model, graft.LoRA(r=4, alpha=8, targets=["q_proj", "v_proj"]), n)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in adapter_parameters(model, n).values():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    fit(model, tokenizer, "right")
    return model


def loss_with(model, tokenizer, name: str) -> float:
    graft.activate(model, name)
    return example_loss(model, example_batch(tokenizer, EXAMPLES))


def test_search_lowers_the_loss_and_finds_the_right_adapter(hub, tokenizer):
    result = graft.lorahub(hub, tokenizer, ["noise0", "right", "noise1"], EXAMPLES, name="found", seed=0)
    try:
        assert result.name == "found" and graft.active_adapters(hub) == ["found"]
        assert len(result.trace) == 40 and len(result.eval_seconds) == 40
        with graft.disabled(hub):
            base = example_loss(hub, example_batch(tokenizer, EXAMPLES))
        assert result.start_loss == pytest.approx(base, rel=1e-5)
        right = loss_with(hub, tokenizer, "right")
        assert right < result.start_loss - 3.0  # the constructed case: one adapter is clearly right
        # the search recovers most of what the right adapter alone gains over the base
        assert result.loss < result.start_loss - 0.8 * (result.start_loss - right), (result.loss, right)
        graft.activate(hub, "found")
        weights = dict(zip(result.adapters, result.weights))
        assert abs(weights["right"]) == max(abs(w) for w in weights.values()), weights
        assert all(abs(w) <= 1.5 for w in result.weights)
        assert result.objective == pytest.approx(result.loss + 0.05 * sum(map(abs, result.weights)) / 3, rel=1e-6)
        assert loss_with(hub, tokenizer, "found") == pytest.approx(result.loss, rel=1e-5)
    finally:
        graft.detach(hub, "found")


@pytest.mark.parametrize(("form", "method"), [("factors", "lorahub"), ("cat", "cat")])
def test_swapped_factors_equal_combine(hub, tokenizer, form, method, tmp_path):
    names = ["noise0", "right", "noise1"]
    result = graft.lorahub(hub, tokenizer, names, EXAMPLES, name="found", form=form, budget=6, seed=1)
    try:
        graft.combine(hub, dict(zip(names, result.weights)), method=method, name="same")
        ids = example_batch(tokenizer, EXAMPLES).input_ids
        logits = {}
        for n in ("found", "same"):
            graft.activate(hub, n)
            with torch.no_grad():
                logits[n] = hub(input_ids=ids).logits
        torch.testing.assert_close(logits["found"], logits["same"], atol=1e-5, rtol=0)
        # an ordinary adapter: saves and loads into a fresh model with the same outputs
        graft.save(hub, tmp_path / "found", "found")
        fresh = graft.load(tiny(tokenizer), tmp_path / "found")
        with torch.no_grad():
            torch.testing.assert_close(fresh(input_ids=ids).logits, logits["found"], atol=1e-5, rtol=0)
    finally:
        for n in ("found", "same"):
            if n in state_of(hub).methods:
                graft.detach(hub, n)


def test_seeded_runs_reproduce(hub, tokenizer):
    names = ["noise0", "right", "noise1"]
    graft.activate(hub, "right")
    runs = []
    # NGOpt picks a deterministic optimizer at this budget; RandomSearch shows the seed reaches nevergrad.
    for name, seed, optimizer in (("s1", 3, "NGOpt"), ("s2", 3, "NGOpt"), ("r1", 3, "RandomSearch"),
                                  ("r2", 3, "RandomSearch"), ("r3", 4, "RandomSearch")):
        runs.append(graft.lorahub(hub, tokenizer, names, EXAMPLES, name=name, budget=3, seed=seed,
                                  optimizer=optimizer, activate=False))
    try:
        assert runs[0].weights == runs[1].weights and runs[0].trace == runs[1].trace
        assert runs[2].weights == runs[3].weights and runs[2].trace == runs[3].trace
        assert runs[2].weights != runs[4].weights
        assert graft.active_adapters(hub) == ["right"]  # activate=False restores the active set
    finally:
        for r in runs:
            graft.detach(hub, r.name)


def test_dict_examples_and_per_example_loss(hub, tokenizer):
    dicts = [{"prompt": p, "completion": c} for p, c in EXAMPLES]
    a = graft.lorahub(hub, tokenizer, ["noise0", "right"], dicts, name="a", budget=3, seed=0)
    b = graft.lorahub(hub, tokenizer, ["noise0", "right"], EXAMPLES, name="b", budget=3, seed=0, per_example=True)
    try:
        assert b.start_loss == pytest.approx(a.start_loss / 5, rel=1e-6)
    finally:
        graft.detach(hub, "a")
        graft.detach(hub, "b")


def test_example_batch_masks_the_prompt(tokenizer):
    batch = example_batch(tokenizer, [("Hello there, a long prompt", " yes"), ("Hi", " no way")])
    comp = [tokenizer(" yes", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id],
            tokenizer(" no way", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]]
    assert batch.keep == max(map(len, comp)) + 1
    for row, c in zip(batch.targets.tolist(), comp):
        assert [t for t in row if t != -100] == c
        assert row[-len(c):] == c  # right-aligned: completions end at the last position
    assert batch.attention_mask[1, 0] == 0 and batch.attention_mask[:, -1].all()


BAD = [
    ({"adapters": []}, "non-empty list"),
    ({"adapters": ["right", "nope"]}, "no adapter named"),
    ({"adapters": ["right", "right"]}, "twice"),
    ({"name": "right"}, "new adapter name"),
    ({"form": "sum"}, "not one of"),
    ({"budget": 0}, "positive number"),
    ({"bound": 0.0}, "must be positive"),
    ({"optimizer": "Nope"}, "nevergrad optimizer"),
    ({"examples": []}, "non-empty list"),
    ({"examples": [("prompt only",)]}, "pair of strings"),
    ({"examples": [("p", "  ")]}, "empty completion"),
    ({"adapters": ["right", "r2"]}, "equal ranks"),
    ({"adapters": ["right", "qonly"]}, "same targets"),
]


@pytest.mark.parametrize(("kwargs", "match"), BAD, ids=[m for _, m in BAD])
def test_bad_input_changes_nothing(hub, tokenizer, kwargs, match):
    state = state_of(hub)
    if "r2" not in state.methods:
        graft.attach(hub, graft.LoRA(r=2, targets=["q_proj", "v_proj"]), "r2", activate=False)
        graft.attach(hub, graft.LoRA(r=4, targets=["q_proj"]), "qonly", activate=False)
    graft.activate(hub, "right")
    before = (sorted(state.methods), list(state.active), [n for n, _ in hub.named_modules()])
    args = {"adapters": ["noise0", "right"], "examples": EXAMPLES, **kwargs}
    with pytest.raises(ValueError, match=match):
        graft.lorahub(hub, tokenizer, args.pop("adapters"), args.pop("examples"), budget=args.pop("budget", 2), **args)
    assert (sorted(state.methods), list(state.active), [n for n, _ in hub.named_modules()]) == before
