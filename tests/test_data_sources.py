"""graft.data.load: parquet, ``datasets`` directories, hub data sets (offline), ShareGPT and OpenAI
conversations, and ``{format field: column}`` mappings from the CLI and YAML."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from huggingface_hub import constants
from transformers import AutoTokenizer

import graft.recipe
from graft import data, models
from graft.cli import main
from graft.data import DataError

ROWS = [{"question": f"What is {i} + {i}?", "answer": str(2 * i), "id": i} for i in range(5)]
SHAREGPT = [
    {"system": "Be brief.", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"},
                                              {"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]},
    {"conversations": [{"from": "user", "value": "Name a colour."}, {"from": "assistant", "value": "Red."}]},
]
MESSAGES = [  # graft's own chat layout, for comparison
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"}]},
    {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red."}]},
]


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(models.resolve("smollm2-135m"), local_files_only=True)


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """Arrow files datasets builds go to a temp dir, never the user's cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rows_of(records) -> list[dict]:
    return [r.data for r in records]


def test_parquet(tmp_path):
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    records = data.load(path)
    assert rows_of(records) == ROWS and records[2].where == f"{path}[2]"
    with pytest.raises(DataError, match="split applies to data set directories and hub data sets"):
        data.load(path, split="test")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="bad.parquet: not a readable parquet file"):
        data.load(tmp_path / "bad.parquet")


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "one"))
    assert rows_of(data.load(tmp_path / "one")) == ROWS
    both = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:3]),
                                 "validation": datasets.Dataset.from_list(ROWS[3:])})
    both.save_to_disk(str(tmp_path / "dict"))
    assert rows_of(data.load(tmp_path / "dict")) == ROWS[:3]  # train by default
    assert rows_of(data.load(tmp_path / "dict", split="validation")) == ROWS[3:]
    assert rows_of(data.load(tmp_path / "dict", prefer=("validation", "test"))) == ROWS[3:]
    with pytest.raises(DataError, match="no split 'test'.*--data-split.*train, validation"):
        data.load(tmp_path / "dict", split="test")


def test_load_dataset_directory_of_data_files(tmp_path):
    folder = tmp_path / "qa"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", ROWS[:4])
    write_jsonl(folder / "test.jsonl", ROWS[4:])
    assert rows_of(data.load(folder)) == ROWS[:4]
    assert rows_of(data.load(folder, split="test")) == ROWS[4:]
    with pytest.raises(DataError, match="config applies to hub data sets, not to a directory"):
        data.load(folder, config="main")


def lay_out_dataset(cache: Path, repo_id: str) -> None:
    """A data set repository in the Hugging Face hub cache, as `huggingface-cli download` leaves it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"datasets--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit / "data"
    snapshot.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(ROWS[:3]), snapshot / "train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(ROWS[3:]), snapshot / "test-00000-of-00001.parquet")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_hub_data_set_offline_from_the_hub_cache_or_a_clear_message(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    lay_out_dataset(cache, "tiny-org/qa")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    assert rows_of(data.load("tiny-org/qa")) == ROWS[:3]
    assert rows_of(data.load("tiny-org/qa", split="test")) == ROWS[3:]
    with pytest.raises(DataError) as info:
        data.load("tiny-org/missing")
    message = str(info.value)
    assert "dataset 'tiny-org/missing' is not in the Hugging Face cache" in message and "HF_HUB_OFFLINE" in message
    assert "huggingface-cli download tiny-org/missing --repo-type dataset" in message
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load(tmp_path / "missing.jsonl")  # a path, never a hub name


def test_sharegpt_becomes_messages(tmp_path, tok):
    (tmp_path / "s.json").write_text(json.dumps(SHAREGPT))
    for path in (write_jsonl(tmp_path / "s.jsonl", SHAREGPT), tmp_path / "s.json"):
        records = data.load(path)
        assert [r.data["messages"] for r in records] == [m["messages"] for m in MESSAGES]
        assert "conversations" not in records[0].data and records[1].where.startswith(str(path))
    ours = data.tokenize(data.load(tmp_path / "s.jsonl"), tok, max_length=256)
    reference = data.tokenize(MESSAGES, tok, max_length=256)
    assert [e.input_ids for e in ours] == [e.input_ids for e in reference]
    assert [e.labels for e in ours] == [e.labels for e in reference]


def test_sharegpt_in_parquet_and_unknown_speaker(tmp_path):
    pq.write_table(pa.Table.from_pylist(SHAREGPT[1:]), tmp_path / "s.parquet")
    assert data.load(tmp_path / "s.parquet")[0].data["messages"] == MESSAGES[1]["messages"]
    bad = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "robot", "value": "Beep"}]}]
    with pytest.raises(DataError, match=r"bad.jsonl line 1: conversations\[1\] has speaker 'from': 'robot'"):
        data.load(write_jsonl(tmp_path / "bad.jsonl", bad))


def test_openai_messages_with_content_parts(tmp_path, tok):
    rows = [{"messages": [{"role": "user", "content": [{"type": "text", "text": "Name "},
                                                        {"type": "text", "text": "a colour."}]},
                          {"role": "assistant", "content": "Red."}]}]
    records = data.load(write_jsonl(tmp_path / "m.jsonl", rows))
    assert records[0].data["messages"] == MESSAGES[1]["messages"]
    ours = data.tokenize(records, tok, max_length=128)[0]
    assert ours.input_ids == data.tokenize(MESSAGES[1:], tok, max_length=128)[0].input_ids
    image = [{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                           {"role": "assistant", "content": "A cat."}]}]
    with pytest.raises(DataError, match="content part of type 'image_url'"):
        data.load(write_jsonl(tmp_path / "i.jsonl", image))


def test_field_mapping_and_its_errors(tmp_path, tok):
    path = write_jsonl(tmp_path / "qa.jsonl", ROWS)
    fields = {"instruction": "question", "output": "answer"}
    records = data.load(path, fields=fields)
    example = data.tokenize(records, tok, fields=fields, max_length=128)[0]
    plain = data.tokenize([{"instruction": ROWS[0]["question"], "output": ROWS[0]["answer"]}], tok, max_length=128)[0]
    assert example.input_ids == plain.input_ids and example.labels == plain.labels
    with pytest.raises(DataError, match="instruction=prompt names a column the data does not have; its columns "
                                        "are: question, answer, id"):
        data.load(path, fields={"instruction": "prompt", "output": "answer"})
    with pytest.raises(DataError, match="must look like FORMAT_FIELD=COLUMN"):
        data.sources.parse_fields(["instruction"])
    # A ShareGPT column under another name, mapped to `messages`, is converted in place.
    renamed = [{"dialog": r["conversations"]} for r in SHAREGPT[1:]]
    records = data.load(write_jsonl(tmp_path / "d.jsonl", renamed), fields={"messages": "dialog"})
    assert records[0].data["dialog"] == MESSAGES[1]["messages"]


@pytest.fixture
def captured(monkeypatch):
    """graft train's options as recipe.run receives them, without loading or training anything."""
    seen = {}

    def fake_run(job, config, resume=False):
        seen["job"] = job
        raise SystemExit(0)

    monkeypatch.setattr(graft.recipe, "run", fake_run)
    return seen


def test_cli_and_yaml_field_mappings(tmp_path, captured):
    path = write_jsonl(tmp_path / "qa.jsonl", ROWS)
    config = tmp_path / "c.yaml"
    config.write_text(f"data: {path}\nfields: {{instruction: question, output: answer}}\ndata_split: train\n")
    with pytest.raises(SystemExit):
        main(["train", str(config), "--field", "output=id", "--revision", "v1", "--data-config", "main"])
    job = captured["job"]
    assert job.fields == {"instruction": "question", "output": "id"}  # the flag overrides the YAML key
    assert (job.data_split, job.data_config, job.revision) == ("train", "main", "v1")


def test_cli_bad_mapping_names_the_columns(tmp_path, capsys):
    path = write_jsonl(tmp_path / "qa.jsonl", ROWS)
    rc = main(["train", "--data", str(path), "--field", "instruction=prompt", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "instruction=prompt" in err and "its columns are: question, answer, id" in err
    assert not (tmp_path / "o").exists()
    rc = main(["train", "--data", str(path), "--field", "instruction", "--out", str(tmp_path / "o")])
    assert rc == 2 and "FORMAT_FIELD=COLUMN" in capsys.readouterr().err
