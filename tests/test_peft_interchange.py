"""Checkpoints interchange with peft, both ways, with equal logits.

graft -> peft: attach in graft, randomise every trainable tensor, ``graft.save``; peft builds its
model from the saved ``adapter_config.json`` and loads the tensors with no missing or unexpected
adapter keys and gives the same logits. peft -> graft: ``get_peft_model`` + ``save_pretrained``,
``graft.load`` on a fresh base, same logits. peft is only the oracle here.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import FACTORIES, batch_for, logits, perturb_adapters
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils import load_peft_weights, set_peft_model_state_dict
from safetensors import safe_open

import graft
from graft.core import adapter_layers
from graft.methods.heads import ModulesToSave
from graft.methods.lora import LoraEmbedding, LoraLinear

PREFIX = "base_model.model."
R, ALPHA = 4, 8  # alpha / r = 2 but alpha / sqrt(r) = 4: a wrong use_rslora changes the logits

TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "bert": ["query", "value"], "t5": ["q", "v"]}
# (rank_pattern, alpha_pattern) per architecture: the second target gets another rank, the first another alpha
PATTERNS = {
    "llama": ({"v_proj": 2}, {"q_proj": 4}),
    "bert": ({"value": 2}, {"query": 4}),
    "t5": ({"v": 2}, {"q": 4}),
}
VARIANTS = ("lora", "rslora", "dora", "patterns")
CASES = [(a, v) for a in TARGETS for v in VARIANTS if not (v == "patterns" and a not in PATTERNS)]
TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS", "t5": "SEQ_2_SEQ_LM"}


def graft_method(arch: str, variant: str, **extra) -> graft.LoRA:
    kw = {"r": R, "alpha": ALPHA, "targets": TARGETS[arch], **extra}
    if variant == "rslora":
        kw["rslora"] = True
    elif variant == "dora":
        kw["dora"] = True
    elif variant == "patterns":
        kw["rank_pattern"], kw["alpha_pattern"] = PATTERNS[arch]
    if arch == "bert":
        kw["modules_to_save"] = ["classifier"]
    return graft.LoRA(**kw)


def peft_config(arch: str, variant: str, **extra) -> LoraConfig:
    kw = {"r": R, "lora_alpha": ALPHA, "target_modules": TARGETS[arch], "task_type": TASK[arch],
          "fan_in_fan_out": arch == "gpt2", **extra}
    if variant == "rslora":
        kw["use_rslora"] = True
    elif variant == "dora":
        kw["use_dora"] = True
    elif variant == "patterns":
        kw["rank_pattern"], kw["alpha_pattern"] = PATTERNS[arch]
    return LoraConfig(**kw)  # SEQ_CLS: peft puts the classifier into modules_to_save itself


def assert_logits_changed(model_out: torch.Tensor, base_out: torch.Tensor) -> None:
    """The adapter must actually do something, or equal logits would prove nothing."""
    assert (model_out - base_out).abs().max() > 1e-2


def peft_from_dir(arch: str, path: Path) -> PeftModel:
    """Build a peft model from a saved config and load the tensors, failing on any key mismatch."""
    config = LoraConfig.from_pretrained(str(path))
    config.inference_mode = False  # keep adapter tensors trainable so we can list them
    peft_model = get_peft_model(FACTORIES[arch](), config)
    adapter_keys = {k for k, p in peft_model.named_parameters() if p.requires_grad}
    assert adapter_keys
    result = set_peft_model_state_dict(peft_model, load_peft_weights(str(path), device="cpu"))
    assert result.unexpected_keys == [], f"peft rejected keys {result.unexpected_keys[:5]}"
    missing = sorted(adapter_keys & set(result.missing_keys))
    assert missing == [], f"peft found no tensor for {missing[:5]}"
    return peft_model.eval()


def graft_layers(model) -> dict[str, object]:
    return {n: m for n, m in adapter_layers(model) if isinstance(m, (LoraLinear, LoraEmbedding))}


def peft_layers(peft_model) -> dict[str, LoraLayer]:
    return {n.removeprefix(PREFIX): m for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}


def assert_same_layout(model, peft_model) -> None:
    """peft adapted exactly graft's modules, with the same rank and scaling on each."""
    ours, theirs = graft_layers(model), peft_layers(peft_model)
    assert sorted(ours) == sorted(theirs)
    for name, layer in ours.items():
        spec = layer.configs["default"]
        assert theirs[name].r["default"] == spec.r, name
        assert theirs[name].scaling["default"] == pytest.approx(layer.scaling["default"]), name


# --------------------------------------------------------------------------------------------
# graft -> peft


@pytest.mark.parametrize(("arch", "variant"), CASES)
def test_graft_to_peft(arch, variant, tmp_path):
    inputs = batch_for(arch)
    model = FACTORIES[arch]()
    base_out = logits(model, inputs)
    graft.attach(model, graft_method(arch, variant))
    perturb_adapters(model)
    want = logits(model, inputs)
    assert_logits_changed(want, base_out)
    graft.save(model, tmp_path)

    peft_model = peft_from_dir(arch, tmp_path)
    assert_same_layout(model, peft_model)
    torch.testing.assert_close(logits(peft_model, inputs), want, atol=1e-5, rtol=0)

    # The ordinary user path loads it too, without a missing-keys warning.
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*missing adapter keys.*")
        plain = PeftModel.from_pretrained(FACTORIES[arch](), str(tmp_path)).eval()
    torch.testing.assert_close(logits(plain, inputs), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("arch", "variant"), CASES)
def test_saved_config_is_a_valid_peft_config(arch, variant, tmp_path):
    model = FACTORIES[arch]()
    method = graft_method(arch, variant)
    graft.attach(model, method)
    graft.save(model, tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    config = LoraConfig.from_pretrained(str(tmp_path))

    assert config.peft_type.value == "LORA" and raw["peft_type"] == "LORA"
    assert config.task_type == TASK[arch]
    assert (config.r, config.lora_alpha) == (R, ALPHA)
    assert config.use_rslora is (variant == "rslora")
    assert config.use_dora is (variant == "dora")
    assert set(config.target_modules) == set(TARGETS[arch])
    assert config.fan_in_fan_out is (arch == "gpt2")
    if variant == "patterns":
        assert (config.rank_pattern, config.alpha_pattern) == PATTERNS[arch]
    else:
        assert (config.rank_pattern, config.alpha_pattern) == ({}, {})
    if arch == "bert":
        assert config.modules_to_save is not None and "classifier" in config.modules_to_save
    # Re-reading it in graft gives back the same method.
    assert graft.LoRA.from_peft(raw) == method


def test_modules_to_save_head_is_saved_and_loaded(tmp_path):
    """BERT's classifier is trained with the adapter: its copy is in the file and peft uses it."""
    inputs = batch_for("bert")
    model = FACTORIES["bert"]()
    graft.attach(model, graft_method("bert", "lora"))
    head = model.get_submodule("classifier")
    assert isinstance(head, ModulesToSave)
    with torch.no_grad():
        head.modules_to_save["default"].weight.add_(1.0)  # only the head differs from the base
    graft.save(model, tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        torch.testing.assert_close(f.get_tensor(PREFIX + "classifier.weight"), head.modules_to_save["default"].weight)
    assert {PREFIX + "classifier.weight", PREFIX + "classifier.bias"} <= keys
    peft_model = peft_from_dir("bert", tmp_path)
    torch.testing.assert_close(logits(peft_model, inputs), logits(model, inputs), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------
# peft -> graft


@pytest.mark.parametrize(("arch", "variant"), CASES)
def test_peft_to_graft(arch, variant, tmp_path):
    inputs = batch_for(arch)
    base_out = logits(FACTORIES[arch](), inputs)
    peft_model = get_peft_model(FACTORIES[arch](), peft_config(arch, variant))
    if arch == "bert":
        assert "classifier" in peft_model.peft_config["default"].modules_to_save
    perturb_adapters(peft_model)
    peft_model.eval()
    want = logits(peft_model, inputs)
    assert_logits_changed(want, base_out)
    peft_model.save_pretrained(str(tmp_path))

    model = graft.load(FACTORIES[arch](), tmp_path)
    assert_same_layout(model, peft_model)
    if arch == "bert":
        assert isinstance(model.get_submodule("classifier"), ModulesToSave)
    torch.testing.assert_close(logits(model, inputs), want, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------
# LoRA on an embedding (peft keys lora_embedding_A / lora_embedding_B)

EMBED_TARGETS = ["embed_tokens", "q_proj"]


def test_embedding_graft_to_peft(tmp_path):
    inputs = batch_for("llama")
    model = FACTORIES["llama"]()
    base_out = logits(model, inputs)
    graft.attach(model, graft.LoRA(r=R, alpha=ALPHA, targets=EMBED_TARGETS))
    assert isinstance(model.get_submodule("model.embed_tokens"), LoraEmbedding)
    perturb_adapters(model)
    want = logits(model, inputs)
    assert_logits_changed(want, base_out)
    graft.save(model, tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    emb = PREFIX + "model.embed_tokens."
    assert {emb + "lora_embedding_A", emb + "lora_embedding_B"} <= keys

    peft_model = peft_from_dir("llama", tmp_path)
    assert_same_layout(model, peft_model)
    torch.testing.assert_close(logits(peft_model, inputs), want, atol=1e-5, rtol=0)


def test_embedding_peft_to_graft(tmp_path):
    inputs = batch_for("llama")
    base_out = logits(FACTORIES["llama"](), inputs)
    peft_model = get_peft_model(FACTORIES["llama"](), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=EMBED_TARGETS,
                                                                 task_type="CAUSAL_LM"))
    perturb_adapters(peft_model)
    peft_model.eval()
    want = logits(peft_model, inputs)
    assert_logits_changed(want, base_out)
    peft_model.save_pretrained(str(tmp_path))

    model = graft.load(FACTORIES["llama"](), tmp_path)
    assert isinstance(model.get_submodule("model.embed_tokens"), LoraEmbedding)
    assert_same_layout(model, peft_model)
    torch.testing.assert_close(logits(model, inputs), want, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------
# PiSSA / OLoRA: saved as the equivalent plain rank-2r LoRA of the original base

PRINCIPAL_CASES = [
    ("llama", "pissa", "lora"), ("llama", "pissa", "rslora"), ("llama", "pissa", "patterns"),
    ("llama", "olora", "lora"), ("gpt2", "pissa", "lora"), ("gpt2", "olora", "lora"),
]


@pytest.mark.parametrize(("arch", "init", "variant"), PRINCIPAL_CASES)
def test_principal_init_saves_plain_lora_of_original_base(arch, init, variant, tmp_path):
    inputs = batch_for(arch)
    original = FACTORIES[arch]()
    base_out = logits(original, inputs)
    model = FACTORIES[arch]()
    graft.attach(model, graft_method(arch, variant, init=init))
    # The base weight really was changed (the principal part moved into A, B) ...
    first = "model.layers.0.self_attn.q_proj" if arch == "llama" else "transformer.h.0.attn.c_attn"
    moved = original.get_submodule(first).weight - model.get_submodule(first).weight
    assert moved.abs().max() > 1e-2
    perturb_adapters(model, std=0.02)
    want = logits(model, inputs)
    assert_logits_changed(want, base_out)
    graft.save(model, tmp_path)

    config = LoraConfig.from_pretrained(str(tmp_path))
    assert config.r == 2 * R
    assert config.init_lora_weights is True  # a plain LoRA: peft must not re-run PiSSA on load
    # ... and peft, on the untouched base, reproduces the graft model.
    peft_model = peft_from_dir(arch, tmp_path)
    torch.testing.assert_close(logits(peft_model, inputs), want, atol=1e-4, rtol=0)
    # graft reads it back the same way, on an untouched base.
    reloaded = graft.load(FACTORIES[arch](), tmp_path)
    torch.testing.assert_close(logits(reloaded, inputs), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_peft_principal_init_checkpoint_loads_in_graft(init, tmp_path):
    """An unconverted peft PiSSA/OLoRA checkpoint is relative to the rewritten base: graft redoes the init."""
    inputs = batch_for("llama")
    peft_model = get_peft_model(FACTORIES["llama"](), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS["llama"],
                                                                 init_lora_weights=init))
    perturb_adapters(peft_model, std=0.02)
    peft_model.eval()
    want = logits(peft_model, inputs)
    assert_logits_changed(want, logits(FACTORIES["llama"](), inputs))
    peft_model.save_pretrained(str(tmp_path / "peft"))

    model = graft.load(FACTORIES["llama"](), tmp_path / "peft")
    torch.testing.assert_close(logits(model, inputs), want, atol=1e-4, rtol=0)
    # Re-saved by graft it is a plain rank-2r LoRA that peft applies to the untouched base.
    graft.save(model, tmp_path / "graft")
    torch.testing.assert_close(logits(peft_from_dir("llama", tmp_path / "graft"), inputs), want, atol=1e-4, rtol=0)


def test_unreproducible_peft_init_is_refused(tmp_path):
    peft_model = get_peft_model(FACTORIES["llama"](), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS["llama"],
                                                                 init_lora_weights="pissa_niter_2"))
    peft_model.save_pretrained(str(tmp_path))
    model = FACTORIES["llama"]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="pissa_niter_2"):
        graft.load(model, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
