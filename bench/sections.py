"""BENCHMARKS.md sections that a benchmark owns: written between its markers, kept when another rewrites the file."""

from __future__ import annotations

from pathlib import Path

ANCHOR = "\n## Reproduce"


def _insert(text: str, section: str) -> str:
    return text.replace(ANCHOR, "\n" + section + "\n" + ANCHOR, 1) if ANCHOR in text else text + "\n" + section + "\n"


def write_section(path: Path, section: str, start: str, end: str) -> None:
    """Replace the section between `start` and `end` in `path` (or add it before "## Reproduce")."""
    text = path.read_text() if path.exists() else ""
    if start in text and end in text:
        before, rest = text.split(start, 1)
        text = before + section + rest.split(end, 1)[1]
    else:
        text = _insert(text, section)
    path.write_text(text)


def carry_section(path: Path, text: str, start: str, end: str) -> str:
    """`text` (a regenerated BENCHMARKS.md) with the section between the markers in `path` put back."""
    old = path.read_text() if path.exists() else ""
    if start not in old or end not in old or start in text:
        return text
    return _insert(text, start + old.split(start, 1)[1].split(end, 1)[0] + end)
