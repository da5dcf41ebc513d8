"""The README's Python quick start runs as written (in a temporary directory, on the real SmolLM2)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.DOTALL)


def test_readme_has_a_python_quick_start():
    blocks = python_blocks()
    assert blocks and "graft.attach" in blocks[0]


@pytest.mark.slow
def test_readme_quick_start_runs(tmp_path, monkeypatch):
    """The first block, the quick start (later blocks show features that need a built library or data)."""
    monkeypatch.chdir(tmp_path)
    code = python_blocks()[0]
    exec(compile(code, "README.md quick start", "exec"), {"__name__": "__readme__"})  # noqa: S102 (our own README)
    assert (tmp_path / "out" / "sql" / "adapter_config.json").is_file()
