"""DPO: preference data, the loss against TRL's DPOTrainer, the reference = the base, training end to end."""

from __future__ import annotations

import json
import tempfile

import pytest
import torch
from conftest import VOCAB, tiny_llama
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers import models as tok_models
from transformers import PreTrainedTokenizerFast

import graft
from graft import core, data
from graft.data import DataError
from graft.train import TrainConfig, train
from graft.train.dpo import DPOLoss, dpo_loss, precompute_reference, sequence_logps

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny matmuls gain nothing from threads

CHAT = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} <eos> {% endfor %}"
        "{% if add_generation_prompt %}<assistant> {% endif %}")


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace tokenizer over the tiny models' vocabulary: "t5 t6" -> [5, 6]; ids 0-2 pad, EOS, unknown."""
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"t{i}": i for i in range(3, VOCAB - 3)}}
    vocab.update({"<user>": VOCAB - 3, "<assistant>": VOCAB - 2, "<system>": VOCAB - 1})
    inner = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=inner, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    tok.chat_template = CHAT
    return tok


def words(g: torch.Generator, n: int) -> str:
    return " ".join(f"t{int(i)}" for i in torch.randint(3, VOCAB - 3, (n,), generator=g))


def pair_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    g = torch.Generator().manual_seed(seed)
    return [{"prompt": words(g, int(torch.randint(2, 7, (1,), generator=g))),
             "chosen": words(g, int(torch.randint(1, 6, (1,), generator=g))),
             "rejected": words(g, int(torch.randint(1, 6, (1,), generator=g)))} for _ in range(n)]


def lora_model(seed: int = 0) -> torch.nn.Module:
    model = tiny_llama(seed)
    graft.attach(model, graft.LoRA(r=4, alpha=8, targets=["q_proj", "v_proj"]))
    perturb(model)
    return model


def perturb(model: torch.nn.Module, std: float = 0.2) -> None:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)


# --------------------------------------------------------------------------------------------
# Data


def test_string_pairs_share_the_prompt_and_supervise_only_responses():
    tok = word_tokenizer()
    (pair,) = data.tokenize_pairs([{"prompt": "t5 t6 t7", "chosen": "t8 t9", "rejected": "t10"}], tok)
    assert pair.chosen.input_ids == [5, 6, 7, 8, 9, 1]
    assert pair.chosen.labels == [-100, -100, -100, 8, 9, 1]  # response + EOS only
    assert pair.rejected.input_ids == [5, 6, 7, 10, 1]
    assert pair.rejected.labels == [-100, -100, -100, 10, 1]
    # Too long: the shared prompt is cut from the left by what the longer response needs, on both sides.
    (cut,) = data.tokenize_pairs([{"prompt": "t5 t6 t7", "chosen": "t8 t9", "rejected": "t10"}], tok, max_length=5)
    assert cut.chosen.input_ids == [6, 7, 8, 9, 1]
    assert cut.rejected.input_ids == [6, 7, 10, 1]


def test_message_pairs_mask_every_prompt_turn_including_earlier_assistant_turns():
    tok = word_tokenizer()
    history = [{"role": "user", "content": "t5"}, {"role": "assistant", "content": "t6"},
               {"role": "user", "content": "t7"}]
    row = {"chosen": [*history, {"role": "assistant", "content": "t8 t9"}],
           "rejected": [*history, {"role": "assistant", "content": "t10"}]}  # implicit prompt: the shared turns
    (pair,) = data.tokenize_pairs([row], tok)
    supervised = [t for t, label in zip(pair.chosen.input_ids, pair.chosen.labels) if label != -100]
    assert supervised == [8, 9, 1]  # the last assistant turn through its EOS; t6 (an assistant turn) is prompt
    rejected = [t for t, label in zip(pair.rejected.input_ids, pair.rejected.labels) if label != -100]
    assert rejected == [10, 1]
    n = pair.chosen.labels.index(8)
    assert pair.chosen.input_ids[:n] == pair.rejected.input_ids[:n]
    explicit = {"prompt": history, "chosen": [row["chosen"][-1]], "rejected": [row["rejected"][-1]]}
    assert data.tokenize_pairs([explicit], tok) == [pair]
    repeated = {"prompt": history, **row}  # UltraFeedback's layout: the lists repeat the prompt
    assert data.tokenize_pairs([repeated], tok) == [pair]


@pytest.mark.parametrize("row, message", [
    ({"prompt": "t5", "chosen": "t6"}, "needs 'chosen' and 'rejected'"),
    ({"prompt": "t5", "chosen": "t6", "rejected": [{"role": "assistant", "content": "t7"}]}, "both be strings"),
    ({"chosen": [{"role": "assistant", "content": "t7"}], "rejected": [{"role": "assistant", "content": "t8"}]},
     "no prompt"),
])
def test_bad_preference_rows_name_the_row(row, message):
    with pytest.raises(DataError, match=message):
        data.tokenize_pairs([row], word_tokenizer())


def test_packed_pairs_give_the_same_sequence_logps_as_padded():
    model = lora_model()
    pairs = data.tokenize_pairs(pair_rows(5), word_tokenizer())
    padded = data.collate_pairs(pairs, 0, packed=False)
    packed = data.collate_pairs(pairs, 0, packed=True, max_length=32)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]  # several sequences per row
    with torch.no_grad():
        a = sequence_logps(model, padded)
        b = sequence_logps(model, packed)
        c = sequence_logps(model, padded, selective=False)
    assert a.shape == (10,)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# The loss against TRL


def trl_trainer(model: torch.nn.Module, tok: PreTrainedTokenizerFast, loss_type: str, beta: float,
                label_smoothing: float):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    args = trl.DPOConfig(output_dir=tempfile.mkdtemp(), beta=beta, loss_type=loss_type,
                         label_smoothing=label_smoothing, report_to=[], use_cpu=True, bf16=False)
    rows = datasets.Dataset.from_list(pair_rows(2))
    return trl.DPOTrainer(model=model, args=args, train_dataset=rows, processing_class=tok)


def trl_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """graft's padded pair batch in TRL's form (completion_mask marks the scored tokens)."""
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "completion_mask": (batch["labels"] != -100).long()}


@pytest.mark.parametrize("label_smoothing, n_pairs, packed", [(0.0, 4, False), (0.0, 4, True), (0.2, 1, False)])
def test_loss_gradients_and_rewards_equal_trl_dpo_trainer(label_smoothing, n_pairs, packed):
    """Same tiny Llama, same LoRA weights (graft's copied into peft by PEFT name), same token batch.

    TRL 1.x's "sigmoid" loss is plain DPO; conservative DPO's label-smoothed sigmoid is its "aot" loss
    on a batch of one pair (aot sorts the log-ratios across the batch, a no-op for one pair).
    """
    peft = pytest.importorskip("peft")
    tok = word_tokenizer()
    ours = lora_model()
    theirs = peft.get_peft_model(tiny_llama(0), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                 target_modules=["q_proj", "v_proj"]))
    mine = core.adapter_parameters(ours, "default")
    peft_params = {n.removeprefix("base_model.model."): p for n, p in theirs.named_parameters() if p.requires_grad}
    assert len(peft_params) == len(mine) == 8  # A and B of q_proj and v_proj in 2 layers
    with torch.no_grad():
        for name, p in mine.items():
            peft_params[_peft_name(name, peft_params)].copy_(p)
    beta = 0.1
    trainer = trl_trainer(theirs, tok, "sigmoid" if label_smoothing == 0 else "aot", beta, label_smoothing)
    # TRL keeps a trained adapter's starting weights as the reference (adapter "ref"); graft's reference is
    # the base with the adapter disabled, which is TRL's reference for a new adapter: drop "ref".
    if "ref" in theirs.peft_config:
        theirs.delete_adapter("ref")
        theirs.set_adapter("default")
    assert "ref" not in theirs.peft_config

    pairs = data.tokenize_pairs(pair_rows(n_pairs, seed=3), tok)
    padded = data.collate_pairs(pairs, tok.pad_token_id)
    batch = data.collate_pairs(pairs, tok.pad_token_id, packed=packed, max_length=40)
    objective = DPOLoss(beta, label_smoothing)
    ours.train()
    loss = objective(ours, batch) / n_pairs
    loss.backward()
    theirs.train()
    reference = trainer.compute_loss(theirs, trl_batch(padded))
    reference.backward()

    assert abs(loss.item() - reference.item()) < 1e-5
    assert abs(loss.item() - torch.log(torch.tensor(2.0)).item()) > 1e-3  # the adapter moved the policy
    for name, p in mine.items():
        torch.testing.assert_close(p.grad, peft_params[_peft_name(name, peft_params)].grad, atol=1e-5, rtol=1e-4)
    metrics = objective.take_metrics()
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert abs(metrics[key] - trainer._metrics["train"][key][-1]) < 1e-5, key


def _peft_name(graft_name: str, peft_names: dict) -> str:
    """graft's qualified adapter parameter name -> peft's (both keep PEFT's tensor names)."""
    if graft_name in peft_names:
        return graft_name
    matches = [n for n in peft_names if n.replace(".default", "") == graft_name.replace(".default", "")]
    assert len(matches) == 1, (graft_name, list(peft_names)[:4])
    return matches[0]


def test_dpo_loss_formula_and_label_smoothing():
    c, r = torch.tensor([-3.0, -1.0]), torch.tensor([-2.0, -4.0])
    rc, rr = torch.tensor([-2.5, -2.0]), torch.tensor([-2.0, -2.0])
    losses, chosen, rejected = dpo_loss(c, r, rc, rr, beta=0.5)
    delta = (c - rc) - (r - rr)
    torch.testing.assert_close(losses, torch.log1p(torch.exp(-0.5 * delta)))
    torch.testing.assert_close(chosen - rejected, 0.5 * delta)
    smoothed, _, _ = dpo_loss(c, r, rc, rr, beta=0.5, label_smoothing=0.25)
    flipped, _, _ = dpo_loss(r, c, rr, rc, beta=0.5)
    torch.testing.assert_close(smoothed, 0.75 * losses + 0.25 * flipped)


# --------------------------------------------------------------------------------------------
# The reference is the base model, for any adapter


@pytest.mark.parametrize("method", [
    graft.LoRA(r=4, targets=["q_proj", "v_proj"]),
    graft.IA3(),
    graft.PromptTuning(num_virtual_tokens=3),
])
def test_reference_is_the_base_model_with_any_adapter(method):
    base = tiny_llama(1)
    model = graft.attach(tiny_llama(1), method)
    perturb(model)
    batch = data.collate_pairs(data.tokenize_pairs(pair_rows(3), word_tokenizer()), 0)
    with torch.no_grad():
        expected = sequence_logps(base, batch)
        policy = sequence_logps(model, batch)
    objective = DPOLoss(0.1)
    loss = objective(model, batch)
    loss.backward()
    metrics = objective.take_metrics()
    n = 3
    torch.testing.assert_close(torch.tensor(metrics["rewards/chosen"]),
                               (0.1 * (policy[:n] - expected[:n])).mean(), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(policy, expected)  # the adapter changes the policy, not the reference
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_dpo_without_an_adapter_is_an_error():
    rows = data.tokenize_pairs(pair_rows(2), word_tokenizer())
    with pytest.raises(ValueError, match="attach an adapter"):
        train(tiny_llama(), rows, lambda b: data.collate_pairs(b, 0),
              TrainConfig(objective="dpo", batch_size=2, progress=False))


@pytest.mark.parametrize("kwargs, message", [
    ({"objective": "dpo", "beta": 0.0}, "beta"),
    ({"objective": "dpo", "label_smoothing": 0.5}, r"\[0, 0.5\)"),
    ({"beta": 0.2}, "DPO setting"),
    ({"objective": "ppo"}, "objective"),
    ({"objective": "dpo", "task": "classification"}, "causal LM"),
])
def test_bad_dpo_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


# --------------------------------------------------------------------------------------------
# Training


def test_training_raises_the_margin_and_logs_rewards(tmp_path):
    tok = word_tokenizer()
    rows = data.tokenize_pairs(pair_rows(8), tok)
    collate = lambda b: data.collate_pairs(b, 0, packed=True, max_length=32)
    model = graft.attach(tiny_llama(2), graft.LoRA(r=4, targets=["q_proj", "v_proj"]))
    cfg = TrainConfig(objective="dpo", beta=0.5, lr=2e-2, batch_size=4, max_steps=12, schedule="constant",
                      progress=False, out_dir=str(tmp_path), eval_every=6)
    result = train(model, rows, collate, cfg, eval_data=rows[:4])
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert key in lines[0], key
    assert abs(lines[0]["loss"] - 0.6931) < 1e-3  # step 1: LoRA B = 0, the policy is the reference
    assert lines[-1]["rewards/margins"] > 0.5 and lines[-1]["rewards/accuracies"] == 1.0
    assert result.losses[-1] < 0.3
    assert "eval_rewards/margins" in result.evals[-1] and result.evals[-1]["eval_rewards/margins"] > 0
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


def test_precomputed_reference_trains_the_same():
    tok = word_tokenizer()
    rows = data.tokenize_pairs(pair_rows(6), tok)
    collate = lambda b: data.collate_pairs(b, 0)
    losses = []
    for precompute in (False, True):
        model = graft.attach(tiny_llama(2), graft.LoRA(r=4, targets=["q_proj", "v_proj"]))
        cfg = TrainConfig(objective="dpo", lr=1e-2, batch_size=3, max_steps=4, progress=False,
                          precompute_ref=precompute)
        losses.append(train(model, rows, collate, cfg).losses)
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), atol=1e-5, rtol=1e-5)
    model = graft.attach(tiny_llama(2), graft.LoRA(r=4, targets=["q_proj", "v_proj"]))
    done = precompute_reference(model, rows, collate, batch_size=4)
    assert all(p.ref_logps is not None for p in done) and all(p.ref_logps is None for p in rows)
    assert "ref_logps" in collate(done[:2])


def test_grad_accumulation_and_checkpointing_give_the_same_step():
    """A step's loss is the mean over its pairs however they are split into micro-batches."""
    rows = data.tokenize_pairs(pair_rows(8), word_tokenizer())
    collate = lambda b: data.collate_pairs(b, 0, packed=True, max_length=32)
    results = []
    for kw in ({"batch_size": 4}, {"batch_size": 2, "grad_accum": 2}, {"batch_size": 4, "gradient_checkpointing": True}):
        model = lora_model()
        result = train(model, rows, collate, TrainConfig(objective="dpo", lr=1e-2, max_steps=1, progress=False, **kw))
        results.append((result.losses[0], {n: p.detach().clone() for n, p in model.named_parameters()
                                           if p.requires_grad}))
    for loss, weights in results[1:]:
        assert abs(loss - results[0][0]) < 1e-6
        for name, value in weights.items():
            torch.testing.assert_close(value, results[0][1][name], atol=1e-6, rtol=1e-5)
