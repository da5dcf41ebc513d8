"""graft plan: exact counts by attaching on the meta device, memory figures, advice, CLI.

The activation formula is checked against autograd itself: on a tiny real model, every tensor
saved for backward during graft's loss is recorded with ``saved_tensors_hooks`` and the bytes are
compared with the plan's walk of the same dataflow.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import re

import pytest
import torch

import graft
from graft.cli import main as cli
from graft.plan import PRESETS, build_meta, load_config, parse_memory, recommend
from graft.plan.estimate import _Candidate, _walk
from graft.plan.settings import _Settings
from graft.plan.trace import _shape

GB = 10**9
NUMBER = re.compile(r"\d+(\.\d+)? [kMGT]?B")
LLAMA_65B = {"model_type": "llama", "hidden_size": 8192, "intermediate_size": 22016, "num_hidden_layers": 80,
             "num_attention_heads": 64, "vocab_size": 32000}
REQUIRED_KEYS = {"method", "trainable_params", "weights_bytes", "optimizer_bytes", "activation_bytes", "total_bytes",
                 "fits"}


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@pytest.fixture(scope="module")
def llama7b():
    return graft.plan("llama-2-7b", memory="24GB", seq_len=512, batch=1, goal="instructions")


def advice(p, **changes):
    """The recommendation for the same rows under other settings (the advice logic alone)."""
    s = dataclasses.replace(p.settings, **changes)
    return recommend(p.rows, s, p.inference_bytes, p.encoder)


# --------------------------------------------------------------------------------------------
# Acceptance 1: counts are the attached methods' (and peft's)


def test_counts_on_meta_llama2_7b(llama7b):
    expected = {"full": 6_738_415_616, "lora": 4_194_304, "qlora": 4_194_304, "dora": 4_456_448, "ia3": 614_400,
                "prompt-tuning": 81_920, "prefix-tuning": 5_242_880}
    for method, count in expected.items():
        assert llama7b.row(method).trainable_params == count, method
    bitfit = llama7b.row("bitfit")
    assert not bitfit.applicable and "bias" in bitfit.note


def test_counts_equal_each_methods_closed_form(llama7b):
    _, config = load_config("llama-2-7b")
    model = build_meta(config, torch.bfloat16)
    methods = {"lora": graft.LoRA(r=8, alpha=16), "dora": graft.LoRA(r=8, alpha=16, dora=True), "ia3": graft.IA3(),
               "prompt-tuning": graft.PromptTuning(num_virtual_tokens=20),
               "prefix-tuning": graft.PrefixTuning(num_virtual_tokens=20), "adapter": graft.Adapter()}
    for name, method in methods.items():
        assert llama7b.row(name).trainable_params == method.count(model), name


@pytest.mark.parametrize("preset,total", [("llama-3-8b", 8_030_261_248), ("mistral-7b", 7_241_732_096),
                                          ("qwen2-7b", 7_615_616_512), ("smollm2-135m", 134_515_008),
                                          ("gpt2", 124_439_808)])
def test_preset_shapes_are_the_published_ones(preset, total):
    _, config = load_config(preset)
    model = build_meta(config, torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == total
    assert all(p.is_meta for p in model.parameters())


# --------------------------------------------------------------------------------------------
# Acceptance 3: known figures


def test_7b_weights_in_16_bit_are_13_5_gb(llama7b):
    assert 13.4 * GB < llama7b.row("full").weights_bytes < 13.6 * GB


def test_7b_full_fine_tuning_in_mixed_precision_is_100_to_140_gb(llama7b):
    full = llama7b.row("full")
    assert full.optimizer_bytes == 12 * full.trainable_params  # fp32 master + two fp32 moments
    assert 100 * GB <= full.total_bytes_checkpointing <= full.total_bytes_no_checkpointing <= 140 * GB
    assert not full.fits


def test_7b_lora_fits_24gb_at_512_with_checkpointing():
    p = graft.plan("llama-2-7b", memory="24GB", seq_len=512, batch=1, gradient_checkpointing=True)
    lora = p.row("lora")
    assert lora.gradient_checkpointing and lora.fits
    assert lora.activation_bytes < lora.activation_bytes_no_checkpointing


def test_65b_qlora_fits_48gb_and_planning_allocates_nothing():
    gc.collect()
    before = rss_bytes()
    p = graft.plan(LLAMA_65B, memory="48GB", seq_len=512, batch=1, gradient_checkpointing=True)
    gc.collect()
    assert rss_bytes() - before < 150 * 2**20  # 65B parameters: 130 GB in 16 bits if anything were real
    assert p.total_params == 65_285_660_672
    assert p.row("lora").trainable_params == 80 * 8 * 4 * 8192  # r (d_in + d_out) on q and v
    qlora = p.row("qlora")
    assert qlora.fits, qlora
    # NF4 with double quantisation: ~4.127 bits for each of the 64.8B block weights; embeddings, head,
    # norms (fp32 after prepare_kbit_training) and the LoRA matrices at 4 bytes
    linears = 80 * (4 * 8192 * 8192 + 3 * 8192 * 22016)
    rest = p.total_params - linears + qlora.trainable_params
    assert qlora.weights_bytes == pytest.approx(linears * 4.127 / 8 + rest * 4, rel=1e-4)
    assert not p.row("lora").fits


# --------------------------------------------------------------------------------------------
# Activations: the walk equals what autograd saves on a tiny real model


TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128}
TINY_GPT2 = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 128, "n_positions": 64,
             "bos_token_id": 0, "eos_token_id": 0}  # dropout 0.1 as GPT-2's: masks and CPU math attention
TINY_BERT = {"model_type": "bert", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "intermediate_size": 128, "vocab_size": 128, "max_position_embeddings": 64}
METHODS = {"full": lambda: None, "lora": lambda: graft.LoRA(r=4), "dora": lambda: graft.LoRA(r=4, dora=True),
           "ia3": graft.IA3, "prompt-tuning": lambda: graft.PromptTuning(num_virtual_tokens=5),
           "prefix-tuning": lambda: graft.PrefixTuning(num_virtual_tokens=5), "adapter": graft.Adapter,
           "parallel": lambda: graft.Adapter(placement="parallel"), "bitfit": graft.BitFit,
           "qlora": lambda: graft.LoRA(r=4)}


class _Box:
    """What the saved-tensor hook stores: a detached alias, so a dropped graph frees it (a hook that
    returned the tensor itself would tie a saved output to its own node and keep dead graphs alive)."""

    __slots__ = ("__weakref__", "t")

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t.detach()


def saved_bytes(model, batch: dict, encoder: bool) -> int:
    """Bytes of the distinct storages (not parameters or buffers) autograd still holds for backward
    once graft's training loss has run forward."""
    import weakref

    from graft.train.loss import causal_lm_loss_sum, classification_loss_sum

    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    boxes = []

    def pack(t):
        box = _Box(t)
        if t.untyped_storage().data_ptr() not in weights:
            boxes.append((weakref.ref(box), t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))
        return box

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.t):
        if encoder:
            loss = classification_loss_sum(model, batch)
        else:
            loss = causal_lm_loss_sum(model, batch, logits_chunk=512, selective=True)
    alive = {ptr: n for ref, ptr, n in boxes if ref() is not None}
    del loss
    return sum(alive.values())


@pytest.mark.parametrize("config,method,dtype", [
    *[(TINY, m, "fp32") for m in ("full", "lora", "dora", "ia3", "prompt-tuning", "prefix-tuning", "adapter",
                                  "parallel", "qlora")],
    *[(TINY, m, "bf16") for m in ("full", "lora", "dora", "prefix-tuning")],
    *[(TINY_GPT2, m, "fp32") for m in ("full", "lora", "ia3", "prefix-tuning", "bitfit", "adapter")],
    *[(TINY_BERT, m, "fp32") for m in ("full", "lora", "prompt-tuning", "bitfit")],
], ids=lambda v: v["model_type"] if isinstance(v, dict) else v)
def test_activation_walk_equals_what_autograd_saves(config, method, dtype):
    """The plan's per-op rules reproduce, byte for byte, what autograd keeps (CPU kernels: fused
    attention for Llama, the math kernel where attention dropout is on, float dropout masks)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(0)
    encoder = config["model_type"] == "bert"
    cls = AutoModelForSequenceClassification if encoder else AutoModelForCausalLM
    model = cls.from_config(AutoConfig.for_model(**config), dtype=getattr(torch, {"fp32": "float32",
                                                                                  "bf16": "bfloat16"}[dtype])).train()
    if method == "qlora":
        from graft import quant

        quant.quantize(model, "nf4", compute_dtype=torch.float32)
        graft.prepare_kbit_training(model, gradient_checkpointing=False)
    cand = METHODS[method]()
    if cand is not None:
        graft.attach(model, cand, "plan")
    seq = 24
    ids = torch.randint(0, 128, (1, seq))
    batch = {"input_ids": ids, "labels": torch.tensor([1]) if encoder else ids}
    measured = saved_bytes(model, batch, encoder)

    s = _Settings(memory=GB, seq_len=seq, batch=1, dtype=dtype, optimizer="adamw", gradient_checkpointing=False,
                  logits_chunk=512, device="cpu", reserve=0, goal=None, tasks=1)
    virtual = {"prompt-tuning": (5, 0), "prefix-tuning": (0, 5)}.get(method, (0, 0))
    candidate = _Candidate(method, method, cand, quantized=method == "qlora")
    walk = _walk(model, dict(model.named_modules()), _shape(model), s, candidate, False, virtual, "plan")
    assert walk.blocks + walk.outside == measured


# --------------------------------------------------------------------------------------------
# Output: JSON, plot, text


def test_json_rows_have_the_keys(llama7b):
    rows = llama7b.to_json()
    assert [r["method"] for r in rows] == ["full", "lora", "qlora", "dora", "ia3", "prompt-tuning", "prefix-tuning",
                                           "adapter", "bitfit"]
    for r in rows:
        assert REQUIRED_KEYS <= set(r)
    json.dumps(rows)  # serialisable


def test_cli_json_and_plot(tmp_path, capsys):
    png = tmp_path / "plan.png"
    assert cli(["plan", "--model", "smollm2-135m", "--memory", "8GB", "--json", "--plot", str(png)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["method"] for r in rows} >= {"full", "lora", "qlora"}
    assert all(REQUIRED_KEYS <= set(r) for r in rows)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_text_output_has_table_and_recommendation(llama7b):
    text = str(llama7b)
    assert "4,194,304" in text and "recommendation:" in text
    assert re.search(r"^bitfit\s+n/a", text, re.MULTILINE)


def test_plan_help_has_an_example(capsys):
    with pytest.raises(SystemExit):
        cli(["plan", "--help"])
    out = capsys.readouterr().out
    assert "example:" in out and "graft plan --model llama-2-7b --memory 24GB" in out


# --------------------------------------------------------------------------------------------
# Memory strings and bad input


@pytest.mark.parametrize("text,size", [("24GB", 24 * 10**9), ("16GiB", 16 * 2**30), ("512MB", 512 * 10**6),
                                       ("1.5 TB", 1.5e12), ("80gb", 80 * 10**9), ("48G", 48 * 10**9),
                                       (10**9, 10**9)])
def test_parse_memory(text, size):
    assert parse_memory(text) == size


@pytest.mark.parametrize("text", ["24", "twenty GB", "24XB", "-1GB", "", "GB", "0.1B", 0, -5])
def test_parse_memory_errors(text):
    with pytest.raises(ValueError, match=r"memory|must be"):
        parse_memory(text)
    with pytest.raises(TypeError):
        parse_memory(True)


def test_unknown_preset_suggests_close_ones():
    with pytest.raises(ValueError) as e:
        graft.plan("llama2-7b")
    assert "Did you mean 'llama-2-7b'" in str(e.value)
    assert all(name in str(e.value) for name in PRESETS)


def test_config_without_needed_fields(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    missing = "lacks num_hidden_layers, num_attention_heads, vocab_size, intermediate_size"
    with pytest.raises(ValueError, match=missing):
        graft.plan(tmp_path)
    with pytest.raises(ValueError, match="no model_type"):
        graft.plan({"hidden_size": 64})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        graft.plan(tmp_path / "empty")


def test_cli_errors_exit_2(capsys):
    assert cli(["plan", "--model", "llama-2-7b", "--memory", "lots"]) == 2
    assert "cannot read memory 'lots'" in capsys.readouterr().err
    assert cli(["plan", "--model", "mistral7b"]) == 2
    assert "mistral-7b" in capsys.readouterr().err


def test_local_config_dir_dict_and_model_agree(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    (tmp_path / "config.json").write_text(json.dumps(TINY))
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY))
    counts = {graft.plan(source, memory="1GB").row("lora").trainable_params for source in (tmp_path, TINY, model)}
    assert counts == {2 * 8 * (64 + 64 + 64 + 32)}  # r (d_in + d_out) on q and v of two blocks
    assert not hasattr(model, "_graft_state") and all(not p.is_meta for p in model.parameters())  # untouched


# --------------------------------------------------------------------------------------------
# The advice


def test_no_training_recommends_icl(llama7b):
    rec = advice(llama7b, goal="no-training")
    assert rec.method == "icl" and "in-context" in rec.approach
    assert any(NUMBER.search(r) for r in rec.reasons)


def test_tight_memory_recommends_qlora():
    p = graft.plan("llama-2-7b", memory="12GB", goal="instructions")
    rec = p.recommendation
    assert not p.row("lora").fits and p.row("qlora").fits
    assert rec.method == "qlora" and rec.fits and "QLoRA" in rec.approach
    assert any("tight memory" in r and NUMBER.search(r) for r in rec.reasons)


def test_instructions_recommend_instruction_tuning_with_lora(llama7b):
    rec = llama7b.recommendation
    assert rec.method == "lora" and rec.approach.startswith("instruction tuning with LoRA")
    assert any("LoRA needs" in r and NUMBER.search(r) for r in rec.reasons)
    assert any("full fine-tuning would need" in r for r in rec.reasons)


def test_reasoning_recommends_cot_data(llama7b):
    rec = advice(llama7b, goal="reasoning")
    assert rec.method == "lora" and "chain-of-thought" in rec.approach


def test_multi_task_recommends_one_adapter_per_task(llama7b):
    rec = advice(llama7b, goal="multi-task", tasks=5)
    assert "adapter per task" in rec.approach
    assert any("5 tasks" in r and NUMBER.search(r) for r in rec.reasons)


def test_classification_on_an_encoder():
    p = graft.plan("bert-base", memory="8GB", goal="classification")
    assert p.row("bitfit").applicable and p.row("bitfit").trainable_params > 0
    assert "classification head" in p.recommendation.approach


def test_nothing_fits_says_so():
    rec = graft.plan("llama-2-7b", memory="4GB").recommendation
    assert not rec.fits and any("nothing fits" in r for r in rec.reasons)


def test_checkpointing_only_where_needed():
    p = graft.plan("llama-2-7b", memory="24GB", seq_len=2048, batch=4)
    lora = p.row("lora")
    assert lora.total_bytes_no_checkpointing > 23 * GB >= lora.total_bytes_checkpointing
    assert lora.gradient_checkpointing and lora.fits
    assert p.row("prefix-tuning").total_bytes_checkpointing is None  # graft refuses prefix + checkpointing
