"""Bottleneck adapters (graft.Adapter): the invariant matrix, closed-form counts, composition
(Stack / Parallel / Average), per-row routing, the checkpoint format, bad input, and training."""

from __future__ import annotations

import copy
import json
import re
import tempfile
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import FACTORIES, VOCAB, batch_for, logits
from torch import nn
from transformers import BertConfig, BertModel

import graft
from graft.core import Composition, adapter_parameters
from graft.methods.adapter import BottleneckLayer

PLACEMENTS = ("houlsby", "pfeiffer", "parallel")
ACTIVATION_OF = {"houlsby": "gelu", "pfeiffer": "relu", "parallel": "swish"}  # every activation gets exercised


def perturb(model: nn.Module, name: str, seed: int, std: float = 0.2) -> None:
    """Non-trivial values for one adapter's tensors (W_up = 0 at init would prove nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(model, name).values():
            p.add_(torch.randn(p.shape, generator=g) * std)


def with_adapters(arch: str, names: tuple[str, ...], **kwargs) -> nn.Module:
    model = FACTORIES[arch]()
    for i, name in enumerate(names):
        graft.attach(model, graft.Adapter(**kwargs), name=name)
        perturb(model, name, seed=10 + i)
    return model


def by_hand(layer: BottleneckLayer, name: str, x: torch.Tensor) -> torch.Tensor:
    """A(x) = s · (W_up σ(W_down x + b_down) + b_up), written out from the raw tensors."""
    spec = layer.configs[name]
    down, up = layer.adapter_down[name], layer.adapter_up[name]
    sigma = {"gelu": F.gelu, "relu": torch.relu, "swish": lambda t: t * torch.sigmoid(t)}[spec.non_linearity]
    return spec.scaling * (sigma(x @ down.weight.T + down.bias) @ up.weight.T + up.bias)


# (The invariant matrix rows for this method are in tests/test_method_matrix.py.)


# --------------------------------------------------------------------------------------------
# Counts

# arch -> (hidden d, transformer blocks (T5: encoder + decoder), head parameters saved with the adapter)
SHAPES = {"llama": (64, 2, 0), "gpt2": (64, 2, 0), "bert": (32, 2, 32 * 3 + 3), "t5": (32, 4, 0)}
LOCATIONS_PER_BLOCK = {"houlsby": 2, "pfeiffer": 1, "parallel": 1}


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("rf", [4, 16])
def test_count_is_closed_form(arch, placement, rf):
    d, blocks, head = SHAPES[arch]
    m = d // rf
    expected = blocks * LOCATIONS_PER_BLOCK[placement] * (2 * d * m + m + d) + head
    model = FACTORIES[arch]()
    method = graft.Adapter(placement=placement, reduction_factor=rf)
    assert method.count(model) == expected
    graft.attach(model, method)
    assert graft.report(model).trainable == expected
    n_layers = sum(isinstance(m, BottleneckLayer) for m in model.modules())
    assert n_layers == blocks * LOCATIONS_PER_BLOCK[placement]


def test_count_with_layers_and_a_float_reduction_factor():
    model = FACTORIES["llama"]()
    method = graft.Adapter(placement="houlsby", reduction_factor=5.5, layers=[1])
    m = int(64 // 5.5)  # 11
    assert method.count(model) == 2 * (2 * 64 * m + m + 64)
    graft.attach(model, method)
    assert graft.report(model).trainable == 2 * (2 * 64 * m + m + 64)
    assert isinstance(model.model.layers[1].mlp.down_proj, BottleneckLayer)
    assert not isinstance(model.model.layers[0].mlp.down_proj, BottleneckLayer)


def test_bert_base_counts_on_meta_device():
    cfg = BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
    with torch.device("meta"):
        model = BertModel(cfg)
    # METHODS.md 5.3: 74,544 per module (d=768, m=48); Pfeiffer 12 modules, Houlsby 24.
    assert graft.Adapter(placement="pfeiffer").count(model) == 894_528
    assert graft.Adapter(placement="houlsby").count(model) == 1_789_056
    assert graft.Adapter(placement="parallel").count(model) == 894_528
    graft.attach(model, graft.Adapter(placement="houlsby"))
    assert graft.report(model).trainable == 1_789_056
    assert all(p.is_meta for p in model.parameters())  # nothing was allocated


# --------------------------------------------------------------------------------------------
# Composition


def test_composition_at_a_sequential_location():
    model = with_adapters("llama", ("a", "b"), placement="pfeiffer", reduction_factor=8, non_linearity="swish",
                          scaling=2.0)
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(2, 5, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = layer.base_layer(x)
        a_h, b_h = by_hand(layer, "a", h), by_hand(layer, "b", h)
        assert a_h.abs().max() > 0.05 and b_h.abs().max() > 0.05  # the adapters really act

        def run(block):
            graft.activate(model, block)
            return layer(x)

        e1 = h + a_h
        stacked = e1 + by_hand(layer, "b", e1)  # a's output is b's input
        torch.testing.assert_close(run(graft.Stack("a", "b")), stacked, atol=1e-5, rtol=0)
        reversed_stack = run(graft.Stack("b", "a"))
        assert not torch.allclose(reversed_stack, stacked, atol=1e-3)  # order matters

        parallel = run(graft.Parallel("a", "b"))
        torch.testing.assert_close(parallel, h + a_h + b_h, atol=1e-5, rtol=0)
        assert not torch.allclose(parallel, stacked, atol=1e-3)
        torch.testing.assert_close(run(["a", "b"]), parallel, atol=0, rtol=0)  # a plain list is Parallel

        # Weights normalised to (0.75, 0.25) and not divided by N again (AdapterHub's pitfall).
        torch.testing.assert_close(run(graft.Average("a", "b", weights=[3, 1])), h + 0.75 * a_h + 0.25 * b_h,
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(run(graft.Average("a", "b", weights=[1, 0])), run("a"), atol=0, rtol=0)
        torch.testing.assert_close(run("a"), h + a_h, atol=1e-5, rtol=0)


def test_composition_at_a_parallel_location():
    model = with_adapters("llama", ("a", "b"), placement="parallel", reduction_factor=8)
    layer = model.model.layers[1].mlp
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ffn = layer.base_layer(x)
        a_x = by_hand(layer, "a", x)
        graft.activate(model, graft.Stack("a", "b"))
        torch.testing.assert_close(layer(x), ffn + a_x + by_hand(layer, "b", x + a_x), atol=1e-5, rtol=0)
        graft.activate(model, graft.Parallel("a", "b"))
        torch.testing.assert_close(layer(x), ffn + a_x + by_hand(layer, "b", x), atol=1e-5, rtol=0)


def test_bert_parallel_adapter_reads_the_ffn_input_and_joins_before_layernorm():
    model = with_adapters("bert", ("a",), placement="parallel", reduction_factor=8)
    layer = model.bert.encoder.layer[0].output  # BertOutput(intermediate, attention_output)
    g = torch.Generator().manual_seed(2)
    inter, x = torch.randn(2, 5, 64, generator=g), torch.randn(2, 5, 32, generator=g)
    base = layer.base_layer
    with torch.no_grad():
        expected = F.layer_norm(base.dense(inter) + x + by_hand(layer, "a", x), (32,), base.LayerNorm.weight,
                                base.LayerNorm.bias, base.LayerNorm.eps)
        torch.testing.assert_close(layer(inter, x), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(layer(inter, input_tensor=x), expected, atol=1e-5, rtol=0)


def test_model_level_composition():
    model = with_adapters("gpt2", ("a", "b"), placement="houlsby", reduction_factor=8)
    inputs = batch_for("gpt2")

    def out(block):
        graft.activate(model, block)
        return logits(model, inputs)

    stacked, parallel = out(graft.Stack("a", "b")), out(graft.Parallel("a", "b"))
    assert not torch.allclose(stacked, parallel, atol=1e-3)
    torch.testing.assert_close(out(graft.Average("a", "b", weights=(1, 0))), out("a"), atol=1e-6, rtol=0)
    torch.testing.assert_close(out(graft.Average("a", "b", weights=(0, 2))), out("b"), atol=1e-6, rtol=0)
    assert not torch.allclose(out(graft.Average("a", "b")), out("a"), atol=1e-3)


# --------------------------------------------------------------------------------------------
# Routing


@pytest.mark.parametrize(("arch", "placement"), [("llama", "houlsby"), ("llama", "parallel"), ("gpt2", "pfeiffer"),
                                                 ("bert", "parallel"), ("t5", "houlsby")])
def test_route_rows_match_running_each_row_alone(arch, placement):
    # BERT: no head copies; heads.py cannot yet give a second adapter its own copy of an auto head.
    heads = {"modules_to_save": ()} if arch == "bert" else {}
    model = with_adapters(arch, ("a", "b", "c"), placement=placement, reduction_factor=8, **heads)
    inputs = batch_for(arch, batch=5, seed=3)
    routing = ["a", None, "c", "b", "a"]
    with torch.no_grad():
        with graft.route(model, routing):
            mixed = model(**inputs).logits
        graft.activate(model, graft.Stack("a", "b"))  # routing ignores the composition
        with graft.route(model, routing):
            torch.testing.assert_close(model(**inputs).logits, mixed, atol=0, rtol=0)
        for i, name in enumerate(routing):
            row = {k: v[i : i + 1] for k, v in inputs.items()}
            if name is None:
                with graft.disabled(model):
                    alone = model(**row).logits
            else:
                graft.activate(model, name)
                alone = model(**row).logits
            torch.testing.assert_close(mixed[i : i + 1], alone, atol=1e-5, rtol=0)
        with graft.disabled(model):
            base = model(**inputs).logits
    torch.testing.assert_close(mixed[1], base[1], atol=1e-6, rtol=0)  # base rows untouched
    assert not torch.allclose(mixed[0], base[0], atol=1e-3)  # adapter rows really changed


# --------------------------------------------------------------------------------------------
# Checkpoint format


def test_checkpoint_format_and_exact_round_trip():
    method = graft.Adapter(placement="parallel", reduction_factor=4, non_linearity="swish", scaling=4.0, layers=[1])
    model = FACTORIES["llama"]()
    graft.attach(model, method, name="task")
    perturb(model, "task", seed=5)
    inputs = batch_for("llama")
    out = logits(model, inputs)
    with tempfile.TemporaryDirectory() as d:
        graft.save(model, d)
        config = json.loads((Path(d) / "adapter_config.json").read_text())
        assert config["peft_type"] == "BOTTLENECK"
        assert {k: config[k] for k in ("reduction_factor", "non_linearity", "placement", "scaling", "dropout",
                                      "layers", "modules_to_save")} == {
            "reduction_factor": 4, "non_linearity": "swish", "placement": "parallel", "scaling": 4.0,
            "dropout": 0.0, "layers": [1], "modules_to_save": None}
        keys = set(graft.io.read_tensors(d))
        prefix = "base_model.model.model.layers.1.mlp."
        assert keys == {prefix + k for k in ("adapter_down.weight", "adapter_down.bias",
                                             "adapter_up.weight", "adapter_up.bias")}
        fresh = FACTORIES["llama"]()
        graft.load(fresh, d, name="task")
        assert graft.core.state_of(fresh).methods["task"] == method
        torch.testing.assert_close(logits(fresh, inputs), out, atol=0, rtol=0)


# --------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"reduction_factor": 0}, "reduction_factor=0 must be a positive number"),
    ({"reduction_factor": -2}, "reduction_factor=-2 must be a positive number"),
    ({"reduction_factor": True}, "reduction_factor=True must be a positive number"),
    ({"non_linearity": "tanh"}, "non_linearity='tanh' is not one of ('gelu', 'relu', 'swish')"),
    ({"placement": "middle"}, "placement='middle' is not one of ('houlsby', 'pfeiffer', 'parallel')"),
    ({"scaling": 0}, "scaling=0 must be a positive number"),
    ({"dropout": 1.0}, "dropout=1.0 is outside [0, 1)"),
    ({"layers": [-1]}, "layers=[-1] must be non-negative block indices"),
])
def test_bad_config_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        graft.Adapter(**kwargs)


def test_reduction_factor_larger_than_hidden_is_refused_at_attach():
    model = FACTORIES["llama"]()
    method = graft.Adapter(reduction_factor=65)
    with pytest.raises(ValueError, match=re.escape("larger than the hidden size 64")):
        method.count(model)
    with pytest.raises(ValueError, match="use 0 < reduction_factor <= 64"):
        graft.attach(model, method)
    assert not any(isinstance(m, BottleneckLayer) for m in model.modules())
    graft.attach(model, graft.Adapter(reduction_factor=64))  # m = 1 is allowed
    assert graft.report(model).trainable == 4 * (2 * 64 + 1 + 64)


def test_unknown_block_layout_and_empty_layers_are_named():
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = types.SimpleNamespace(model_type="toy", hidden_size=16)
            self.proj = nn.Linear(16, 16)

    with pytest.raises(ValueError, match=r"Toy \(model_type='toy'\).*Llama-, GPT-2-, BERT- and T5-style"):
        graft.attach(Toy(), graft.Adapter())
    with pytest.raises(ValueError, match=r"layers=\[7\] selects no block of LlamaForCausalLM; its blocks are \[0, 1\]"):
        graft.attach(FACTORIES["llama"](), graft.Adapter(layers=[7]))


def test_composition_rejects_other_methods_and_other_blocks():
    model = FACTORIES["llama"]()
    graft.attach(model, graft.Adapter(), name="a")
    graft.attach(model, graft.Adapter(placement="parallel"), name="b")
    graft.attach(model, graft.LoRA(targets=["q_proj"]), name="l")
    with pytest.raises(ValueError, match=r"adapter 'l' \(LoRA\) does not support Stack"):
        graft.activate(model, graft.Stack("a", "l"))
    assert graft.active_adapters(model) == ["l"]  # a refused activate changes nothing

    class Fuse(Composition):
        """A block bottleneck adapters do not implement."""

    with pytest.raises(TypeError, match="supports the composition blocks Stack, Parallel, Average, not Fuse"):
        graft.activate(model, Fuse("a", "b"))
    graft.activate(model, ["a", "l"])  # a plain list mixes methods: their changes add up
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        graft.merge(model, "a")


def test_wraps_a_module_lora_already_adapts():
    base = FACTORIES["llama"]()
    inputs = batch_for("llama")
    model = copy.deepcopy(base)
    graft.attach(model, graft.LoRA(r=2, targets=["o_proj"]), name="l")
    graft.attach(model, graft.Adapter(placement="houlsby", reduction_factor=8), name="a")
    perturb(model, "l", seed=7)
    perturb(model, "a", seed=8)
    outer = model.model.layers[0].self_attn.o_proj
    assert isinstance(outer, BottleneckLayer) and isinstance(outer.base_layer, graft.methods.lora.LoraLinear)
    graft.activate(model, "a")
    only_a = logits(model, inputs)
    graft.activate(model, ["l", "a"])
    both = logits(model, inputs)
    assert not torch.allclose(both, only_a, atol=1e-3)
    graft.detach(model, "l")
    assert isinstance(model.model.layers[0].self_attn.o_proj.base_layer, nn.Linear)
    torch.testing.assert_close(logits(model, inputs), only_a, atol=1e-6, rtol=0)
    plain = graft.unload(model)
    torch.testing.assert_close(logits(plain, inputs), logits(base, inputs), atol=0, rtol=0)


# --------------------------------------------------------------------------------------------
# Training


def test_training_lowers_the_loss_and_changes_only_adapter_tensors():
    model = FACTORIES["llama"]()
    graft.attach(model, graft.Adapter(placement="houlsby", reduction_factor=8))
    ids_ = {id(p) for p in adapter_parameters(model, "default").values()}
    adapter_keys = {k for k, p in model.named_parameters() if id(p) in ids_}
    assert len(adapter_keys) == 4 * 4  # 4 locations x (W_down, b_down, W_up, b_up)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(3, VOCAB, (4, 12), generator=torch.Generator().manual_seed(4))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    model.train()
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == adapter_keys  # every adapter tensor moved, nothing else did


def test_half_precision_base_keeps_fp32_adapters():
    model = FACTORIES["llama"]().to(torch.bfloat16)
    graft.attach(model, graft.Adapter(placement="parallel"))
    assert all(p.dtype == torch.float32 for p in adapter_parameters(model, "default").values())
    out = model(**batch_for("llama")).logits
    assert out.dtype == torch.bfloat16
