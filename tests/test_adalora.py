"""AdaLoRA: the rank-budget schedule, importance and masking equal to peft's, checkpoint interchange with
peft both ways (before and after the pattern is fixed), the orthogonality regulariser, training through
graft.train with exact resume, and bad input."""

from __future__ import annotations

import contextlib
import io
import json
import math
import warnings

import pytest
import torch
from conftest import FACTORIES, batch_for, logits, perturb_adapters, tiny_llama
from conftest import pad_collate as collate
from peft import AdaLoraConfig, PeftModel, get_peft_model
from peft.tuners.adalora import SVDLinear as PeftSVDLinear
from peft.utils import load_peft_weights, set_peft_model_state_dict
from safetensors.torch import load_file
from test_train import config, make_examples
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import graft
import graft.models
from graft.cli import main
from graft.core import adapter_parameters
from graft.methods.adalora import SVDLinear, orthogonality_penalty, update_and_allocate
from graft.train import causal_lm_loss, train

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny matmuls gain nothing from threads

TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "bert": ["query", "value"], "t5": ["q", "v"]}
TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS", "t5": "SEQ_2_SEQ_LM"}
PREFIX = "base_model.model."


def svd_layers(model) -> dict[str, SVDLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SVDLinear)}


def peft_layers(peft_model) -> dict[str, PeftSVDLinear]:
    return {n.removeprefix(PREFIX): m for n, m in peft_model.named_modules() if isinstance(m, PeftSVDLinear)}


def nonzero_triplets(model) -> int:
    return sum(int((m.lora_E["default"] != 0).sum()) for m in svd_layers(model).values())


def random_grads(params, g: torch.Generator) -> None:
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


# --------------------------------------------------------------------------------------------
# 1. The rank budget falls from b0 to b_T on the cubic schedule; the pattern is fixed after T - t_f


def test_budget_follows_the_cubic_schedule_and_the_final_pattern_is_fixed():
    T, TINIT, TFINAL, DELTA_T = 20, 3, 5, 2
    model = graft.attach(tiny_llama(), graft.AdaLoRA(init_r=6, target_r=2, targets=TARGETS["llama"], tinit=TINIT,
                                                     tfinal=TFINAL, delta_t=DELTA_T, total_step=T))
    layers = svd_layers(model)
    assert len(layers) == 4  # b0 = 4 x 6 = 24, b_T = 4 x 2 = 8
    # b(t) = int(16 (1 - (t - 3) / 12)^3 + 8), worked out by hand for the pruning phase 4..15
    expected = {**dict.fromkeys(range(1, 4), 24), 4: 20, 5: 17, 6: 14, 7: 12, 8: 11, 9: 10, 10: 9,
                **dict.fromkeys(range(11, 21), 8)}
    prunes = {4, 6, 8, 10, 12, 14, 15}  # every ΔT = 2 steps in 4..14, and the final mask at T - t_f = 15
    g = torch.Generator().manual_seed(0)
    params = list(adapter_parameters(model, "default").values())
    fixed = None
    for t in range(1, T + 1):
        with torch.no_grad():  # as if training regrew every singular value since the last mask
            for layer in layers.values():
                layer.lora_E["default"].copy_(torch.rand(6, 1, generator=g) + 0.5)
        random_grads(params, g)
        assert update_and_allocate(model, t) == expected[t], t
        alive = nonzero_triplets(model)
        assert alive == (expected[t] if t in prunes or t > 15 else 24), t
        masks = {n: (m.lora_E["default"] != 0).view(-1) for n, m in layers.items()}
        if t == 15:
            fixed = masks
            assert all(not m.importance for m in layers.values())  # the scores are dropped once fixed
        elif t > 15:
            assert all(torch.equal(masks[n], fixed[n]) for n in layers), t  # same triplets, whatever the grads
    assert all(torch.equal(m.rank_mask["default"], fixed[n]) for n, m in layers.items())
    saved = graft.core.state_of(model).methods["default"].to_peft(model, "default")["rank_pattern"]
    assert saved == {f"{n}.lora_E": fixed[n].tolist() for n in layers}


def test_update_and_allocate_before_tinit_only_scores():
    model = graft.attach(tiny_llama(), graft.AdaLoRA(init_r=4, target_r=2, targets=["q_proj"], tinit=2,
                                                     total_step=6))
    perturb_adapters(model)
    before = {n: m.lora_E["default"].clone() for n, m in svd_layers(model).items()}
    random_grads(adapter_parameters(model, "default").values(), torch.Generator().manual_seed(0))
    assert update_and_allocate(model, 1) == 8
    for n, m in svd_layers(model).items():
        assert torch.equal(m.lora_E["default"], before[n])
        assert set(m.importance["default"]) == {"lora_A", "lora_E", "lora_B"}


# --------------------------------------------------------------------------------------------
# 3. Importance and masks equal peft's, step for step, on the same model, data and SGD updates


def test_masks_and_importance_equal_peft_update_and_allocate():
    T = 9
    kw = {"tinit": 1, "tfinal": 3, "total_step": T, "beta1": 0.8, "beta2": 0.9, "orth_reg_weight": 0.3}
    peft_model = get_peft_model(tiny_llama(), AdaLoraConfig(
        init_r=4, target_r=2, lora_alpha=8, target_modules=TARGETS["llama"], deltaT=2, task_type="CAUSAL_LM", **kw))
    model = graft.attach(tiny_llama(), graft.AdaLoRA(init_r=4, target_r=2, alpha=8, targets=TARGETS["llama"],
                                                     delta_t=2, **kw))
    ours, theirs = svd_layers(model), peft_layers(peft_model)
    assert sorted(ours) == sorted(theirs)
    with torch.no_grad():  # the same start: peft's random Q, P and zero Λ
        for n, layer in ours.items():
            for f in ("lora_A", "lora_E", "lora_B"):
                getattr(layer, f)["default"].copy_(getattr(theirs[n], f)["default"])
    method = graft.core.state_of(model).methods["default"]
    ids = batch_for("llama", batch=4, seq=12)["input_ids"]
    opt_peft = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=2.0)
    opt_ours = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=2.0)
    allocator = peft_model.base_model.rankallocator
    peft_model.train()
    model.train()
    for t in range(1, T + 1):
        peft_model(input_ids=ids, labels=ids).loss.backward()  # peft adds the regulariser to the loss
        opt_peft.step()
        peft_model.base_model.update_and_allocate(t)
        model(input_ids=ids, labels=ids).loss.backward()
        method.loss_penalty(model, "default").backward()
        opt_ours.step()
        method.after_optimizer_step(model, "default", step=t, total_steps=T, optimizer=opt_ours)
        if t < T - 3:  # the EMAs peft's allocator keeps, until the pattern is fixed
            for n, layer in ours.items():
                for f in ("lora_A", "lora_E", "lora_B"):
                    avg, unc = layer.importance["default"][f]
                    torch.testing.assert_close(avg, allocator.exp_avg_ipt[f"{n}.{f}.default"], rtol=1e-4, atol=1e-12)
                    torch.testing.assert_close(unc, allocator.exp_avg_unc[f"{n}.{f}.default"], rtol=1e-4, atol=1e-12)
        for n, layer in ours.items():
            mine, ref = layer.lora_E["default"], theirs[n].lora_E["default"]
            assert torch.equal(mine == 0, ref == 0), (t, n)  # the same triplets pruned
            torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-6)
        opt_peft.zero_grad()
        opt_ours.zero_grad()
    assert nonzero_triplets(model) == 2 * 4
    pattern = {k.replace(".default", ""): v for k, v in peft_model.peft_config["default"].rank_pattern.items()}
    assert method.to_peft(model, "default")["rank_pattern"] == pattern


# --------------------------------------------------------------------------------------------
# 2. Checkpoints interchange with peft, both ways, before and after the pattern is fixed


def peft_config(arch: str, **kw) -> AdaLoraConfig:
    return AdaLoraConfig(init_r=6, target_r=2, lora_alpha=8, target_modules=TARGETS[arch], task_type=TASK[arch],
                         fan_in_fan_out=arch == "gpt2", tinit=0, tfinal=2, total_step=6, **kw)


def prune(step_to: int, params, allocate) -> None:
    """Run the allocator for steps 1..step_to with random gradients (as if trained)."""
    g = torch.Generator().manual_seed(7)
    for t in range(1, step_to + 1):
        random_grads(params, g)
        allocate(t)


@pytest.mark.parametrize("arch", list(TARGETS))
@pytest.mark.parametrize("steps", [2, 4])  # 2: pruning phase (no pattern saved); 4 = T - t_f: pattern fixed
def test_graft_to_peft(arch, steps, tmp_path):
    inputs = batch_for(arch)
    model = FACTORIES[arch]()
    base = logits(model, inputs)
    graft.attach(model, graft.AdaLoRA(init_r=6, target_r=2, targets=TARGETS[arch], tfinal=2, total_step=6))
    perturb_adapters(model)
    params = [p for n, p in adapter_parameters(model, "default").items() if ".lora_" in n]
    prune(steps, params, lambda t: update_and_allocate(model, t))
    want = logits(model, inputs)
    assert (want - base).abs().max() > 1e-2
    graft.save(model, tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert raw["peft_type"] == "ADALORA" and raw["init_r"] == 6 and raw["total_step"] == 6
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    kept = sum(v.shape[0] for k, v in saved.items() if k.endswith("lora_E"))
    if steps == 4:
        assert raw["rank_pattern"] and kept == 2 * len(svd_layers(model))  # only the surviving triplets
    else:
        assert raw["rank_pattern"] is None and kept == 6 * len(svd_layers(model))

    config = AdaLoraConfig.from_pretrained(str(tmp_path))
    config.inference_mode = False  # keep adapter tensors trainable so we can list them
    peft_model = get_peft_model(FACTORIES[arch](), config)
    adapter_keys = {k for k, p in peft_model.named_parameters() if p.requires_grad}
    result = set_peft_model_state_dict(peft_model, load_peft_weights(str(tmp_path), device="cpu"))
    assert result.unexpected_keys == []
    assert sorted(adapter_keys & set(result.missing_keys)) == []
    torch.testing.assert_close(logits(peft_model.eval(), inputs), want, atol=1e-5, rtol=0)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*missing adapter keys.*")
        plain = PeftModel.from_pretrained(FACTORIES[arch](), str(tmp_path)).eval()
    torch.testing.assert_close(logits(plain, inputs), want, atol=1e-5, rtol=0)
    assert graft.AdaLoRA.from_peft(raw).rank_pattern == (
        None if steps == 2 else {k.removesuffix(".lora_E"): tuple(v) for k, v in raw["rank_pattern"].items()})


@pytest.mark.parametrize("arch", list(TARGETS))
@pytest.mark.parametrize("steps", [2, 4])  # peft writes its latest mask as rank_pattern in both phases
def test_peft_to_graft(arch, steps, tmp_path):
    inputs = batch_for(arch)
    peft_model = get_peft_model(FACTORIES[arch](), peft_config(arch))
    perturb_adapters(peft_model)
    params = [p for n, p in peft_model.named_parameters() if ".lora_" in n and p.requires_grad]
    prune(steps, params, peft_model.base_model.update_and_allocate)
    peft_model.eval()
    want = logits(peft_model, inputs)
    pattern = peft_model.peft_config["default"].rank_pattern
    assert pattern and sum(sum(v) for v in pattern.values()) < 6 * len(pattern)  # ranks were pruned
    peft_model.save_pretrained(str(tmp_path))

    model = graft.load(FACTORIES[arch](), tmp_path)
    layers = svd_layers(model)
    for n, layer in layers.items():
        keep = pattern[f"{n}.lora_E.default"]
        assert layer.lora_A["default"].shape[0] == sum(keep)  # built with the kept triplets ...
        assert layer.configs["default"].init_r == 6  # ... still divided by init_r
    torch.testing.assert_close(logits(model, inputs), want, atol=1e-5, rtol=0)
    assert graft.report(model).trainable == 0  # loaded frozen

    out = tmp_path / "again"  # graft writes the same file back
    graft.save(model, out)
    assert json.loads((out / "adapter_config.json").read_text())["rank_pattern"] == json.loads(
        (tmp_path / "adapter_config.json").read_text())["rank_pattern"]
    a, b = load_file(str(tmp_path / "adapter_model.safetensors")), load_file(str(out / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_merge_and_count_of_a_pruned_adapter(tmp_path):
    """A loaded pattern counts its kept triplets; merged == unmerged; routing works per row."""
    inputs = batch_for("llama")
    model = graft.attach(tiny_llama(), graft.AdaLoRA(init_r=6, target_r=2, targets=TARGETS["llama"], total_step=3))
    perturb_adapters(model)
    prune(3, list(adapter_parameters(model, "default").values()), lambda t: update_and_allocate(model, t))
    graft.save(model, tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    method = graft.AdaLoRA.from_peft(raw)
    fresh = tiny_llama()
    # r_k (d_in + d_out + 1) per matrix: q_proj is 64 -> 64, v_proj 64 -> 32 (two KV heads of 16)
    per_matrix = {k: sum(v) * (64 + (64 if "q_proj" in k else 32) + 1) for k, v in raw["rank_pattern"].items()}
    assert sum(sum(v) for v in raw["rank_pattern"].values()) == 8
    assert method.count(fresh) == sum(per_matrix.values())
    loaded = graft.load(fresh, tmp_path, trainable=True)
    assert graft.report(loaded).trainable == method.count(tiny_llama())
    want = logits(loaded, inputs)
    torch.testing.assert_close(want, logits(model, inputs), atol=1e-6, rtol=0)
    graft.merge(loaded)
    torch.testing.assert_close(logits(loaded, inputs), want, atol=1e-5, rtol=0)
    graft.unmerge(loaded)
    base = logits(tiny_llama(), inputs)
    with graft.route(loaded, ["default", None]):
        routed = logits(loaded, inputs)
    torch.testing.assert_close(routed[0], want[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(routed[1], base[1], atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------
# 5. The regulariser, training through graft.train, exact resume, the CLI


def test_orthogonality_penalty_equals_hand_computation():
    model = graft.attach(tiny_llama(), graft.AdaLoRA(init_r=4, target_r=2, targets=TARGETS["llama"], orth_reg_weight=0.5))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in svd_layers(model).values():
            a, b = layer.lora_A["default"], layer.lora_B["default"]
            a.copy_(2 * torch.linalg.qr(torch.randn(a.shape[1], 4, generator=g))[0].T)  # Q Qᵀ = 4 I
            b.copy_(torch.linalg.qr(torch.randn(b.shape[0], 4, generator=g))[0])  # Pᵀ P = I
    # ‖4I − I‖_F = 3·√4 = 6 for each of the 4 Q's, 0 for each P: mean over 8 matrices = 3
    method = graft.core.state_of(model).methods["default"]
    torch.testing.assert_close(method.loss_penalty(model, "default"), torch.tensor(1.5), atol=1e-5, rtol=0)
    perturb_adapters(model)
    by_hand = 0.0
    for layer in svd_layers(model).values():
        a, b = layer.lora_A["default"].double(), layer.lora_B["default"].double()
        by_hand += math.sqrt(((a @ a.T - torch.eye(4, dtype=torch.float64)) ** 2).sum())
        by_hand += math.sqrt(((b.T @ b - torch.eye(4, dtype=torch.float64)) ** 2).sum())
    assert orthogonality_penalty(model, "default").item() == pytest.approx(by_hand / 8, rel=1e-5)


def adalora_run(out, resume=False, stop_at=None):
    torch.manual_seed(0)
    model = graft.attach(tiny_llama(), graft.AdaLoRA(init_r=4, target_r=2, targets=TARGETS["llama"], tinit=1,
                                                     tfinal=3, orth_reg_weight=0.1))
    cfg = config(max_steps=8, save_every=2, out_dir=str(out), lr=2e-2, seed=5)

    def on_step(record):
        if record["step"] == stop_at:
            raise KeyboardInterrupt  # the run dies right after this step's checkpoint

    train(model, make_examples(16), collate, cfg, resume=resume, on_step=on_step)
    return model


def test_training_prunes_to_the_target_budget_and_resumes_exactly(tmp_path):
    model = adalora_run(tmp_path / "a")  # total_step from the trainer: T = 8, pattern fixed at step 5
    batch = collate(make_examples(16))
    with torch.no_grad():
        assert causal_lm_loss(model, batch) < causal_lm_loss(tiny_llama(), batch)
    assert nonzero_triplets(model) == 2 * 4
    raw = json.loads((tmp_path / "a" / "adapter" / "adapter_config.json").read_text())
    assert raw["total_step"] == 8 and sum(sum(v) for v in raw["rank_pattern"].values()) == 8
    loaded = graft.load(tiny_llama(), tmp_path / "a" / "adapter")
    torch.testing.assert_close(logits(loaded, batch_for("llama")), logits(model.eval(), batch_for("llama")),
                               atol=1e-6, rtol=0)

    with pytest.raises(KeyboardInterrupt):
        adalora_run(tmp_path / "b", stop_at=4)  # in the pruning phase: the EMAs must survive
    state = load_file(str(tmp_path / "b" / "checkpoint-4" / "method_state.safetensors"))
    assert any(k.endswith("exp_avg_unc") for k in state) and not any(k.endswith("rank_mask") for k in state)
    with pytest.raises(KeyboardInterrupt):
        adalora_run(tmp_path / "b", resume=True, stop_at=6)  # after the pattern is fixed: it must survive
    state = load_file(str(tmp_path / "b" / "checkpoint-6" / "method_state.safetensors"))
    assert sum(k.endswith("rank_mask") for k in state) == 4 and not any(k.endswith("exp_avg_ipt") for k in state)
    resumed = adalora_run(tmp_path / "b", resume=True)
    a, b = svd_layers(model), svd_layers(resumed)
    for n in a:
        assert torch.equal(a[n].rank_mask["default"], b[n].rank_mask["default"])
        for f in ("lora_A", "lora_E", "lora_B"):
            assert torch.equal(getattr(a[n], f)["default"], getattr(b[n], f)["default"]), (n, f)


def test_graft_train_cli_with_adalora(tmp_path):
    tok = AutoTokenizer.from_pretrained(graft.models.resolve("smollm2-135m"), local_files_only=True)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256)
                     ).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    rows = [{"instruction": f"Add {i} and {i}.", "input": "", "output": f"The sum is {2 * i}."} for i in range(6)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with contextlib.redirect_stdout(io.StringIO()):
        rc = main(["train", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "train.jsonl"),
                   "--max-steps", "3", "--batch-size", "2", "--lr", "1e-2", "--method", "adalora",
                   "--method-arg", "init_r=4", "--method-arg", "target_r=2", "--out", str(tmp_path / "out")])
    assert rc == 0
    raw = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert raw["peft_type"] == "ADALORA" and raw["total_step"] == 3
    assert sum(sum(v) for v in raw["rank_pattern"].values()) == 2 * 2  # q_proj and v_proj of one layer
    graft.load(LlamaForCausalLM.from_pretrained(tmp_path / "model"), tmp_path / "out" / "adapter")


# --------------------------------------------------------------------------------------------
# 6. Bad input


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"init_r": 4, "target_r": 8}, "init_r=4 is smaller than target_r=8"),
    ({"tinit": 5, "tfinal": 5, "total_step": 10}, r"tinit=5 \+ tfinal=5 must be smaller than total_step=10"),
    ({"init_r": 0}, "init_r=0 must be an integer >= 1"),
    ({"delta_t": 0}, "delta_t=0 must be an integer >= 1"),
    ({"beta1": 1.0}, r"beta1=1.0 must lie in \(0, 1\)"),
    ({"orth_reg_weight": -0.1}, "orth_reg_weight=-0.1 must be >= 0"),
    ({"alpha": 0}, "alpha=0 must be a positive number"),
    ({"dropout": 1.0}, r"dropout=1.0 is outside \[0, 1\)"),
    ({"init_r": 2, "target_r": 1, "rank_pattern": {"x": [True]}}, r"rank_pattern\['x'\] must be 2 \(init_r\) booleans"),
])
def test_bad_settings_name_field_value_and_allowed(kwargs, message):
    with pytest.raises(ValueError, match=message):
        graft.AdaLoRA(**kwargs)


def test_schedule_from_the_trainer_is_checked(tmp_path):
    model = graft.attach(tiny_llama(), graft.AdaLoRA(init_r=4, target_r=2, targets=["q_proj"], tinit=2, tfinal=1))
    with pytest.raises(ValueError, match=r"tinit=2 \+ tfinal=1 must be smaller than total_step=3"):
        train(model, make_examples(6), collate, config(max_steps=3))


def test_only_one_trainable_adalora_adapter(tmp_path):
    model = graft.attach(tiny_llama(), graft.AdaLoRA(init_r=4, target_r=2, targets=["q_proj"]), "a")
    with pytest.raises(ValueError, match="'a' is a trainable AdaLoRA adapter already"):
        graft.attach(model, graft.AdaLoRA(init_r=4, target_r=2, targets=["v_proj"]), "b")
    assert sorted(graft.core.state_of(model).methods) == ["a"]  # the failed attach left nothing behind
    graft.save(model, tmp_path)
    for p in adapter_parameters(model, "a").values():
        p.requires_grad_(False)
    graft.attach(model, graft.AdaLoRA(init_r=4, target_r=2, targets=["v_proj"]), "b")  # "a" is frozen now: fine
    for p in adapter_parameters(model, "a").values():
        p.requires_grad_(True)
    with pytest.raises(ValueError, match=r"AdaLoRA adapters \['a', 'b'\] are all trainable"):
        train(model, make_examples(4), collate, config(max_steps=2))


def test_embedding_target_is_refused():
    with pytest.raises(TypeError, match="AdaLoRA targets: module 'model.embed_tokens' is a Embedding"):
        graft.attach(tiny_llama(), graft.AdaLoRA(targets=["embed_tokens"]))
