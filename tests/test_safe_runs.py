"""Safe runs through `graft train`: resume only from a checkpoint, a resumed run on the longer schedule, no
silent overwrite of a finished run, and one command run twice giving the same adapter bit for bit.

Tiny random models saved as transformers directories (tests/tiny_dirs.py); each run takes about a second.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import load_file
from tiny_dirs import ALPACA, LABELLED, decoder_dir, encoder_dir, write_jsonl

import graft
import graft.recipe
from graft.cli import main
from graft.io import WEIGHTS_NAME
from graft.train import TrainConfig, train
from graft.train.optim import Schedule

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny matmuls gain nothing from threads


@pytest.fixture(scope="module")
def decoder(tmp_path_factory) -> Path:
    return decoder_dir(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    return encoder_dir(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def alpaca(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", ALPACA)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "labels.jsonl", LABELLED)


def train_cli(*argv: str, threads: str = "1") -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["train", *argv, "--threads", threads])
    return rc, out.getvalue(), err.getvalue()


def lora_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--data", str(data), "--batch-size", "2", "--r", "4", "--targets",
            "q_proj,v_proj", "--lr", "1e-2", "--warmup-steps", "0", "--out", str(out), *extra]  # no warmup: exact lr checks


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def error_of(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("graft train: error: ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0].removeprefix("graft train: error: ")


# --------------------------------------------------------------------------------------------
# Resume


def test_resume_without_a_checkpoint_says_where_it_looked(decoder, alpaca, tmp_path):
    out = tmp_path / "run"
    rc, _, err = train_cli(*lora_args(decoder, alpaca, out, "--max-steps", "1", "--resume"))
    msg = error_of(err)
    assert rc == 2 and "--resume" in msg and f"no checkpoint to continue from in {out}" in msg
    assert "checkpoint-<step>" in msg and "--save-every" in msg
    assert not out.exists()
    # The Python API says the same in its own words.
    model = graft.attach(tiny_llama(), graft.LoRA(r=2, targets=["q_proj"]))
    out.mkdir()
    with pytest.raises(ValueError, match=r"resume=True: no checkpoint to continue from in .*checkpoint-<step>"):
        train(model, [[1, 2, 3]], lambda rows: {"input_ids": torch.tensor(rows), "labels": torch.tensor(rows)},
              TrainConfig(max_steps=1, out_dir=str(out), progress=False), resume=True)


def test_resume_with_more_steps_replans_the_schedule(decoder, alpaca, tmp_path):
    """Before the fix, step 3 trained at lr 0 and step 4 at lr/2: the 2-step cosine, wrapped around."""
    short, full = tmp_path / "short", tmp_path / "full"
    assert train_cli(*lora_args(decoder, alpaca, short, "--max-steps", "2", "--save-every", "1"))[0] == 0
    with pytest.warns(UserWarning, match="lr schedule planned over 4 steps"):
        rc, _, _ = train_cli(*lora_args(decoder, alpaca, short, "--max-steps", "4", "--save-every", "1", "--resume"))
    assert rc == 0
    assert train_cli(*lora_args(decoder, alpaca, full, "--max-steps", "4"))[0] == 0
    resumed, straight = [m["lr"] for m in metrics(short)], [m["lr"] for m in metrics(full)]
    plan = Schedule("cosine", 0, 4)
    assert resumed[2:] == pytest.approx(straight[2:])
    assert resumed[2:] == pytest.approx([1e-2 * plan(2), 1e-2 * plan(3)])
    assert resumed[:2] == pytest.approx([1e-2, 1e-2 * Schedule("cosine", 0, 2)(1)])  # trained on the 2-step plan
    assert min(resumed) > 0


# --------------------------------------------------------------------------------------------
# Output directory


def test_finished_run_is_not_overwritten_without_overwrite(decoder, alpaca, tmp_path, caplog):
    out = tmp_path / "run"
    assert train_cli(*lora_args(decoder, alpaca, out, "--max-steps", "1", "--save-every", "1"))[0] == 0
    (out / "merged").mkdir()  # e.g. `graft merge --out run/merged` of the first adapter
    (out / "tensorboard").mkdir()  # as `--report-to tensorboard` leaves it
    (out / "tensorboard" / "events.out.tfevents.1").write_bytes(b"old run")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    rc, _, err = train_cli(*lora_args(decoder, alpaca, out, "--max-steps", "2"))
    msg = error_of(err)
    assert rc == 2 and "already holds a finished run" in msg and "--overwrite" in msg and "merged/" in msg
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    with caplog.at_level(logging.WARNING, logger="graft"):
        rc, _, _ = train_cli(*lora_args(decoder, alpaca, out, "--max-steps", "2", "--overwrite"))
    assert rc == 0
    assert not (out / "checkpoint-1").exists()  # the earlier run's checkpoint went with it
    assert not (out / "tensorboard").exists()  # and its reporter logs, which would mix two runs' curves
    assert [m["step"] for m in metrics(out)] == [1, 2]
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "removed the earlier run's adapter" in warned and "merged/" in warned and "may not match" in warned

    config = tmp_path / "run.yaml"
    config.write_text("overwrite: true\nmax_steps: 1\n")
    assert train_cli(str(config), *lora_args(decoder, alpaca, out))[0] == 0  # the YAML key does the same
    assert [m["step"] for m in metrics(out)] == [1]


# --------------------------------------------------------------------------------------------
# Reproducibility


def adapter_bytes(out: Path) -> dict[str, bytes]:
    """Every saved tensor's dtype, shape and raw bytes (the file's header also holds a per-save id)."""
    tensors = load_file(out / "adapter" / WEIGHTS_NAME)
    return {k: (str(t.dtype), tuple(t.shape), t.numpy().tobytes()) for k, t in tensors.items()}


def test_one_command_twice_gives_the_same_adapter_bit_for_bit(decoder, alpaca, tmp_path):
    args = ["--max-steps", "2", "--dropout", "0.1", "--seed", "7"]  # lora_A's init and dropout draw from the seed
    runs = []
    for i, noise in enumerate((1, 2)):
        torch.manual_seed(noise)  # whatever the process drew before must not matter
        torch.rand(noise * 10)
        assert train_cli(*lora_args(decoder, alpaca, tmp_path / f"run{i}", *args))[0] == 0
        runs.append(tmp_path / f"run{i}")
    assert adapter_bytes(runs[0]) == adapter_bytes(runs[1])
    assert metrics(runs[0])[0]["loss"] == metrics(runs[1])[0]["loss"]
    other = tmp_path / "seed8"
    assert train_cli(*lora_args(decoder, alpaca, other, *args[:-1], "8"))[0] == 0
    assert adapter_bytes(other) != adapter_bytes(runs[0])  # the seed is what fixes it


def test_classification_head_is_seeded_too(encoder, labelled, tmp_path):
    """The new head is built from the seed: step 1's loss (at lr ~0, so it is the head's) and the saved
    adapter with its head are identical across two runs."""
    runs = []
    for i in range(2):
        torch.manual_seed(100 + i)
        args = ["--model", str(encoder), "--data", str(labelled), "--task", "classification", "--batch-size", "4",
                "--max-steps", "2", "--targets", "query,value", "--r", "2", "--seed", "3",
                "--out", str(tmp_path / f"cls{i}")]
        assert train_cli(*args)[0] == 0
        runs.append(tmp_path / f"cls{i}")
    assert adapter_bytes(runs[0]) == adapter_bytes(runs[1])
    assert metrics(runs[0])[0]["loss"] == metrics(runs[1])[0]["loss"]
    tensors = load_file(runs[0] / "adapter" / WEIGHTS_NAME)
    assert any("classifier" in k for k in tensors)  # the head is in what was compared


# --------------------------------------------------------------------------------------------
# Task, threads


@pytest.mark.parametrize("extra", [[], ["--format", "classification"]])
def test_labelled_rows_on_an_encoder_train_a_classifier(extra, encoder, labelled, tmp_path):
    out = tmp_path / "run"
    rc, _, err = train_cli("--model", str(encoder), "--data", str(labelled), "--batch-size", "4", "--max-steps", "1",
                           "--targets", "query,value", "--r", "2", "--out", str(out), *extra)
    assert rc == 0, err
    job = json.loads((out / "job.json").read_text())
    assert job["train"]["task"] == "classification" and job["label_map"] == {"neg": 0, "pos": 1}


def test_threads_default_to_the_cores_this_process_may_use(decoder, alpaca, tmp_path, monkeypatch):
    seen = []

    def stop(job, config, info=None):
        seen.append(torch.get_num_threads())
        raise ValueError("stop here")

    monkeypatch.setattr(graft.recipe, "prepare", stop)
    for given, expected in ((["--threads", "1"], 1), ([], len(os.sched_getaffinity(0)))):
        with contextlib.redirect_stderr(io.StringIO()):
            assert main(["train", *lora_args(decoder, alpaca, tmp_path / "run"), *given]) == 2
        assert seen[-1] == expected
    assert torch.get_num_threads() == 1  # the caller's setting is back
