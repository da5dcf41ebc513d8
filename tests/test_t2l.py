"""Text-to-LoRA: the hypernetwork's output is an ordinary LoRA, reconstruction reproduces a library,
SFT trains only the hypernetwork through the routed batch, resume is exact, bad input changes nothing."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
from conftest import batch_for, logits, tiny_llama
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import graft
from graft import models
from graft.compose import t2l_train
from graft.compose.t2l import HypernetError, T2LConfig, TextToLoRA, text_to_lora
from graft.compose.tasks import read_tasks
from graft.core import adapter_layers, route

SMALL = T2LConfig(latent=16, head_in=32, dropout=0.0)
DESC = "Translate English sentences to Spanish."


def fake_embedder(texts):
    """A deterministic 24-d 'sentence embedding' per text (no encoder to load in unit tests)."""
    out = []
    for t in texts:
        g = torch.Generator().manual_seed(int(hashlib.sha256(t.encode()).hexdigest()[:8], 16))
        out.append(torch.randn(24, generator=g))
    return torch.nn.functional.normalize(torch.stack(out), dim=-1)


def net_for(model, config=SMALL, perturb=True):
    net = TextToLoRA.for_model(model, config, embedder=fake_embedder)
    if perturb:  # heads start at zero weight (bias-HyperInit): give them some, or every description is alike
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for head in net.heads.values():
                head.weight.copy_(torch.randn(head.weight.shape, generator=g) * 0.05)
    return net


def test_generated_lora_has_the_shapes_and_scaling_of_graft_lora():
    model = tiny_llama()
    net = net_for(model, T2LConfig(latent=16, head_in=32, r=4, alpha=8, rslora=True))
    factors = net.generate_one(DESC)
    ref = graft.attach(tiny_llama(), graft.LoRA(r=4, alpha=8, rslora=True, targets=("q_proj", "v_proj")))
    layers = dict(adapter_layers(ref))
    assert sorted(factors) == sorted(layers)
    for name, (a, b) in factors.items():
        assert a.shape == layers[name].lora_A["default"].weight.shape
        assert b.shape == layers[name].lora_B["default"].weight.shape
        assert layers[name].scaling["default"] == pytest.approx(8 / math.sqrt(4)) == net.scaling
    text_to_lora(model, net, DESC, name="es")
    assert dict(adapter_layers(model))["model.layers.0.self_attn.q_proj"].scaling["es"] == pytest.approx(4.0)
    assert not net.generate_one(DESC)["model.layers.1.self_attn.v_proj"][1].equal(
        net.generate_one("Say whether a review is positive.")["model.layers.1.self_attn.v_proj"][1])


def test_peft_and_graft_load_the_written_adapter_with_the_same_logits(tmp_path):
    peft = pytest.importorskip("peft")
    model = tiny_llama()
    net = net_for(model)
    x = batch_for("llama")
    base = logits(model, x)
    text_to_lora(model, net, DESC, name="es")
    attached = logits(model, x)
    assert (attached - base).abs().max() > 1e-3, "the generated adapter must change the output"
    out = net.write_peft(DESC, tmp_path / "es")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_rslora"] and config["r"] == 8 and config["target_modules"] == ["q_proj", "v_proj"]
    via_peft = peft.PeftModel.from_pretrained(tiny_llama(), str(out))
    torch.testing.assert_close(logits(via_peft, x), attached, atol=1e-5, rtol=0)
    via_graft = graft.load(tiny_llama(), out)
    torch.testing.assert_close(logits(via_graft, x), attached, atol=1e-5, rtol=0)


def test_save_load_round_trip_and_inspect(tmp_path, capsys):
    from graft.cli import main

    model = tiny_llama()
    net = net_for(model)
    net.save(tmp_path / "net")
    back = TextToLoRA.load(tmp_path / "net", embedder=fake_embedder, model=model)
    for name, (a, b) in net.generate_one(DESC).items():
        a2, b2 = back.generate_one(DESC)[name]
        assert a.equal(a2) and b.equal(b2)
    assert main(["inspect", str(tmp_path / "net"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == "Text-to-LoRA hypernetwork" and info["target_modules"] == 4
    assert info["targets"] == {"q_proj": [64, 64], "v_proj": [64, 32]}


def _library(tmp_path, n=3):
    """n random LoRAs (r=8, rsLoRA) saved as a library manifest."""
    entries = []
    for i in range(n):
        model = tiny_llama()
        graft.attach(model, graft.LoRA(r=8, alpha=16, rslora=True, targets=("q_proj", "v_proj")))
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        graft.save(model, tmp_path / "lib" / f"task{i}")
        entries.append({"name": f"task{i}", "path": f"task{i}", "description": f"Task number {i} does thing {i}."})
    (tmp_path / "lib" / "manifest.json").write_text(json.dumps(entries))
    return entries


def _tasks(tmp_path, n=3, rows=12):
    index = []
    for i in range(n):
        lines = [json.dumps({"input": f"item {j} of {i}", "output": f"answer {(i * j) % 7}"}) for j in range(rows)]
        (tmp_path / f"task{i}.jsonl").write_text("\n".join(lines) + "\n")
        index.append({"task": f"task{i}", "description": f"Task number {i} does thing {i}.",
                      "alt_descriptions": [f"Do thing {i}, please."], "file": f"task{i}.jsonl"})
    (tmp_path / "index.json").write_text(json.dumps(index))
    return read_tasks(tmp_path / "index.json")


def test_reconstruction_reproduces_three_adapters(tmp_path):
    _library(tmp_path)
    tasks = _tasks(tmp_path)
    model = tiny_llama()
    net = TextToLoRA.for_model(model, SMALL, embedder=fake_embedder)
    config = t2l_train.T2LTrainConfig(mode="recon", steps=80, tasks_per_batch=3, warmup=0.0, lr=3e-2)
    t2l_train.train(net, tasks, config, library=tmp_path / "lib", descriptions={t.name: [t.description] for t in tasks},
                    out_dir=tmp_path / "out", progress=False)
    for i, task in enumerate(tasks):
        target = load_file(str(tmp_path / "lib" / f"task{i}" / "adapter_model.safetensors"))
        made = net.generate_one(task.description)
        num = den = 0.0
        for name, (a, b) in made.items():
            ta = target[f"base_model.model.{name}.lora_A.weight"]
            tb = target[f"base_model.model.{name}.lora_B.weight"]
            num += float((a - ta).pow(2).sum() + (b - tb).pow(2).sum())
            den += float(ta.pow(2).sum() + tb.pow(2).sum())
        assert math.sqrt(num / den) < 0.05, f"task {i}: relative error {math.sqrt(num / den):.3f}"
    assert (tmp_path / "out" / "metrics.jsonl").is_file() and (tmp_path / "out" / "loss.png").is_file()


@pytest.fixture(scope="module")
def tok():
    gguf = models._package_file(*models._SMOLLM2)
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)


def chat_llama(tok, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(cfg).eval()


def test_routed_sft_loss_equals_each_row_with_its_own_adapter(tok, tmp_path):
    """The batched path (one slot per row, generated factors swapped in) computes what attaching
    each row's generated LoRA alone computes."""
    tasks = _tasks(tmp_path)
    model = chat_llama(tok)
    net = net_for(model)
    net.eval()
    slots = t2l_train.attach_slots(model, net, 3)
    rows = [t2l_train.encode_row(tok, t, t.rows()[0], t.description, 64) for t in tasks]
    batch = t2l_train.collate(rows, tok.pad_token_id)
    descs = [t.description for t in tasks]
    factors = net(net.embed(descs))
    with t2l_train.generated_factors(model, slots, factors), route(model, slots):
        routed = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    for i, desc in enumerate(descs):
        alone = chat_llama(tok)
        text_to_lora(alone, net, desc)
        ref = alone(input_ids=batch["input_ids"][i:i + 1], attention_mask=batch["attention_mask"][i:i + 1]).logits
        n = int(batch["attention_mask"][i].sum())
        torch.testing.assert_close(routed[i, :n], ref[0, :n], atol=1e-5, rtol=1e-5)


def test_sft_trains_only_the_hypernetwork(tok, tmp_path):
    tasks = _tasks(tmp_path)
    model = chat_llama(tok)
    before = [(n, p, p.detach().clone()) for n, p in model.state_dict(keep_vars=True).items()]
    net = net_for(model, T2LConfig(latent=16, head_in=32), perturb=False)
    start = {k: v.clone() for k, v in net.state_dict().items()}
    config = t2l_train.T2LTrainConfig(mode="sft", steps=3, tasks_per_batch=2, rows_per_task=2, max_length=48, lr=1e-3)
    result = t2l_train.train(net, tasks, config, model=model, tokenizer=tok, progress=False)
    assert math.isfinite(result.final_loss)
    for n, p, v in before:
        assert p.equal(v) and not p.requires_grad, f"base tensor {n} changed"
    for name in (n for n in graft.core.state_of(model).methods if n.startswith(t2l_train.SLOT)):
        assert all(not p.any() for k, p in graft.core.adapter_parameters(model, name).items() if "lora_B" in k)
    changed = [k for k, v in net.state_dict().items() if not v.equal(start[k])]
    assert any(k.startswith("heads.") for k in changed) and any(k.startswith(("mixer.", "task_proj"))
                                                                 for k in changed)


@pytest.mark.parametrize("mode", ["sft", "recon"])
def test_training_resumes_exactly(tok, tmp_path, mode):
    tasks = _tasks(tmp_path)
    if mode == "recon":
        _library(tmp_path)
    config = t2l_train.T2LTrainConfig(mode=mode, steps=4, tasks_per_batch=2, rows_per_task=2, max_length=48,
                                      save_every=2, lr=1e-3)
    cfg = T2LConfig(latent=16, head_in=32, dropout=0.1)  # dropout: the RNG state must come back too

    def run(out, fresh_seed):
        model = chat_llama(tok) if mode == "sft" else tiny_llama()  # the library's adapters are for tiny_llama
        net = TextToLoRA.for_model(model, cfg, embedder=fake_embedder, seed=fresh_seed)
        t2l_train.train(net, tasks, config, model=model, tokenizer=tok, library=tmp_path / "lib" if mode == "recon" else None,
                        out_dir=out, progress=False)
        return net.state_dict()

    straight = run(tmp_path / "a", 0)
    assert (tmp_path / "a" / "checkpoints" / "checkpoint-2").is_dir()
    resumed = run(tmp_path / "a", 7)  # another init: everything must come from the checkpoint
    for k, v in straight.items():
        assert resumed[k].equal(v), k
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]


def test_bad_input_is_a_clear_error_and_changes_nothing(tmp_path):
    model = tiny_llama()
    net = net_for(model, T2LConfig(latent=16, head_in=32, max_description_chars=100))
    x = batch_for("llama")
    base = logits(model, x)
    for bad, words in (("", "non-empty"), ("   ", "non-empty"), ("x" * 101, "at most 100")):
        with pytest.raises(HypernetError, match=words):
            text_to_lora(model, net, bad)
    other = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=96)).eval()
    with pytest.raises(HypernetError, match="another base model"):
        text_to_lora(other, net, DESC)
    with pytest.raises(HypernetError, match="another base model.*different weights"):
        text_to_lora(tiny_llama(seed=3), net, DESC)
    with pytest.raises(HypernetError, match="'k_projx' matches no linear module"):
        TextToLoRA.for_model(model, T2LConfig(targets=("q_proj", "k_projx")), embedder=fake_embedder)
    with pytest.raises(ValueError, match="targets"):
        T2LConfig(targets=())
    net.save(tmp_path / "net")
    with pytest.raises(HypernetError, match="another base model"):
        TextToLoRA.load(tmp_path / "net", embedder=fake_embedder, model=other)
    weights = tmp_path / "net" / "t2l_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(HypernetError, match="truncated or corrupted"):
        text_to_lora(model, tmp_path / "net", DESC)
    (tmp_path / "net" / "t2l_config.json").write_text("{not json")
    with pytest.raises(HypernetError, match="damaged"):
        TextToLoRA.load(tmp_path / "net")
    assert graft.core.STATE_ATTR not in vars(model) or not graft.core.state_of(model).methods
    torch.testing.assert_close(logits(model, x), base, atol=0, rtol=0)


def test_cli_generate_writes_a_peft_adapter_from_the_bundled_embedder(tmp_path, capsys):
    """`graft t2l generate` with the real all-MiniLM-L6-v2 embedder (384-d, mean-pooled)."""
    peft = pytest.importorskip("peft")
    from graft.cli import main

    model = tiny_llama()
    net = TextToLoRA.for_model(model, T2LConfig(latent=16, head_in=32))
    assert net.layout.embed_dim == 384
    net.save(tmp_path / "net")
    assert main(["t2l", "generate", "--hypernet", str(tmp_path / "net"), "--description", DESC,
                 "--out", str(tmp_path / "es")]) == 0
    assert "generated a rank-8 LoRA on 4 modules" in capsys.readouterr().out
    x = batch_for("llama")
    text_to_lora(model, net, DESC)
    torch.testing.assert_close(logits(peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "es")), x),
                               logits(model, x), atol=1e-5, rtol=0)
    assert main(["t2l", "generate", "--hypernet", str(tmp_path / "net"), "--description", " ",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "non-empty" in capsys.readouterr().err and not (tmp_path / "bad").exists()
