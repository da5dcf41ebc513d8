"""Every user error through ``graft.cli.main``: exit status 2, one message in the user's own words (flags on
the command line, keys in a YAML file), no traceback, and nothing written to the output directory.

Also: other tools' YAML key names, `graft merge` of an adapter that cannot be merged, a closed pipe
after `graft inspect --json`, an adapter of another architecture, and bitsandbytes' kernel-hub notice.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_dirs import ALPACA, LABELLED, decoder_dir, encoder_dir, write_jsonl

import graft.recipe
from graft.cli import main
from graft.options import ALIASES, OptionError, apply_aliases, cli_renderer

# Option keys as Python spells them: none may appear as `key=` in a command-line message.
KEYS = sorted(graft.recipe.JOB_KEYS | graft.recipe.TRAIN_KEYS | {"resume", "on_overflow", "fields"})
PYTHON_KEYWORD = re.compile(r"(?<![\w-])(" + "|".join(KEYS) + r")=")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny matmuls gain nothing from threads


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-errors")
    long_rows = [{"instruction": "Count.", "output": " ".join(map(str, range(100)))}]
    return {
        "llama": decoder_dir(root / "llama"), "bert": encoder_dir(root / "bert"),
        "alpaca": write_jsonl(root / "train.jsonl", ALPACA), "labels": write_jsonl(root / "labels.jsonl", LABELLED),
        "long": write_jsonl(root / "long.jsonl", long_rows), "root": root,
    }


def run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def yaml_file(root: Path | str, name: str, text: str) -> str:
    path = Path(root) / name
    path.write_text(text)
    return str(path)


# (id, argv after `graft train` given the files, words the message must hold)
LORA = ["--r", "4", "--targets", "q_proj,v_proj", "--max-steps", "1"]
CASES = [
    ("resume-without-checkpoint", lambda f: ["--model", f["llama"], "--data", f["alpaca"], *LORA, "--resume"],
     ["--resume", "no checkpoint", "checkpoint-<step>"]),
    ("eval-every-without-eval-data", lambda f: ["--model", f["llama"], "--data", f["alpaca"], "--eval-every", "1"],
     ["--eval-every 1", "--eval-data", "--eval-split"]),
    ("rank-for-ia3", lambda f: ["--model", f["llama"], "--data", f["alpaca"], "--method", "ia3", "--r", "4"],
     ["--method ia3", "has no rank", "--r 4", "does not apply", "feedforward"]),
    ("rank-for-adalora", lambda f: ["--model", f["llama"], "--data", f["alpaca"], "--method", "adalora", "--r", "4"],
     ["--method adalora", "has no rank", "init_r"]),
    ("alpha-for-adapter", lambda f: ["--model", f["llama"], "--data", f["alpaca"], "--method", "adapter",
                                     "--alpha", "8"], ["--method adapter", "has no alpha", "--alpha 8"]),
    ("targets-for-prompt", lambda f: ["--model", f["llama"], "--data", f["alpaca"], "--method", "prompt-tuning",
                                      "--method-arg", "num_virtual_tokens=4", "--targets", "q_proj"],
     ["chooses its own modules", "--targets q_proj"]),
    ("dropout-for-full", lambda f: ["--model", f["llama"], "--data", f["alpaca"], "--method", "full",
                                    "--dropout", "0.1"], ["--method full", "trains every weight", "--dropout"]),
    ("prompt-tuning-without-settings", lambda f: ["--model", f["llama"], "--data", f["alpaca"], "--method",
                                                  "prompt-tuning"],
     ["--method prompt-tuning needs --method-arg num_virtual_tokens", "--method-arg num_virtual_tokens=20"]),
    ("prefix-with-checkpointing", lambda f: ["--model", f["llama"], "--data", f["alpaca"], "--method",
                                             "prefix-tuning", "--method-arg", "num_virtual_tokens=2",
                                             "--gradient-checkpointing"],
     ["--method prefix-tuning", "--gradient-checkpointing", "past_key_values"]),
    ("qlora-with-int8", lambda f: ["--model", f["llama"], "--data", f["alpaca"], "--method", "qlora", "--quantize",
                                   "int8"], ["--method qlora", "4-bit", "--quantize int8", "--method lora"]),
    ("labelled-rows-on-a-decoder", lambda f: ["--model", f["llama"], "--data", f["labels"], *LORA],
     ["labelled rows", "--task classification"]),
    ("encoder-as-causal-lm", lambda f: ["--model", f["bert"], "--data", f["alpaca"], "--targets", "query"],
     ["encoder without a language-model head", "--task classification"]),
    ("bad-on-overflow", lambda f: ["--model", f["llama"], "--data", f["alpaca"], "--on-overflow", "drop"],
     ["--on-overflow drop", "error, skip, truncate"]),
    ("response-too-long", lambda f: ["--model", f["llama"], "--data", f["long"], "--max-length", "16", *LORA],
     ["--max-length 16", "--on-overflow skip", "--on-overflow truncate"]),
    ("zero-threads", lambda f: ["--model", f["llama"], "--data", f["alpaca"], "--threads", "0"], ["--threads 0"]),
    ("resume-and-overwrite", lambda f: ["--model", f["llama"], "--data", f["alpaca"], "--resume", "--overwrite"],
     ["--resume", "--overwrite", "give one"]),
    ("targets-typo", lambda f: ["--model", f["llama"], "--data", f["alpaca"], "--targets", "q_prj,v_proj"],
     ["--targets q_prj matches no module", "Did you mean ['q_proj'"]),
    ("unsupported-quantize", lambda f: ["--model", f["llama"], "--data", f["alpaca"], "--quantize", "int4"],
     ["--quantize int4 is not supported", "no --quantize"]),
    ("template-without-fields", lambda f: ["--model", f["llama"], "--data", f["alpaca"], "--template", "llama3"],
     ["--template llama3 names no {field}", "--chat-template"]),
    ("bad-lr", lambda f: ["--model", f["llama"], "--data", f["alpaca"], "--lr", "0"], ["--lr 0", "> 0"]),
    ("yaml-value-named-as-yaml", lambda f: [yaml_file(f["root"], "typed.yaml", 'max_length: "512"\n'),
                                            "--model", f["llama"], "--data", f["alpaca"]],
     ['max_length: "512"', "must be an int"]),
    ("yaml-alias-conflict", lambda f: [yaml_file(f["root"], "twice.yaml", "lr: 2e-4\nlearning_rate: 1e-3\n"),
                                       "--model", f["llama"], "--data", f["alpaca"]],
     ["lr twice", "'learning_rate'", "keep one"]),
    ("yaml-alias-typo", lambda f: [yaml_file(f["root"], "typo.yaml", "learning_rat: 1e-3\n"),
                                   "--model", f["llama"], "--data", f["alpaca"]],
     ["unknown key 'learning_rat'", "did you mean 'lr'?"]),
    ("yaml-lora-rank-typo", lambda f: [yaml_file(f["root"], "rank.yaml", "lora_rnk: 8\n"),
                                       "--model", f["llama"], "--data", f["alpaca"]],
     ["unknown key 'lora_rnk'", "did you mean 'r'?"]),
]


@pytest.mark.parametrize(("argv", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_train_user_errors(argv, words, files, tmp_path):
    out = tmp_path / "out"
    args = argv({k: str(v) for k, v in files.items()})
    rc, stdout, stderr = run(["train", *args, "--out", str(out), *([] if "--threads" in args else ["--threads", "1"])])
    assert rc == 2, stderr
    assert "Traceback" not in stderr and "done:" not in stdout
    lines = [line for line in stderr.splitlines() if line.startswith("graft train: error: ")]
    assert len(lines) == 1, stderr
    msg = lines[0]
    for word in words:
        assert word in msg, msg
    assert not PYTHON_KEYWORD.search(msg), msg  # --resume, not resume=True
    assert not out.exists() or not any(out.iterdir())  # nothing written


def test_finished_run_without_overwrite_writes_nothing(files, tmp_path):
    out = tmp_path / "out"
    base = ["train", "--model", str(files["llama"]), "--data", str(files["alpaca"]), *LORA, "--out", str(out),
            "--threads", "1"]
    assert run(base)[0] == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    rc, _, err = run(base)
    assert rc == 2 and "already holds a finished run" in err and "--overwrite" in err and "--resume" not in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_merge_of_an_adapter_that_cannot_be_merged(files, tmp_path):
    out = tmp_path / "run"
    assert run(["train", "--model", str(files["llama"]), "--data", str(files["alpaca"]), "--method",
                "prompt-tuning", "--method-arg", "num_virtual_tokens=2", "--max-steps", "1", "--out", str(out),
                "--threads", "1"])[0] == 0
    rc, _, err = run(["merge", "--model", str(files["llama"]), "--adapter", str(out / "adapter"),
                      "--out", str(out / "merged")])
    assert rc == 2 and "Traceback" not in err
    assert "PromptTuning adapter" in err and "cannot be merged" in err and "--adapter" in err
    assert not (out / "merged").exists()


def test_adapter_of_another_architecture_names_its_base(files, tmp_path):
    out = tmp_path / "run"
    assert run(["train", "--model", str(files["llama"]), "--data", str(files["alpaca"]), *LORA, "--out", str(out),
                "--threads", "1"])[0] == 0
    rc, _, err = run(["generate", "--model", str(files["bert"]), "--adapter", str(out / "adapter"),
                      "--prompt", "hi", "--max-new-tokens", "1"])
    assert rc == 2 and "Traceback" not in err
    msg = next(line for line in err.splitlines() if line.startswith("graft generate: error: "))
    assert f"trained on {files['llama']}" in msg and "another architecture" in msg
    assert "self_attn.q_proj" in msg and "all-linear" not in msg


def test_broken_pipe_is_quiet(files, tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert run(["train", "--model", str(files["llama"]), "--data", str(files["alpaca"]), *LORA, "--out", str(out),
                "--threads", "1"])[0] == 0

    class ClosedPipe(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    err = io.StringIO()
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    with contextlib.redirect_stderr(err):
        rc = main(["inspect", str(out / "adapter"), "--json"])
    monkeypatch.undo()
    assert rc == 141 and err.getvalue() == ""
    # And in a real pipe whose reader is gone before graft writes (`| true`): nothing on stderr.
    proc = subprocess.run(f"'{sys.executable}' -m graft inspect '{out / 'adapter'}' --json | true",
                          shell=True, capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "PYTHONPATH": str(Path(graft.recipe.__file__).parents[1])})
    assert proc.stderr == ""


# --------------------------------------------------------------------------------------------
# Other tools' key names


def test_hugging_face_and_llama_factory_keys_are_read_as_graft_keys(files, caplog):
    text = ("model_name_or_path: m\ndataset: d.jsonl\nlearning_rate: 1e-4\nnum_train_epochs: 3.0\n"
            "per_device_train_batch_size: 4\ngradient_accumulation_steps: 2\nlora_rank: 8\nlora_alpha: 16\n"
            "lora_dropout: 0.05\nlora_target: all\nmax_steps: 10\nwarmup_ratio: 0.1\noutput_dir: runs/x\n"
            "cutoff_len: 256\nseed: 3\nbf16: true\nlr_scheduler_type: constant_with_warmup\n")
    path = yaml_file(files["root"], "hf.yaml", text)
    with caplog.at_level(logging.WARNING, logger="graft"):
        options = graft.recipe.read_yaml(path)
    assert options == {"model": "m", "data": "d.jsonl", "lr": 1e-4, "epochs": 3, "batch_size": 4, "grad_accum": 2,
                       "r": 8, "alpha": 16, "dropout": 0.05, "targets": "all-linear", "max_steps": 10,
                       "warmup_ratio": 0.1, "out_dir": "runs/x", "max_length": 256, "seed": 3, "autocast": "bf16",
                       "schedule": "constant"}
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 1 and "learning_rate -> lr: 1e-4" in notes[0] and "bf16 -> autocast: bf16" in notes[0]
    job, config = graft.recipe.split_options(options, path)
    assert (job.r, job.alpha, job.targets, config.epochs, config.autocast) == (8, 16, "all-linear", 3, "bf16")


def test_every_alias_maps_to_a_graft_key():
    known = graft.recipe.JOB_KEYS | graft.recipe.TRAIN_KEYS
    assert {key for key, _ in ALIASES.values()} <= known
    assert apply_aliases({"lora_r": 8, "r": 8})[0] == {"r": 8}  # the same value twice is fine
    with pytest.raises(ValueError, match="gives r twice, as 'lora_r' and as 'lora_rank'"):
        apply_aliases({"lora_r": 8, "lora_rank": 16})


def test_method_qlora_is_lora_on_nf4(caplog):
    pytest.importorskip("bitsandbytes")
    with caplog.at_level(logging.WARNING, logger="graft"):
        job, _ = graft.recipe.split_options({"method": "qlora", "data": "d.jsonl"})
    assert (job.method, job.quantize) == ("lora", "nf4")
    assert "method: qlora -> method: lora with quantize: nf4" in caplog.text


# --------------------------------------------------------------------------------------------
# Rendering


def test_an_option_error_speaks_python_or_cli():
    e = OptionError("{resume} needs {out_dir}; {quantize} given, {packing} too, see {method_arg_num_virtual_tokens}",
                    resume=True, out_dir=None, quantize="nf4", packing=False, method_arg_num_virtual_tokens=20)
    assert str(e) == ("resume=True needs out_dir=None; quantize='nf4' given, packing=False too, "
                      "see num_virtual_tokens=20")
    cli = cli_renderer({"resume": "--resume", "out_dir": "--out", "quantize": "--quantize", "packing": "--packing"},
                       switches=["packing"])
    assert e.render(cli) == ("--resume needs no --out; --quantize nf4 given, --no-packing too, "
                             "see --method-arg num_virtual_tokens=20")
    assert e.render(cli_renderer({}, yaml_keys=["quantize"])).startswith("resume: true needs out_dir: null")
    # Each verb renders with its own flags; one without a YAML config names the rest the Python way.
    from graft.cli import _parser, cli_option

    parser = _parser()
    args = parser.parse_args(["eval", "--model", "m", "--data", "d", "--task", "math"])
    e = OptionError("{chat_template} with {template}, {max_length}", chat_template=True, template="x", max_length=3)
    assert e.render(cli_option(parser, args)) == "--chat-template with --template x, max_length=3"


def test_bitsandbytes_kernel_hub_notice_is_filtered_and_nothing_else():
    import graft.quant  # noqa: F401 (installs the filter)

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    notice = logger.makeRecord(logger.name, logging.WARNING, "ops.py", 1,
                               "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...",
                               ("no network",), None)
    other = logger.makeRecord(logger.name, logging.WARNING, "ops.py", 1, "something else", (), None)
    assert not logger.filter(notice) and logger.filter(other)


def test_axolotl_keys_read_as_grafts():
    options, notes = apply_aliases({"base_model": "m", "adapter": "qlora", "lora_target_modules": ["q_proj"],
                                    "sequence_len": 1024, "micro_batch_size": 2})
    assert options == {"model": "m", "method": "qlora", "targets": ["q_proj"], "max_length": 1024, "batch_size": 2}
    assert notes
