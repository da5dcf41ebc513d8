"""graft.combine against peft's ``add_weighted_adapter`` (the oracle), on tiny Llama and GPT-2 models.

Each case gives both libraries the same adapters (graft's, saved and loaded into peft), combines them
with the same weights (one negative), and compares the logits and the saved tensors (atol 1e-5). DARE
draws its masks in peft from a generator seeded like graft's, in the same order (the test swaps peft's
``random_pruning`` for one with that generator; the pruning math is peft's).
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import VOCAB, tiny_gpt2, tiny_llama

import graft
from graft.compose.combine import METHODS, combine_state_dicts
from graft.core import adapter_layers, state_of
from graft.io import adapter_tensors, read_tensors

peft = pytest.importorskip("peft")
from peft import PeftModel
from peft.utils import merge_utils
from peft.utils.save_and_load import get_peft_model_state_dict

WEIGHTS = {"a": 0.7, "b": -0.4, "c": 1.1}
FACTORIES = {"llama": tiny_llama, "gpt2": tiny_gpt2}
TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}


def inputs() -> dict[str, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs()).logits


def with_adapters(arch: str, ranks=(4, 4, 4), alphas=(8, 4, 16), seed=0):
    """A tiny model carrying LoRA adapters a, b, c with random non-zero A and B."""
    model = FACTORIES[arch]()
    for i, (n, r, alpha) in enumerate(zip("abc", ranks, alphas)):
        graft.attach(model, graft.LoRA(r=r, alpha=alpha, targets=TARGETS[arch]), n)
        g = torch.Generator().manual_seed(seed + 10 * i)
        with torch.no_grad():
            for p in graft.core.adapter_parameters(model, n).values():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def peft_twin(model, arch: str, tmp_path):
    """The same base and adapters in peft (loaded from graft's saved files)."""
    for n in state_of(model).methods:
        graft.save(model, tmp_path / n, n)
    base = FACTORIES[arch]()
    twin = PeftModel.from_pretrained(base, tmp_path / "a", adapter_name="a")
    for n in state_of(model).methods:
        if n != "a":
            twin.load_adapter(tmp_path / n, adapter_name=n)
    return twin.eval()


@pytest.fixture
def seeded_dare(monkeypatch):
    """peft's DARE masks from a generator seeded as graft seeds its own (seed 0), drawn in the same order."""
    gen = torch.Generator().manual_seed(0)

    def random_pruning(tensor, density, rescale):
        keep = torch.bernoulli(torch.full(tensor.shape, density, dtype=tensor.dtype), generator=gen)
        pruned = tensor * keep
        return pruned / density if rescale else pruned

    monkeypatch.setattr(merge_utils, "random_pruning", random_pruning)
    return gen


CASES = [
    ("linear", {}), ("cat", {}), ("svd", {}), ("svd", {"rank": 3}),
    ("ties", {"density": 0.5}), ("ties", {"density": 0.7, "majority_sign": "frequency"}),
    ("dare_linear", {"density": 0.6}), ("dare_ties", {"density": 0.6}), ("magnitude_prune", {"density": 0.4}),
    ("ties_svd", {"density": 0.5}), ("dare_linear_svd", {"density": 0.6}), ("dare_ties_svd", {"density": 0.6}),
    ("magnitude_prune_svd", {"density": 0.5, "rank": 6}),
]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """(graft model, peft twin) per (arch, equal ranks?), built once: each case adds its own adapter."""
    cache = {}

    def get(arch: str, equal: bool):
        if (arch, equal) not in cache:
            model = with_adapters(arch, ranks=(4, 4, 4) if equal else (4, 2, 6))
            cache[arch, equal] = model, peft_twin(model, arch, tmp_path_factory.mktemp(arch))
        return cache[arch, equal]

    return get


@pytest.mark.parametrize("arch", list(FACTORIES))
@pytest.mark.parametrize(("method", "options"), CASES, ids=[f"{m}-{'-'.join(map(str, o.values()))}" for m, o in CASES])
def test_matches_peft(arch, method, options, pairs, tmp_path, seeded_dare):
    # Unequal ranks where the method allows them (cat, svd forms), equal ones where it sums factors.
    model, twin = pairs(arch, method in ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"))
    mix = f"mix{len(state_of(model).methods)}"

    name = graft.combine(model, WEIGHTS, method=method, name=mix, **options)
    assert name == mix and graft.active_adapters(model) == [mix]
    peft_options = {"density": options.get("density"), "svd_rank": options.get("rank"),
                    "majority_sign_method": options.get("majority_sign", "total")}
    twin.add_weighted_adapter(list(WEIGHTS), list(WEIGHTS.values()), mix, combination_type=method, **peft_options)
    twin.set_adapter(mix)

    torch.testing.assert_close(logits(model), logits(twin), atol=1e-5, rtol=0)
    graft.save(model, tmp_path / mix, mix)
    ours = read_tensors(tmp_path / mix)
    theirs = get_peft_model_state_dict(twin, adapter_name=mix)
    assert sorted(ours) == sorted(theirs)
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-5, rtol=0, msg=key)


@pytest.mark.parametrize("arch", list(FACTORIES))
def test_cat_is_the_exact_weighted_sum_of_deltas(arch):
    model = with_adapters(arch, ranks=(4, 2, 6))
    graft.combine(model, WEIGHTS, method="cat", name="mix")
    layers = [layer for _, layer in adapter_layers(model)]
    assert layers
    for layer in layers:
        assert layer.lora_A["mix"].weight.shape[0] == 12 and layer.scaling["mix"] == 1.0
        expected = sum(w * layer.delta_weight(n) for n, w in WEIGHTS.items())
        torch.testing.assert_close(layer.delta_weight("mix"), expected, atol=1e-6, rtol=1e-6)
    # ... and so the model equals all three adapters active at once, scaled.
    plain = with_adapters(arch, ranks=(4, 2, 6))
    with torch.no_grad():
        for n, w in WEIGHTS.items():
            for _, layer in adapter_layers(plain):
                layer.lora_B[n].weight.mul_(w)
    graft.activate(plain, list(WEIGHTS))
    torch.testing.assert_close(logits(model), logits(plain), atol=1e-5, rtol=0)


def test_svd_rank_truncates_and_full_rank_is_exact():
    model = with_adapters("llama", ranks=(4, 2, 6))
    graft.combine(model, WEIGHTS, method="svd", rank=12, name="full")
    graft.combine(model, WEIGHTS, method="svd", rank=2, name="low")
    for _, layer in adapter_layers(model):
        expected = sum(w * layer.delta_weight(n) for n, w in WEIGHTS.items())
        torch.testing.assert_close(layer.delta_weight("full"), expected, atol=1e-5, rtol=0)
        assert torch.linalg.matrix_rank(layer.delta_weight("low")) == 2


def test_negative_weight_negates_the_adapter():
    model = with_adapters("llama")
    graft.combine(model, {"a": -1.0}, method="linear", name="neg")
    for _, layer in adapter_layers(model):
        torch.testing.assert_close(layer.delta_weight("neg"), -layer.delta_weight("a"), atol=1e-6, rtol=1e-6)


def test_result_saves_loads_in_peft_and_merges(tmp_path):
    model = with_adapters("gpt2", ranks=(4, 2, 6))
    graft.combine(model, WEIGHTS, method="ties_svd", density=0.5, rank=5, name="mix")
    want = logits(model)
    graft.save(model, tmp_path / "mix", "mix")
    loaded = PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "mix").eval()
    torch.testing.assert_close(logits(loaded), want, atol=1e-5, rtol=0)
    again = graft.load(tiny_gpt2(), tmp_path / "mix")
    torch.testing.assert_close(logits(again), want, atol=1e-6, rtol=0)
    graft.merge(model, "mix")
    torch.testing.assert_close(logits(model), want, atol=1e-5, rtol=0)


def test_ia3_matches_peft(tmp_path):
    model = tiny_llama()
    for i, n in enumerate("ab"):
        graft.attach(model, graft.IA3(), n)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in graft.core.adapter_parameters(model, n).values():
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    twin = peft_twin(model, "llama", tmp_path)
    graft.combine(model, {"a": 0.6, "b": -0.3}, name="mix")
    twin.add_weighted_adapter(["a", "b"], [0.6, -0.3], "mix")
    twin.set_adapter("mix")
    torch.testing.assert_close(logits(model), logits(twin), atol=1e-5, rtol=0)
    graft.save(model, tmp_path / "mix", "mix")
    ours, theirs = read_tensors(tmp_path / "mix"), get_peft_model_state_dict(twin, adapter_name="mix")
    assert sorted(ours) == sorted(theirs)
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-6, rtol=0)


def test_state_dicts_without_a_model_equal_the_model_path():
    model = with_adapters("llama", ranks=(4, 2, 6))
    graft.combine(model, WEIGHTS, method="dare_ties_svd", density=0.5, rank=4, name="mix", seed=7)
    sds = [adapter_tensors(model, n) for n in WEIGHTS]
    scalings = [state_of(model).methods[n].alpha / state_of(model).methods[n].r for n in WEIGHTS]
    out = combine_state_dicts(sds, list(WEIGHTS.values()), "dare_ties_svd", scalings=scalings, density=0.5,
                              rank=4, seed=7)
    mix = adapter_tensors(model, "mix")
    assert sorted(out) == sorted(mix)
    for key in out:
        torch.testing.assert_close(out[key], mix[key], atol=1e-6, rtol=0)


def test_dare_is_seeded():
    model = with_adapters("llama")
    graft.combine(model, WEIGHTS, method="dare_linear", density=0.5, name="x", seed=1)
    graft.combine(model, WEIGHTS, method="dare_linear", density=0.5, name="y", seed=1)
    graft.combine(model, WEIGHTS, method="dare_linear", density=0.5, name="z", seed=2)
    x, y, z = (adapter_tensors(model, n) for n in "xyz")
    assert all(torch.equal(a, b) for a, b in zip(x.values(), y.values()))
    assert not all(torch.equal(a, b) for a, b in zip(x.values(), z.values()))


# ---- bad input: a clear error, and the model is exactly as it was


def snapshot(model):
    state = state_of(model)
    return (sorted(state.methods), list(state.active),
            {k: v.detach().clone() for k, v in model.state_dict().items()},
            [n for n, _ in model.named_modules()])


def assert_unchanged(model, before):
    after = snapshot(model)
    assert after[0] == before[0] and after[1] == before[1] and after[3] == before[3]
    assert all(torch.equal(after[2][k], v) for k, v in before[2].items())


BAD = [
    ({"weights": WEIGHTS, "method": "average"}, "is not one of"),
    ({"weights": WEIGHTS, "method": "ties", "density": 0.0}, r"outside \(0, 1\]"),
    ({"weights": WEIGHTS, "method": "ties", "density": 1.5}, r"outside \(0, 1\]"),
    ({"weights": WEIGHTS, "method": "ties"}, "needs density"),
    ({"weights": WEIGHTS, "method": "linear", "density": 0.5}, "density is for"),
    ({"weights": WEIGHTS, "method": "cat", "rank": 4}, "rank is for"),
    ({"weights": WEIGHTS, "method": "svd", "rank": 0}, "positive integer"),
    ({"weights": WEIGHTS, "method": "svd", "rank": 100}, "exceeds min"),
    ({"weights": {"a": 1.0, "zz": 1.0}}, "no adapter named"),
    ({"weights": {}}, "weights must map"),
    ({"weights": {"a": float("nan")}}, "finite"),
    ({"weights": WEIGHTS, "name": "a"}, "already attached"),
    ({"weights": WEIGHTS, "majority_sign": "vote", "method": "ties", "density": 0.5}, "majority_sign"),
]


@pytest.mark.parametrize(("kwargs", "match"), BAD, ids=[m for _, m in BAD])
def test_bad_input_changes_nothing(kwargs, match):
    model = with_adapters("llama")
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        graft.combine(model, **kwargs)
    assert_unchanged(model, before)


def test_rank_mismatch_for_linear_is_refused():
    model = with_adapters("llama", ranks=(4, 2, 6))
    before = snapshot(model)
    with pytest.raises(ValueError, match="same rank.*'cat'"):
        graft.combine(model, WEIGHTS, method="ties", density=0.5)
    assert_unchanged(model, before)


def test_different_methods_or_targets_are_refused():
    model = with_adapters("llama")
    graft.attach(model, graft.IA3(targets=["k_proj"], feedforward=[]), "ia3")
    graft.attach(model, graft.LoRA(r=4, targets=["q_proj"]), "q_only")
    before = snapshot(model)
    with pytest.raises(ValueError, match="all of one method"):
        graft.combine(model, {"a": 1.0, "ia3": 1.0})
    with pytest.raises(ValueError, match="different targets"):
        graft.combine(model, {"a": 1.0, "q_only": 1.0})
    assert_unchanged(model, before)
    dora = with_adapters("llama")
    graft.attach(dora, graft.LoRA(r=4, targets=["q_proj", "v_proj"], dora=True), "d")
    with pytest.raises(ValueError, match="DoRA"):
        graft.combine(dora, {"a": 1.0, "d": 1.0})


def test_state_dict_errors():
    model = with_adapters("llama", ranks=(4, 2, 6))
    sds = [adapter_tensors(model, n) for n in WEIGHTS]
    with pytest.raises(ValueError, match="got 2 weights for 3 adapters"):
        combine_state_dicts(sds, [1.0, 2.0], "cat")
    with pytest.raises(ValueError, match="same rank"):
        combine_state_dicts(sds, [1.0, 2.0, 3.0], "linear")
    other = with_adapters("gpt2")
    with pytest.raises(ValueError, match="same tensors"):
        combine_state_dicts([sds[0], adapter_tensors(other, "a")], [1.0, 1.0], "cat")
    bigger = copy.deepcopy(sds[0])
    key = next(k for k in bigger if k.endswith("lora_A.weight"))
    bigger[key] = torch.zeros(4, 128)
    with pytest.raises(ValueError, match="different base models"):
        combine_state_dicts([sds[0], bigger], [1.0, 1.0], "cat")


def test_methods_listed():
    assert set(METHODS) == {"linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_linear_svd",
                            "dare_ties", "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd", "lorahub"}


def test_lorahub_method_sums_the_factors():
    model = with_adapters("llama", alphas=(8, 8, 8))
    graft.combine(model, WEIGHTS, method="lorahub", name="hub")
    for _, layer in adapter_layers(model):
        a = sum(w * layer.lora_A[n].weight for n, w in WEIGHTS.items())
        b = sum(w * layer.lora_B[n].weight for n, w in WEIGHTS.items())
        torch.testing.assert_close(layer.delta_weight("hub"), 2.0 * (b @ a), atol=1e-5, rtol=1e-5)
