"""graft.runtime: the device / precision choice, every branch on fake hardware, and every verb applying it."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from tiny_dirs import decoder_dir

import graft.models
from graft import recipe, runtime
from graft.cli import main, plan_choice
from graft.runtime import Choice, Hardware, resolve

BARE = Hardware()  # a CPU without bf16 units, no GPU
BF16_CPU = Hardware(cpu_bf16=True, cpu_feature="AVX512-BF16")
AMX_CPU = Hardware(cpu_bf16=True, cpu_fp16=True, cpu_feature="AMX")
AMPERE = Hardware(cuda_capabilities=((8, 0), (8, 6)))
VOLTA = Hardware(cuda_capabilities=((7, 0),))


@pytest.mark.parametrize(("device", "dtype", "training", "full", "hw", "expected"), [
    # auto device: CUDA when present, else the CPU
    ("auto", "auto", True, False, AMPERE, Choice("cuda", "bf16", "bf16", "GPU compute capability 8.0 supports bf16")),
    ("auto", "auto", False, False, AMPERE, Choice("cuda", "bf16", None, "GPU compute capability 8.0 supports bf16")),
    ("auto", "auto", True, False, VOLTA, Choice("cuda", "fp16", "fp16", "GPU compute capability 7.0 lacks bf16")),
    ("cuda:1", "auto", False, False, AMPERE, Choice("cuda:1", "bf16", None, "GPU compute capability 8.6 supports bf16")),
    # full fine-tuning keeps fp32 weights; 16 bits by autocast only
    ("cuda", "auto", True, True, AMPERE,
     Choice("cuda", "fp32", "bf16", "GPU compute capability 8.0 supports bf16; full fine-tuning keeps fp32 weights")),
    ("cuda", "fp16", True, False, AMPERE, Choice("cuda", "fp16", "fp16", "asked for")),
    ("cuda", "fp32", True, False, AMPERE, Choice("cuda", "fp32", None, "asked for")),
    # CPUs: bf16 units -> fp32 weights + bf16 autocast in training, fp32 for inference; else fp32
    ("auto", "auto", True, False, BF16_CPU, Choice("cpu", "fp32", "bf16", "CPU has AVX512-BF16")),
    ("auto", "auto", False, False, BF16_CPU,
     Choice("cpu", "fp32", None, "inference on a CPU; --dtype bf16 for bf16 weights")),
    ("cpu", "auto", True, True, AMX_CPU, Choice("cpu", "fp32", "bf16", "CPU has AMX")),
    ("cpu", "auto", True, False, AMPERE, Choice("cpu", "fp32", None, "CPU without bf16 units (AVX512-BF16 / AMX)")),
    ("auto", "auto", True, False, BARE, Choice("cpu", "fp32", None, "CPU without bf16 units (AVX512-BF16 / AMX)")),
    ("cpu", "fp32", True, False, BF16_CPU, Choice("cpu", "fp32", None, "asked for")),
    ("cpu", "fp16", True, False, AMX_CPU, Choice("cpu", "fp32", "fp16", "asked for")),
    # inference may ask for 16-bit weights on any CPU (emulated: said so)
    ("cpu", "bf16", False, False, BARE, Choice("cpu", "bf16", None, "asked for; this CPU emulates bf16")),
    ("cpu", "bfloat16", False, False, BF16_CPU, Choice("cpu", "bf16", None, "asked for")),
])
def test_resolve_every_branch(device, dtype, training, full, hw, expected):
    assert resolve(device, dtype, training=training, full=full, hardware=hw) == expected


@pytest.mark.parametrize(("device", "dtype", "training", "hw", "message"), [
    ("cuda", "auto", False, BARE, "no CUDA device is visible"),
    ("cuda:2", "auto", False, AMPERE, "only 2 CUDA device(s) (cuda:0..cuda:1)"),
    ("cuda", "bf16", True, VOLTA, "does not support bf16"),
    ("cpu", "bf16", True, BARE, "lacks AVX512-BF16 or AMX"),
    ("cpu", "fp16", True, BF16_CPU, "lacks AMX-FP16"),
    ("gpu", "auto", False, BARE, "device='gpu' is not one of auto, cpu, cuda, cuda:N"),
    ("cpu", "int8", False, BARE, "dtype='int8' is not one of auto, fp32, bf16, fp16"),
])
def test_resolve_refuses_what_the_hardware_lacks(device, dtype, training, hw, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        resolve(device, dtype, training=training, hardware=hw)


def test_describe_is_the_start_up_line():
    assert resolve(training=True, hardware=BF16_CPU).describe() == \
        "device cpu, dtype fp32 weights + bf16 autocast (CPU has AVX512-BF16)"
    assert resolve(hardware=BARE).describe() == "device cpu, dtype fp32 (CPU without bf16 units (AVX512-BF16 / AMX))"
    assert resolve(training=True, hardware=AMPERE).describe() == ("device cuda, dtype bf16 weights + bf16 autocast, "
                                                                  "trainable weights fp32 (GPU compute capability 8.0 "
                                                                  "supports bf16)")


def test_detect_reads_this_machine():
    hw = runtime.detect()
    assert len(hw.cuda_capabilities) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert hw.cpu_bf16 == bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    assert bool(hw.cpu_feature) == hw.cpu_bf16


# --------------------------------------------------------------------------------------------
# the old autocast option and dtype, in training


def _precision(hw, monkeypatch, **options):
    monkeypatch.setattr(runtime, "detect", lambda: hw)
    job, config = recipe.split_options({"data": "x.jsonl", **options})
    return recipe.precision(job, config)


def test_training_autocast_follows_the_choice(monkeypatch):
    choice, config = _precision(BF16_CPU, monkeypatch)
    assert (choice.param_dtype, choice.autocast_dtype, config.autocast) == ("fp32", "bf16", "bf16")
    choice, config = _precision(BARE, monkeypatch)
    assert (choice.param_dtype, config.autocast) == ("fp32", None)
    choice, config = _precision(AMPERE, monkeypatch, method="full")
    assert (choice.device, choice.param_dtype, config.autocast) == ("cuda", "fp32", "bf16")


def test_autocast_alone_means_dtype_and_a_contradiction_is_an_error(monkeypatch):
    choice, config = _precision(AMPERE, monkeypatch, autocast="fp16")
    assert (choice.param_dtype, config.autocast) == ("fp16", "fp16")
    choice, config = _precision(AMPERE, monkeypatch, autocast="bf16", dtype="bf16")
    assert config.autocast == "bf16"
    with pytest.raises(ValueError, match="autocast='bf16' contradicts dtype='fp32'"):
        _precision(AMPERE, monkeypatch, autocast="bf16", dtype="fp32")
    with pytest.raises(ValueError, match="device='tpu' is not one of"):
        recipe.Job(data="x.jsonl", device="tpu")


def test_plan_and_train_make_the_same_choice():
    for hw in (BARE, BF16_CPU, AMPERE, VOLTA):
        for dtype in ("auto", "fp32"):
            assert plan_choice("auto", dtype, hw) == resolve("auto", dtype, training=True, hardware=hw)
    # naming cuda on a machine without one plans for a bf16 GPU rather than failing
    assert plan_choice("cuda", "auto", BARE).param_dtype == "bf16"


def test_plan_counts_fp32_weights_under_autocast():
    from graft.plan import plan

    sixteen = plan("smollm2-135m", memory="8GB", dtype="bf16", device="cpu")
    mixed = plan("smollm2-135m", memory="8GB", dtype="bf16", weight_dtype="fp32", device="cpu")
    lora = {r.method: r for r in sixteen.rows}["lora"], {r.method: r for r in mixed.rows}["lora"]
    assert 1.95 < lora[1].weights_bytes / lora[0].weights_bytes < 2.0  # the base doubles; the fp32 adapter not
    assert lora[1].activation_bytes == lora[0].activation_bytes  # bf16 matmuls either way
    assert any("fp32" in n for n in mixed.notes)


# --------------------------------------------------------------------------------------------
# every verb takes --device / --dtype and applies them (on the CPU)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return decoder_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    rows = [{"instruction": f"Add {i} and {i}.", "input": "", "output": f"{2 * i}"} for i in range(4)]
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def adapter(model_dir, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "out"
    assert _run("train", "--model", str(model_dir), "--data", str(data), "--max-steps", "1", "--batch-size", "2",
                "--r", "2", "--device", "cpu", "--dtype", "fp32", "--out", str(out))[0] == 0
    return out / "adapter"


def _run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture
def loaded(monkeypatch):
    """Record the dtype and device of every model graft.models.load gives."""
    seen = []
    real = graft.models.load

    def load(*args, **kwargs):
        model, tok = real(*args, **kwargs)
        seen.append(model)
        return model, tok

    monkeypatch.setattr(graft.models, "load", load)
    return seen


def test_train_says_and_applies_the_choice(model_dir, data, adapter, tmp_path, loaded):
    job = json.loads((adapter.parent / "job.json").read_text())
    assert (job["job"]["device"], job["job"]["dtype"], job["train"]["autocast"]) == ("cpu", "fp32", None)
    rc, _, err = _run("train", "--model", str(model_dir), "--data", str(data), "--max-steps", "1",
                      "--batch-size", "2", "--r", "2", "--device", "cpu", "--dtype", "bf16", "--out", str(tmp_path))
    if runtime.detect().cpu_bf16:
        assert rc == 0, err
        assert "graft: device cpu, dtype fp32 weights + bf16 autocast (asked for)" in err
        assert json.loads((tmp_path / "job.json").read_text())["train"]["autocast"] == "bf16"
        assert loaded[-1].model.embed_tokens.weight.dtype == torch.float32
    else:
        assert rc == 2 and "lacks AVX512-BF16 or AMX" in err


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_generate_loads_in_the_dtype_asked_for(model_dir, adapter, loaded, dtype):
    rc, _, err = _run("generate", "--model", str(model_dir), "--adapter", str(adapter), "--prompt", "Hi",
                        "--max-new-tokens", "2", "--device", "cpu", "--dtype", dtype)
    assert rc == 0, err
    assert f"graft generate: device cpu, dtype {dtype}" in err
    base = loaded[-1]
    assert base.model.embed_tokens.weight.dtype == runtime.DTYPES[dtype]
    assert base.device.type == "cpu"


def test_eval_and_serve_build_take_the_flags(model_dir, adapter, tmp_path, loaded):
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"instruction": "Add 1 and 1.", "input": "", "output": "2"}) + "\n")
    rc, _, err = _run("eval", "--model", str(model_dir), "--adapter", str(adapter), "--data", str(data),
                      "--task", "exact", "--max-new-tokens", "2", "--device", "cpu", "--dtype", "bf16",
                      "--out", str(tmp_path / "eval"))
    assert rc == 0, err
    assert "graft eval: device cpu, dtype bf16" in err
    assert loaded[-1].model.embed_tokens.weight.dtype == torch.bfloat16
    from graft.serve import build

    _, engine = build(str(model_dir), dtype="bf16", device="cpu")
    try:
        assert engine.model.model.embed_tokens.weight.dtype == torch.bfloat16
    finally:
        engine.shutdown()


def test_merge_runs_in_fp32_and_writes_the_dtype_asked_for(model_dir, adapter, tmp_path):
    rc, _, err = _run("merge", "--model", str(model_dir), "--adapter", str(adapter), "--out", str(tmp_path / "m"),
                      "--device", "cpu", "--dtype", "bf16")
    assert rc == 0, err
    assert "graft merge: device cpu, dtype bf16 (merged in fp32)" in err
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"


def test_a_missing_gpu_is_one_clean_error(model_dir, adapter):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    rc, _, err = _run("generate", "--model", str(model_dir), "--prompt", "Hi", "--device", "cuda")
    assert rc == 2
    assert "no CUDA device is visible" in err


def test_serve_cli_passes_the_flags(monkeypatch):
    import graft.serve

    seen = {}
    monkeypatch.setattr(graft.serve, "serve", lambda model, **kw: seen.update(kw))
    assert _run("serve", "--model", "m", "--device", "cpu", "--dtype", "bf16")[0] == 0
    assert (seen["device"], seen["dtype"]) == ("cpu", "bf16")
    assert _run("serve", "--model", "m")[0] == 0
    assert (seen["device"], seen["dtype"]) == ("auto", "auto")
