"""TrainConfig.compile: torch.compile of the decoder layers for the run, exact, and undone afterwards."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import pad_collate as collate
from conftest import tiny_llama
from test_train import make_examples

import graft
from graft.train import TrainConfig, train
from graft.train.compile import compiled_layers, decoder_layers

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny matmuls gain nothing from threads


def lora_llama() -> torch.nn.Module:
    model = tiny_llama(0)
    torch.manual_seed(1)
    return graft.attach(model, graft.LoRA(r=4, targets="all-linear"))


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")), reason="no C++ compiler")
def test_compiled_training_matches_eager_and_leaves_the_model_eager():
    examples = make_examples(8)
    config = TrainConfig(lr=1e-2, max_steps=3, batch_size=4, progress=False)
    eager = train(lora_llama(), examples, collate, config)
    model = lora_llama()
    compiled = train(model, examples, collate, TrainConfig(**{**vars(config), "compile": True}))
    assert compiled.losses == pytest.approx(eager.losses, abs=1e-5)  # the bar, fp32
    assert all(layer._compiled_call_impl is None for layer in decoder_layers(model))  # eager again afterwards


def test_compile_without_a_compiler_says_so(monkeypatch, tmp_path):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    model = lora_llama()
    with pytest.raises(ValueError, match=r"compile=True: .*no C\+\+ compiler"), \
            compiled_layers(model, torch.device("cpu")):
        pass
    assert len(decoder_layers(model)) == 2 and all(m._compiled_call_impl is None for m in decoder_layers(model))
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"compile=True: .*no C\+\+ compiler"):  # before anything is written
        train(model, make_examples(4), collate, TrainConfig(max_steps=1, compile=True, out_dir=str(out), progress=False))
    assert not out.exists()
