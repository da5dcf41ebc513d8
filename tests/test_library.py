"""The adapter library (graft.compose.library): build from a task collection, resume, manifest,
search by description, serving from a library, and the errors a user meets.

The base is a tiny random Llama (hidden 32, one layer) with the SmolLM2 tokenizer, saved as a
transformers directory so `graft library build --model DIR` loads it as it loads a real model; the
task collection is three small tasks written to a temp dir. One test embeds with the real
all-MiniLM-L6-v2; the others use a bag-of-words embedder.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import graft
import graft.models
from graft.cli import main
from graft.compose import library as L
from graft.compose import tasks as T

TASKS = {
    "upper": ("Write the word in capital letters", ["Say it loudly"], lambda i: (f"word{i}", f"WORD{i}")),
    "translate_de": ("Translate the English word into German", ["English to German"],
                     lambda i: (["one", "two", "three", "four"][i % 4] + f" ({i})", ["eins", "zwei", "drei", "vier"][i % 4])),
    "parity": ("Is the number even or odd?", [],
               lambda i: (f"{i}\n\nOptions:\n- even\n- odd", "even" if i % 2 == 0 else "odd")),
}
SMALL = L.BuildConfig(r=2, alpha=4.0, epochs=1, lr=1e-3, batch_size=4, max_length=64, max_train_rows=8,
                      heldout=0.25, eval_rows=3)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny matmuls gain nothing from threads


def bag_of_words(texts):
    """A deterministic stand-in for a sentence embedder: hashed word counts, normalised."""
    out = torch.zeros(len(texts), 64)
    for i, text in enumerate(texts):
        for word in text.lower().replace("?", " ").split():
            out[i, int(hashlib.md5(word.encode()).hexdigest(), 16) % 64] += 1.0
    return torch.nn.functional.normalize(out, dim=-1)


def write_collection(root: Path, tasks=TASKS, rows: int = 16) -> Path:
    (root / "data").mkdir(parents=True, exist_ok=True)
    index = []
    for name, (desc, alts, make) in tasks.items():
        with open(root / "data" / f"{name}.jsonl", "w") as f:
            for i in range(rows):
                x, y = make(i)
                f.write(json.dumps({"input": x, "output": y}) + "\n")
        index.append({"task": name, "description": desc, "alt_descriptions": alts, "file": f"data/{name}.jsonl"})
    (root / "index.json").write_text(json.dumps(index))
    return root / "index.json"


def write_tiny_model(root: Path, hidden: int = 32, seed: int = 0) -> Path:
    tok = AutoTokenizer.from_pretrained(graft.models.resolve("smollm2-135m"), local_files_only=True)
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(root)
    tok.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("lib")
    index = write_collection(root / "tasks")
    model = write_tiny_model(root / "model")
    lib = L.build(model, index, root / "lib", SMALL, embed=bag_of_words, progress=False, log=lambda s: None)
    return root, index, model, lib


def test_build_writes_adapters_and_manifest(built):
    root, index, model, lib = built
    assert lib.names == list(TASKS)
    manifest = json.loads((root / "lib" / "manifest.json").read_text())
    assert manifest["format_version"] == L.FORMAT_VERSION
    assert manifest["base"]["id"] == str(model.resolve()) and manifest["base"]["hidden_size"] == 32
    tasks = {t.name: t for t in T.read_tasks(index)}
    for entry in lib.entries:
        assert entry.method == {"type": "lora", "r": 2, "alpha": 4.0, "targets": ["q_proj", "v_proj"], "dropout": 0.0}
        assert entry.description == TASKS[entry.name][0] and list(entry.alt_descriptions) == TASKS[entry.name][1]
        d = entry.data
        assert (d["rows"], d["heldout_rows"], d["train_rows"], d["rows_used"], d["scored_rows"]) == (16, 4, 12, 8, 3)
        assert d["file"] == f"data/{entry.name}.jsonl" and d["split"]["split_seed"] == 0
        # The manifest is enough to recover the exact rows: none of the scored rows was trained on.
        used, held, scored = L.select_rows(tasks[entry.name].rows(), d["split"])
        assert len(used) == 8 and len(scored) == 3 and not {r["input"] for r in used} & {r["input"] for r in held}
        assert entry.training["lr"] == 1e-3 and entry.training["steps"] == 2  # 8 rows, batch 4, 1 epoch
        assert 0.0 <= entry.scores["adapter"] <= 1.0 and 0.0 <= entry.scores["base"] <= 1.0
        assert entry.scores["rows"] == 3 and entry.created
        path = lib.path_of(entry.name)
        assert (path / "adapter_config.json").is_file() and (path / "adapter_model.safetensors").is_file()
    assert (root / "lib" / "embeddings.safetensors").is_file()


def test_adapters_load_and_differ_from_base(built):
    _, _, model_dir, lib = built
    model, _ = graft.models.load(model_dir)
    ids = torch.tensor([[5, 17, 200, 3000]])
    with torch.no_grad():
        base = model(input_ids=ids).logits
        graft.load(model, lib.path_of("upper"), "upper")
        adapted = model(input_ids=ids).logits
    assert not torch.allclose(base, adapted, atol=1e-6)  # the trained B is not zero


def test_the_score_is_the_adapters_own(built):
    """The recorded held-out score is what tasks.evaluate gives with that adapter on those rows."""
    _, index, model_dir, lib = built
    model, tok = graft.models.load(model_dir)
    entry = lib.entry("parity")
    task = next(t for t in T.read_tasks(index) if t.name == "parity")
    _, _, scored = L.select_rows(task.rows(), entry.data["split"])
    assert T.evaluate(model, tok, task, scored) == entry.scores["base"]
    graft.load(model, lib.path_of("parity"), "parity")
    assert T.evaluate(model, tok, task, scored) == entry.scores["adapter"]


def test_resume_skips_complete_adapters(built, monkeypatch):
    root, index, model, lib = built
    before = (root / "lib" / "manifest.json").read_text()
    monkeypatch.setattr(L, "_build_one", lambda *a, **k: pytest.fail("a complete adapter was trained again"))
    again = L.build(model, index, root / "lib", SMALL, embed=bag_of_words, progress=False, log=lambda s: None)
    assert again.names == lib.names
    after = json.loads((root / "lib" / "manifest.json").read_text())
    assert [a["created"] for a in after["adapters"]] == [a["created"] for a in json.loads(before)["adapters"]]


def test_interrupted_task_is_redone(tmp_path, built, monkeypatch):
    _, index, model, _ = built
    out = tmp_path / "lib"
    L.build(model, index, out, SMALL, only=["upper", "parity"], embed=bag_of_words, progress=False,
            log=lambda s: None)
    # "parity" dies mid-way: its weights half written (a save's temp dir left behind, the old dir gone)
    # and no manifest entry; "upper" is complete.
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["adapters"] = [a for a in manifest["adapters"] if a["name"] != "parity"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / ".parity.tmp-deadbeef").mkdir()
    (out / "parity" / "adapter_model.safetensors").unlink()
    trained = []
    real = L._build_one
    monkeypatch.setattr(L, "_build_one", lambda lm, tok, task, *a: trained.append(task.name) or real(lm, tok, task, *a))
    lib = L.build(model, index, out, SMALL, embed=bag_of_words, progress=False, log=lambda s: None)
    assert trained == ["translate_de", "parity"]  # upper skipped; parity redone; the new task built
    assert lib.names == ["upper", "translate_de", "parity"] and lib.is_complete("parity")
    assert not list(out.glob(".*.tmp-*"))


def test_search_ranks_by_description_and_caches(built):
    root, _, _, _ = built
    calls = []

    def counting(texts):
        calls.append(list(texts))
        return bag_of_words(texts)

    lib = L.Library.open(root / "lib", embed=counting)
    hits = lib.search("translate this word into German", k=2)
    assert hits[0][0].name == "translate_de" and hits[0][1] > hits[1][1] and -1.0 <= hits[1][1] <= 1.0
    # The cache held the MiniLM embeddings of the build; this embedder's are computed once, cached, then reused.
    assert calls == [["translate this word into German"], [d for d, _, _ in TASKS.values()]]
    lib2 = L.Library.open(root / "lib", embed=counting)
    assert lib2.search("is the number even or odd", k=1)[0][0].name == "parity"
    assert len(calls) == 3  # only the query was embedded: the descriptions came from the cache
    assert "parity" not in [e.name for e, _ in lib2.search("even or odd", k=3, exclude=["parity"])]
    assert lib2.embeddings.shape == (3, 64)
    with pytest.raises(KeyError, match="nope"):
        lib2.search("x", exclude=["nope"])


def test_search_with_minilm(built):
    root, *_ = built
    lib = L.Library.open(root / "lib")  # the bundled all-MiniLM-L6-v2
    hits = lib.search("translate to German", k=3)
    assert hits[0][0].name == "translate_de" and hits[0][1] > hits[1][1]
    assert lib.embeddings.shape == (3, 384)
    assert torch.allclose(lib.embeddings.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_cli_list_and_search(built, capsys):
    root, *_ = built
    assert main(["library", "list", str(root / "lib")]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in TASKS) and "held-out" in out
    assert main(["library", "search", str(root / "lib"), "capital letters", "--k", "1", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert hits[0]["name"] == "upper" and 0 < hits[0]["score"] <= 1


def test_serve_loads_adapters_from_a_library_root(built):
    from graft.serve.registry import AdapterError, AdapterRegistry

    root, _, model_dir, lib = built
    model, _ = graft.models.load(model_dir)
    registry = AdapterRegistry(model, "base", roots=[root / "lib"])
    registry.load_now("translate_de", lib.path_of("translate_de"))
    assert "translate_de" in registry.loaded()
    with pytest.raises(AdapterError, match="outside the adapter roots"):
        AdapterRegistry(model, "base", roots=[root / "tasks"]).load_now("upper", lib.path_of("upper"))


def test_cli_build_errors(tmp_path, built, capsys):
    _, index, model, _ = built
    assert main(["library", "build", "--model", str(model), "--tasks", str(tmp_path / "none.json"),
                 "--out", str(tmp_path / "x")]) == 2
    assert "task index" in capsys.readouterr().err
    assert main(["library", "build", "--model", str(model), "--tasks", str(index), "--out", str(tmp_path / "x"),
                 "--only", "upper,nope"]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["library", "list", str(tmp_path)]) == 2
    assert "not an adapter library" in capsys.readouterr().err


def test_reusing_a_library_with_another_base_fails(tmp_path, built):
    root, index, _, _ = built
    other = write_tiny_model(tmp_path / "other", hidden=16)
    with pytest.raises(ValueError, match="another base model.*hidden_size: library 32, given 16"):
        L.build(other, index, root / "lib", SMALL, embed=bag_of_words, progress=False, log=lambda s: None)
    assert len(L.Library.open(root / "lib")) == 3  # nothing changed


def test_build_config_errors():
    with pytest.raises(ValueError, match="r=0"):
        L.BuildConfig(r=0)
    with pytest.raises(ValueError, match="heldout=1.5"):
        L.BuildConfig(heldout=1.5)
    with pytest.raises(ValueError, match="targets"):
        L.BuildConfig(targets="")
    assert L.BuildConfig(targets="q_proj, k_proj").targets == ("q_proj", "k_proj")


def test_open_rejects_other_format(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 99, "base": {}, "adapters": []}))
    with pytest.raises(ValueError, match="format_version 99"):
        L.Library.open(tmp_path)
    entry = {"name": "x", "path": "../elsewhere", "description": "d"}
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 1, "base": {}, "adapters": [entry]}))
    with pytest.raises(ValueError, match="inside it"):
        L.Library.open(tmp_path)


def test_compose_benchmark_runs_on_a_tiny_library(built, tmp_path):
    """benchmarks/compose.py's per-task protocol end to end (tiny sizes), and its table."""
    import importlib.util
    import types

    root, index, _, lib = built
    spec = importlib.util.spec_from_file_location("compose_bench", Path(__file__).parents[1] / "benchmarks" / "compose.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model, tok = graft.models.load(lib.base["id"])
    library = ["upper", "translate_de"]
    for n in library:
        graft.load(model, lib.path_of(n), n, activate=False)
    args = types.SimpleNamespace(tasks=str(index), rows=3, seeds=2, k=2, budget=2, nearest_k=True, few_shot_steps=1,
                                 seed=0)
    out = bench.run_task("parity", args, L.Library.open(root / "lib", embed=bag_of_words), model, tok, library)
    assert set(out["scores"]) == set(bench.METHODS) and all(0 <= v <= 1 for v in out["scores"].values())
    assert out["scores"]["own LoRA"] == lib.entry("parity").scores["adapter"]  # the same 3 rows, the same adapter
    assert out["detail"]["nearest"]["adapter"] in library and len(out["detail"]["LoraHub"]) == 2
    assert graft.active_adapters(model) == [] and sorted(graft.core.state_of(model).methods) == sorted(library)
    (tmp_path / "parity.json").write_text(json.dumps(out))
    assert "| parity | no | 3 |" in bench.table(tmp_path)
