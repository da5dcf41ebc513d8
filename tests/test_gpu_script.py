"""benchmarks/gpu.py must not rot between the sessions that have a GPU: run it on the CPU, on a tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer, LlamaConfig

import graft.models

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data" / "gsm8k_train_sample.jsonl"


def test_gpu_script_runs_every_section_on_the_cpu(tmp_path):
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("peft")
    tok = AutoTokenizer.from_pretrained(graft.models.resolve("smollm2-135m"), local_files_only=True)
    config = tmp_path / "config"
    LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=len(tok), max_position_embeddings=1024, tie_word_embeddings=True).save_pretrained(config)
    tok.save_pretrained(config)
    out = tmp_path / "results.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--device", "cpu", "--random-init", str(config),
           "--data", str(DATA), "--reps", "1", "--qlora-examples", "8", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert "failed" not in results, results.get("failed")
    assert results["parity/lora r16 all-linear: graft vs peft max|dlogits|"] <= 1e-4
    assert results["qlora/LoftQ rebuilt from the saved adapter max|dlogits|"] <= 1e-3
    assert {"timing/float32/c/decode", "timing/bfloat16/c/prefill"} <= set(results)
    assert results["cli/train choice"]["device"] == "cpu"  # the CLI section: graft train / generate --device cpu
    assert results["cli/train choice"]["line"].startswith("graft: device cpu, dtype ")
