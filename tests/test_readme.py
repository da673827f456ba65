"""Every ```python block of README.md runs as written (the README's examples are part of the API)."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, monkeypatch):
    monkeypatch.delenv("KDOPS_BACKEND", raising=False)
    exec(compile(BLOCKS[index], f"README.md:python-block-{index}", "exec"), {"__name__": "__readme__"})
