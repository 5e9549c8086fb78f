"""The worked examples of docs/design.md ("How to extend fusion"), read from the document itself so that the
text a contributor copies is the code a test runs: ``example("a layer type")`` is the first ```python block
after the heading that contains those words."""

from __future__ import annotations

import re
from pathlib import Path

DESIGN = Path(__file__).resolve().parents[1] / "docs" / "design.md"


def example(heading_words: str) -> str:
    text = DESIGN.read_text()
    for match in re.finditer(r"^#+ (.*)$", text, flags=re.M):
        if heading_words.lower() in match.group(1).lower():
            block = re.search(r"```python\n(.*?)```", text[match.end() :], flags=re.S)
            if block is None:
                break
            return block.group(1)
    raise LookupError(f"docs/design.md has no heading with {heading_words!r} followed by a python block")


def run_example(heading_words: str) -> dict:
    """Execute the example in a fresh namespace; returns that namespace (its names, for further asserts)."""
    code = example(heading_words)
    assert len(code.strip().splitlines()) < 40, f"the example under {heading_words!r} must stay under 40 lines"
    slug = re.sub(r"\W+", "_", heading_words)
    namespace: dict = {"__name__": f"design_example_{slug}"}
    exec(compile(code, f"docs/design.md ({heading_words})", "exec"), namespace)
    return namespace
