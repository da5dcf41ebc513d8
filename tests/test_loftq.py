"""LoftQ: a 4-bit base and its LoRA fitted together (Q + s·BA ≈ W), saved, and rebuilt exactly."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import batch_for, logits, tiny_llama
from test_qlora import cli_model_dir, dequantized_reference, quantized_llama, run_cli, train_steps  # noqa: F401 (a fixture)

import graft
from graft import quant
from graft.loftq import decompose, top_singular

bnb = pytest.importorskip("bitsandbytes")

FP32 = {"compute_dtype": "float32"}  # exact comparisons: the 4-bit layers dequantize and multiply in fp32


def lora(**kw) -> graft.LoRA:
    return graft.LoRA(**{"r": 8, "alpha": 16, "targets": "all-linear", **kw})


def effective_weights(model) -> dict[str, torch.Tensor]:
    """name -> dequantized base + s·BA of every LoRA layer on a 4-bit base."""
    out = {}
    for name, m in model.named_modules():
        if hasattr(m, "lora_A") and quant.is_quantized(m.base_layer):
            out[name] = quant.dequantize(m.base_layer).float() + m.delta_weight("default")
    return out


def test_one_iteration_is_the_closed_form():
    w = tiny_llama().model.layers[0].mlp.up_proj.weight.detach()
    d = decompose(w, r=4, scaling=2.0, settings={**FP32, "iters": 1, "svd": "exact"})
    q, state = bnb.functional.quantize_4bit(w.contiguous(), blocksize=64, compress_statistics=True, quant_type="nf4")
    plain = bnb.functional.dequantize_4bit(q, state)
    u, s, vh = torch.linalg.svd(w - plain, full_matrices=False)
    assert torch.equal(d.source, w) and torch.equal(d.quantized, plain)
    torch.testing.assert_close(2.0 * d.b @ d.a, (u[:, :4] * s[:4]) @ vh[:4], atol=1e-6, rtol=0)


def test_randomized_top_singular_is_deterministic_and_near_optimal():
    g = torch.Generator().manual_seed(1)
    # a clear rank-6 signal under noise: the randomized range finder recovers it
    a = torch.randn(96, 6, generator=g) @ torch.randn(6, 160, generator=g) * 3 + 0.01 * torch.randn(96, 160, generator=g)
    u, s, vh = top_singular(a, 6)
    eu, es, evh = top_singular(a, 6, "exact")
    torch.testing.assert_close(s, es, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close((u * s) @ vh, (eu * es) @ evh, atol=1e-3, rtol=0)
    # a flat spectrum (what quantization error looks like): within 90% of the optimal captured energy
    noise = torch.randn(128, 192, generator=g)
    u, s, vh = top_singular(noise, 8)
    _, es, _ = top_singular(noise, 8, "exact")
    captured = noise.pow(2).sum() - (noise - (u * s) @ vh).pow(2).sum()
    assert captured >= 0.9 * es.pow(2).sum()
    assert all(torch.equal(x, y) for x, y in zip(top_singular(noise, 8), (u, s, vh)))  # seeded: rebuilds exactly


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_loftq_starts_closer_to_the_full_precision_model_than_plain_quantization(quant_type):
    inputs = batch_for("llama")
    full, fp_logits = tiny_llama(), logits(tiny_llama(), inputs)
    plain = quant.quantize(tiny_llama(), quant_type, compute_dtype=torch.float32)
    model = graft.loftq(tiny_llama(), lora(), quant_type=quant_type, iters=3, prepare=False, **FP32)
    fitted = effective_weights(model)
    assert len(fitted) == 14  # 7 linears x 2 blocks, all on 4-bit bases
    for name, w_eff in fitted.items():
        w = full.get_submodule(name).weight.detach()
        plain_err = (quant.dequantize(plain.get_submodule(name)).float() - w).norm()
        assert (w_eff - w).norm() < 0.97 * plain_err, name  # rank 8 of 64 takes a share of the error
    # ... and so do the logits, by a margin the test can see
    plain_gap = (logits(plain, inputs) - fp_logits).abs().mean()
    assert (logits(model, inputs) - fp_logits).abs().mean() < 0.9 * plain_gap


def test_each_layer_holds_the_codes_of_its_loftq_residual():
    """The stored base is exactly quant(W - L_{T-1}), the Q of the decomposition (nothing requantized twice)."""
    full = tiny_llama()
    model = graft.loftq(tiny_llama(), lora(), iters=2, prepare=False, **FP32)
    layer = model.model.layers[1].self_attn.v_proj
    d = decompose(full.model.layers[1].self_attn.v_proj.weight, 8, 2.0, {**FP32, "iters": 2})
    assert torch.equal(quant.dequantize(layer.base_layer).float(), d.quantized)
    assert torch.equal(layer.lora_A["default"].weight, d.a) and torch.equal(layer.lora_B["default"].weight, d.b)


def test_trained_loftq_adapter_is_rebuilt_exactly_and_refused_on_a_plain_4bit_base(tmp_path):
    inputs = batch_for("llama")
    model = graft.loftq(tiny_llama(), lora(), iters=2, gradient_checkpointing=False, **FP32)
    train_steps(model, inputs["input_ids"], steps=3)
    trained = logits(model, inputs)
    graft.save(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] == "loftq" and config["loftq_config"]["loftq_iter"] == 2

    # 1. on 4 bits: the same base rebuilt from the full-precision weights, the trained tensors loaded
    rebuilt = graft.loftq(tiny_llama(), tmp_path / "a")
    torch.testing.assert_close(logits(rebuilt, inputs), trained, atol=1e-6, rtol=0)
    # 2. on the full-precision model: Q_T written into its weights; equal up to summation order (fp32 compute)
    on_fp = graft.load(tiny_llama(), tmp_path / "a")
    torch.testing.assert_close(logits(on_fp, inputs), trained, atol=1e-5, rtol=0)
    # the test can tell: a plain NF4 base under the same adapter is far off
    plain = graft.load(dequantized_reference(quantized_llama()), tmp_path / "a")
    assert (logits(plain, inputs) - trained).abs().max() > 1e-3
    # 3. a plain 4-bit base cannot carry it: a clear error
    with pytest.raises(ValueError, match="LoftQ needs the full-precision"):
        graft.load(quantized_llama(), tmp_path / "a")


def test_bad_loftq_input_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="dora"):
        graft.loftq(tiny_llama(), lora(dora=True))
    with pytest.raises(ValueError, match="would not be quantized"):
        graft.loftq(tiny_llama(), lora(targets=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="already quantized"):
        graft.loftq(quantized_llama(), lora())
    with pytest.raises(ValueError, match="allowed keys: quant_type, iters, compute_dtype, double_quant"):
        graft.loftq(tiny_llama(), lora(), bits=4)
    with pytest.raises(ValueError, match="svd='full' is not one of randomized, exact"):
        graft.loftq(tiny_llama(), lora(), svd="full")
    with pytest.raises(ValueError, match="iters=0 must be an integer >= 1"):
        graft.loftq(tiny_llama(), lora(), iters=0)
    with pytest.raises(ValueError, match="allowed: nf4, fp4"):
        graft.LoRA(init="loftq", loftq_config={"quant_type": "int8"})
    with pytest.raises(ValueError, match="compute_dtype=torch.int8 is not one of float32, bfloat16, float16"):
        graft.loftq(tiny_llama(), lora(), compute_dtype=torch.int8)
    # a torch dtype is taken as quant.quantize takes it, and stored by name
    from graft.loftq import check_settings
    assert check_settings({"compute_dtype": torch.float16})["compute_dtype"] == "float16"
    with pytest.raises(ValueError, match="loftq_config is for init='loftq'"):
        graft.LoRA(loftq_config={"iters": 2})
    graft.save(graft.attach(tiny_llama(), lora()), tmp_path / "plain")
    with pytest.raises(ValueError, match="not a LoftQ adapter"):
        graft.loftq(tiny_llama(), tmp_path / "plain")


def test_cli_trains_with_loftq_and_merge_rebuilds_its_base(cli_model_dir, tmp_path):  # noqa: F811 (the fixture)
    from transformers import AutoModelForCausalLM

    from graft import models

    model_dir = cli_model_dir
    rows = [{"instruction": f"Add {i} and {i}.", "input": "", "output": f"The sum is {2 * i}."} for i in range(6)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    assert run_cli(["train", "--model", str(model_dir), "--data", str(data), "--quantize", "nf4", "--init", "loftq",
                    "--max-steps", "2", "--batch-size", "3", "--r", "4", "--lr", "1e-2", "--out", str(out)]) == 0
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] == "loftq"
    from graft.cli import describe

    info = describe(str(out / "adapter"))  # graft inspect says which base the adapter needs
    assert info["init"] == "loftq" and info["loftq"]["quant_type"] == "nf4" and info["loftq"]["iters"] == 5
    inputs = {"input_ids": torch.tensor([[1, 520, 3075, 314, 1072, 30]])}
    on_4bit = logits(graft.loftq(models.load(model_dir)[0], out / "adapter"), inputs)
    # merge (with or without --quantize) rebuilds the LoftQ base, not a plain NF4 one
    for extra in ([], ["--quantize", "nf4"]):
        merged = tmp_path / f"merged{len(extra)}"
        assert run_cli(["merge", "--model", str(model_dir), "--adapter", str(out / "adapter"), "--out", str(merged),
                        "--dtype", "fp32", *extra]) == 0
        dense = AutoModelForCausalLM.from_pretrained(merged, local_files_only=True).eval()
        # the run computed in the machine's default dtype (bf16 where native): allow its rounding
        print("DIFF", (logits(dense, inputs) - on_4bit).abs().max().item(), on_4bit.abs().max().item())
        torch.testing.assert_close(logits(dense, inputs), on_4bit, rtol=0, atol=0.05 * on_4bit.abs().max().item())


def test_job_checks_init_against_quantize():
    from graft.recipe import Job

    with pytest.raises(ValueError, match="init='loftq' goes with quantize='nf4' or quantize='fp4'"):
        Job(model="m", data="d", init="loftq")
    with pytest.raises(ValueError, match="init='loftq' goes with quantize='nf4' or quantize='fp4'"):
        Job(model="m", data="d", init="loftq", quantize="int8")
    with pytest.raises(ValueError, match="is a LoRA setting"):
        Job(model="m", data="d", init="pissa", method="ia3")
    with pytest.raises(ValueError, match="not one of"):
        Job(model="m", data="d", init="svd")
