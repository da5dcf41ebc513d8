"""What a run reports and how it can be steered: metric backends, summaries, graft.report on a loaded
adapter, step callbacks, early stopping and best-checkpoint keeping."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch
from conftest import pad_collate as collate
from conftest import tiny_llama
from safetensors.torch import load_file
from test_dpo import pair_rows, word_tokenizer

import graft
from graft import cli, data
from graft.train import TrainConfig, train
from graft.train.callbacks import StepInfo
from graft.train.report import outputs_summary

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny matmuls gain nothing from threads


def make_examples(n: int, seed: int = 0) -> list[dict[str, list[int]]]:
    """A learnable task: a random prompt, then always the response 5 6 7 8 (the loss can fall)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt = torch.randint(10, 90, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
        out.append({"input_ids": prompt + [5, 6, 7, 8], "labels": [-100] * len(prompt) + [5, 6, 7, 8]})
    return out


def lora_llama(seed: int = 0) -> torch.nn.Module:
    model = tiny_llama(seed)
    torch.manual_seed(seed + 1)
    return graft.attach(model, graft.LoRA(r=4, targets=["q_proj", "v_proj"]))


def config(**kw) -> TrainConfig:
    return TrainConfig(**{"lr": 1e-2, "batch_size": 2, "schedule": "constant", "progress": False, **kw})


# --------------------------------------------------------------------------------------------
# graft.report


def test_report_counts_a_loaded_frozen_adapter(tmp_path):
    model = lora_llama()
    graft.save(model, tmp_path / "adapter")
    expected = 2 * 2 * 4 * (64 + 64) - 2 * 4 * (64 - 32)  # q (64x64) and v (64->32, 2 kv heads) in 2 layers
    assert graft.report(model).adapter == expected == graft.report(model).trainable
    loaded = graft.load(tiny_llama(), tmp_path / "adapter")
    for p in loaded.parameters():
        p.requires_grad_(False)  # inference: nothing trains
    counts = graft.report(loaded)
    assert counts.trainable == 0 and counts.adapter == expected
    assert f"adapter params: {expected:,} (default: {expected:,})" in str(counts)
    assert "adapter params" not in str(graft.report(model))  # peft's wording when they are the trainable ones


# --------------------------------------------------------------------------------------------
# Callbacks, early stopping, keep-best


def test_callback_gets_step_info_and_can_stop(tmp_path):
    seen: list[StepInfo] = []

    def stop_at_three(info: StepInfo) -> None:
        seen.append(info)
        if info.step == 3:
            info.request_stop("enough")

    old_style: list[dict] = []
    result = train(lora_llama(), make_examples(12), collate, config(max_steps=10, out_dir=str(tmp_path)),
                   on_step=old_style.append, callbacks=[stop_at_three])
    assert result.steps == 3 and result.stopped_early == "enough"
    assert [i.step for i in seen] == [1, 2, 3] and seen[0].total_steps == 10
    assert seen[0]["loss"] == seen[0].loss and isinstance(seen[0].lr, float)
    assert [r["step"] for r in old_style] == [1, 2, 3]  # on_step still gets the metrics dict
    json.dumps(old_style)  # ... which stays plain JSON
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()  # a stopped run still saves


def test_early_stopping_stops_after_patience_evaluations_without_improvement():
    # A threshold no decrease can beat: the first evaluation sets the best, the next two do not improve.
    cfg = config(max_steps=10, eval_every=1, early_stopping_patience=2, early_stopping_threshold=1e6)
    result = train(lora_llama(), make_examples(12), collate, cfg, eval_data=make_examples(4, seed=9))
    assert result.steps == 3 and len(result.evals) == 3
    assert "early stopping" in result.stopped_early
    relaxed = config(lr=0.1, max_steps=4, eval_every=1, early_stopping_patience=2)
    assert train(lora_llama(), make_examples(12), collate, relaxed,
                 eval_data=make_examples(4, seed=9)).stopped_early is None  # the loss keeps falling


def test_keep_best_saves_the_weights_of_the_lowest_eval_loss(tmp_path):
    snapshots: dict[int, dict[str, torch.Tensor]] = {}
    model = lora_llama()

    def snapshot(info: StepInfo) -> None:
        snapshots[info.step] = {n: p.detach().clone() for n, p in graft.core.adapter_parameters(model, "default").items()}

    cfg = config(lr=0.3, max_steps=8, eval_every=1, keep_best=True, out_dir=str(tmp_path))  # a large lr overshoots
    result = train(model, make_examples(12), collate, cfg, eval_data=make_examples(4, seed=9), on_step=snapshot)
    best = min(result.evals, key=lambda e: e["eval_loss"])
    assert result.best_step == best["step"]
    assert result.best_step != result.steps, "the test needs a run whose last step is not its best"
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    for name, tensor in snapshots[result.best_step].items():
        key = next(k for k in saved if k.endswith(name.replace(".default", "").removeprefix("model.")))
        torch.testing.assert_close(saved[key], tensor, atol=0, rtol=0)


@pytest.mark.parametrize("kwargs, message", [
    ({"early_stopping_patience": 2}, "eval_every"),
    ({"keep_best": True}, "eval_every"),
    ({"early_stopping_patience": 0, "eval_every": 1}, "early_stopping_patience"),
    ({"report_to": "comet"}, "report_to"),
])
def test_bad_reporting_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_keep_best_without_eval_data_is_an_error():
    with pytest.raises(ValueError, match="eval_data"):
        train(lora_llama(), make_examples(4), collate, config(eval_every=1, keep_best=True))


# --------------------------------------------------------------------------------------------
# Metric backends


def test_report_to_tensorboard_writes_every_scalar(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = train(lora_llama(), make_examples(8), collate,
                   config(max_steps=3, out_dir=str(tmp_path), report_to="tensorboard"))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    losses = [e.value for e in events.Scalars("loss")]
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(result.losses))
    assert "lr" in events.Tags()["scalars"]
    assert result.outputs["tensorboard"] == str(tmp_path / "tensorboard")
    assert (tmp_path / "metrics.jsonl").exists() and (tmp_path / "loss.png").exists()  # still written


@pytest.mark.parametrize("backend", ["wandb", "mlflow", "tensorboard"])
def test_a_missing_backend_names_the_extra(tmp_path, monkeypatch, backend):
    monkeypatch.setitem(sys.modules, backend, None)  # import fails as if not installed
    with pytest.raises(ImportError, match=rf"pip install 'graft-peft\[{backend}\]'"):
        train(lora_llama(), make_examples(4), collate, config(max_steps=1, out_dir=str(tmp_path), report_to=backend))
    assert not (tmp_path / "adapter").exists()  # refused before training


def test_report_to_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    result = train(lora_llama(), make_examples(4), collate, config(max_steps=2, out_dir=str(tmp_path),
                                                                   report_to="wandb"))
    assert (tmp_path / "wandb").is_dir() and "wandb" in result.outputs


def test_report_to_mlflow_local_store(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = train(lora_llama(), make_examples(4), collate, config(max_steps=2, out_dir=str(tmp_path),
                                                                   report_to="mlflow"))
    run_id = result.outputs["mlflow"].split("(run ")[1].rstrip(")")
    history = mlflow.tracking.MlflowClient((tmp_path / "mlruns").resolve().as_uri()).get_metric_history(run_id, "loss")
    assert [m.step for m in history] == [1, 2]


def test_outputs_summary_lists_every_output():
    text = outputs_summary({"adapter": "runs/x/adapter", "metrics": "runs/x/metrics.jsonl", "tensorboard": None})
    assert re.search(r"adapter +runs/x/adapter\n", text) and re.search(r"metrics +runs/x/metrics.jsonl", text)
    assert "tensorboard" not in text


# --------------------------------------------------------------------------------------------
# The command line: start-up summary, DPO, outputs


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(3).save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


def test_cli_dpo_run_prints_summary_and_outputs(tmp_path, tiny_model_dir, capsys):
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps(r) + "\n" for r in pair_rows(12)))
    out = tmp_path / "run"
    code = cli.main(["train", "--model", str(tiny_model_dir), "--data", str(prefs), "--objective", "dpo",
                     "--beta", "0.2", "--label-smoothing", "0.1", "--targets", "q_proj,v_proj", "--r", "4",
                     "--batch-size", "4", "--max-steps", "3", "--lr", "1e-2", "--eval-split", "0.25",
                     "--eval-every", "1", "--keep-best", "--report-to", "none", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "dpo on 9 examples" in text and "eval 3" in text
    assert "data format: preference pairs (prompt / chosen / rejected)" in text
    assert "trainable params: 1,792" in text and "steps: 3" in text and "beta 0.2, label smoothing 0.1" in text
    assert "saved the best weights: step" in text
    assert f"adapter       {out / 'adapter'}" in text and str(out / "metrics.jsonl") in text
    assert str(out / "job.json") in text
    line = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert {"rewards/margins", "rewards/accuracies", "eval_rewards/margins"} <= set(line)


def test_cli_sft_summary_names_the_detected_format(tmp_path, tiny_model_dir, capsys):
    rows = tmp_path / "train.jsonl"
    rows.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["chosen"]}) + "\n"
                            for r in pair_rows(6)))
    code = cli.main(["train", "--model", str(tiny_model_dir), "--data", str(rows), "--max-steps", "2",
                     "--targets", "q_proj", "--out", str(tmp_path / "run")])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "data format: completion (detected)" in text and "sft on 6 examples" in text
    tokens = data.stats(data.tokenize(data.read(str(rows)), word_tokenizer())).tokens
    assert f"({tokens:,} tokens)" in text


def test_cli_preference_rows_need_the_dpo_objective(tmp_path, tiny_model_dir, capsys):
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps(r) + "\n" for r in pair_rows(4)))
    code = cli.main(["train", "--model", str(tiny_model_dir), "--data", str(prefs), "--out", str(tmp_path / "a")])
    assert code == 2 and "--objective dpo" in capsys.readouterr().err
    code = cli.main(["train", "--model", str(tiny_model_dir), "--data", str(prefs), "--objective", "dpo",
                     "--format", "chat", "--out", str(tmp_path / "b")])
    assert code == 2 and "--format chat does not apply to --objective dpo" in capsys.readouterr().err  # CLI words
    assert not (tmp_path / "a").exists() and not (tmp_path / "b" / "adapter").exists()


def test_yaml_takes_the_new_keys(tmp_path):
    from graft import recipe

    path = tmp_path / "run.yaml"
    path.write_text("data: prefs.jsonl\nobjective: dpo\nbeta: 2e-1\nlabel_smoothing: 0.1\nreport_to: [tensorboard]\n"
                    "eval_split: 0.2\neval_every: 5\nearly_stopping_patience: 2\nkeep_best: true\n")
    _, cfg = recipe.split_options(recipe.read_yaml(path))
    assert (cfg.objective, cfg.beta, cfg.label_smoothing, cfg.report_to) == ("dpo", 0.2, 0.1, "tensorboard")
    assert cfg.reporters() == ["tensorboard"] and cfg.early_stopping_patience == 2 and cfg.keep_best
