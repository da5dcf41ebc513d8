"""One prompt format from training to inference: graft_format.json is written by `graft train` and
read by generate, eval, serve and inspect, which render a query exactly as training rendered a row's prompt."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from tiny_dirs import decoder_dir
from transformers import AutoTokenizer, LlamaForCausalLM

import graft
import graft.models
from graft import data
from graft.cli import _parser, generation_prompts, main
from graft.data import promptformat
from graft.data.promptformat import PromptFormat
from graft.data.templates import ALPACA_PROMPT_NO_INPUT

ROWS = [{"instruction": f"Add {i} and {i}.", "input": "", "output": f"{2 * i}"} for i in range(6)]


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(graft.models.resolve("smollm2-135m"), local_files_only=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return decoder_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def train(model_dir: Path, data_file: Path, out: Path, *extra: str) -> Path:
    rc, _, err = run("train", "--model", str(model_dir), "--data", str(data_file), "--max-steps", "2",
                     "--batch-size", "2", "--r", "2", "--targets", "q_proj,v_proj", "--lr", "1e-2",
                     "--dtype", "fp32", "--out", str(out), *extra)
    assert rc == 0, err
    return out / "adapter"


@pytest.fixture(scope="module")
def alpaca(model_dir, data_file, tmp_path_factory) -> Path:
    """An adapter trained on alpaca rows without the chat template (the default)."""
    return train(model_dir, data_file, tmp_path_factory.mktemp("run") / "alpaca")


@pytest.fixture(scope="module")
def chat(model_dir, data_file, tmp_path_factory) -> Path:
    """The same rows rendered through SmolLM2's chat template."""
    return train(model_dir, data_file, tmp_path_factory.mktemp("run") / "chat", "--chat-template")


def training_prompts(tok, chat_template: bool) -> list[list[int]]:
    """The prompt part (labels -100, before the response) of every training example, as training built it."""
    examples = data.tokenize(ROWS, tok, format="alpaca", chat_template=chat_template, max_length=512)
    return [e.input_ids[: next(i for i, label in enumerate(e.labels) if label != data.IGNORE_INDEX)]
            for e in examples]


def generate_args(model_dir: Path, adapter: Path, *extra: str):
    prompts = [a for r in ROWS for a in ("--prompt", r["instruction"])]
    return _parser().parse_args(["generate", "--model", str(model_dir), "--adapter", str(adapter), *prompts, *extra])


# --------------------------------------------------------------------------------------------
# the file


def test_train_writes_the_format_beside_the_adapter(alpaca, chat, tok):
    saved = json.loads((alpaca / promptformat.FILENAME).read_text())
    assert saved == {
        "format": "alpaca", "chat_template": False, "template": None, "response_template": None, "fields": None,
        "system": None, "chat_template_text": None, "bos": None, "eos": tok.eos_token, "train_on_prompt": False,
        "max_length": 512, "version": 1,
    }
    with_chat = promptformat.read(chat)
    assert with_chat.chat and with_chat.chat_template_text == tok.chat_template
    assert not list(alpaca.parent.glob(".*tmp*"))  # written atomically: no temporary left


def test_peft_still_loads_the_directory(alpaca, model_dir):
    peft = pytest.importorskip("peft")
    base = LlamaForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(base, alpaca)(ids).logits
    ours_model = LlamaForCausalLM.from_pretrained(model_dir).eval()
    graft.load(ours_model, alpaca)
    with torch.no_grad():
        ours = ours_model(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------
# generate renders exactly the training prompt


@pytest.mark.parametrize("which", ["alpaca", "chat"])
def test_generate_prompts_are_the_training_prompts(which, request, model_dir, tok):
    adapter = request.getfixturevalue(which)
    ids = generation_prompts(generate_args(model_dir, adapter), tok)
    assert ids == training_prompts(tok, chat_template=which == "chat")
    if which == "alpaca":
        assert tok.decode(ids[0]) == ALPACA_PROMPT_NO_INPUT.format(instruction=ROWS[0]["instruction"])


def test_an_override_wins_with_one_warning(alpaca, model_dir, tok, capsys):
    ids = generation_prompts(generate_args(model_dir, alpaca, "--chat-template"), tok)
    assert ids == training_prompts(tok, chat_template=True)  # the alpaca user message through the chat template
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "trained without the chat template" in err
    # agreeing with the saved format is no override: no warning
    assert generation_prompts(generate_args(model_dir, alpaca, "--no-chat-template"), tok) == training_prompts(tok, False)
    assert "warning" not in capsys.readouterr().err
    raw = generation_prompts(generate_args(model_dir, alpaca, "--template", "{q}"), tok)
    assert raw[0] == tok(ROWS[0]["instruction"], add_special_tokens=False)["input_ids"]
    assert "--template '{q}' overrides" in capsys.readouterr().err


def test_without_a_saved_format_generate_keeps_its_defaults(model_dir, tok, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    args = _parser().parse_args(["generate", "--model", str(model_dir), "--prompt", "Hi"])
    expected = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert tok.decode(generation_prompts(args, tok)[0]) == expected
    args = _parser().parse_args(["generate", "--model", str(model_dir), "--prompt", "Hi", "--no-chat-template"])
    assert generation_prompts(args, tok)[0] == tok("Hi")["input_ids"]


def test_generate_runs_end_to_end(alpaca, model_dir):
    rc, _, err = run("generate", "--model", str(model_dir), "--adapter", str(alpaca), "--prompt", "Add 1 and 1.",
                       "--max-new-tokens", "3", "--dtype", "fp32")
    assert rc == 0, err
    assert "warning" not in err


# --------------------------------------------------------------------------------------------
# eval


@pytest.mark.parametrize("which", ["alpaca", "chat"])
def test_eval_prompts_are_the_training_prompts(which, request, model_dir, data_file, tok, tmp_path):
    adapter = request.getfixturevalue(which)
    rc, _, err = run("eval", "--model", str(model_dir), "--adapter", str(adapter), "--data", str(data_file),
                     "--task", "exact", "--max-new-tokens", "2", "--dtype", "fp32", "--out", str(tmp_path))
    assert rc == 0, err
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    expected = training_prompts(tok, chat_template=which == "chat")
    assert [tok(r["prompt"], add_special_tokens=False)["input_ids"] for r in rows] == expected
    assert [r["prompt_tokens"] for r in rows] == [len(e) for e in expected]
    assert json.loads((tmp_path / "summary.json").read_text())["chat"] is (which == "chat")


def test_eval_without_an_adapter_keeps_the_chat_default(model_dir, data_file, tmp_path):
    rc, _, err = run("eval", "--model", str(model_dir), "--data", str(data_file), "--task", "exact",
                     "--max-new-tokens", "1", "--limit", "1", "--dtype", "fp32", "--out", str(tmp_path))
    assert rc == 0, err
    assert json.loads((tmp_path / "summary.json").read_text())["chat"] is True


# --------------------------------------------------------------------------------------------
# inspect and serve


def test_inspect_shows_the_format(alpaca, capsys):
    assert main(["inspect", str(alpaca)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("prompt_format"))
    assert "alpaca, no chat template" in line
    assert main(["inspect", str(alpaca), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["prompt_format"]["format"] == "alpaca"


def test_serve_renders_chat_requests_in_the_adapters_format(alpaca, chat, model_dir, tok):
    from fastapi.testclient import TestClient

    from graft.serve import build

    model = LlamaForCausalLM.from_pretrained(model_dir).eval()
    app, engine = build(model, tokenizer=tok, adapters={"alpaca": alpaca, "chat": chat}, served_name="base")
    try:
        client = TestClient(app)

        def prompt_tokens(model_name, messages):
            r = client.post("/v1/chat/completions", json={"model": model_name, "messages": messages, "max_tokens": 1})
            return r.status_code, r.json()

        question = [{"role": "user", "content": ROWS[0]["instruction"]}]
        trained = training_prompts(tok, chat_template=False)[0], training_prompts(tok, chat_template=True)[0]
        for name, expected in (("alpaca", trained[0]), ("chat", trained[1])):
            status, body = prompt_tokens(name, question)
            assert status == 200, body
            assert body["usage"]["prompt_tokens"] == len(expected)
        status, body = prompt_tokens("alpaca", [{"role": "system", "content": "Be brief."}, *question])
        assert status == 400 and "trained without a chat template" in body["error"]["message"]
        # completions stay raw text, by OpenAI's semantics
        r = client.post("/v1/completions", json={"model": "alpaca", "prompt": "Add", "max_tokens": 1})
        assert r.json()["usage"]["prompt_tokens"] == len(tok("Add")["input_ids"])
    finally:
        engine.shutdown()


# --------------------------------------------------------------------------------------------
# the format itself


def test_a_format_renders_every_kind_of_query(tok):
    completion = PromptFormat(format="completion", chat_template=False, template="Q: {question}\nA:")
    assert completion.prompt_text(tok, "2+2?") == "Q: 2+2?\nA:"
    assert PromptFormat(format="cot", chat_template=False).prompt_text(tok, "2+2?") == "Q: 2+2?\nA:"
    assert PromptFormat(format="text", chat_template=False).prompt_text(tok, "Once") == "Once"
    with_system = PromptFormat(format="chat", chat_template=True, system="Be brief.")
    assert with_system.prompt_text(tok, "Hi") == tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], tokenize=False,
        add_generation_prompt=True)
    with pytest.raises(ValueError, match="one prompt fills only one"):
        PromptFormat(format="completion", chat_template=False, template="{a} {b}").fill("x")
    with pytest.raises(ValueError, match="format='nope'"):
        PromptFormat(format="nope", chat_template=False)
    with pytest.raises(ValueError, match="unknown key"):
        PromptFormat.from_json({"format": "alpaca", "chat_template": False, "colour": "red"})


def test_a_different_tokenizer_is_noticed(tok):
    fmt = PromptFormat(format="alpaca", chat_template=False, eos="</s>")
    assert promptformat.check_tokenizer(fmt, tok) == [
        f"training ended responses with '</s>'; this tokenizer's EOS is {tok.eos_token!r}"]


def test_a_fully_tuned_model_carries_its_format_too(model_dir, data_file, tmp_path, tok):
    rc, _, err = run("train", "--model", str(model_dir), "--data", str(data_file), "--method", "full",
                     "--max-steps", "1", "--batch-size", "2", "--dtype", "fp32", "--out", str(tmp_path))
    assert rc == 0, err
    assert promptformat.read(tmp_path / "model").format == "alpaca"
    args = _parser().parse_args(["generate", "--model", str(tmp_path / "model"), "--prompt", ROWS[0]["instruction"]])
    assert generation_prompts(args, tok) == training_prompts(tok, chat_template=False)[:1]
    rc, _, err = run("eval", "--model", str(tmp_path / "model"), "--data", str(data_file), "--task", "exact",
                     "--limit", "1", "--max-new-tokens", "1", "--dtype", "fp32", "--out", str(tmp_path / "eval"))
    assert rc == 0, err
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["chat"] is False


def test_a_system_message_is_trained_saved_and_reused(model_dir, data_file, tmp_path, tok):
    adapter = train(model_dir, data_file, tmp_path / "run", "--chat-template", "--system", "Answer with a number.")
    assert promptformat.read(adapter).system == "Answer with a number."
    examples = data.tokenize(ROWS, tok, format="alpaca", chat_template=True, system="Answer with a number.")
    trained = [e.input_ids[: next(i for i, label in enumerate(e.labels) if label != data.IGNORE_INDEX)]
               for e in examples]
    assert tok.decode(trained[0]).count("Answer with a number.") == 1
    assert generation_prompts(generate_args(model_dir, adapter), tok) == trained
    rc, _, err = run("eval", "--model", str(model_dir), "--adapter", str(adapter), "--data", str(data_file),
                     "--task", "exact", "--limit", "2", "--max-new-tokens", "1", "--dtype", "fp32",
                     "--out", str(tmp_path / "eval"))
    assert rc == 0, err
    rows = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert [tok(r["prompt"], add_special_tokens=False)["input_ids"] for r in rows] == trained[:2]
    with pytest.raises(data.DataError, match="system is a chat-template message"):
        data.tokenize(ROWS, tok, format="alpaca", system="Answer with a number.")


def test_rows_of_no_known_format_save_no_format():
    from graft.recipe import _detected_format

    pair = data.read([{"prompt": "Q", "chosen": "A", "rejected": "B"}])[0]  # preference rows: another objective's
    assert _detected_format(pair, None) is None
    assert _detected_format(data.read(ROWS)[0], None) == "alpaca"
