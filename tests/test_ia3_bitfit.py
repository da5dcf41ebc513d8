"""(IA)³ and BitFit: the invariant matrix, closed-form counts, peft interchange (IA3), routing, bad input."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import FACTORIES, VOCAB, batch_for, logits, perturb_adapters
from peft import IA3Config, PeftModel, get_peft_model
from peft.tuners.ia3 import IA3Layer
from peft.utils import load_peft_weights, set_peft_model_state_dict
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

import graft
from graft.core import STATE_ATTR, adapter_layers, adapter_parameters
from graft.methods.bitfit import BitFitLayer
from graft.methods.heads import ModulesToSave
from graft.methods.ia3 import IA3Linear

PREFIX = "base_model.model."
TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS", "t5": "SEQ_2_SEQ_LM"}


def ia3_for(arch: str) -> graft.IA3:
    """The architecture defaults; BERT's classifier is trained in full and saved with the adapter."""
    return graft.IA3(modules_to_save=["classifier"]) if arch == "bert" else graft.IA3()


def snapshot(model: torch.nn.Module) -> tuple[dict, dict, list]:
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {k: p.requires_grad for k, p in model.named_parameters()},
            [type(m).__name__ for m in model.modules()])


def assert_unchanged(model: torch.nn.Module, before: tuple[dict, dict, list]) -> None:
    state, grads, types = snapshot(model)
    assert state.keys() == before[0].keys()
    assert all(torch.equal(v, before[0][k]) for k, v in state.items())
    assert grads == before[1] and types == before[2]
    assert not hasattr(model, STATE_ATTR)


# (The invariant matrix rows for this method are in tests/test_method_matrix.py.)


# --------------------------------------------------------------------------------------------
# BitFit specifics


def test_bitfit_gradients_equal_training_the_bias_itself():
    inputs = batch_for("bert")
    plain = FACTORIES["bert"]()
    for name, p in plain.named_parameters():
        p.requires_grad_(name.endswith("bias") and not name.startswith("classifier"))
    plain.train()
    plain(**inputs).logits.pow(2).mean().backward()
    model = graft.attach(FACTORIES["bert"](), graft.BitFit())
    model.train()
    model(**inputs).logits.pow(2).mean().backward()
    deltas = {k.removesuffix(".bias_delta.default"): p for k, p in model.named_parameters() if ".bias_delta." in k}
    biases = {k.removesuffix(".bias"): p for k, p in plain.named_parameters() if p.requires_grad}
    assert deltas.keys() == biases.keys() and len(deltas) == 1 + 2 * 8 + 1  # embeddings LN, 8 per layer, pooler
    for k, p in deltas.items():
        torch.testing.assert_close(p.grad, biases[k].grad, atol=1e-7, rtol=1e-5)
    assert all(p.grad is None for k, p in model.named_parameters() if "base_layer" in k)


def test_bitfit_adapters_coexist_and_base_is_untouched(tmp_path):
    inputs = batch_for("gpt2")
    model = FACTORIES["gpt2"]()
    base = logits(model, inputs)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    graft.attach(model, graft.BitFit(), name="a")
    graft.attach(model, graft.BitFit(targets=["c_attn", "ln_f"]), name="b")
    for i, name in enumerate(("a", "b")):
        with torch.no_grad():
            for p in adapter_parameters(model, name).values():
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(i))
    outs = {}
    for name in ("a", "b"):
        graft.activate(model, name)
        outs[name] = logits(model, inputs)
    assert (outs["a"] - outs["b"]).abs().max() > 1e-2
    with graft.disabled(model):
        assert torch.equal(logits(model, inputs), base)
    unloaded = graft.unload(copy.deepcopy(model)).state_dict()
    assert unloaded.keys() == base_state.keys()
    assert all(torch.equal(unloaded[k], v) for k, v in base_state.items())  # bit-identical base
    graft.save(model, tmp_path, "b")
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert raw["peft_type"] == "BITFIT" and sorted(raw["target_modules"]) == ["c_attn", "ln_f"]
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == [PREFIX + "transformer.h.0.attn.c_attn.bias_delta",
                                    PREFIX + "transformer.h.1.attn.c_attn.bias_delta", PREFIX + "transformer.ln_f.bias_delta"]
    reloaded = graft.load(FACTORIES["gpt2"](), tmp_path)
    torch.testing.assert_close(logits(reloaded, inputs), outs["b"], atol=0, rtol=0)


def test_bitfit_trains_bert_head_in_full():
    model = graft.attach(FACTORIES["bert"](), graft.BitFit())
    head = model.get_submodule("classifier")
    assert isinstance(head, ModulesToSave)
    assert all(p.requires_grad for p in head.modules_to_save["default"].parameters())
    assert not any(isinstance(m, BitFitLayer) for m in head.modules())
    kinds = {type(layer.base_layer).__name__ for _, layer in adapter_layers(model) if isinstance(layer, BitFitLayer)}
    assert kinds == {"Linear", "LayerNorm"}


# --------------------------------------------------------------------------------------------
# Counts


def meta_llama2_7b() -> LlamaForCausalLM:
    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                            num_attention_heads=32, num_key_value_heads=32, vocab_size=32000))


def test_ia3_count_on_meta_llama2_7b():
    model = meta_llama2_7b()
    method = graft.IA3()
    assert method.count(model) == 32 * (4096 + 4096 + 11008) == 614_400
    graft.attach(model, method)
    rep = graft.report(model)
    assert (rep.trainable, rep.total) == (614_400, 6_738_415_616 + 614_400)
    not_meta = [n for n, p in model.named_parameters() if not p.is_meta]
    assert not not_meta, f"attach materialised {not_meta[:3]}"


def test_ia3_count_on_tiny_llama():
    # 2 layers x (k: 2 kv heads x 16 + v: 32 + down_proj input 128)
    assert graft.IA3().count(FACTORIES["llama"]()) == 2 * (32 + 32 + 128) == 384


def test_bitfit_count_is_bias_sizes_plus_head():
    model = FACTORIES["bert"]()
    biases = sum(p.numel() for n, p in model.named_parameters() if n.endswith(".bias") and not n.startswith("classifier"))
    head = sum(p.numel() for p in model.classifier.parameters())
    assert (biases, head) == (640, 99)
    method = graft.BitFit()
    assert method.count(model) == biases + head
    graft.attach(model, method)
    assert graft.report(model).trainable == biases + head


# --------------------------------------------------------------------------------------------
# Interchange with peft (IA3 only; peft has no BitFit)


def graft_ia3_layers(model) -> dict[str, bool]:
    return {n: layer.configs["default"].feedforward for n, layer in adapter_layers(model) if isinstance(layer, IA3Linear)}


def peft_ia3_layers(peft_model) -> dict[str, bool]:
    return {n.removeprefix(PREFIX): m.is_feedforward for n, m in peft_model.named_modules() if isinstance(m, IA3Layer)}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "t5"])
def test_ia3_graft_to_peft(arch, tmp_path):
    inputs = batch_for(arch)
    model = FACTORIES[arch]()
    base = logits(model, inputs)
    graft.attach(model, ia3_for(arch))
    perturb_adapters(model)
    want = logits(model, inputs)
    assert (want - base).abs().max() > 1e-2
    graft.save(model, tmp_path)

    config = IA3Config.from_pretrained(str(tmp_path))
    assert config.task_type == TASK[arch]
    config.inference_mode = False  # keep adapter tensors trainable so we can list them
    peft_model = get_peft_model(FACTORIES[arch](), config)
    adapter_keys = {k for k, p in peft_model.named_parameters() if p.requires_grad}
    result = set_peft_model_state_dict(peft_model, load_peft_weights(str(tmp_path), device="cpu"))
    assert result.unexpected_keys == []
    assert sorted(adapter_keys & set(result.missing_keys)) == []
    assert peft_ia3_layers(peft_model) == graft_ia3_layers(model)  # same modules, same kind on each
    torch.testing.assert_close(logits(peft_model.eval(), inputs), want, atol=1e-5, rtol=0)

    plain = PeftModel.from_pretrained(FACTORIES[arch](), str(tmp_path)).eval()
    torch.testing.assert_close(logits(plain, inputs), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "t5"])
def test_ia3_peft_to_graft(arch, tmp_path):
    inputs = batch_for(arch)
    base = logits(FACTORIES[arch](), inputs)
    peft_model = get_peft_model(FACTORIES[arch](), IA3Config(task_type=TASK[arch], fan_in_fan_out=arch == "gpt2"))
    perturb_adapters(peft_model)
    peft_model.eval()
    want = logits(peft_model, inputs)
    assert (want - base).abs().max() > 1e-2
    peft_model.save_pretrained(str(tmp_path))

    model = graft.load(FACTORIES[arch](), tmp_path)
    assert graft_ia3_layers(model) == peft_ia3_layers(peft_model)
    if arch == "bert":
        assert isinstance(model.get_submodule("classifier"), ModulesToSave)
    torch.testing.assert_close(logits(model, inputs), want, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------
# Routing: one forward, each row through its own adapter (or none)


def routed_model(arch: str, method_cls: type) -> torch.nn.Module:
    model = FACTORIES[arch]()
    for i, name in enumerate(("a", "b")):
        graft.attach(model, method_cls(), name=name)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in adapter_parameters(model, name).values():
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model


@pytest.mark.parametrize(("arch", "method_cls"), [("llama", graft.IA3), ("gpt2", graft.IA3), ("gpt2", graft.BitFit)])
def test_route_rows_match_rows_alone(arch, method_cls):
    model = routed_model(arch, method_cls)
    ids = torch.randint(3, VOCAB, (5, 8), generator=torch.Generator().manual_seed(0))
    routing = ["a", None, "b", "b", None]
    with torch.no_grad():
        with graft.route(model, routing):
            mixed = model(ids).logits
        for i, name in enumerate(routing):
            if name is None:
                with graft.disabled(model):
                    alone = model(ids[i : i + 1]).logits
            else:
                graft.activate(model, name)
                alone = model(ids[i : i + 1]).logits
            torch.testing.assert_close(mixed[i : i + 1], alone, atol=1e-5, rtol=0)
    assert (mixed[0] - mixed[2]).abs().max() > 1e-2  # the adapters really differ


# --------------------------------------------------------------------------------------------
# Bad input


def test_ia3_feedforward_must_be_subset_of_targets():
    with pytest.raises(ValueError, match=r"feedforward=\['down_proj'\] must be a subset of targets=\['k_proj', 'v_proj'\]"):
        graft.IA3(targets=["k_proj", "v_proj"], feedforward=["down_proj"])
    model = FACTORIES["llama"]()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"must be a subset of targets.*default targets for llama.*\['up_proj'\]"):
        graft.attach(model, graft.IA3(feedforward=["up_proj"]))
    with pytest.raises(ValueError, match="selects none of the targeted modules"):
        graft.attach(model, graft.IA3(targets=["k_proj", "down_proj"], feedforward=r".*up_proj"))
    assert_unchanged(model, before)


def test_ia3_unknown_target_suggests_names():
    model = FACTORIES["llama"]()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"IA3 targets=\('k_prj',\) matches no module.*Did you mean \['k_proj'"):
        graft.attach(model, graft.IA3(targets=["k_prj"]))
    with pytest.raises(TypeError, match="IA3 targets: module 'model.embed_tokens' is a Embedding"):
        graft.attach(model, graft.IA3(targets=["embed_tokens"]))
    assert_unchanged(model, before)


def test_ia3_needs_targets_for_unknown_architecture():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="no default is known for model_type=None"):
        graft.attach(model, graft.IA3())


def test_bitfit_target_without_bias_is_refused():
    model = FACTORIES["bert"]()
    with pytest.raises(ValueError, match="'word_embeddings' selects no module with a bias"):
        graft.attach(model, graft.BitFit(targets=["query", "word_embeddings"]))
    with pytest.raises(ValueError, match="Did you mean"):
        graft.attach(model, graft.BitFit(targets=["qurey"]))
    assert not hasattr(model, STATE_ATTR)
