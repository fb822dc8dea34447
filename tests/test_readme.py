"""The README's usage example must run as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_a_usage_example():
    blocks = python_blocks()
    assert blocks, "README.md has no ```python block"
    assert len(blocks[0].strip().splitlines()) <= 20


def test_readme_examples_run():
    for block in python_blocks():
        exec(compile(block, str(README), "exec"), {"__name__": "__readme__"})
