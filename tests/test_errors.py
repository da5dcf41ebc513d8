"""Bad input gets a clear error that names what was wrong and what is allowed, and loses nothing."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import VOCAB, batch_for, logits, perturb_adapters, tiny_gpt2, tiny_llama

import graft
from graft.io import CONFIG_NAME, WEIGHTS_NAME


def test_target_that_matches_nothing_suggests_close_names():
    with pytest.raises(ValueError, match=r"matches no module.*Did you mean \['q_proj'"):
        graft.attach(tiny_llama(), graft.LoRA(targets=["q_prj"]))


def test_target_typo_among_good_ones_is_not_silently_ignored():
    # peft silently ignores an entry that matches nothing when another one matches; graft refuses.
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"targets=\['v_prj'\] matches no module.*Did you mean \['v_proj'"):
        graft.attach(model, graft.LoRA(r=2, targets=["q_proj", "v_prj"]))
    assert not hasattr(model, graft.core.STATE_ATTR)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"r": 0}, r"r=0 must be a positive integer"),
        ({"r": -3}, r"r=-3 must be a positive integer"),
        ({"r": 2.5}, r"r=2.5 must be a positive integer"),
        ({"alpha": 0}, r"alpha=0 must be a positive number"),
        ({"alpha": -1.0}, r"alpha=-1.0 must be a positive number"),
        ({"dropout": 1.0}, r"dropout=1.0 is outside \[0, 1\)"),
        ({"dropout": -0.1}, r"dropout=-0.1 is outside \[0, 1\)"),
        ({"bias": "some"}, r"bias='some' is not one of \('none', 'all', 'lora_only'\)"),
        ({"init": "xavier"}, r"init='xavier' is not one of"),
        ({"rank_pattern": {"q_proj": 0}}, r"rank_pattern\['q_proj'\]=0 must be a positive integer"),
    ],
)
def test_bad_config_values(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        graft.LoRA(targets=["q_proj"], **kwargs)


def test_attaching_a_name_twice():
    model = tiny_llama()
    graft.attach(model, graft.LoRA(targets=["q_proj"]), name="sql")
    with pytest.raises(ValueError, match="an adapter named 'sql' is already attached"):
        graft.attach(model, graft.LoRA(targets=["v_proj"]), name="sql")


def test_unknown_adapter_names():
    model = tiny_llama()
    graft.attach(model, graft.LoRA(targets=["q_proj"]), name="sql")
    with pytest.raises(ValueError, match=r"no adapter named 'chat'; attached adapters: \['sql'\]"):
        graft.activate(model, "chat")
    with pytest.raises(ValueError, match="no adapter named"):
        graft.detach(model, "chat")


def test_loading_adapter_for_a_different_shape_names_module_and_shapes(tmp_path):
    small = tiny_llama()
    graft.attach(small, graft.LoRA(r=4, targets=["q_proj"]))
    graft.save(small, tmp_path)
    # Same architecture, wider hidden size: shapes no longer fit.
    from transformers import LlamaConfig, LlamaForCausalLM

    wide = LlamaForCausalLM(LlamaConfig(hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB))
    before = {k: v.clone() for k, v in wide.state_dict().items()}
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight' has shape \(4, 64\) "
                                         r"but the model expects \(4, 96\)"):
        graft.load(wide, tmp_path)
    # Nothing was lost: the model is back to a plain model with its weights unchanged.
    assert not hasattr(wide, graft.core.STATE_ATTR)
    assert all(torch.equal(before[k], v) for k, v in wide.state_dict().items())


def test_loading_on_a_model_without_the_targets(tmp_path):
    model = tiny_llama()
    graft.attach(model, graft.LoRA(targets=["q_proj"]))
    graft.save(model, tmp_path)
    with pytest.raises(ValueError, match="another architecture than this GPT2LMHeadModel: it adapts modules such as "
                                         r"\['model.layers.0.self_attn.q_proj', .*\(q_proj\)"):
        graft.load(tiny_gpt2(), tmp_path)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        graft.load(tiny_llama(), tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=f"has no {CONFIG_NAME}"):
        graft.load(tiny_llama(), tmp_path)


def _saved(tmp_path):
    model = tiny_llama()
    graft.attach(model, graft.LoRA(targets=["q_proj", "v_proj"]))
    perturb_adapters(model)
    graft.save(model, tmp_path)
    return model


def test_truncated_safetensors(tmp_path):
    _saved(tmp_path)
    data = (tmp_path / WEIGHTS_NAME).read_bytes()
    (tmp_path / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    model = tiny_llama()
    with pytest.raises(ValueError, match="truncated or corrupted"):
        graft.load(model, tmp_path)
    assert not hasattr(model, graft.core.STATE_ATTR)


def test_corrupted_safetensors_header(tmp_path):
    _saved(tmp_path)
    data = bytearray((tmp_path / WEIGHTS_NAME).read_bytes())
    data[8:40] = b"\xff" * 32  # garbage in the JSON header
    (tmp_path / WEIGHTS_NAME).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="truncated or corrupted"):
        graft.load(tiny_llama(), tmp_path)


def test_pickled_checkpoint_is_refused(tmp_path):
    _saved(tmp_path)
    (tmp_path / WEIGHTS_NAME).unlink()
    (tmp_path / "adapter_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(FileNotFoundError, match="never unpickles"):
        graft.load(tiny_llama(), tmp_path)


def test_unknown_method_in_config(tmp_path):
    _saved(tmp_path)
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    cfg["peft_type"] = "LORAX"
    (tmp_path / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"unknown method peft_type='LORAX'.*Did you mean \['LORA'"):
        graft.load(tiny_llama(), tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        graft.load(tiny_llama(), tmp_path)


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    model = _saved(tmp_path)
    inputs = batch_for("llama")
    expected = logits(model, inputs)
    (tmp_path / "notes.txt").write_text("user file")
    perturb_adapters(model, seed=9)  # new values that must not land

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(graft.io, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        graft.save(model, tmp_path)
    monkeypatch.undo()
    fresh = graft.load(tiny_llama(), tmp_path)
    torch.testing.assert_close(logits(fresh, inputs), expected, atol=0, rtol=0)
    assert (tmp_path / "notes.txt").read_text() == "user file"
    assert [p.name for p in tmp_path.parent.iterdir() if p.name.startswith(f".{tmp_path.name}.")] == []


def test_interrupted_swap_is_recovered(tmp_path):
    target = tmp_path / "ckpt"
    model = _saved(target)
    expected = logits(model, batch_for("llama"))
    # Simulate a crash between the two renames of the swap: only the ".old" copy exists.
    target.rename(tmp_path / ".ckpt.old-deadbeef")
    fresh = graft.load(tiny_llama(), target)
    torch.testing.assert_close(logits(fresh, batch_for("llama")), expected, atol=0, rtol=0)


def test_unsupported_layer_type():
    model = tiny_llama()
    with pytest.raises(TypeError, match="LoRA targets: module 'model.norm' is a LlamaRMSNorm"):
        graft.attach(model, graft.LoRA(targets=["norm"]))


def test_failed_attach_leaves_the_model_untouched(monkeypatch):
    from graft.methods.lora import LoraLinear

    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    original = LoraLinear.add

    def flaky(self, name, spec):  # fails on the third layer, after two were wrapped
        calls.append(name)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        original(self, name, spec)

    monkeypatch.setattr(LoraLinear, "add", flaky)
    with pytest.raises(RuntimeError, match="out of memory"):
        graft.attach(model, graft.LoRA(targets=["q_proj", "v_proj"]))
    assert not any(isinstance(m, graft.core.AdapterLayer) for m in model.modules())
    assert not hasattr(model, graft.core.STATE_ATTR)
    assert all(p.requires_grad for p in model.parameters())
    assert set(model.state_dict()) == set(before)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_an_init_that_rewrites_the_base_refuses_a_model_with_adapters(init):
    model = graft.attach(tiny_llama(), graft.LoRA(r=4, targets=["q_proj"]), name="first")
    before = logits(model, batch_for("llama"))
    with pytest.raises(ValueError, match=rf"init='{init}' rewrites the base weights, and this model carries "
                                         r"adapters \['first'\]"):
        graft.attach(model, graft.LoRA(r=4, targets=["q_proj"], init=init), name="second")
    torch.testing.assert_close(logits(model, batch_for("llama")), before, atol=0, rtol=0)  # nothing rewritten
