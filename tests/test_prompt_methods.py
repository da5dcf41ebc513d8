"""Prompt tuning, P-tuning and prefix tuning: the invariant matrix, closed-form counts, checkpoints that
interchange with peft both ways, greedy generation equal to peft's, training through graft's
selective loss, resume of the encoders, concatenation of active adapters, and bad input.

peft is the oracle only. peft's prompt-tuning logits include the n virtual positions; graft drops
them from the hidden states, so peft's are compared from position n on.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import warnings

import peft
import pytest
import torch
import transformers
from conftest import FACTORIES, VOCAB, batch_for, logits, perturb_adapters
from invariants import Expect, check_invariants
from packaging.version import Version
from peft import (
    PeftConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    get_peft_model,
)
from safetensors import safe_open
from test_counts import meta_llama2_7b, rss_bytes
from transformers import DistilBertConfig, DistilBertForSequenceClassification, DynamicCache

import graft
from graft.io import RESUME_NAME, WEIGHTS_NAME
from graft.methods.prompt import INPUT_ATTR, InputAdapters
from graft.train.loss import causal_lm_loss

N = 4  # virtual tokens

# name -> (graft method, equivalent peft config kwargs)
CASES = {
    "prompt": (graft.PromptTuning(N), (PromptTuningConfig, {})),
    "ptuning-mlp": (graft.PTuning(N, encoder_hidden_size=16),
                    (PromptEncoderConfig, {"encoder_hidden_size": 16})),
    "ptuning-lstm": (graft.PTuning(N, encoder="lstm", encoder_hidden_size=8),
                     (PromptEncoderConfig, {"encoder_reparameterization_type": "LSTM", "encoder_hidden_size": 8})),
    "prefix": (graft.PrefixTuning(N), (PrefixTuningConfig, {})),
    "prefix-proj": (graft.PrefixTuning(N, projection=True, encoder_hidden_size=16),
                    (PrefixTuningConfig, {"prefix_projection": True, "encoder_hidden_size": 16})),
}
TOKENS_IN_FRONT = {"prompt", "ptuning-mlp", "ptuning-lstm"}  # peft's logits carry n extra positions for these
# peft 0.21.2 hands the prompt/prefix cache to the backbone as `past_key_values`; transformers 5.24 renamed that
# argument `cache`. There peft refuses prefix tuning on BERT, and its greedy tokens on a left-padded row stop
# matching a cache-free recomputation while graft's still match the peft-free oracles below: peft is only an
# oracle where it is right.
PEFT_CACHE_OK = Version(transformers.__version__) < Version("5.24")


def padded_batch(arch: str) -> dict[str, torch.Tensor]:
    """The conftest batch with the second row left-padded: masks and positions must line up."""
    inputs = batch_for(arch)
    inputs["attention_mask"][1, :2] = 0
    return inputs


def peft_logits(peft_model, inputs, case):
    out = logits(peft_model, inputs)
    return out[:, N:] if case in TOKENS_IN_FRONT else out


# --------------------------------------------------------------------------------------------
# The invariant matrix


# Invariants that do not apply, and why: a prompt or prefix is never the identity (random virtual
# tokens always change the attention), and there is no weight to merge it into (merge must refuse).
PROMPT_EXPECT = Expect(identity_at_init=False, mergeable=False)


def test_vocab_and_text_init_invariants(tmp_path):
    check_invariants("llama", graft.PromptTuning(N, init="vocab"), PROMPT_EXPECT)
    tokenizer = make_tokenizer(tmp_path)
    check_invariants("gpt2", graft.PromptTuning(N, init="text", init_text="alpha beta", tokenizer=tokenizer),
                     PROMPT_EXPECT)


# --------------------------------------------------------------------------------------------
# Counts


@pytest.mark.parametrize(("method", "expected", "peft_config"), [
    (graft.PromptTuning(20), 81_920, PromptTuningConfig(num_virtual_tokens=20, task_type="CAUSAL_LM")),
    (graft.PrefixTuning(20), 5_242_880, PrefixTuningConfig(num_virtual_tokens=20, task_type="CAUSAL_LM")),
])
def test_counts_on_meta_llama2_7b(method, expected, peft_config):
    model = meta_llama2_7b()
    assert method.count(model) == expected
    gc.collect()
    before = rss_bytes()
    graft.attach(model, method)
    gc.collect()
    assert graft.report(model).trainable == expected
    assert all(p.is_meta for p in model.parameters()), "attach materialised a tensor"
    assert rss_bytes() - before < 10 * 2**20  # a real fp32 prefix table would be 21 MB
    # The oracle, on the same shape
    assert get_peft_model(meta_llama2_7b(), peft_config).get_nb_trainable_parameters()[0] == expected


@pytest.mark.parametrize("case", list(CASES))
def test_count_equals_peft_on_gqa_llama(case):
    """The closed forms (LSTM layers, projection MLP, GQA-sized prefix) against peft's modules."""
    method, (config_cls, kwargs) = CASES[case]
    peft_model = get_peft_model(FACTORIES["llama"](), config_cls(num_virtual_tokens=N, task_type="CAUSAL_LM", **kwargs))
    assert method.count(FACTORIES["llama"]()) == peft_model.get_nb_trainable_parameters()[0]


def test_prefix_table_is_sized_for_gqa():
    model = graft.attach(FACTORIES["llama"](), graft.PrefixTuning(N))  # 4 heads, 2 kv heads of 16
    table = getattr(model, INPUT_ATTR).adapters["default"].embedding.weight
    assert table.shape == (N, 2 * 2 * 32)  # n x (L * 2 * head_dim * kv_heads), not L * 2 * hidden


# --------------------------------------------------------------------------------------------
# Checkpoints: graft -> peft and peft -> graft


INTERCHANGE = [(arch, case) for arch in ("llama", "gpt2") for case in CASES]


@pytest.mark.parametrize(("arch", "case"), INTERCHANGE)
def test_graft_to_peft(arch, case, tmp_path):
    inputs = padded_batch(arch)
    model = FACTORIES[arch]()
    graft.attach(model, CASES[case][0])
    perturb_adapters(model)
    want = logits(model, inputs)
    graft.save(model, tmp_path)

    with safe_open(str(tmp_path / WEIGHTS_NAME), framework="pt") as f:
        assert set(f.keys()) == {"prompt_embeddings"}  # exactly peft's layout: one top-level table
        table = f.get_tensor("prompt_embeddings")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*(missing|unexpected).*")
        peft_model = PeftModel.from_pretrained(FACTORIES[arch](), str(tmp_path)).eval()
    assert torch.equal(peft_model.prompt_encoder["default"].embedding.weight, table)
    torch.testing.assert_close(peft_logits(peft_model, inputs, case), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("arch", "case"), INTERCHANGE)
def test_peft_to_graft(arch, case, tmp_path):
    inputs = padded_batch(arch)
    config_cls, kwargs = CASES[case][1]
    peft_model = get_peft_model(FACTORIES[arch](), config_cls(num_virtual_tokens=N, task_type="CAUSAL_LM", **kwargs))
    perturb_adapters(peft_model)
    peft_model.eval()
    want = peft_logits(peft_model, inputs, case)
    peft_model.save_pretrained(str(tmp_path))

    model = graft.load(FACTORIES[arch](), tmp_path)
    torch.testing.assert_close(logits(model, inputs), want, atol=1e-5, rtol=0)
    assert not torch.allclose(logits(model, inputs), logits(FACTORIES[arch](), inputs), atol=1e-3)


@pytest.mark.parametrize("case", list(CASES))
def test_saved_config_is_peft_config(case, tmp_path):
    method = CASES[case][0]
    graft.save(graft.attach(FACTORIES["llama"](), method), tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    config = PeftConfig.from_pretrained(str(tmp_path))
    assert config.peft_type.value == method.peft_type and config.task_type == "CAUSAL_LM"
    assert (config.num_virtual_tokens, config.num_layers, config.num_transformer_submodules) == (N, 2, 1)
    if case.startswith("prefix"):
        assert (config.token_dim, config.num_attention_heads) == (32, 2)  # GQA: kv heads x head_dim
        assert config.prefix_projection is method.projection
    else:
        assert (config.token_dim, config.num_attention_heads) == (64, 4)
    if case.startswith("ptuning"):
        assert config.encoder_reparameterization_type == method.encoder.upper()
        assert config.encoder_hidden_size == method.encoder_hidden_size
    # a loaded table overwrites any initialisation, so a loaded prefix config says init="random" (no forward)
    loaded = method if not case.startswith("prefix") else dataclasses.replace(method, init="random")
    assert type(method).from_peft(raw) == loaded


@pytest.mark.parametrize("case", ["prompt", "prefix"])
def test_bert_classifier_head_travels_with_the_prompt(case, tmp_path):
    """peft keys a prompt-learning model's modules under ``base_model.``: the head must go there."""
    inputs = {**padded_batch("bert"), "token_type_ids": torch.zeros(2, 7, dtype=torch.long)}
    model = graft.attach(FACTORIES["bert"](), CASES[case][0])
    perturb_adapters(model)
    graft.save(model, tmp_path)
    with safe_open(str(tmp_path / WEIGHTS_NAME), framework="pt") as f:
        assert set(f.keys()) == {"prompt_embeddings", "base_model.classifier.weight", "base_model.classifier.bias"}
    if case == "prefix" and not PEFT_CACHE_OK:  # peft cannot run it: graft's own reload, head included
        reference = graft.load(FACTORIES["bert"](), tmp_path)
    else:
        reference = PeftModel.from_pretrained(FACTORIES["bert"](), str(tmp_path)).eval()
    torch.testing.assert_close(logits(reference, inputs), logits(model, inputs), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------
# Generation


GENERATE_CASES = [("llama", "prompt"), ("llama", "ptuning-mlp"), ("llama", "prefix"), ("llama", "prefix-proj"),
                  ("gpt2", "prompt"), ("gpt2", "prefix")]
GEN_IDS = torch.tensor([[5, 6, 7, 8, 9], [0, 0, 10, 11, 12]])  # the second row left-padded
GEN_MASK = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])


def greedy_on(m, ids: torch.Tensor, mask: torch.Tensor, steps: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    out = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, pad_token_id=0,
                     output_scores=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.scores)  # (batch, len + steps), (steps, batch, vocab)


def greedy(m) -> tuple[torch.Tensor, torch.Tensor]:
    return greedy_on(m, GEN_IDS, GEN_MASK)


@pytest.mark.parametrize(("arch", "case"), [c for c in GENERATE_CASES if c[1] in TOKENS_IN_FRONT])
def test_greedy_generate_equals_recomputation_without_cache(arch, case):
    """An oracle that owes nothing to any library's cache handling: at every step the whole sequence so far,
    virtual tokens in front, through graft's own forward (no cache; that forward equals peft's, tested above)
    picks the same token with the same scores as generate with its KV cache. Positions come from the mask in
    both, as generate derives them."""
    model = graft.attach(FACTORIES[arch](), CASES[case][0])
    perturb_adapters(model, std=0.5)
    tokens, scores = greedy(model)
    seq, mask, expected = GEN_IDS, GEN_MASK, []
    with torch.no_grad():
        for _ in range(scores.shape[0]):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            last = model(input_ids=seq, attention_mask=mask, position_ids=positions).logits[:, -1]
            expected.append(last)
            seq = torch.cat([seq, last.argmax(-1, keepdim=True)], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    assert torch.equal(tokens, seq)
    torch.testing.assert_close(scores, torch.stack(expected), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("arch", "case"), GENERATE_CASES)
def test_generate_of_a_padded_batch_equals_each_row_alone(arch, case):
    """An oracle that owes nothing to peft: each row of a left-padded batch, its positions taken from the mask,
    generates exactly what it generates alone, unpadded (peft fails this for prompt tokens: it drops the
    positions, so a padded row's count its padding)."""
    model = graft.attach(FACTORIES[arch](), CASES[case][0])
    perturb_adapters(model, std=0.5)
    tokens, scores = greedy(model)
    for row in range(GEN_IDS.shape[0]):
        keep = GEN_MASK[row].bool()
        alone_tokens, alone_scores = greedy_on(model, GEN_IDS[row, keep][None], GEN_MASK[row, keep][None])
        assert torch.equal(tokens[row][torch.cat([keep, keep.new_ones(scores.shape[0])])], alone_tokens[0])
        torch.testing.assert_close(scores[:, row], alone_scores[:, 0], atol=1e-5, rtol=0)


@pytest.mark.skipif(not PEFT_CACHE_OK, reason=f"peft {peft.__version__} generate with prompt/prefix methods "
                    f"diverges on transformers {transformers.__version__} (>= 5.24 renamed the cache argument)")
@pytest.mark.filterwarnings("ignore:Position ids are not supported")  # peft drops them for prompt tokens
@pytest.mark.parametrize(("arch", "case"), GENERATE_CASES)
def test_greedy_generate_equals_peft(arch, case, tmp_path):
    """Same tokens and same per-step scores as peft, with a left-padded row (masks and positions at every step).

    For prompt tokens, the padded row only where peft is right: peft drops generate's positions there, so its
    padded row counts the padding and differs from that row alone (graft's equals it: the oracle above)."""
    generate = greedy
    model = FACTORIES[arch]()
    base_tokens, base_scores = generate(model)
    graft.attach(model, CASES[case][0])
    perturb_adapters(model, std=0.5)
    tokens, scores = generate(model)
    graft.save(model, tmp_path)
    peft_tokens, peft_scores = generate(PeftModel.from_pretrained(FACTORIES[arch](), str(tmp_path)).eval())
    rows = [0] if case in TOKENS_IN_FRONT else [0, 1]
    assert torch.equal(tokens[rows], peft_tokens[rows])
    torch.testing.assert_close(scores[:, rows], peft_scores[:, rows], atol=1e-5, rtol=0)
    if case in TOKENS_IN_FRONT:  # the difference is real, not noise
        assert (scores[:, 1] - peft_scores[:, 1]).abs().max() > 1e-4
    assert (scores - base_scores).abs().max() > 1e-2, "the adapter changed nothing: the comparison proves nothing"
    with graft.disabled(model):
        assert torch.equal(generate(model)[0], base_tokens)


# --------------------------------------------------------------------------------------------
# Training through graft's selective loss, and resume


@pytest.mark.parametrize("case", ["prompt", "prefix"])
def test_selective_loss_sees_the_prompt_and_training_lowers_it(case):
    model = graft.attach(FACTORIES["llama"](), CASES[case][0])
    inputs = padded_batch("llama")
    batch = {**inputs, "labels": inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)}
    # selective (backbone + head), plain (the model's logits) and the model's own loss agree
    selective = causal_lm_loss(model, batch)
    torch.testing.assert_close(selective, causal_lm_loss(model, batch, selective=False), atol=1e-6, rtol=0)
    torch.testing.assert_close(selective, model(**batch).loss, atol=1e-6, rtol=0)
    with graft.disabled(model):
        assert abs(causal_lm_loss(model, batch).item() - selective.item()) > 1e-4

    table = getattr(model, INPUT_ATTR).adapters["default"].embedding.weight
    start, frozen = table.detach().clone(), {k: v.clone() for k, v in model.state_dict().items() if "graft_input" not in k}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    losses = []
    for _ in range(8):
        loss = causal_lm_loss(model, batch)
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert losses[-1] < losses[0] - 0.1, losses
    assert not torch.equal(table, start)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.items())


@pytest.mark.parametrize("case", ["ptuning-mlp", "ptuning-lstm", "prefix-proj"])
def test_resume_restores_the_encoder(case, tmp_path):
    inputs = batch_for("llama")
    method = CASES[case][0]
    model = graft.attach(FACTORIES["llama"](), method)
    perturb_adapters(model)
    want = logits(model, inputs)
    graft.save(model, tmp_path)
    assert (tmp_path / RESUME_NAME).exists()

    resumed = graft.load(FACTORIES["llama"](), tmp_path, trainable=True)
    ours, theirs = (getattr(m, INPUT_ATTR).adapters["default"].state_dict() for m in (model, resumed))
    assert ours.keys() == theirs.keys() and len(ours) > 1  # the table and the encoder's layers
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert graft.report(resumed).trainable == method.count(FACTORIES["llama"]())
    torch.testing.assert_close(logits(resumed, inputs), want, atol=1e-6, rtol=0)

    # Without the resume file (a peft-written checkpoint), the encoder's output is kept as a plain table.
    (tmp_path / RESUME_NAME).unlink()
    fixed = graft.load(FACTORIES["llama"](), tmp_path, trainable=True)
    adapter = getattr(fixed, INPUT_ATTR).adapters["default"]
    assert not adapter.has_encoder
    assert graft.report(fixed).trainable == adapter.embedding.weight.numel()
    torch.testing.assert_close(logits(fixed, inputs), want, atol=1e-6, rtol=0)


def test_stale_resume_file_is_ignored(tmp_path):
    """peft re-saving over a graft checkpoint leaves graft's resume file behind: it must not be used."""
    inputs = batch_for("llama")
    graft.save(perturbed(graft.attach(FACTORIES["llama"](), CASES["ptuning-mlp"][0])), tmp_path)
    peft_model = PeftModel.from_pretrained(FACTORIES["llama"](), str(tmp_path))
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.add_(1.0)
    peft_model.eval().save_pretrained(str(tmp_path))
    assert (tmp_path / RESUME_NAME).exists()
    model = graft.load(FACTORIES["llama"](), tmp_path)
    torch.testing.assert_close(logits(model, inputs), logits(peft_model, inputs)[:, N:], atol=1e-5, rtol=0)


def perturbed(model):
    perturb_adapters(model)
    return model


# --------------------------------------------------------------------------------------------
# Several adapters, disabling, detaching, routing


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_active_adapters_concatenate_in_activation_order(kind):
    cls = graft.PromptTuning if kind == "prompt" else graft.PrefixTuning
    inputs = padded_batch("llama")
    model = FACTORIES["llama"]()
    for name, n in (("a", 2), ("b", 3)):
        graft.attach(model, cls(n), name)
    tables = {n: getattr(model, INPUT_ATTR).adapters[n].embedding.weight for n in ("a", "b")}
    for order in (["a", "b"], ["b", "a"]):
        graft.activate(model, order)
        got = logits(model, inputs)
        single = graft.attach(FACTORIES["llama"](), cls(5))
        with torch.no_grad():
            getattr(single, INPUT_ATTR).adapters["default"].embedding.weight.copy_(
                torch.cat([tables[n] for n in order]))
        torch.testing.assert_close(got, logits(single, inputs), atol=1e-5, rtol=0)
    graft.activate(model, ["a", "b"])
    # Prompt rows have positions, so their order matters; prefix keys carry none, so attention over them
    # does not depend on their order.
    assert torch.allclose(logits(model, inputs), got, atol=1e-5) is (kind == "prefix")


def test_prompt_and_prefix_together():
    """A prefix lives in the cache, before the prompt rows: [K_prefix ; P ; x], positions counted after both."""
    inputs = padded_batch("llama")
    model = FACTORIES["llama"]()
    graft.attach(model, graft.PrefixTuning(3), "kv")
    graft.attach(model, graft.PromptTuning(2), "p")
    graft.activate(model, ["p", "kv"])
    got = logits(model, inputs)
    adapters = getattr(model, INPUT_ATTR).adapters
    with torch.no_grad(), graft.disabled(model):
        cache = DynamicCache(config=model.config)
        for layer, (k, v) in enumerate(adapters["kv"].key_values(2, torch.float32)):
            cache.update(k, v, layer)
        embeds = torch.cat([adapters["p"]().expand(2, -1, -1), model.model.embed_tokens(inputs["input_ids"])], dim=1)
        mask = torch.cat([torch.ones(2, 5, dtype=torch.long), inputs["attention_mask"]], dim=1)
        want = model(inputs_embeds=embeds, attention_mask=mask, past_key_values=cache).logits[:, 2:]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_detach_and_unload_remove_the_hooks():
    inputs = batch_for("gpt2")
    base = logits(FACTORIES["gpt2"](), inputs)
    for finish in (lambda m: graft.detach(m, "default"), graft.unload):
        model = graft.attach(FACTORIES["gpt2"](), graft.PrefixTuning(N))
        assert isinstance(getattr(model, INPUT_ATTR), InputAdapters)
        hooks = len(model.transformer._forward_pre_hooks), len(model.transformer._forward_hooks)
        model = finish(model)
        assert not hasattr(model, INPUT_ATTR)
        assert (len(model.transformer._forward_pre_hooks), len(model.transformer._forward_hooks)) == (
            hooks[0] - 1, hooks[1] - 1)
        torch.testing.assert_close(logits(model, inputs), base, atol=0, rtol=0)


def test_second_adapter_keeps_hooks_until_the_last_leaves():
    model = FACTORIES["llama"]()
    before = len(model.model._forward_pre_hooks)
    graft.attach(model, graft.PromptTuning(2), "a")
    graft.attach(model, graft.PrefixTuning(2), "b")
    assert len(model.model._forward_pre_hooks) == before + 1  # one hook pair for every input-side adapter
    graft.detach(model, "a")
    assert hasattr(model, INPUT_ATTR) and len(model.model._forward_pre_hooks) == before + 1
    graft.detach(model, "b")
    assert not hasattr(model, INPUT_ATTR) and len(model.model._forward_pre_hooks) == before


def test_route_refuses_prompt_adapters():
    model = FACTORIES["llama"]()
    graft.attach(model, graft.LoRA(r=2, targets=["q_proj"]), "lora")
    graft.attach(model, graft.PromptTuning(N), "prompt")
    inputs = batch_for("llama")
    with graft.route(model, ["prompt", "lora"]), pytest.raises(ValueError, match="graft.route does not support"):
        model(**inputs)
    with graft.route(model, ["lora", None]):  # routing only LoRA rows still works
        model(**inputs)


def test_merge_and_unload_merge_refuse():
    model = graft.attach(FACTORIES["llama"](), graft.PTuning(N))
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        graft.merge(model)
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        graft.unload(model, merge=True)
    assert hasattr(model, INPUT_ATTR)  # a refused unload leaves the adapter in place


def test_prefix_refuses_gradient_checkpointing():
    model = graft.attach(FACTORIES["llama"](), graft.PrefixTuning(N))
    model.gradient_checkpointing_enable()
    model.train()
    with pytest.raises(RuntimeError, match="gradient checkpointing"):
        model(**batch_for("llama"))


# --------------------------------------------------------------------------------------------
# Initialisation from text or vocabulary equals peft's


def make_tokenizer(path):
    """A tiny word-level tokenizer that adds BOS, saved where AutoTokenizer (and peft) can load it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "alpha": 5, "beta": 17, "gamma": 42}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>")
    fast.save_pretrained(str(path))
    return fast


def test_text_init_equals_peft(tmp_path):
    make_tokenizer(tmp_path)
    model = graft.attach(FACTORIES["llama"](), graft.PromptTuning(7, init="text", init_text="alpha beta gamma",
                                                                   tokenizer=str(tmp_path)))
    table = getattr(model, INPUT_ATTR).adapters["default"].embedding.weight
    rows = model.model.embed_tokens.weight[[1, 5, 17, 42, 1, 5, 17]]  # BOS included, cycled to 7
    assert torch.equal(table, rows)
    peft_model = get_peft_model(FACTORIES["llama"](), PromptTuningConfig(
        num_virtual_tokens=7, task_type="CAUSAL_LM", prompt_tuning_init="TEXT",
        prompt_tuning_init_text="alpha beta gamma", tokenizer_name_or_path=str(tmp_path)))
    assert torch.equal(peft_model.prompt_encoder["default"].embedding.weight, table)
    graft.save(model, tmp_path / "adapter")
    config = PeftConfig.from_pretrained(str(tmp_path / "adapter"))
    assert (config.prompt_tuning_init, config.tokenizer_name_or_path) == ("TEXT", str(tmp_path))


def test_vocab_init_equals_peft():
    model, base = FACTORIES["llama"](), FACTORIES["llama"]()  # (the factories seed the generator themselves)
    torch.manual_seed(7)
    graft.attach(model, graft.PromptTuning(N, init="vocab"))
    torch.manual_seed(7)
    peft_model = get_peft_model(base, PromptTuningConfig(
        num_virtual_tokens=N, task_type="CAUSAL_LM", prompt_tuning_init="SAMPLE_VOCAB"))
    table = getattr(model, INPUT_ATTR).adapters["default"].embedding.weight
    assert torch.equal(peft_model.prompt_encoder["default"].embedding.weight, table)
    vocab = model.model.embed_tokens.weight
    assert all(any(torch.equal(row, v) for v in vocab) for row in table)  # rows of the word embedding


# --------------------------------------------------------------------------------------------
# Bad input: the error names the problem and what is allowed


@pytest.mark.parametrize(("make", "pattern"), [
    (lambda: graft.PromptTuning(0), r"num_virtual_tokens=0 must be a positive integer"),
    (lambda: graft.PrefixTuning(-3), r"num_virtual_tokens=-3 must be a positive integer"),
    (lambda: graft.PTuning(True), r"num_virtual_tokens=True must be a positive integer"),
    (lambda: graft.PromptTuning(4, init="txt"), r"init='txt' is not one of \('random', 'text', 'vocab'\)"),
    (lambda: graft.PromptTuning(4, init="text", tokenizer="gpt2"), r"init='text' needs init_text"),
    (lambda: graft.PromptTuning(4, init="text", init_text="hi"), r"init='text' needs tokenizer="),
    (lambda: graft.PromptTuning(4, init_text="hi"), r"init_text is only used with init='text'"),
    (lambda: graft.PTuning(4, encoder="gru"), r"encoder='gru' is not one of \('mlp', 'lstm'\)"),
    (lambda: graft.PTuning(4, encoder_num_layers=3), r"encoder_num_layers=3 applies to encoder='lstm' only"),
    (lambda: graft.PTuning(4, encoder_hidden_size=0), r"encoder_hidden_size=0 must be None or a positive integer"),
    (lambda: graft.PTuning(4, encoder_dropout=1.0), r"encoder_dropout=1.0 is outside \[0, 1\)"),
    (lambda: graft.PrefixTuning(4, encoder_hidden_size=8), r"encoder_hidden_size is the projection's width"),
])
def test_bad_config_values(make, pattern):
    with pytest.raises((ValueError, TypeError), match=pattern):
        make()


def tiny_distilbert():
    torch.manual_seed(0)
    return DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=64)).eval()


@pytest.mark.parametrize(("make_model", "method", "error", "pattern"), [
    (FACTORIES["t5"], graft.PromptTuning(N), ValueError, r"does not support encoder-decoder models"),
    (FACTORIES["t5"], graft.PrefixTuning(N), ValueError, r"does not support encoder-decoder models"),
    (lambda: torch.nn.Sequential(torch.nn.Linear(4, 4)), graft.PromptTuning(N), TypeError,
     r"needs a transformers model with a config and a backbone"),
    (tiny_distilbert, graft.PrefixTuning(N), ValueError,
     r"needs a model whose attention takes a KV cache.*use PromptTuning or PTuning"),
    (FACTORIES["gpt2"], graft.PromptTuning(N, init="text", init_text="hi", tokenizer="/no/such/tokenizer"),
     ValueError, r"could not load tokenizer '/no/such/tokenizer'"),
])
def test_unsupported_models_fail_at_attach(make_model, method, error, pattern):
    model = make_model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=pattern):
        graft.attach(model, method)
    assert not hasattr(model, INPUT_ATTR) and not hasattr(model, graft.core.STATE_ATTR)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.requires_grad for p in model.parameters())  # attach's freezing was rolled back


def test_prompt_tuning_works_where_prefix_cannot():
    """DistilBERT's attention takes no cache, but prompt tuning only needs its embeddings."""
    inputs = batch_for("bert")
    model = tiny_distilbert()
    base = logits(model, inputs)
    graft.attach(model, graft.PromptTuning(N))
    assert not torch.allclose(logits(model, inputs), base, atol=1e-4)
