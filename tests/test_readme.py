"""The README's example is the code mypy checks in tests/typing/readme_example.py."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parent.parent


def _normalise(line: str) -> str:
    return re.sub(r"\s+", " ", line.split("#")[0]).strip()


def test_readme_python_blocks_are_type_checked() -> None:
    """Every code line of the README's ```python blocks appears in the mypy-checked file
    (comments and spacing aside), so the documented example cannot silently rot."""
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.DOTALL)
    assert blocks, "the README has no python example"
    typed = (ROOT / "tests/typing/readme_example.py").read_text().splitlines()
    checked = {_normalise(line) for line in typed}
    missing = [
        line
        for block in blocks
        for line in block.splitlines()
        if _normalise(line) and _normalise(line) not in checked
    ]
    assert not missing, f"README lines not type-checked: {missing}"
