"""Child-Tuning (F and D) and the feature-extraction probe: invariants, sparse saving, masks, resume."""

from __future__ import annotations

import pytest
import torch
from conftest import batch_for, logits, tiny_bert, tiny_llama
from conftest import pad_collate as collate
from safetensors.torch import load_file, save_file
from test_train import bert_collate, config, make_examples

import graft
from graft.methods.child import ChildLinear, fisher_threshold
from graft.train import causal_lm_loss, train

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny matmuls gain nothing from threads

TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "bert": ["query", "value"], "t5": ["q", "v"]}


# --------------------------------------------------------------------------------------------
# Child-Tuning


def test_child_tuning_all_linear_count_is_the_weights():
    model = tiny_llama()
    method = graft.ChildTuning()
    graft.attach(model, method)
    layers = [m for m in model.modules() if isinstance(m, ChildLinear)]
    assert len(layers) == 2 * 7  # q k v o gate up down per block; the lm_head is not a target
    assert graft.report(model).trainable == method.count(model) == sum(m.base_layer.weight.numel() for m in layers)


def test_saving_stores_only_changed_entries(tmp_path):
    model = graft.attach(tiny_llama(), graft.ChildTuning(targets=["q_proj"]))
    layer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.child_delta["default"][3, 5] = 0.25
        layer.child_delta["default"][7, 1] = -1.5
    graft.save(model, tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.q_proj."
    assert saved[key + "child_indices"].tolist() == [3 * 64 + 5, 7 * 64 + 1]
    assert saved[key + "child_values"].tolist() == [0.25, -1.5]
    assert saved["base_model.model.model.layers.1.self_attn.q_proj.child_indices"].numel() == 0
    assert (tmp_path / "adapter_model.safetensors").stat().st_size < 4096  # not a copy of the weights
    fresh = graft.load(tiny_llama(), tmp_path)
    assert torch.equal(fresh.model.layers[0].self_attn.q_proj.child_delta["default"], layer.child_delta["default"])


def test_corrupted_sparse_indices_are_a_clear_error(tmp_path):
    model = graft.attach(tiny_llama(), graft.ChildTuning(targets=["q_proj"]))
    graft.save(model, tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.q_proj."
    tensors[key + "child_indices"] = torch.tensor([10**9])
    tensors[key + "child_values"] = torch.tensor([1.0])
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    fresh = tiny_llama()
    with pytest.raises(ValueError, match="outside the weight"):
        graft.load(fresh, tmp_path)
    assert not hasattr(fresh, graft.core.STATE_ATTR)  # the failed load left the model as it was


def test_fisher_threshold_keeps_the_top_fraction():
    f = [torch.arange(10.0).reshape(2, 5), torch.arange(10.0, 20.0)]
    thr = fisher_threshold(f, 0.25)  # 20 values, keep 5: 15..19
    assert thr == 15.0 and sum(int((x >= thr).sum()) for x in f) == 5
    assert fisher_threshold(f, 1.0) == float("-inf")


def test_mode_f_mask_is_bernoulli_and_rescaled():
    model = graft.attach(tiny_llama(), graft.ChildTuning(mode="F", p=0.3, targets=["q_proj"]))
    method = graft.core.state_of(model).methods["default"]
    layers = [m for m in model.modules() if isinstance(m, ChildLinear)]
    for layer in layers:
        layer.child_delta["default"].grad = torch.ones_like(layer.child_delta["default"])
    torch.manual_seed(0)
    method.before_optimizer_step(model, "default")
    g = torch.cat([layer.child_delta["default"].grad.flatten() for layer in layers])
    kept = g != 0
    assert torch.allclose(g[kept], torch.full_like(g[kept], 1 / 0.3))  # kept gradients divided by p
    assert abs(kept.float().mean().item() - 0.3) < 0.03  # 8,192 draws: 3 sigma is 0.015


def test_mode_d_trains_only_the_fisher_child_and_resumes_exactly(tmp_path):
    def run(out, resume=False, stop_at=None):
        torch.manual_seed(0)
        model = graft.attach(tiny_llama(), graft.ChildTuning(mode="D", p=0.2, fisher_batches=3, targets="all-linear"))
        cfg = config(max_steps=6, save_every=2, out_dir=str(out), lr=1e-2, seed=5, schedule="cosine", warmup_steps=1)

        def on_step(record):
            if record["step"] == stop_at:
                raise KeyboardInterrupt  # the run dies right after checkpoint-4 is written

        result = train(model, make_examples(16), collate, cfg, resume=resume, on_step=on_step)
        return model, result

    model, _ = run(tmp_path / "a")
    batch = collate(make_examples(16))
    with torch.no_grad():
        assert causal_lm_loss(model, batch) < causal_lm_loss(tiny_llama(), batch)  # it learned the training data
    layers = [m for m in model.modules() if isinstance(m, ChildLinear)]
    masks = torch.cat([m.child_mask["default"].flatten() for m in layers])
    assert abs(masks.float().mean().item() - 0.2) < 0.01  # the top 20% (ties at the threshold kept)
    for m in layers:
        changed = m.child_delta["default"] != 0
        assert not (changed & ~m.child_mask["default"]).any(), "an entry outside the child network moved"
    saved = load_file(str(tmp_path / "a" / "adapter" / "adapter_model.safetensors"))
    nnz = sum(v.numel() for k, v in saved.items() if k.endswith("child_values"))
    assert 0 < nnz <= int(masks.sum())

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", stop_at=4)  # stopped after step 4 (checkpoints at 2 and 4) ...
    resumed, result = run(tmp_path / "b", resume=True)  # ... and continued to 6 on a fresh model
    assert result.resumed_from.name == "checkpoint-4"
    for a, b in zip(layers, [m for m in resumed.modules() if isinstance(m, ChildLinear)]):
        assert torch.equal(a.child_mask["default"], b.child_mask["default"])
        assert torch.equal(a.child_delta["default"], b.child_delta["default"])

    # The mask comes from the checkpoint, not from a new Fisher pass: an edited saved mask is what resumes.
    state_file = tmp_path / "b" / "checkpoint-4" / "method_state.safetensors"
    saved_state = load_file(str(state_file))
    key = "default/model.layers.0.self_attn.q_proj.child_mask"
    saved_state[key] = 1 - saved_state[key]
    save_file(saved_state, str(state_file))
    (tmp_path / "b" / "checkpoint-6").rename(tmp_path / "b" / ".gone")
    resumed, _ = run(tmp_path / "b", resume=True)
    mask = resumed.model.layers[0].self_attn.q_proj.child_mask["default"]
    assert torch.equal(mask, saved_state[key].bool())


def test_child_tuning_refuses_bad_settings():
    with pytest.raises(ValueError, match="mode='X' is not one of"):
        graft.ChildTuning(mode="X")
    with pytest.raises(ValueError, match=r"p=0 must be a fraction in \(0, 1\]"):
        graft.ChildTuning(p=0)
    with pytest.raises(ValueError, match="fisher_batches"):
        graft.ChildTuning(fisher_batches=0)


# --------------------------------------------------------------------------------------------
# Probe


def test_probe_pools_over_real_tokens_only():
    model = tiny_bert()
    graft.attach(model, graft.Probe(pooling="mean"))
    inputs = batch_for("bert")
    padded = {k: torch.cat([v, torch.zeros_like(v[:, :3])], dim=1) for k, v in inputs.items()}
    padded["input_ids"][:, -3:] = 5  # arbitrary tokens behind a zero mask
    torch.testing.assert_close(logits(model, padded), logits(model, inputs), atol=1e-5, rtol=0)


def test_probe_learns_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = graft.attach(tiny_bert(), graft.Probe(pooling="first"))
    # Label = whether token 7 occurs: linearly readable from a frozen random encoder's [CLS]-free mean? use first.
    data = [{"input_ids": x["input_ids"], "label": i % 3} for i, x in enumerate(make_examples(24))]
    result = train(model, data, bert_collate, config(task="classification", epochs=8, batch_size=8, lr=5e-2,
                                                     out_dir=tmp_path))
    assert result.losses[-1] < result.losses[0]
    assert graft.report(model).trainable == 32 * 3 + 3
    batch = bert_collate(data[:4])
    del batch["labels"]
    reloaded = graft.load(tiny_bert(), tmp_path / "adapter")
    torch.testing.assert_close(logits(reloaded, batch), logits(model.eval(), batch), atol=0, rtol=0)
    graft.unload(model)
    assert not hasattr(model, "graft_probe")
    torch.testing.assert_close(logits(model, batch), logits(tiny_bert(), batch), atol=0, rtol=0)


def test_probe_embeddings_start_as_mean_pooling():
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    encoder = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                   vocab_size=96)).eval()
    inputs = batch_for("bert")
    with torch.no_grad():
        hidden = encoder(**inputs).last_hidden_state
    graft.attach(encoder, graft.Probe(task="embedding"))
    with torch.no_grad():
        emb = encoder(**inputs)["embeddings"]
    torch.testing.assert_close(emb, torch.nn.functional.normalize(hidden.mean(1), dim=-1), atol=1e-6, rtol=0)


def test_probe_refuses_generative_models_and_bad_settings():
    with pytest.raises(TypeError, match="generative model"):
        graft.attach(tiny_llama(), graft.Probe(num_labels=2))
    with pytest.raises(ValueError, match="pooling='max' is not one of"):
        graft.Probe(pooling="max")


def test_a_mostly_changed_delta_is_stored_dense(tmp_path):
    model = graft.attach(tiny_llama(), graft.ChildTuning(targets=["q_proj"]))
    layer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.child_delta["default"].normal_()  # every entry changed, as mode F leaves it
    graft.save(model, tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.q_proj."
    assert {k for k in saved if k.startswith(key)} == {key + "child_delta"}
    fresh = graft.load(tiny_llama(), tmp_path)
    assert torch.equal(fresh.model.layers[0].self_attn.q_proj.child_delta["default"], layer.child_delta["default"])
