"""The Hugging Face hub, never the network: model ids resolved from a Hugging Face cache laid out in a
temp dir (offline, as ``HF_HUB_OFFLINE=1`` runs), and ``graft push`` / ``--push-to-hub`` against a local
stand-in of the hub API (``tests/hub_stub.py``).

The cache is laid out as huggingface_hub writes it: ``models--org--name/blobs/<id>`` (here symlinks to
the model files, so SmolLM2's weights are not copied), ``snapshots/<commit>/<file>`` symlinks to the
blobs, and ``refs/main`` holding the commit.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import json
import os
from pathlib import Path

import pytest
import torch
from hub_stub import HubStub
from huggingface_hub import constants
from tiny_dirs import decoder_dir
from transformers import AutoTokenizer, LlamaForCausalLM

import graft
from graft import hub, models
from graft.cli import main

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER = "fedcba9876543210fedcba9876543210fedcba98"


def lay_out(cache: Path, repo_id: str, files: Path, commit: str = COMMIT, refs: tuple[str, ...] = ("main",)) -> Path:
    """Put the files of ``files`` into a Hugging Face hub cache as snapshot ``commit`` of ``repo_id``."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for file in sorted(files.iterdir()):
        if not file.is_file():
            continue
        blob = repo / "blobs" / hashlib.sha256(f"{commit}/{file.name}".encode()).hexdigest()
        blob.symlink_to(file.resolve())
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random Llama with the SmolLM2 tokenizer (so a chat template), as from save_pretrained."""
    return decoder_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def hf_cache(tmp_path, monkeypatch, tiny_dir) -> Path:
    """An offline Hugging Face cache holding tiny-org/tiny-llama at two commits (main and v2)."""
    cache = tmp_path / "hf" / "hub"
    lay_out(cache, "tiny-org/tiny-llama", tiny_dir)
    other = tmp_path / "other"
    other.mkdir()
    for f in tiny_dir.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "rms_norm_eps": 0.5}))  # tells v2 apart
    lay_out(cache, "tiny-org/tiny-llama", other, commit=OTHER, refs=("v2",))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def logits(model, ids=((5, 9, 2, 7),)) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits


def test_hub_id_resolves_from_the_cache_offline(hf_cache, tiny_dir):
    path = models.resolve("tiny-org/tiny-llama")
    assert path == hf_cache / "models--tiny-org--tiny-llama" / "snapshots" / COMMIT
    model, tok = models.load("tiny-org/tiny-llama")
    reference = LlamaForCausalLM.from_pretrained(tiny_dir).eval()
    assert torch.equal(logits(model), logits(reference))
    assert tok.chat_template and tok.pad_token is not None


def test_revision_picks_a_branch_or_a_commit(hf_cache):
    assert models.resolve("tiny-org/tiny-llama", revision="v2").name == OTHER
    assert models.resolve("tiny-org/tiny-llama", revision=COMMIT).name == COMMIT
    model, _ = models.load("tiny-org/tiny-llama", revision="v2")
    assert model.config.rms_norm_eps == 0.5
    with pytest.raises(hub.HubError, match="revision 'v3'.*not in the Hugging Face cache"):
        models.resolve("tiny-org/tiny-llama", revision="v3")


def test_missing_model_offline_says_what_to_do(hf_cache):
    with pytest.raises(hub.HubError) as info:
        models.load("other-org/missing-model")
    message = str(info.value)
    assert "'other-org/missing-model'" in message and "not in the Hugging Face cache" in message
    assert str(hf_cache) in message and "HF_HUB_OFFLINE" in message
    assert "huggingface-cli download other-org/missing-model" in message and "local directory" in message
    assert isinstance(info.value, ValueError)  # the CLI prints it as a one-line user error


def test_bare_names_and_typos(hf_cache):
    with pytest.raises(ValueError, match="Did you mean 'smollm2-135m'"):
        models.resolve("smollm-135")  # a near-miss of a built-in: no hub look-up
    with pytest.raises(hub.HubError, match="unknown model 'gpt9'.*Read as a hub model id.*not in the Hugging Face"):
        models.resolve("gpt9")


def test_local_directory_wins_and_revision_needs_a_hub_id(hf_cache, tiny_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local = tmp_path / "tiny-org" / "tiny-llama"
    local.mkdir(parents=True)
    for f in tiny_dir.iterdir():
        (local / f.name).symlink_to(f)
    assert models.resolve("tiny-org/tiny-llama") == local.resolve()
    with pytest.raises(ValueError, match="revision='v2' applies to Hugging Face hub model ids.*local path"):
        models.resolve("tiny-org/tiny-llama", revision="v2")
    with pytest.raises(ValueError, match="built-in model"):
        models.resolve("minilm", revision="main")


def test_snapshot_without_safetensors_is_refused(hf_cache, tiny_dir, tmp_path):
    files = tmp_path / "pickled"
    files.mkdir()
    (files / "config.json").write_bytes((tiny_dir / "config.json").read_bytes())
    (files / "pytorch_model.bin").write_bytes(b"not unpickled")
    lay_out(hf_cache, "tiny-org/pickled", files)
    with pytest.raises(hub.HubError, match="no .safetensors weights; graft loads safetensors only"):
        models.resolve("tiny-org/pickled")


@pytest.mark.slow
def test_smollm2_hub_id_from_the_bundled_files(tmp_path, monkeypatch):
    """SmolLM2's own hub id resolves offline from a cache laid out from graft's converted SmolLM2 files."""
    cache = tmp_path / "hub"
    lay_out(cache, "HuggingFaceTB/SmolLM2-135M-Instruct", models.resolve("smollm2-135m"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    path = models.resolve("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert (path / "model.safetensors").resolve() == (models.resolve("smollm2-135m") / "model.safetensors").resolve()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).startswith("<|im_start|>")


def test_cli_generate_with_a_hub_id_and_the_offline_error(hf_cache, capsys):
    assert main(["generate", "--model", "tiny-org/tiny-llama", "--prompt", "hi", "--max-new-tokens", "2"]) == 0
    assert main(["generate", "--model", "tiny-org/tiny-llama", "--revision", "v2", "--prompt", "hi",
                 "--max-new-tokens", "1"]) == 0
    capsys.readouterr()
    assert main(["generate", "--model", "nobody/nothing", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    # the first line may be the device / dtype announcement; the error is one line after it
    assert "\ngraft generate: error: 'nobody/nothing' is no local path" in "\n" + err and "Traceback" not in err
    assert "huggingface-cli download nobody/nothing" in err


def test_plan_reads_a_hub_models_config(hf_cache, capsys):
    assert main(["plan", "--model", "tiny-org/tiny-llama", "--memory", "1GB", "--device", "cpu", "--json"]) == 0
    assert '"method"' in capsys.readouterr().out
    assert main(["plan", "--model", "nobody/nothing", "--memory", "1GB"]) == 2
    assert "huggingface-cli download nobody/nothing" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# push


@pytest.fixture
def stub(monkeypatch):
    with HubStub() as server:
        # What HF_ENDPOINT sets when huggingface_hub is imported (file URLs are built from a template).
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        yield server


def test_hub_id_downloads_once_then_resolves_offline(stub, tiny_dir, tmp_path, monkeypatch):
    """Online, a model comes from the hub (only configs, tokenizer files and safetensors) into the cache."""
    files = {f.name: f.read_bytes() for f in tiny_dir.iterdir() if f.is_file()}
    commit = stub.add_repo("tiny-org/online", {**files, "pytorch_model.bin": b"never fetched", "model.onnx": b"-"})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    model, _ = models.load("tiny-org/online")
    assert sorted(stub.downloads) == sorted(files)
    assert torch.equal(logits(model), logits(LlamaForCausalLM.from_pretrained(tiny_dir).eval()))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    stub.downloads.clear()
    assert models.resolve("tiny-org/online") == tmp_path / "hub" / "models--tiny-org--online" / "snapshots" / commit
    assert stub.downloads == []


def tiny_adapter(path: Path) -> Path:
    from conftest import perturb_adapters, tiny_llama

    model = graft.attach(tiny_llama(), graft.LoRA(r=4, alpha=8, rslora=True, targets=["q_proj", "v_proj"]))
    perturb_adapters(model)
    model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    return graft.save(model, path)


def test_push_creates_the_repo_and_uploads_files_and_card(stub, tmp_path):
    adapter = tiny_adapter(tmp_path / "run" / "adapter")
    job = {"job": {"format": "alpaca", "chat_template": False, "max_length": 256, "template": None},
           "train": {"max_steps": 3, "lr": 1e-3, "batch_size": 2, "grad_accum": 1, "seed": 0}, "label_map": None}
    (tmp_path / "run" / "job.json").write_text(json.dumps(job))
    url = hub.push(adapter, "me/tiny-lora", private=True, token="hf_secret")
    repo = stub.repos["me/tiny-lora"]
    assert repo["private"] is True and url.startswith(f"{stub.url}/me/tiny-lora/commit/")
    assert set(repo["files"]) == {"README.md", "adapter_config.json", "adapter_model.safetensors"}
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert repo["files"][name] == (adapter / name).read_bytes()
    card = repo["files"]["README.md"].decode()
    assert card == (adapter / "README.md").read_text()
    assert "`HuggingFaceTB/SmolLM2-135M-Instruct`" in card and "LoRA (r=4, alpha=8, rsLoRA)" in card
    assert f"graft/) {graft.__version__}" in card and "**Training format:** alpaca (no chat template)" in card
    assert stub.cards == [{"library_name": "peft", "tags": ["graft", "lora"],
                           "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct"}]
    assert "Bearer hf_secret" in stub.tokens
    assert ("POST", "/api/repos/create") in stub.requests


def test_card_names_a_builtin_base_not_a_local_path(tmp_path):
    from conftest import tiny_llama

    model = graft.attach(tiny_llama(), graft.LoRA(r=2, targets=["q_proj"]))
    model.config._name_or_path = str(models.cache_dir() / "models" / "smollm2-135m")
    card = hub.model_card(graft.save(model, tmp_path / "a"), "me/x")
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and 'models.load("smollm2-135m")' in card
    assert str(models.cache_dir()) not in card
    model.config._name_or_path = "/home/someone/models/my-llama"
    card = hub.model_card(graft.save(model, tmp_path / "b"), "me/x")
    assert "my-llama (a local model)" in card and "/home/someone" not in card and "base_model:" not in card


def test_push_keeps_an_existing_card_and_an_existing_repo(stub, tmp_path):
    adapter = tiny_adapter(tmp_path / "adapter")
    (adapter / "README.md").write_text("---\nlicense: mit\n---\n# mine\n")
    hub.push(adapter, "me/x")
    hub.push(adapter, "me/x", commit_message="again")  # exists: create_repo(exist_ok=True) takes the 409
    repo = stub.repos["me/x"]
    assert repo["files"]["README.md"] == b"---\nlicense: mit\n---\n# mine\n"
    assert repo["private"] is False and [c["summary"] for c in repo["commits"]][-1] == "again"


def test_push_errors(stub, tmp_path, monkeypatch):
    adapter = tiny_adapter(tmp_path / "adapter")
    with pytest.raises(hub.HubError, match="must look like org/name"):
        hub.push(adapter, "no-namespace")
    with pytest.raises(hub.HubError, match="not an adapter directory"):
        hub.push(tmp_path, "me/x")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(hub.HubError, match="HF_HUB_OFFLINE is set"):
        hub.push(adapter, "me/x")
    assert stub.repos == {}


def test_pushed_adapter_loads_by_its_hub_id(stub, tmp_path, monkeypatch):
    """What `graft push` uploads, `graft.load(model, "org/name")` brings back: same outputs."""
    from conftest import batch_for, tiny_llama

    adapter = tiny_adapter(tmp_path / "adapter")
    hub.push(adapter, "me/roundtrip")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    local, remote = graft.load(tiny_llama(), adapter), graft.load(tiny_llama(), "me/roundtrip")
    inputs = batch_for("llama")
    with torch.no_grad():
        assert torch.equal(local(**inputs).logits, remote(**inputs).logits)
    assert not torch.equal(local(**inputs).logits, tiny_llama()(**inputs).logits)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(hub.HubError, match="no adapter directory 'me/missing', so it was read as a hub adapter id: "
                                           "adapter 'me/missing' is not in the Hugging Face cache"):
        graft.load(tiny_llama(), "me/missing")


def test_cli_push_uses_hf_endpoint(tmp_path, monkeypatch, capsys):
    """`graft push` with HF_ENDPOINT and HF_TOKEN set in the environment, as a user sets them.

    huggingface_hub reads HF_ENDPOINT when it is imported, so its constants are re-read from the
    environment here (and again afterwards) instead of paying for a fresh Python process.
    """
    adapter = tiny_adapter(tmp_path / "adapter")
    with HubStub() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("HF_TOKEN", "hf_from_env")
        importlib.reload(constants)
        try:
            assert main(["push", "--adapter", str(adapter), "--repo", "org/pushed", "--private"]) == 0
        finally:
            monkeypatch.undo()
            importlib.reload(constants)
        assert "pushed" in capsys.readouterr().out
        assert set(server.repos["org/pushed"]["files"]) == {"README.md", "adapter_config.json",
                                                              "adapter_model.safetensors"}
        assert server.repos["org/pushed"]["private"] and "Bearer hf_from_env" in server.tokens
    assert constants.ENDPOINT != server.url


def test_train_push_to_hub(hf_cache, stub, tmp_path):
    """`graft train --model org/name --push-to-hub org/name`: a hub model in, the adapter out to the hub."""
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"question": f"{i}+{i}?", "answer": f"{2 * i}"}) + "\n" for i in range(4)))
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        # The stub stands in for the hub, so the model comes from the cache by its pinned commit.
        rc = main(["train", "--model", "tiny-org/tiny-llama", "--revision", COMMIT, "--data", str(data),
                   "--field", "prompt=question", "--field", "completion=answer", "--max-steps", "1",
                   "--batch-size", "2", "--r", "2", "--targets", "q_proj", "--out", str(tmp_path / "run"),
                   "--push-to-hub", "me/trained", "--hub-private"])
    assert rc == 0, stdout.getvalue()
    assert "pushed" in stdout.getvalue()
    files = stub.repos["me/trained"]["files"]
    assert files["adapter_model.safetensors"] == (tmp_path / "run" / "adapter" / "adapter_model.safetensors").read_bytes()
    card = files["README.md"].decode()
    assert "**Training format:** detected from the data (no chat template)" in card and "**Training:** 1, lr" in card


def test_push_options_are_checked_before_loading(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "x"}) + "\n")
    assert main(["train", "--data", str(data), "--push-to-hub", "bad id", "--out", str(tmp_path / "o")]) == 2
    assert "push_to_hub='bad id' must be a hub repository id" in capsys.readouterr().err
    assert main(["train", "--data", str(data), "--hub-private", "--out", str(tmp_path / "o")]) == 2
    assert "hub_private applies with push_to_hub" in capsys.readouterr().err
