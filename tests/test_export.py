"""`graft export --format gguf`: a LoRA adapter as llama.cpp's GGUF LoRA file, read back with gguf's reader.

The oracle for values is independent of the exporter's own code: graft's merged weights minus the base
weights must equal the delta llama.cpp would add, ``alpha / r * lora_b @ lora_a``, once transformers'
GGUF loader (``LlamaTensorProcessor``, which undoes llama.cpp's q/k row permutation) has mapped it back.
"""

from __future__ import annotations

import math

import gguf
import numpy as np
import pytest
import torch
from conftest import perturb_adapters, tiny_gpt2, tiny_llama
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

import graft
from graft.cli import main
from graft.export import ExportError, export_gguf

MODULES = {  # HF module -> llama.cpp tensor, for one layer
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def saved_lora(tmp_path, method: graft.LoRA, seed: int = 0):
    """A tiny GQA Llama (4 heads, 2 KV heads) with a perturbed LoRA saved to tmp_path / "adapter"."""
    model = tiny_llama(seed)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    graft.attach(model, method)
    perturb_adapters(model, std=0.2)
    graft.save(model, tmp_path / "adapter")
    return model, base


def merged_deltas(model: torch.nn.Module, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """graft's own merge: weight after folding the adapter in, minus the base weight, per module."""
    plain = graft.unload(model, merge=True)
    return {n.removesuffix(".weight"): p.detach() - base[n] for n, p in plain.named_parameters()
            if n.endswith("proj.weight") and not torch.equal(p, base[n])}


def gguf_deltas(reader: gguf.GGUFReader, config: LlamaConfig) -> dict[str, torch.Tensor]:
    """The weight delta llama.cpp adds per tensor (alpha / rank * B @ A), mapped back to HF layout."""
    alpha = float(field(reader, "adapter.lora.alpha"))
    tensors = {t.name: torch.from_numpy(np.array(t.data, dtype=np.float32)) for t in reader.tensors}
    processor = LlamaTensorProcessor(config=config.to_dict())
    out = {}
    for name, a in tensors.items():
        if not name.endswith(".lora_a"):
            continue
        stem = name.removesuffix(".lora_a")
        b = tensors[f"{stem}.lora_b"]
        delta = (alpha / a.shape[0]) * (b @ a)
        delta = torch.from_numpy(np.ascontiguousarray(processor.process(delta.numpy(), stem).weights))
        layer, kind = int(stem.split(".")[1]), stem.split(".")[2]
        module = next(m for m, k in MODULES.items() if k == kind)
        out[f"model.layers.{layer}.{module}"] = delta
    return out


def test_file_metadata_names_shapes_and_values(tmp_path):
    model, base = saved_lora(tmp_path, graft.LoRA(r=4, alpha=8, targets="all-linear"))
    path = export_gguf(tmp_path / "adapter", tmp_path / "a.gguf", base=model.config.to_dict())
    reader = gguf.GGUFReader(path)
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "general.type") == "adapter"
    assert field(reader, "adapter.type") == "lora"
    assert field(reader, "adapter.lora.alpha") == pytest.approx(8.0)
    names = {t.name for t in reader.tensors}
    assert names == {f"blk.{i}.{k}.weight.lora_{ab}" for i in range(2) for k in MODULES.values() for ab in "ab"}
    tensors = {t.name: t for t in reader.tensors}
    from graft.io import read_tensors

    saved = read_tensors(tmp_path / "adapter")
    for i in range(2):
        for module, kind in MODULES.items():
            a = saved[f"base_model.model.model.layers.{i}.{module}.lora_A.weight"]
            b = saved[f"base_model.model.model.layers.{i}.{module}.lora_B.weight"]
            ta, tb = tensors[f"blk.{i}.{kind}.weight.lora_a"], tensors[f"blk.{i}.{kind}.weight.lora_b"]
            # GGUF dims are ne order: lora_a [in, r], lora_b [r, out]; the data is the torch layout.
            assert list(ta.shape) == [a.shape[1], a.shape[0]] and list(tb.shape) == [b.shape[1], b.shape[0]]
            assert ta.tensor_type == gguf.GGMLQuantizationType.F32
            assert torch.equal(torch.from_numpy(np.array(ta.data)), a)  # A as is
            if kind in ("attn_q", "attn_k"):  # rows permuted per head: a plain copy would be wrong
                assert not torch.equal(torch.from_numpy(np.array(tb.data)), b)
            else:
                assert torch.equal(torch.from_numpy(np.array(tb.data)), b)
    expected = merged_deltas(model, base)
    got = gguf_deltas(reader, model.config)
    assert set(got) == set(expected) and len(got) == 14
    for name, delta in expected.items():
        torch.testing.assert_close(got[name], delta, atol=1e-6, rtol=1e-5, msg=name)


def test_rslora_and_alpha_pattern_scale_exactly(tmp_path):
    """llama.cpp has one alpha and divides by r: rsLoRA's alpha / sqrt(r) and per-module alphas still match."""
    method = graft.LoRA(r=4, alpha=8, rslora=True, targets=["q_proj", "k_proj", "v_proj"],
                        rank_pattern={"v_proj": 2}, alpha_pattern={"k_proj": 3.0})
    model, base = saved_lora(tmp_path, method, seed=1)
    reader = gguf.GGUFReader(export_gguf(tmp_path / "adapter", tmp_path / "a.gguf", base=model.config.to_dict()))
    assert field(reader, "adapter.lora.alpha") == pytest.approx(8 * math.sqrt(4))
    ranks = {t.name: int(t.shape[1]) for t in reader.tensors if t.name.endswith(".lora_a")}
    assert ranks["blk.0.attn_v.weight.lora_a"] == 2 and ranks["blk.0.attn_q.weight.lora_a"] == 4
    expected = merged_deltas(model, base)
    got = gguf_deltas(reader, model.config)
    assert set(got) == set(expected) and len(got) == 6
    for name, delta in expected.items():
        torch.testing.assert_close(got[name], delta, atol=1e-6, rtol=1e-5, msg=name)


def test_f16_and_cli(tmp_path, capsys):
    model, _ = saved_lora(tmp_path, graft.LoRA(r=4, targets=["q_proj", "o_proj"]))
    model.config.save_pretrained(tmp_path / "base")  # only the config is read
    out = tmp_path / "out" / "a16.gguf"
    rc = main(["export", "--adapter", str(tmp_path / "adapter"), "--model", str(tmp_path / "base"),
               "--out", str(out), "--dtype", "f16"])
    assert rc == 0 and "llama.cpp LoRA adapter" in capsys.readouterr().out
    reader = gguf.GGUFReader(out)
    assert {t.tensor_type for t in reader.tensors} == {gguf.GGMLQuantizationType.F16}
    assert len(reader.tensors) == 8
    assert not list(out.parent.glob(".*tmp*"))  # the temp file was renamed into place


def test_unsupported_adapters_and_bases_are_clear_errors(tmp_path, capsys):
    llama = tiny_llama()
    cfg = llama.config.to_dict()
    dora = graft.attach(tiny_llama(), graft.LoRA(r=2, dora=True, targets=["q_proj"]))
    graft.save(dora, tmp_path / "dora")
    with pytest.raises(ExportError, match="DoRA"):
        export_gguf(tmp_path / "dora", tmp_path / "x.gguf", base=cfg)
    ia3 = graft.attach(tiny_llama(), graft.IA3(targets=["k_proj", "v_proj", "down_proj"],
                                               feedforward=["down_proj"]))
    graft.save(ia3, tmp_path / "ia3")
    with pytest.raises(ExportError, match="IA3 adapter.*LoRA only.*graft merge"):
        export_gguf(tmp_path / "ia3", tmp_path / "x.gguf", base=cfg)
    gpt2 = graft.attach(tiny_gpt2(), graft.LoRA(r=2, targets=["c_attn"]))
    graft.save(gpt2, tmp_path / "gpt2")
    with pytest.raises(ExportError, match="Llama family.*GPT2LMHeadModel"):
        export_gguf(tmp_path / "gpt2", tmp_path / "x.gguf", base={**gpt2.config.to_dict(),
                                                                 "architectures": ["GPT2LMHeadModel"]})
    head = graft.attach(tiny_llama(), graft.LoRA(r=2, targets=["lm_head"]))
    graft.save(head, tmp_path / "head")
    with pytest.raises(ExportError, match="lm_head.*ties"):
        export_gguf(tmp_path / "head", tmp_path / "x.gguf", base={**cfg, "tie_word_embeddings": True})
    assert not (tmp_path / "x.gguf").exists()
    rc = main(["export", "--adapter", str(tmp_path / "dora"), "--out", str(tmp_path / "x.gguf")])
    err = capsys.readouterr().err
    assert rc == 2 and "graft export: error:" in err and "Traceback" not in err


def test_untied_lm_head_exports_as_output(tmp_path):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      vocab_size=48, tie_word_embeddings=False)
    model = graft.attach(LlamaForCausalLM(cfg), graft.LoRA(r=2, targets=["lm_head", "v_proj"]))
    graft.save(model, tmp_path / "adapter")
    reader = gguf.GGUFReader(export_gguf(tmp_path / "adapter", tmp_path / "a.gguf", base=cfg.to_dict()))
    shapes = {t.name: list(t.shape) for t in reader.tensors}
    assert shapes["output.weight.lora_a"] == [32, 2] and shapes["output.weight.lora_b"] == [2, 48]


@pytest.mark.parametrize("verb", ["export", "push"])
def test_help_shows_an_example(verb, capsys):
    with pytest.raises(SystemExit):
        main([verb, "--help"])
    out = capsys.readouterr().out
    assert f"example:\n  graft {verb} --adapter" in out
