"""benchmarks/defaults.py (how the LoRA defaults were chosen) must not rot: its splits never leak, and a run
goes through `graft.recipe.run` with the options a user would give (a tiny encoder stands in for MiniLM)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from tiny_dirs import LABELLED, encoder_dir

from graft.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("defaults_bench", ROOT / "benchmarks" / "defaults.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("task", ["sst2", "clinc"])
def test_splits_are_disjoint_seeded_and_sized(bench, task):
    if not bench.SHARED.exists():
        pytest.skip("../shared/data is not here (a user's clone)")
    sizes = {"train": 40, "val": 5, "test": 7}
    first, again = bench.splits(task, sizes), bench.splits(task, sizes)
    assert first == again  # seeded: the grid and the check see the same rows
    texts = {part: {r["text"] for r in rows} for part, rows in first.items()}
    assert not texts["train"] & texts["val"] and not texts["train"] & texts["test"] and not texts["val"] & texts["test"]
    per_class = 150 if task == "clinc" else 1  # CLINC's sizes are per intent
    assert [len(first[p]) for p in ("train", "val", "test")] == [n * per_class for n in (40, 5, 7)]
    if task == "clinc":
        assert len({r["label"] for r in first["test"]}) == 150


def test_a_run_trains_with_the_defaults_and_scores_the_asked_split(bench, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    model = encoder_dir(tmp_path / "enc")
    rows = {"train": LABELLED, "val": LABELLED[:4], "test": LABELLED[4:]}
    monkeypatch.setattr(bench, "splits", lambda task, sizes, seed=0: rows)
    monkeypatch.setitem(bench.TASKS, "sst2", {**bench.TASKS["sst2"], "model": str(model), "max_length": 32})
    out = bench.run_one("sst2", "default", "val", 0, 1, {"epochs": 1})
    assert out["scored_rows"] == 4 and 0.0 <= out["accuracy"] <= 1.0 and math.isfinite(out["loss"])
    assert out["steps"] == math.ceil(len(LABELLED) / TrainConfig().batch_size)
    # The "default" config adds no LoRA option: what it trains is whatever graft's defaults are.
    assert bench.CONFIGS["default"] == {"method": "lora"}
    qv = bench.run_one("sst2", "qv-r8", "test", 0, 1, {"epochs": 1})  # "qv" maps to BERT's own module names
    assert qv["scored_rows"] == 4 and qv["trainable"] < out["trainable"]


def test_lora_defaults_are_the_grids_choice(bench):
    from graft import recipe

    def defaults(**options):
        job, config = recipe.split_options({"data": "x.jsonl", **options})
        return recipe.build_method(job), config

    method, config = defaults()
    assert (method.r, method.alpha, method.rslora, method.targets) == (16, 32, False, "all-linear")  # peft's alpha / r
    assert (config.lr, config.warmup_ratio, config.head_lr_ratio) == (5e-4, 0.1, None)  # causal LM: no new head
    _, config = defaults(task="classification")
    assert (config.lr, config.warmup_ratio, config.head_lr_ratio) == (5e-4, 0.1, 4.0)
    # what a user gives wins, under graft's names and other tools' (learning_rate: the Trainer's)
    _, config = defaults(task="classification", learning_rate=1e-4, warmup_steps=3, head_lr_ratio=1.0)
    assert (config.lr, config.warmup_steps, config.warmup_ratio, config.head_lr_ratio) == (1e-4, 3, 0.0, 1.0)
    # rsLoRA scales 4x higher at r 16 and keeps 2e-4; other methods, full fine-tuning and DPO: TrainConfig's own
    assert defaults(method="rslora")[1].lr == defaults(rslora=True)[1].lr == 2e-4
    for options in ({"method": "ia3"}, {"method": "full"}, {"objective": "dpo"}):
        assert (defaults(**options)[1].lr, defaults(**options)[1].warmup_ratio) == (TrainConfig().lr, 0.0)
    assert TrainConfig().lr == 2e-4 and TrainConfig().head_lr_ratio is None  # Python API: the Trainer's convention
    # the default is the grid's chosen config, spelled out in benchmarks/defaults.py
    chosen = {k: v for k, v in bench.CONFIGS["alpha-r-lr5e-4-head4"].items() if k != "rslora"}
    assert defaults(task="classification") == defaults(task="classification", **chosen)


def test_rslora_is_asked_for_by_name_or_flag():
    from graft import recipe
    from graft.options import OptionError

    assert recipe.build_method(recipe.Job(method="lora", alpha=16.0, rslora=True)).rslora
    assert recipe.build_method(recipe.Job(method="rslora")).rslora
    assert not recipe.build_method(recipe.Job(method="lora", rslora=False)).rslora
    assert recipe.split_options({"use_rslora": True, "data": "x.jsonl"})[0].rslora  # the peft / LF key
    with pytest.raises(OptionError, match="rsLoRA"):
        recipe.Job(method="rslora", rslora=False)
    with pytest.raises(OptionError, match="every weight"):
        recipe.Job(method="full", rslora=True)
    with pytest.raises(OptionError, match="rslora"):  # a method without the setting says so
        recipe.build_method(recipe.Job(method="ia3", rslora=True))
