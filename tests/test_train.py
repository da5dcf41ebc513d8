"""graft.train: selective-logits loss, accumulation, LoRA+, schedules, checkpoints and exact resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, perturb_adapters, tiny_bert, tiny_llama
from conftest import pad_collate as collate
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import graft
from graft.core import adapter_layers
from graft.train import (
    Schedule,
    TrainConfig,
    build_optimizer,
    build_scheduler,
    causal_lm_loss,
    epoch_batches,
    head_parameters,
    lora_b_parameters,
    supervised_count,
    train,
)
from graft.train import checkpoint as ckpt
from graft.train.loss import selective_fallback_reason

TESTS = Path(__file__).resolve().parent
# Tiny models, one thread: the subprocess runs of the resume test use one thread too, so all runs share
# one kernel configuration.
pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------
# Data: random token rows with a masked prompt, and a right-padding collate


def make_examples(n: int, seed: int = 0) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(6, 15, (1,), generator=g))
        prompt = int(torch.randint(1, length - 1, (1,), generator=g))
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def lora_llama(seed: int = 0, **lora) -> LlamaForCausalLM:
    model = tiny_llama(seed)
    torch.manual_seed(seed + 1)
    return graft.attach(model, graft.LoRA(**{"r": 4, **lora}))


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def config(**kw) -> TrainConfig:
    return TrainConfig(**{"lr": 1e-2, "batch_size": 2, "schedule": "constant", "progress": False, **kw})


# --------------------------------------------------------------------------------------------
# Selective-logits loss


def tied_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


def gemma2_softcapped() -> torch.nn.Module:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=16, vocab_size=VOCAB, final_logit_softcapping=2.0)
    model = Gemma2ForCausalLM(cfg)
    return graft.attach(model, graft.LoRA(r=4, targets=("q_proj", "v_proj")))


MODELS = {
    "lora": lambda: lora_llama(),
    "lora-on-head": lambda: lora_llama(targets=("q_proj", "lm_head")),
    "full-tied-head": tied_llama,  # every weight trains; the head is the embedding matrix
    "gemma2-softcap": gemma2_softcapped,
}


@pytest.mark.parametrize("kind", list(MODELS))
def test_selective_loss_equals_hf_loss_and_gradients(kind):
    model = MODELS[kind]().train()
    perturb_adapters(model, std=0.05)
    batch = collate(make_examples(3, seed=5))
    assert kind != "full-tied-head" or model.lm_head.weight is model.model.embed_tokens.weight

    ours = causal_lm_loss(model, batch, logits_chunk=5)  # several chunks, the last one partial
    ours.backward()
    ours_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    reference = model(**batch).loss
    reference.backward()

    assert torch.allclose(ours, reference, atol=1e-5), (ours.item(), reference.item())
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(ours_grads[name], p.grad, atol=1e-5), name
    assert selective_fallback_reason(model, batch, 5) is None


def test_selective_loss_passes_packed_rows_through():
    """Packed rows: position_ids restart per example and there is no attention mask."""
    model = lora_llama().train()
    perturb_adapters(model)
    examples = make_examples(4, seed=3)
    ids, labels, positions = [], [], []
    for x in examples:
        ids += x["input_ids"]
        labels += [-100, *x["labels"][1:]]  # nothing predicts the first token of the next example
        positions += range(len(x["input_ids"]))
    batch = {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]), "position_ids": torch.tensor([positions])}
    # use_cache=False matters: with a cache object transformers does not detect packed rows (5.x).
    reference = model(**batch, use_cache=False).loss
    assert torch.allclose(causal_lm_loss(model, batch, logits_chunk=7), reference, atol=1e-5)
    one_by_one = [dict(collate([x]), labels=torch.tensor([[-100, *x["labels"][1:]]])) for x in examples]
    counts = [supervised_count(b, "causal-lm") for b in one_by_one]
    separate = sum(causal_lm_loss(model, b) * n for b, n in zip(one_by_one, counts, strict=True)) / sum(counts)
    assert torch.allclose(reference, separate, atol=1e-5)  # the examples did not see each other
    assert not torch.allclose(causal_lm_loss(model, dict(batch, position_ids=torch.arange(len(ids))[None])),
                              reference, atol=1e-4)  # the positions do reach the model


class ScaledLlama(LlamaForCausalLM):
    """Post-processes logits in its forward, which the selective path cannot know about."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 2.0
        return out


def test_selective_loss_falls_back_when_logits_are_post_processed():
    batch = collate(make_examples(2))
    torch.manual_seed(0)
    scaled = ScaledLlama(tiny_llama().config)
    assert "post-processes logits" in selective_fallback_reason(scaled, batch, 8)

    cohere_like = tiny_llama()
    cohere_like.config.logit_scale = 0.0625
    assert "logit_scale=0.0625" in selective_fallback_reason(cohere_like, batch, 8)

    graft.attach(scaled, graft.LoRA(r=4))
    with pytest.warns(UserWarning, match="computing full logits"):
        result = train(scaled, make_examples(4), collate, config(max_steps=1))
    assert result.selective_logits is False


# --------------------------------------------------------------------------------------------
# Gradient accumulation, LoRA+, schedules


def test_grad_accumulation_is_token_weighted():
    data = make_examples(8, seed=2)
    kw = {"max_steps": 2, "seed": 7, "max_grad_norm": None}
    big, small = lora_llama(), lora_llama()
    perturb_adapters(big)
    perturb_adapters(small)  # B != 0, so every adapter tensor gets a gradient from step 1
    r1 = train(big, data, collate, config(batch_size=4, grad_accum=1, **kw))
    r2 = train(small, data, collate, config(batch_size=2, grad_accum=2, **kw))

    # Discriminating: step 1's two micro-batches have different supervised-token counts, so a mean of
    # per-micro-batch means would weight tokens differently from the single batch of 4.
    first = epoch_batches(len(data), None, config(batch_size=2, seed=7), epoch=0)[:2]
    counts = [sum(sum(1 for x in data[i]["labels"][1:] if x != -100) for i in b) for b in first]
    assert counts[0] != counts[1]

    assert r1.losses == pytest.approx(r2.losses, abs=1e-6)
    for (name, a), b in zip(trainable(big).items(), trainable(small).values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name


def test_loraplus_groups_found_structurally():
    model = lora_llama(dora=True)
    # A decoy whose name says lora_B but is no adapter tensor: it must stay in the base group.
    model.lora_B_decoy = torch.nn.Linear(4, 4)
    opt = build_optimizer(model, config(lr=1e-3, loraplus_ratio=16.0, weight_decay=0.1))
    groups = {g["name"]: g for g in opt.param_groups}
    fast = {id(p) for name in ("loraplus", "loraplus_no_decay") for p in groups[name]["params"]}

    b_matrices = [layer.lora_B[n].weight for _, layer in adapter_layers(model) for n in layer.lora_B]
    magnitudes = [m for _, layer in adapter_layers(model) for m in layer.lora_magnitude_vector.values()]
    a_matrices = [layer.lora_A[n].weight for _, layer in adapter_layers(model) for n in layer.lora_A]
    assert {id(p) for p in lora_b_parameters(model)} == {id(p) for p in b_matrices}
    assert fast == {id(p) for p in b_matrices + magnitudes} | {id(model.lora_B_decoy.bias)}  # vectors: fast, as peft
    assert id(model.lora_B_decoy.weight) not in fast and all(id(a) not in fast for a in a_matrices)
    assert groups["loraplus"]["lr"] == pytest.approx(16e-3) and groups["base"]["lr"] == pytest.approx(1e-3)
    assert groups["loraplus_no_decay"]["weight_decay"] == 0.0 and groups["loraplus"]["weight_decay"] == 0.1

    with pytest.raises(ValueError, match="loraplus_ratio=2.0 needs trainable LoRA B"):
        build_optimizer(tied_llama(), config(loraplus_ratio=2.0))


def test_head_lr_ratio_puts_the_new_head_alone_in_its_group():
    model = graft.attach(tiny_bert(), graft.LoRA(r=2, targets=["query", "value"]))  # + classifier (modules_to_save)
    head = {id(p) for p in head_parameters(model)}
    copies = [m for n, m in model.named_modules() if n.endswith("modules_to_save.default")]
    assert copies and head == {id(p) for m in copies for p in m.parameters()}  # the trained copy, not the base
    opt = build_optimizer(model, config(lr=1e-3, head_lr_ratio=10.0, loraplus_ratio=4.0, weight_decay=0.1))
    groups = {g["name"]: g for g in opt.param_groups}
    assert {id(p) for name in ("head", "head_no_decay") for p in groups[name]["params"]} == head
    assert groups["head"]["lr"] == pytest.approx(1e-2) and groups["head_no_decay"]["weight_decay"] == 0.0
    assert groups["base"]["lr"] == pytest.approx(1e-3) and groups["loraplus"]["lr"] == pytest.approx(4e-3)
    assert "loraplus_no_decay" not in groups  # the only trainable vector, the head's bias, stays with the head
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sorted(id(p) for g in opt.param_groups for p in g["params"]) == sorted(id(p) for p in trainable)
    plain = {g["name"] for g in build_optimizer(model, config(lr=1e-3)).param_groups}
    assert plain == {"base", "base_no_decay"}  # no ratio: the head trains at lr, as before


@pytest.mark.parametrize(("kind", "expected"), [
    ("constant", [0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
    ("linear", [0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]),
    ("cosine", [0.0, 0.5, 1.0, 0.9619, 0.8536, 0.6913, 0.5, 0.3087, 0.1464, 0.0381]),
])
def test_schedules(kind, expected):
    param = torch.nn.Parameter(torch.zeros(2, 2))
    model = torch.nn.Module()
    model.w = param
    cfg = config(lr=2.0, schedule=kind, warmup_steps=2)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, total=10)
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"] / 2.0)
        opt.step()
        sched.step()
    assert seen == pytest.approx(expected, abs=1e-4)
    assert Schedule(kind, warmup=3, total=10)(1) == pytest.approx(1 / 3)
    assert build_scheduler(opt, config(warmup_ratio=0.25), total=10).lr_lambdas[0].warmup == 3  # ceil(2.5)


# --------------------------------------------------------------------------------------------
# What a run changes and writes


def test_training_changes_only_adapter_and_writes_outputs(tmp_path):
    model = lora_llama()
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = trainable(model)
    result = train(model, make_examples(8), collate, config(max_steps=3, out_dir=tmp_path, eval_every=2),
                   eval_data=make_examples(3, seed=9))

    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, base[name]), name
    changed = [n for n, p in trainable(model).items() if not torch.equal(p, before[n])]
    assert changed and all(n in before for n in changed)

    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]
    assert {"loss", "lr", "tokens", "supervised_tokens", "tok_per_s", "elapsed", "peak_rss_mb"} <= set(lines[0])
    assert "eval_loss" in lines[1] and "eval_loss" in lines[2] and "eval_loss" not in lines[0]
    assert lines[1]["eval_ppl"] == pytest.approx(torch.tensor(lines[1]["eval_loss"]).exp().item())
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert result.saved_to == tmp_path / "adapter" and result.selective_logits
    assert result.peak_rss_mb > 0 and result.vm_hwm_mb > 0 and len(result.evals) == 2
    reloaded = graft.load(tiny_llama(), result.saved_to)
    batch = collate(make_examples(2))
    assert torch.allclose(reloaded(**batch).logits, model.eval()(**batch).logits, atol=1e-6)


def test_gradient_checkpointing_same_result_with_frozen_embeddings():
    data = make_examples(6)
    plain, ckpt_model = lora_llama(), lora_llama()
    train(plain, data, collate, config(max_steps=2))
    train(ckpt_model, data, collate, config(max_steps=2, gradient_checkpointing=True))
    layer0 = "model.layers.0.self_attn.q_proj.lora_A.default.weight"
    assert not torch.equal(trainable(ckpt_model)[layer0], trainable(lora_llama())[layer0])  # grads reached layer 0
    for (name, a), b in zip(trainable(plain).items(), trainable(ckpt_model).values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name
    assert not ckpt_model.is_activation_checkpointing  # switched off again afterwards


def test_tokens_per_batch_and_data_order():
    data = make_examples(20)
    lengths = [len(x["input_ids"]) for x in data]
    cfg = config(batch_size=None, tokens_per_batch=30)
    batches = epoch_batches(20, lengths, cfg, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(20))
    assert all(len(b) == 1 or max(lengths[i] for i in b) * len(b) <= 30 for b in batches)
    assert epoch_batches(20, lengths, cfg, epoch=0) == batches != epoch_batches(20, lengths, cfg, epoch=1)
    result = train(lora_llama(), data, collate, config(batch_size=None, tokens_per_batch=30, epochs=1))
    assert result.steps == len(batches) and result.epochs == 1.0


# --------------------------------------------------------------------------------------------
# Checkpoints and exact resume


def resume_run(out_dir: str, resume: bool = False, kill_at: int = 0):
    """The run the resume tests interrupt and continue (also run as a script in a subprocess)."""
    model = lora_llama(dropout=0.1)  # dropout: resuming must restore the torch RNG too

    def on_step(record: dict) -> None:
        print(f"step {record['step']}", flush=True)
        if record["step"] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    cfg = config(max_steps=8, save_every=2, keep_checkpoints=2, seed=3, warmup_steps=2, schedule="cosine",
                 out_dir=str(out_dir))  # 12 examples / batch 2: 6 steps per epoch, so resume crosses an epoch
    result = train(model, make_examples(12), collate, cfg, resume=resume, on_step=on_step)
    print("resumed_from", result.resumed_from.name if result.resumed_from else None, flush=True)
    return result


SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import torch
from test_train import resume_run
torch.set_num_threads(1)
resume_run(sys.argv[1], resume=sys.argv[2] == "resume", kill_at=int(sys.argv[3]))
"""


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    result = resume_run(str(out))
    return load_file(str(out / "adapter" / "adapter_model.safetensors")), result.losses


def assert_same_adapter(out_dir: Path, reference: dict[str, torch.Tensor]) -> None:
    got = load_file(str(out_dir / "adapter" / "adapter_model.safetensors"))
    assert got.keys() == reference.keys()
    for key in got:
        assert torch.equal(got[key], reference[key]), key


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path, uninterrupted):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(tests=str(TESTS)))
    out = tmp_path / "run"
    env = {**os.environ, "TQDM_DISABLE": "1"}
    killed = subprocess.run([sys.executable, str(script), str(out), "fresh", "5"], capture_output=True, text=True,
                            check=False, env=env, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert "step 5" in killed.stdout and "step 6" not in killed.stdout
    assert [s for s, _ in ckpt.checkpoints(out)] == [2, 4]  # keep_checkpoints=2
    assert not (out / "adapter").exists()

    resumed = subprocess.run([sys.executable, str(script), str(out), "resume", "0"], capture_output=True, text=True,
                             check=False, env=env, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed_from checkpoint-4" in resumed.stdout and "step 5\n" in resumed.stdout
    assert "step 4\n" not in resumed.stdout
    assert_same_adapter(out, uninterrupted[0])
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 9))  # step 5 of the killed run is not left behind
    assert [r["loss"] for r in lines] == pytest.approx(uninterrupted[1], abs=1e-7)


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch, uninterrupted):
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        if ".checkpoint-4." in str(f) and Path(f).name == ckpt.SCHEDULER_NAME:
            raise OSError("disk full (simulated)")  # adapter, weights and optimizer already written
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        resume_run(str(tmp_path))
    monkeypatch.undo()
    assert [s for s, _ in ckpt.checkpoints(tmp_path)] == [2]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no half-written directory left
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-2"

    with pytest.raises(ValueError, match="pass resume=True"):
        resume_run(str(tmp_path))
    result = resume_run(str(tmp_path), resume=True)
    assert result.resumed_from == tmp_path / "checkpoint-2" and result.steps == 8
    assert_same_adapter(tmp_path, uninterrupted[0])
    # The checkpoint directory is itself a PEFT adapter directory.
    graft.load(tiny_llama(), tmp_path / "checkpoint-8")


# --------------------------------------------------------------------------------------------
# Classification, full fine-tuning, 8-bit AdamW, bf16


def bert_collate(batch: list[dict]) -> dict[str, torch.Tensor]:
    out = collate([{"input_ids": b["input_ids"], "labels": b["input_ids"]} for b in batch])
    return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"],
            "labels": torch.tensor([b["label"] for b in batch])}


def test_classification_trains_and_saves_the_head(tmp_path):
    model = graft.attach(tiny_bert(), graft.LoRA(r=4))
    data = [{"input_ids": x["input_ids"], "label": i % 3} for i, x in enumerate(make_examples(12))]
    result = train(model, data, bert_collate, config(task="classification", epochs=2, batch_size=4, out_dir=tmp_path),
                   eval_data=data[:6])
    assert result.steps == 6 and 0.0 <= result.evals[-1]["eval_accuracy"] <= 1.0
    assert result.losses[-1] < result.losses[0]
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    head = [k for k in saved if ".classifier." in k]
    assert head, sorted(saved)
    reloaded = graft.load(tiny_bert(), tmp_path / "adapter")
    batch = bert_collate(data[:3])
    del batch["labels"]
    assert torch.allclose(reloaded(**batch).logits, model.eval()(**batch).logits, atol=1e-6)


def test_full_finetune_checkpoints_full_weights(tmp_path):
    model = tiny_llama()
    model.requires_grad_(True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = train(model, make_examples(6), collate, config(max_steps=2, save_every=2, out_dir=tmp_path, lr=1e-3))
    assert result.saved_to == tmp_path / "model"
    saved = load_file(str(tmp_path / "checkpoint-2" / ckpt.TRAINABLE_NAME))
    assert saved.keys() == before.keys() and not (tmp_path / "checkpoint-2" / "adapter_config.json").exists()
    assert not torch.equal(saved["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    back = LlamaForCausalLM.from_pretrained(tmp_path / "model")
    for name, p in back.named_parameters():
        assert torch.equal(p, dict(model.named_parameters())[name]), name


def test_adamw8bit_runs_and_checkpoints(tmp_path):
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # noqa: BLE001 (a broken native library raises more than ImportError)
        pytest.skip(f"bitsandbytes does not import: {e}")
    model = tiny_llama()
    model.requires_grad_(True)  # full tensors >= 4096 elements get 8-bit states (LoRA tensors are smaller)
    before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    train(model, make_examples(4), collate, config(optimizer="adamw8bit", max_steps=1, save_every=1, lr=1e-3,
                                                   out_dir=tmp_path))
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, before)
    state = torch.load(tmp_path / "checkpoint-1" / ckpt.OPTIMIZER_NAME, weights_only=True)  # loads unpickling nothing
    quantized = [s["__bnb_optimizer_quant_state__"]["state1"] for s in state["state"].values()]
    assert any(t.dtype == torch.uint8 for t in quantized)


def test_bf16_autocast_matches_fp32_loosely():
    if not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
        with pytest.raises(ValueError, match="lacks AVX512-BF16"):
            train(lora_llama(), make_examples(2), collate, config(max_steps=1, autocast="bf16"))
        return
    r16 = train(lora_llama(), make_examples(4), collate, config(max_steps=1, autocast="bf16"))
    r32 = train(lora_llama(), make_examples(4), collate, config(max_steps=1))
    assert r16.losses[0] == pytest.approx(r32.losses[0], rel=2e-2)


# --------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"lr": 0}, "lr=0 must be a finite number > 0"),
    ({"lr": float("nan")}, "lr=nan"),
    ({"lr": float("inf")}, "lr=inf"),
    ({"epochs": 0}, "epochs=0 must be an integer >= 1"),
    ({"batch_size": 0}, "batch_size=0"),
    ({"batch_size": None}, "exactly one of batch_size and tokens_per_batch"),
    ({"grad_accum": 1.5}, "grad_accum=1.5 must be an integer"),
    ({"optimizer": "sgd"}, "optimizer='sgd' is not one of ('adamw', 'adamw8bit')"),
    ({"schedule": "step"}, "schedule='step' is not one of"),
    ({"autocast": "int8"}, "autocast='int8' is not one of ('bf16', 'fp16', None)"),
    ({"task": "seq2seq"}, "task='seq2seq'"),
    ({"loraplus_ratio": 0.5}, "loraplus_ratio=0.5 must be a finite number >= 1.0"),
    ({"head_lr_ratio": 0.0}, "head_lr_ratio=0.0 must be a finite number > 0.0"),
    ({"warmup_ratio": 1.5}, "warmup_ratio=1.5 must be in [0, 1)"),
    ({"warmup_steps": 2, "warmup_ratio": 0.1}, "use one"),
    ({"save_every": 5}, "save_every=5 needs out_dir"),
    ({"logits_chunk": 0}, "logits_chunk=0"),
    ({"gradient_checkpointing": "yes"}, "gradient_checkpointing='yes' must be True or False"),
])
def test_bad_config_values_name_field_value_and_allowed(kwargs, message):
    with pytest.raises((ValueError, TypeError)) as e:
        TrainConfig(**kwargs)
    assert message in str(e.value)


def test_bad_train_calls(tmp_path):
    with pytest.raises(ValueError, match="train_data is empty"):
        train(lora_llama(), [], collate, config())
    with pytest.raises(ValueError, match="resume=True needs TrainConfig.out_dir"):
        train(lora_llama(), make_examples(2), collate, config(), resume=True)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(tiny_llama().requires_grad_(False), make_examples(2), collate, config())
    train(lora_llama(), make_examples(4), collate, config(max_steps=1, save_every=1, out_dir=tmp_path))
    with pytest.raises(ValueError, match="different data order .*'seed'"):
        train(lora_llama(), make_examples(4), collate, config(max_steps=2, save_every=1, out_dir=tmp_path, seed=9),
              resume=True)


@pytest.mark.parametrize("cap", [None, 2.0])
def test_head_cross_entropy_gradient_formed_in_forward_is_exact(cap):
    """The fused head loss (x's gradient computed in its forward) equals autograd through the plain
    head and cross-entropy. Both take the cross-entropy in fp32 (also for these float64 inputs), so
    they agree to fp32 rounding: rtol 1e-5."""
    from graft.train.loss import _head_loss, _HeadCrossEntropy

    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 16, dtype=torch.float64, generator=g, requires_grad=True)
    head = torch.nn.Linear(16, 50, bias=False).double().requires_grad_(False)
    targets = torch.randint(0, 50, (7,), generator=g)
    ours = _HeadCrossEntropy.apply(x, head.weight, targets, cap) * 0.5  # an upstream gradient != 1
    ours.backward()
    gx = x.grad.clone()
    x.grad = None
    ref = _head_loss(head, x, targets, cap) * 0.5
    ref.backward()
    torch.testing.assert_close(ours, ref, atol=0, rtol=1e-6)
    torch.testing.assert_close(gx, x.grad, atol=1e-8, rtol=1e-5)
    assert gx.abs().max() > 1e-3  # a gradient that can be wrong
    with pytest.raises(ValueError, match="frozen head"):
        _HeadCrossEntropy.apply(x, head.weight.requires_grad_(True), targets, cap)
