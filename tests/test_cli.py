"""`graft train | generate | merge | inspect` through ``graft.cli.main``: good runs, and bad input that
fails with a clear one-line error (exit status 2) before any training starts.

Everything runs on a tiny random Llama (hidden 32, one layer) saved as a transformers directory with
the SmolLM2 tokenizer, so the vocabulary matches the tokenizer (49152) and a run takes about a second.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from tiny_dirs import decoder_dir
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

import graft
import graft.models
import graft.recipe
import graft.train
from graft.cli import EXAMPLES, main
from graft.io import WEIGHTS_NAME

VERBS = ["train", "generate", "merge", "inspect", "eval", "plan", "serve"]
ROWS = [{"instruction": f"Add {i} and {i}.", "input": "", "output": f"The sum is {2 * i}."} for i in range(6)]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny matmuls gain nothing from threads


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random LlamaForCausalLM with the SmolLM2 tokenizer, as a plain transformers directory."""
    return decoder_dir(tmp_path_factory.mktemp("tiny-llama"))


def write_jsonl(path: Path, rows: list[dict] | list[str]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", ROWS)


@pytest.fixture(scope="module")
def trained(model_dir, data_file, tmp_path_factory):
    """One real `graft train` run (2 steps); lr 1e-2 so the adapter is far from its zero start."""
    out = tmp_path_factory.mktemp("run") / "out"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = main(["train", "--model", str(model_dir), "--data", str(data_file), "--max-steps", "2",
                   "--batch-size", "2", "--r", "4", "--targets", "q_proj,v_proj", "--lr", "1e-2",
                   "--out", str(out)])
    return SimpleNamespace(rc=rc, out=out, adapter=out / "adapter", stdout=stdout.getvalue())


# --------------------------------------------------------------------------------------------
# --help


@pytest.mark.parametrize("verb", VERBS)
def test_help_of_every_verb_shows_an_example(verb, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([verb, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert f"example:\n  graft {verb} " in out
    assert EXAMPLES[verb].splitlines()[0] in out


def test_top_level_help_lists_the_verbs(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert all(verb in out for verb in VERBS)


# --------------------------------------------------------------------------------------------
# train, inspect, merge, generate on a real (tiny) run


def test_train_writes_adapter_metrics_and_plot(trained, model_dir):
    assert trained.rc == 0
    assert "\ndone: 2 steps, final loss " in trained.stdout  # after the start-up summary
    assert (trained.adapter / WEIGHTS_NAME).is_file()
    assert (trained.adapter / "adapter_config.json").is_file()
    assert (trained.adapter / "tokenizer_config.json").is_file()  # the adapter dir is self-contained
    assert (trained.out / "loss.png").stat().st_size > 0
    lines = (trained.out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
    job = json.loads((trained.out / "job.json").read_text())
    assert job["job"]["r"] == 4 and job["job"]["targets"] == "q_proj,v_proj"
    assert job["train"]["max_steps"] == 2 and job["train"]["batch_size"] == 2 and job["train"]["lr"] == 1e-2


def test_inspect_prints_method_rank_and_targets(trained, capsys):
    assert main(["inspect", str(trained.adapter)]) == 0
    lines = {line.split(None, 1)[0]: line.split(None, 1)[1] for line in capsys.readouterr().out.splitlines()}
    assert lines["method"] == "LORA"
    assert lines["r"] == "4"
    assert set(ast.literal_eval(lines["targets"])) == {"q_proj", "v_proj"}


def test_inspect_json(trained, model_dir, capsys):
    assert main(["inspect", str(trained.adapter), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    tensors = load_file(trained.adapter / WEIGHTS_NAME)
    assert info["method"] == "LORA" and info["r"] == 4 and info["variant"] is None  # plain LoRA
    assert sorted(info["targets"]) == ["q_proj", "v_proj"]
    assert info["tensors"] == len(tensors) == 4  # lora_A and lora_B of q_proj and v_proj, one layer
    assert info["parameters"] == sum(t.numel() for t in tensors.values())
    assert info["dtypes"] == ["float32"]
    assert Path(info["base_model"]).resolve() == model_dir.resolve()


def test_inspect_missing_directory(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    assert "nope" in error_line(capsys.readouterr().err, "inspect")


def test_merge_writes_a_plain_model_with_the_adapters_logits(trained, model_dir, tmp_path, capsys):
    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(model_dir), "--adapter", str(trained.adapter), "--out", str(merged)]) == 0
    assert str(merged) in capsys.readouterr().out

    plain = AutoModelForCausalLM.from_pretrained(merged, local_files_only=True).eval()
    assert not any("lora" in k for k in plain.state_dict())
    AutoTokenizer.from_pretrained(merged, local_files_only=True)  # the tokenizer travels with it

    base, _ = graft.models.load(model_dir)
    ids = torch.randint(3, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = base(input_ids=ids).logits
        graft.load(base, trained.adapter)
        expected = base(input_ids=ids).logits
        got = plain(input_ids=ids).logits
    assert (expected - before).abs().max() > 1e-3  # the adapter really changes the output
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_merge_missing_adapter_is_a_clear_error(model_dir, tmp_path, capsys):
    out = tmp_path / "merged"
    rc = main(["merge", "--model", str(model_dir), "--adapter", str(tmp_path / "nope"), "--out", str(out)])
    assert rc == 2
    msg = error_line(capsys.readouterr().err, "merge")
    assert "nope" in msg and "does not exist" in msg
    assert not out.exists()


def test_generate(trained, model_dir, capsys):
    rc = main(["generate", "--model", str(model_dir), "--adapter", str(trained.adapter), "--prompt", "hi",
               "--max-new-tokens", "3"])
    assert rc == 0
    capsys.readouterr()
    rc = main(["generate", "--model", str(model_dir), "--prompt", "hi", "--prompt", "yo", "--max-new-tokens", "2",
               "--no-chat-template", "--temperature", "0.7"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "### hi\n" in out and "### yo\n" in out


# --------------------------------------------------------------------------------------------
# YAML config


@pytest.fixture
def captured_run(monkeypatch):
    """Replace recipe.run: record what `graft train` would run, train nothing."""
    calls = []

    def fake_run(job, config, resume=False):
        calls.append(SimpleNamespace(job=job, config=config, resume=resume))
        result = SimpleNamespace(steps=0, final_loss=0.0, eval_loss=None, seconds=0.0, peak_rss_mb=0.0,
                                 saved_to=config.out_dir)
        return None, None, result

    monkeypatch.setattr(graft.recipe, "run", fake_run)
    return calls


def test_yaml_config_and_flags_override_it(tmp_path, model_dir, data_file, captured_run):
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {model_dir}\n"
        f"data: {data_file}\n"
        "max_steps: 5\n"
        "batch-size: 4\n"          # '-' and '_' both work
        "lr: 2e-4\n"               # YAML 1.1 reads this as a string; it still means 0.0002
        "targets: [q_proj, v_proj]\n"
        "gradient_checkpointing: true\n"
        "r: 8\n"
        "max_length: 64\n"
        f"out: {tmp_path / 'from-yaml'}\n"
    )
    assert main(["train", str(config)]) == 0
    job, cfg = captured_run[-1].job, captured_run[-1].config
    assert job.model == str(model_dir) and job.data == str(data_file)
    assert (cfg.max_steps, cfg.batch_size, cfg.lr, cfg.gradient_checkpointing) == (5, 4, 2e-4, True)
    assert (job.r, job.max_length, job.targets) == (8, 64, "q_proj,v_proj")
    assert cfg.out_dir == str(tmp_path / "from-yaml")
    assert captured_run[-1].resume is False

    assert main(["train", str(config), "--max-steps", "2", "--r", "4", "--no-gradient-checkpointing",
                 "--out", str(tmp_path / "from-flags"), "--resume"]) == 0
    job, cfg = captured_run[-1].job, captured_run[-1].config
    assert (cfg.max_steps, job.r, cfg.gradient_checkpointing) == (2, 4, False)
    assert (cfg.batch_size, cfg.lr, job.max_length) == (4, 2e-4, 64)  # untouched by the flags
    assert cfg.out_dir == str(tmp_path / "from-flags")
    assert captured_run[-1].resume is True


def test_default_out_dir(data_file, captured_run):
    assert main(["train", "--data", str(data_file)]) == 0
    assert captured_run[-1].config.out_dir == "runs/latest"
    assert captured_run[-1].job.model == "smollm2-135m"


# --------------------------------------------------------------------------------------------
# Bad input: exit status 2, one clear line on stderr, and no training started


@pytest.fixture
def no_training(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("training started despite bad input")

    monkeypatch.setattr(graft.train, "train", refuse)


@pytest.fixture
def no_model_load(monkeypatch):
    """For errors that must come before the model is loaded (the options alone are wrong)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded despite bad options")

    monkeypatch.setattr(graft.models, "load", refuse)


def train_error(capsys, out: Path, *argv: str) -> str:
    """Run `graft train ... --out OUT`; check it failed cleanly, wrote nothing; return the message."""
    capsys.readouterr()
    assert main(["train", *argv, "--out", str(out)]) == 2
    captured = capsys.readouterr()
    msg = error_line(captured.err, "train")
    assert "done:" not in captured.out
    for name in ("metrics.jsonl", "loss.png", "adapter", "job.json"):
        assert not (out / name).exists()
    assert not list(out.glob("checkpoint-*"))  # (an empty glob when out does not exist)
    return msg


def error_line(err: str, verb: str) -> str:
    """The one `graft VERB: error: ...` line of stderr (progress bars may precede it), minus its prefix."""
    prefix = f"graft {verb}: error: "
    lines = [line.rpartition("\r")[2] for line in err.splitlines() if prefix in line]
    assert len(lines) == 1 and lines[0].startswith(prefix), err
    assert "Traceback" not in err
    return lines[0].removeprefix(prefix)


def test_missing_field_names_file_line_and_field(tmp_path, model_dir, capsys, no_training):
    data = write_jsonl(tmp_path / "rows.jsonl", [json.dumps(ROWS[0]), "", json.dumps({"instruction": "Hi."})])
    msg = train_error(capsys, tmp_path / "out", "--model", str(model_dir), "--data", str(data))
    assert f"{data} line 3" in msg  # the file's line, blank lines counted
    assert "'output'" in msg and "missing" in msg


def test_empty_data_set(tmp_path, model_dir, capsys, no_training, no_model_load):
    for text in ("", "\n\n"):
        data = tmp_path / "empty.jsonl"
        data.write_text(text)
        msg = train_error(capsys, tmp_path / "out", "--model", str(model_dir), "--data", str(data))
        assert str(data) in msg and "empty" in msg


def test_response_longer_than_max_length(tmp_path, model_dir, capsys, no_training):
    rows = [ROWS[0], {"instruction": "Count.", "output": " ".join(map(str, range(100)))}]
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    msg = train_error(capsys, tmp_path / "out", "--model", str(model_dir), "--data", str(data),
                      "--max-length", "32")
    assert f"{data} line 2" in msg and "--max-length 32" in msg and "response" in msg


def test_unknown_data_format(tmp_path, model_dir, data_file, capsys, no_training, no_model_load):
    msg = train_error(capsys, tmp_path / "out", "--model", str(model_dir), "--data", str(data_file),
                      "--format", "alpacca")
    assert "unknown data format 'alpacca'" in msg and "alpaca" in msg.split("allowed:")[1]


def test_unknown_file_suffix(tmp_path, model_dir, capsys, no_training, no_model_load):
    data = tmp_path / "train.txt"
    data.write_text(json.dumps(ROWS[0]) + "\n")
    msg = train_error(capsys, tmp_path / "out", "--model", str(model_dir), "--data", str(data))
    assert str(data) in msg and "'.txt'" in msg and ".jsonl" in msg


@pytest.mark.parametrize(("typo", "meant"), [("max_step", "max_steps"), ("bach_size", "batch_size"),
                                             ("lerning-rate", None)])
def test_unknown_yaml_key_suggests_the_closest(typo, meant, tmp_path, model_dir, data_file, capsys,
                                               no_training, no_model_load):
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {model_dir}\ndata: {data_file}\n{typo}: 2\n")
    msg = train_error(capsys, tmp_path / "out", str(config))
    assert f"unknown key '{typo.replace('-', '_')}' in {config}" in msg
    if meant:
        assert f"did you mean '{meant}'?" in msg
    assert "Known keys: " in msg and "lr" in msg.split("Known keys: ")[1].split(", ")


@pytest.mark.parametrize("line", ['packing: "no"', 'max_length: "512"', "r: true",
                                  'gradient_checkpointing: "yes"', "lr: fast"])
def test_wrongly_typed_yaml_value(line, tmp_path, model_dir, data_file, capsys, no_training, no_model_load):
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {model_dir}\ndata: {data_file}\n{line}\n")
    msg = train_error(capsys, tmp_path / "out", str(config))
    assert line.split(":")[0] in msg


def test_missing_config_file(tmp_path, capsys, no_training, no_model_load):
    msg = train_error(capsys, tmp_path / "out", str(tmp_path / "nope.yaml"))
    assert "nope.yaml" in msg and "does not exist" in msg


def test_model_path_that_does_not_exist(tmp_path, data_file, capsys, no_training):
    missing = tmp_path / "no-such-model"
    msg = train_error(capsys, tmp_path / "out", "--model", str(missing), "--data", str(data_file))
    assert "does not exist" in msg and str(missing) in msg


def test_unknown_model_name(tmp_path, data_file, capsys, no_training):
    msg = train_error(capsys, tmp_path / "out", "--model", "smollm3", "--data", str(data_file))
    assert "unknown model 'smollm3'" in msg and "smollm2-135m" in msg


def test_missing_data_file_and_no_data(tmp_path, model_dir, capsys, no_training, no_model_load):
    msg = train_error(capsys, tmp_path / "out", "--model", str(model_dir), "--data", str(tmp_path / "x.jsonl"))
    assert "x.jsonl" in msg and "does not exist" in msg
    msg = train_error(capsys, tmp_path / "out", "--model", str(model_dir))
    assert "no training data" in msg and "--data" in msg


def test_bad_option_values(tmp_path, model_dir, data_file, capsys, no_training, no_model_load):
    base = ["--model", str(model_dir), "--data", str(data_file)]
    assert "--method lorra" in train_error(capsys, tmp_path / "out", *base, "--method", "lorra")
    assert "--max-steps 0" in train_error(capsys, tmp_path / "out", *base, "--max-steps", "0")
    assert "--lr -1.0" in train_error(capsys, tmp_path / "out", *base, "--lr", "-1")


@pytest.mark.parametrize("method, args", [
    ("ia3", []), ("child-tuning", ["--method-arg", "mode=D", "--method-arg", "fisher_batches=2"]),
    ("prompt-tuning", ["--method-arg", "num_virtual_tokens=4"]), ("adapter", ["--method-arg", "placement=pfeiffer"]),
])
def test_train_with_other_methods(method, args, model_dir, data_file, tmp_path):
    """`graft train --method NAME` trains and saves every method; the saved adapter loads back."""
    out = tmp_path / "out"
    with contextlib.redirect_stdout(io.StringIO()):
        rc = main(["train", "--model", str(model_dir), "--data", str(data_file), "--max-steps", "2",
                   "--batch-size", "2", "--lr", "1e-2", "--method", method, *args, "--out", str(out)])
    assert rc == 0
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    expected = {"ia3": "IA3", "child-tuning": "CHILD_TUNING", "prompt-tuning": "PROMPT_TUNING"}.get(method)
    assert expected is None or config["peft_type"] == expected
    model = LlamaForCausalLM.from_pretrained(model_dir)
    graft.load(model, out / "adapter")  # loads without missing or unexpected tensors


def test_method_settings_are_checked_before_loading(tmp_path, model_dir, data_file, capsys, no_training,
                                                    no_model_load):
    base = ["--model", str(model_dir), "--data", str(data_file)]
    msg = train_error(capsys, tmp_path / "out", *base, "--method", "child-tuning", "--method-arg", "mode=X")
    assert "mode='X' is not one of" in msg
    msg = train_error(capsys, tmp_path / "out", *base, "--method", "child-tuning", "--method-arg", "rank=4")
    assert "no setting(s) ['rank']" in msg and "fisher_batches" in msg
    msg = train_error(capsys, tmp_path / "out", *base, "--method", "ia3", "--method-arg", "oops")
    assert "KEY=VALUE" in msg
    assert "did you mean 'bitfit'" in train_error(capsys, tmp_path / "out", *base, "--method", "bitfi")
