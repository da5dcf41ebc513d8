"""benchmarks/seqlen.py's row building and slope, without a model."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from graft.data.tokenize import Example

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "seqlen.py"


@pytest.fixture(scope="module")
def seqlen():
    spec = importlib.util.spec_from_file_location("seqlen_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["seqlen_bench"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("seqlen_bench", None)


def test_rows_are_exactly_l_tokens_with_positions_restarting_per_example(seqlen):
    examples = [Example(input_ids=list(range(100 * k, 100 * k + n)), labels=[-100] * 2 + list(range(n - 2)))
                for k, n in enumerate((5, 7, 3))]
    rows = seqlen.make_rows(examples, length=12, count=2)
    assert [len(r["input_ids"]) for r in rows] == [12, 12]
    first = rows[0]
    assert first["input_ids"][:5] == list(range(5)) and first["input_ids"][5:12] == list(range(100, 107))
    assert first["position_ids"] == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]
    assert first["labels"][0] == -100 and first["labels"][5] == -100  # each example's first label
    assert rows[1]["input_ids"][:3] == [200, 201, 202]  # the next row goes on with the next example
    packed, causal = seqlen.collate_packed(rows), seqlen.collate_causal(rows)
    assert packed.keys() == {"input_ids", "labels", "position_ids"} and tuple(packed["input_ids"].shape) == (2, 12)
    assert causal["attention_mask"].sum() == 24 and "position_ids" not in causal


def test_slope_recovers_the_exponent(seqlen):
    assert seqlen.slope({256: 3 * 256**2, 512: 3 * 512**2, 1024: 3 * 1024**2}) == pytest.approx(2.0)
    assert seqlen.slope({256: 1.0, 4096: 16.0}) == pytest.approx(1.0)
