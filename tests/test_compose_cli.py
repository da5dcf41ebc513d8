"""`graft combine` and `graft lorahub` through ``graft.cli.main`` on a tiny random Llama with the SmolLM2
tokenizer: the written adapters equal the Python API's, and bad input exits 2 with a one-line error."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import graft
import graft.models
from graft.cli import main
from graft.core import adapter_parameters
from graft.io import read_tensors


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A model directory and three saved LoRAs (a, b: r=4 q/v; c: IA3)."""
    tok = AutoTokenizer.from_pretrained(graft.models.resolve("smollm2-135m"), local_files_only=True)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256)
    root = tmp_path_factory.mktemp("compose-cli")
    LlamaForCausalLM(cfg).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    model, _ = graft.models.load(str(root / "model"))
    for i, (n, method) in enumerate([("a", graft.LoRA(r=4, targets=["q_proj", "v_proj"])),
                                     ("b", graft.LoRA(r=4, alpha=4, targets=["q_proj", "v_proj"])),
                                     ("c", graft.IA3(targets=["k_proj", "down_proj"]))]):
        graft.attach(model, method, n)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in adapter_parameters(model, n).values():
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
        graft.save(model, root / n, n)
    return root, model


def run(*argv: str) -> tuple[int, str]:
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = main(list(argv))
    return code, out.getvalue() + err.getvalue()


def test_combine_writes_what_the_api_computes(setup, tmp_path):
    root, model = setup
    code, out = run("combine", "--model", str(root / "model"), "--adapter", f"a={root / 'a'}",
                    "--adapter", f"b={root / 'b'}", "--weights", "0.7,-0.3", "--method", "ties", "--density", "0.5",
                    "--out", str(tmp_path / "mix"))
    assert code == 0, out
    graft.combine(model, {"a": 0.7, "b": -0.3}, method="ties", density=0.5, name="mix")
    try:
        graft.save(model, tmp_path / "api", "mix")
        ours, cli = read_tensors(tmp_path / "api"), read_tensors(tmp_path / "mix")
        assert sorted(ours) == sorted(cli) and all(torch.equal(ours[k], cli[k]) for k in ours)
    finally:
        graft.detach(model, "mix")


@pytest.mark.parametrize(("extra", "match"), [
    (["--adapter", "A=a", "--adapter", "B=b", "--weights", "1"], "1 values for 2"),
    (["--adapter", "A=a", "--adapter", "C=c", "--weights", "1,1"], "different methods"),
    (["--adapter", "A=a", "--adapter", "B=b", "--weights", "1,x"], "numbers separated by commas"),
    (["--adapter", "A=a", "--adapter", "B=b", "--weights", "1,1", "--method", "ties", "--density", "2"],
     r"outside \(0, 1\]"),
])
def test_combine_bad_input(setup, tmp_path, extra, match):
    import re

    root, _ = setup
    extra = [x.replace("=a", f"={root / 'a'}").replace("=b", f"={root / 'b'}").replace("=c", f"={root / 'c'}")
             for x in extra]
    code, out = run("combine", "--model", str(root / "model"), *extra, "--out", str(tmp_path / "x"))
    assert code == 2 and re.search(match, out), out
    assert not (tmp_path / "x").exists()


def test_lorahub_from_a_library(setup, tmp_path):
    root, _ = setup
    lib = tmp_path / "lib"
    lib.mkdir()
    for n in ("a", "b"):
        (lib / n).symlink_to(root / n)
    (lib / "manifest.json").write_text(json.dumps({"format_version": 1, "base": {}, "adapters": [
        {"name": "a", "path": "a", "description": "answer colours"},
        {"name": "b", "path": "b", "description": "count things"}]}))
    few = tmp_path / "few.jsonl"
    few.write_text("".join(json.dumps({"input": f"item {i}", "output": "blue"}) + "\n" for i in range(3)))
    code, out = run("lorahub", "--model", str(root / "model"), "--library", str(lib), "--examples", str(few),
                    "--description", "Name the colour.", "--budget", "4", "--out", str(tmp_path / "hub"))
    assert code == 0, out
    report = json.loads((tmp_path / "hub" / "lorahub.json").read_text())
    assert set(report["weights"]) == {"a", "b"} and len(report["trace"]) == 4
    fresh, _ = graft.models.load(str(root / "model"))
    graft.load(fresh, tmp_path / "hub")  # an ordinary adapter

    code, out = run("lorahub", "--model", str(root / "model"), "--library", str(lib), "--examples", str(few),
                    "--out", str(tmp_path / "no"))
    assert code == 2 and "--description" in out
    code, out = run("lorahub", "--model", str(root / "model"), "--examples", str(few), "--out", str(tmp_path / "no"))
    assert code == 2 and "either --library" in out


def test_lorahub_from_adapters_with_rendered_examples(setup, tmp_path):
    root, _ = setup
    few = tmp_path / "few.jsonl"
    few.write_text("".join(json.dumps({"prompt": f"Q{i}: colour?\nA:", "completion": " blue"}) + "\n"
                           for i in range(2)))
    code, out = run("lorahub", "--model", str(root / "model"), "--adapter", f"a={root / 'a'}",
                    "--adapter", f"b={root / 'b'}", "--examples", str(few), "--budget", "3", "--form", "cat",
                    "--out", str(tmp_path / "hub"))
    assert code == 0, out
    assert Path(tmp_path / "hub" / "adapter_config.json").is_file()
    assert json.loads((tmp_path / "hub" / "adapter_config.json").read_text())["r"] == 8  # cat: 4 + 4
