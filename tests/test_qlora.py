"""QLoRA: LoRA / DoRA on bitsandbytes 4-bit (NF4, double quantisation) and 8-bit (LLM.int8()) bases.

References are built independently of graft.quant: a plain fp32 copy of the same tiny model whose
linear weights are what bitsandbytes itself dequantizes (``bnb.functional.dequantize_4bit``, or
``CB * SCB / 127`` for int8), carrying the same adapter loaded from the same file.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import sys
import warnings

import pytest
import torch
from conftest import VOCAB, batch_for, logits, perturb_adapters, tiny_gpt2, tiny_llama
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import graft
from graft import models, quant

bnb = pytest.importorskip("bitsandbytes")

# Code books a 4-bit layer stores besides codes and scales (bitsandbytes 0.50 keeps one copy per layer).
NF4_CODEBOOK_BYTES = 16 * 4  # the 16 NF4 values, fp32
DYNAMIC_CODEBOOK_BYTES = 256 * 4  # the 8-bit dynamic map of the nested (double-quantized) scales, fp32
LINEARS_PER_BLOCK = 7  # q, k, v, o, gate, up, down


def quantized_llama(mode: str = "nf4", compute: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    return quant.quantize(tiny_llama(seed), mode, compute_dtype=compute)


def dequantized_reference(qmodel: nn.Module, seed: int = 0) -> nn.Module:
    """A plain fp32 tiny Llama whose linears hold the weights ``qmodel``'s bnb layers compute with."""
    ref = tiny_llama(seed)
    with torch.no_grad():
        for name, module in qmodel.named_modules():
            name = name.removesuffix(".base_layer")
            if type(module).__name__ == "Linear4bit":
                w = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            elif type(module).__name__ == "Linear8bitLt":
                scb = module.weight.SCB if module.weight.SCB is not None else module.state.SCB
                w = module.weight.data.float() * scb[:, None] / 127
            else:
                continue
            ref.get_submodule(name).weight.copy_(w)
    return ref


def stored_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Clones of every quantized tensor (codes, scales, nested scales) and every float parameter."""
    out = {k: p.detach().clone() for k, p in model.named_parameters()}
    for name, m in model.named_modules():
        if type(m).__name__ == "Linear4bit":
            qs = m.weight.quant_state
            out.update({f"{name}.absmax": qs.absmax.clone(), f"{name}.offset": qs.offset.clone(),
                        f"{name}.nested_absmax": qs.state2.absmax.clone()})
    return out


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def train_steps(model: nn.Module, ids: torch.Tensor, steps: int, lr: float = 1e-2) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = lm_loss(model, ids)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


# --------------------------------------------------------------------------------------------
# 1. Memory


@pytest.mark.parametrize("double_quant", [True, False])
def test_4bit_weights_are_stored_in_exactly_the_nf4_budget(double_quant):
    # Hidden 256: the ~1 KiB of code books per layer is noise, as in real models (it would be 5% of a
    # 64x64 layer); 4.127 bits (DQ) or 4.5 bits per weight are 0.129x or 0.141x of fp32.
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB)
    model = quant.quantize(LlamaForCausalLM(cfg), "nf4", double_quant=double_quant)
    layers = [m for _, m in quant.quantized_modules(model)]
    assert len(layers) == LINEARS_PER_BLOCK * 2  # every block linear; lm_head and embeddings stay dense
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    sizes = [m.in_features * m.out_features for m in layers]
    if double_quant:
        # codes n/2 + a uint8 scale per 64 weights + an fp32 scale per 256 scales + the fp32 offset
        expected = sum(n // 2 + n // 64 + 4 * math.ceil(n / 64 / 256) + 4 + NF4_CODEBOOK_BYTES
                       + DYNAMIC_CODEBOOK_BYTES for n in sizes)
    else:
        expected = sum(n // 2 + 4 * (n // 64) + NF4_CODEBOOK_BYTES for n in sizes)  # an fp32 scale per 64
    stored = quant.weight_bytes(model)
    assert stored.fp32 == 4 * sum(sizes)
    assert stored.quantized == expected
    assert stored.ratio <= 0.16
    assert all(m.weight.dtype == torch.uint8 and m.weight.quant_state.blocksize == 64 for m in layers)


@pytest.mark.parametrize("mode", ["nf4", "fp4"])
def test_same_codes_and_scales_as_transformers_bitsandbytes_config(mode, tmp_path):
    pytest.importorskip("accelerate")  # transformers' bitsandbytes quantizer needs it; graft does not
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_llama().save_pretrained(tmp_path)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=mode, bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config, device_map="cpu")
    ours = quant.quantize(AutoModelForCausalLM.from_pretrained(tmp_path), mode, compute_dtype=torch.float32)
    hf_layers = {n for n, m in hf.named_modules() if type(m).__name__ == "Linear4bit"}
    assert hf_layers == {n for n, _ in quant.quantized_modules(ours)}  # lm_head left alone by both
    for name in hf_layers:  # compared before any forward: transformers' layers repack on the first CPU call
        a, b = hf.get_submodule(name).weight, ours.get_submodule(name).weight
        assert a.quant_state.blocksize == b.quant_state.blocksize == 64
        assert torch.equal(a.data.view(-1), b.data.view(-1))
        assert torch.equal(bnb.functional.dequantize_4bit(a.data, a.quant_state),
                           bnb.functional.dequantize_4bit(b.data, b.quant_state))


# --------------------------------------------------------------------------------------------
# 2. Train on 4-bit, save, load on the fp and the 4-bit base, compare with the dequantized reference


def test_lora_trained_on_4bit_loads_on_both_bases_and_equals_dequantized_reference(tmp_path):
    inputs = batch_for("llama")
    model = quantized_llama()
    graft.prepare_kbit_training(model, gradient_checkpointing=True)
    graft.attach(model, graft.LoRA(r=4, alpha=8, targets="all-linear"))
    train_steps(model, inputs["input_ids"], steps=3)
    trained = logits(model, inputs)
    graft.save(model, tmp_path / "a")

    on_fp = graft.load(tiny_llama(), tmp_path / "a")
    on_4bit = graft.load(quantized_llama(), tmp_path / "a")
    reference = graft.load(dequantized_reference(on_4bit), tmp_path / "a")
    got, want, fp = logits(on_4bit, inputs), logits(reference, inputs), logits(on_fp, inputs)
    # Quantizing is deterministic, so a fresh 4-bit base reproduces the trained model.
    torch.testing.assert_close(got, trained, rtol=0, atol=1e-6)
    # With fp32 compute a 4-bit layer dequantizes with the same kernel and runs the same fp32 matmul
    # as the reference; only summation order may differ: 1e-5 on logits of size ~0.1-1.
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # The test can tell: the fp base (no quantization noise) is far outside that tolerance.
    assert (fp - want).abs().max() > 1e-3


def test_bf16_compute_is_close_to_the_reference(tmp_path):
    inputs = batch_for("llama")
    model = graft.attach(quantized_llama(compute=torch.bfloat16), graft.LoRA(r=4, targets="all-linear"))
    perturb_adapters(model)
    graft.save(model, tmp_path / "a")
    reference = graft.load(dequantized_reference(model), tmp_path / "a")
    got, want = logits(model, inputs), logits(reference, inputs)
    fp = logits(graft.load(tiny_llama(), tmp_path / "a"), inputs)
    # bf16 rounds every quantized layer's input and dequantized weight (8-bit mantissa, 2^-9 relative);
    # over 14 layers that came to 1.8% of the logits' scale here: allow 5%. The quantization error
    # itself (fp base vs the dequantized reference, ~35%) is far outside that, so the test can fail.
    tolerance = 0.05 * want.abs().max()
    assert 0 < (got - want).abs().max() <= tolerance  # > 0: it did compute in bf16
    assert (fp - want).abs().max() > 3 * tolerance


# --------------------------------------------------------------------------------------------
# 3. QLoRA learns, and only adapter tensors change


def test_qlora_learns_and_leaves_4bit_weights_bit_identical():
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))
    model = quantized_llama(compute=torch.bfloat16)
    graft.prepare_kbit_training(model, gradient_checkpointing=False)
    graft.attach(model, graft.LoRA(r=8, alpha=16, targets="all-linear"))
    before = stored_tensors(model)
    ids_of_adapters = {id(p) for p in graft.core.adapter_parameters(model, "default").values()}
    adapters = {k for k, p in model.named_parameters() if id(p) in ids_of_adapters}
    losses = train_steps(model, ids, steps=20)
    with torch.no_grad():
        model(input_ids=ids)  # an eval, no-grad call: bitsandbytes would repack the weight here on AVX512-BF16
    after = stored_tensors(model)
    assert losses[-1] < 0.85 * losses[0] and sum(losses[-5:]) < sum(losses[:5]), losses  # 4.47 -> ~3.6
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == adapters  # every LoRA A and B; no code, scale, norm, embedding or head
    assert all(type(m.weight).__name__ == "Params4bit" for _, m in quant.quantized_modules(model))


# --------------------------------------------------------------------------------------------
# 4. Merging: into 4-bit (with its error reported) and as a dense export


def test_merge_into_4bit_reports_the_requantization_error():
    inputs = batch_for("llama")
    model = graft.attach(quantized_llama(), graft.LoRA(r=4, targets="all-linear"))
    perturb_adapters(model, std=0.05)
    unmerged = logits(model, inputs)
    layer = model.model.layers[0].self_attn.q_proj
    exact = bnb.functional.dequantize_4bit(layer.base_layer.weight.data, layer.base_layer.weight.quant_state)
    exact = exact + layer.delta_weight("default").detach()
    with pytest.warns(UserWarning, match=r"requantized 14 layer\(s\).*max \|err\|.*mean \|err\|"):
        graft.merge(model)
    report = quant.merge_error(model)
    assert set(report.layers) == {n for n, _ in graft.core.adapter_layers(model)}
    stored = bnb.functional.dequantize_4bit(layer.base_layer.weight.data, layer.base_layer.weight.quant_state)
    err = report.layers["model.layers.0.self_attn.q_proj"]
    assert err.max_abs == pytest.approx(float((stored - exact).abs().max()), rel=1e-6)
    assert err.mean_abs == pytest.approx(float((stored - exact).abs().mean()), rel=1e-5)
    assert 0 < report.total.mean_abs < 0.2 * report.total.mean_abs_weight  # NF4 rounds by ~10% of |w|
    assert report.total.numel == sum(m.in_features * m.out_features for _, m in quant.quantized_modules(model))
    # The merged model computes with the requantized weights alone (the adapters are not applied twice)...
    merged = logits(model, inputs)
    torch.testing.assert_close(merged, logits(dequantized_reference(model), inputs), rtol=0, atol=1e-5)
    assert (merged - unmerged).abs().max() > 1e-3  # ...which the rounding moved away from the unmerged output
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        graft.merge(model)  # idempotent: nothing requantized, nothing reported


@pytest.fixture(scope="module")
def cli_model_dir(tmp_path_factory):
    """A tiny Llama with the SmolLM2 tokenizer as a transformers directory (as in test_cli.py)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(models.resolve("smollm2-135m"), local_files_only=True)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def run_cli(args: list[str]) -> int:
    from graft.cli import main

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return main(args)


def test_cli_trains_on_nf4_and_merge_exports_a_dense_model(cli_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    rows = [{"instruction": f"Add {i} and {i}.", "input": "", "output": f"The sum is {2 * i}."} for i in range(6)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    assert run_cli(["train", "--model", str(cli_model_dir), "--data", str(data), "--quantize", "nf4", "--max-steps",
                    "2", "--batch-size", "3", "--r", "4", "--lr", "1e-2", "--out", str(out)]) == 0
    assert json.loads((out / "job.json").read_text())["job"]["quantize"] == "nf4"
    adapter, inputs = out / "adapter", {"input_ids": torch.tensor([[1, 520, 3075, 314, 1072, 30]])}

    expected = {
        # default: merge into the full-precision base -> equals the unmerged adapter on that base
        None: logits(graft.load(models.load(cli_model_dir)[0], adapter), inputs),
        # --quantize nf4: merge into the dequantized NF4 weights -> equals the adapter on the 4-bit base
        "nf4": logits(graft.load(models.load(cli_model_dir, quantize="nf4", compute_dtype=torch.float32)[0],
                                 adapter), inputs),
    }
    assert (expected[None] - expected["nf4"]).abs().max() > 1e-3  # the two exports are told apart
    for mode, want in expected.items():
        merged = tmp_path / f"merged-{mode}"
        assert run_cli(["merge", "--model", str(cli_model_dir), "--adapter", str(adapter), "--out", str(merged),
                        "--dtype", "fp32", *(["--quantize", mode] if mode else [])]) == 0
        assert "quantization_config" not in json.loads((merged / "config.json").read_text())
        dense = AutoModelForCausalLM.from_pretrained(merged, local_files_only=True).eval()
        assert all(type(m).__name__ not in ("Linear4bit", "Linear8bitLt") for m in dense.modules())
        assert all(p.dtype == torch.float32 for p in dense.parameters())
        torch.testing.assert_close(logits(dense, inputs), want, rtol=0, atol=1e-4)  # fp32 merge: W0 + sBA rounding

    assert run_cli(["merge", "--model", str(cli_model_dir), "--adapter", str(adapter), "--out",
                    str(tmp_path / "bf16"), "--dtype", "bf16"]) == 0
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", local_files_only=True, dtype="auto")
    assert all(p.dtype == torch.bfloat16 for p in dense.parameters())


def test_cli_trains_dora_on_an_int8_base_unpacked(cli_model_dir, tmp_path):
    # LLM.int8() picks its outlier columns per batch, so packed examples would not be independent:
    # the recipe trains int8 bases unpacked instead of failing the packing check.
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {i}.", "input": "", "output": str(i)}) + "\n"
                            for i in range(4)))
    assert run_cli(["train", "--model", str(cli_model_dir), "--data", str(data), "--quantize", "int8", "--method",
                    "dora", "--max-steps", "1", "--batch-size", "2", "--r", "2", "--out", str(tmp_path / "run")]) == 0
    assert json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())["use_dora"] is True


# --------------------------------------------------------------------------------------------
# 5. DoRA on a 4-bit base


def test_dora_on_4bit_equals_the_dequantized_reference(tmp_path):
    inputs = batch_for("llama")
    model = graft.attach(quantized_llama(), graft.LoRA(r=4, dora=True, targets="all-linear"))
    layer = model.model.layers[1].mlp.down_proj
    w = bnb.functional.dequantize_4bit(layer.base_layer.weight.data, layer.base_layer.weight.quant_state)
    torch.testing.assert_close(layer.lora_magnitude_vector["default"].detach(), torch.linalg.norm(w, dim=1))
    perturb_adapters(model)
    graft.save(model, tmp_path / "d")
    reference = graft.load(dequantized_reference(model), tmp_path / "d")
    torch.testing.assert_close(logits(model, inputs), logits(reference, inputs), rtol=0, atol=1e-5)
    model.train()
    lm_loss(model, inputs["input_ids"]).backward()  # the magnitude gets a gradient through the 4-bit base
    assert layer.lora_magnitude_vector["default"].grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------
# 6. LLM.int8() base


def test_lora_on_int8_base_equals_the_dequantized_reference(tmp_path):
    inputs = batch_for("llama")
    model = graft.attach(quantized_llama("int8"), graft.LoRA(r=4, targets="all-linear"))
    assert all(m.weight.dtype == torch.int8 for _, m in quant.quantized_modules(model))
    perturb_adapters(model)
    graft.save(model, tmp_path / "a")
    reference = graft.load(dequantized_reference(model), tmp_path / "a")
    want = logits(reference, inputs)
    # Training mode: bitsandbytes' CPU path dequantizes the int8 weight and runs an fp32 matmul.
    model.train()
    out = model(**inputs).logits
    torch.testing.assert_close(out.detach(), want, rtol=0, atol=1e-5)
    out.sum().backward()
    assert model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.grad.abs().sum() > 0
    # Inference: LLM.int8() also rounds each activation row to int8 (1/127 of its absmax); that
    # moved the logits by 2.7% of their scale here: allow 5%. (This bound does not separate the int8
    # weights from the fp ones, whose difference is smaller; the exact training-mode check above does.)
    model.eval()
    got = logits(model, inputs)
    assert (got - want).abs().max() <= 0.05 * want.abs().max()


# --------------------------------------------------------------------------------------------
# prepare_kbit_training


def test_prepare_kbit_training_upcasts_small_params_and_enables_input_grads():
    model = quant.quantize(tiny_llama().to(torch.bfloat16), "nf4")
    codes = {n: m.weight.data.clone() for n, m in quant.quantized_modules(model)}
    assert graft.prepare_kbit_training(model) is model
    assert model.model.norm.weight.dtype == torch.float32
    assert model.model.layers[0].input_layernorm.weight.dtype == torch.float32
    assert model.lm_head.weight.dtype == torch.float32
    assert not any(p.requires_grad for p in model.parameters())
    assert all(torch.equal(m.weight.data, codes[n]) for n, m in quant.quantized_modules(model))
    assert model.is_gradient_checkpointing
    assert model.model.embed_tokens(torch.tensor([[1, 2]])).requires_grad  # the input-grads hook
    graft.attach(model, graft.LoRA(r=2, targets="all-linear"))
    with pytest.raises(ValueError, match="call it before graft.attach"):
        graft.prepare_kbit_training(model)


# --------------------------------------------------------------------------------------------
# 7. Bad input


def test_unknown_quantize_value_lists_the_allowed_ones(tmp_path):
    with pytest.raises(ValueError, match=r"quantize='nf3' is not supported; allowed values: nf4, fp4, int8"):
        quant.quantize(tiny_llama(), "nf3")
    # models.load checks before it reads anything (tmp_path holds no model at all).
    with pytest.raises(ValueError, match=r"quantize='q4' is not supported; allowed values: nf4, fp4, int8"):
        models.load(tmp_path, quantize="q4")
    with pytest.raises(ValueError, match=r"compute_dtype=torch.int8 is not one of"):
        quant.quantize(tiny_llama(), "nf4", compute_dtype=torch.int8)


def test_4bit_without_bitsandbytes_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    model = tiny_llama()
    with pytest.raises(ImportError, match=r"quantize='nf4' needs bitsandbytes, which cannot be imported"):
        quant.quantize(model, "nf4")
    assert not list(quant.quantized_modules(model))  # the model is untouched
    with pytest.raises(ImportError, match=r"quantize='int8' needs bitsandbytes.*or load the model without quantize"):
        models.load(tmp_path, quantize="int8")
    from graft.recipe import Job

    with pytest.raises(ImportError, match=r"quantize='fp4' needs bitsandbytes"):
        Job(quantize="fp4")


def test_layers_bitsandbytes_cannot_quantize_are_named():
    with pytest.raises(TypeError, match=r"cannot quantize 'model.embed_tokens' \(Embedding\) to nf4: .*nn.Linear"):
        quant.quantize(tiny_llama(), "nf4", modules=["embed_tokens"])
    with pytest.raises(TypeError, match=r"cannot quantize 'transformer.h.0.attn.c_attn' \(Conv1D\) to int8"):
        quant.quantize(tiny_gpt2(), "int8")
    model = quantized_llama()
    with pytest.raises(TypeError, match=r"'model.layers.0.self_attn.q_proj' to fp4: it is already a bitsandbytes"):
        quant.quantize(model, "fp4")
    lora = graft.attach(tiny_llama(), graft.LoRA(r=2, targets=["q_proj"]))
    with pytest.raises(TypeError, match=r"carries graft adapters; quantize the base model first, then attach"):
        quant.quantize(lora, "nf4")


def test_cli_rejects_bad_quantize_before_loading(capsys, tmp_path):
    from graft.cli import main

    assert main(["train", "--model", "smollm2-135m", "--data", str(tmp_path / "x.jsonl"), "--quantize", "int4"]) == 2
    assert "--quantize int4 is not supported; allowed values: nf4, fp4, int8" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "x.jsonl"), "--quantize", "nf4", "--method", "full"]) == 2
    assert "--method full cannot train it" in capsys.readouterr().err
