"""Text tables: the one formatter behind every table the package prints.

Standard library only (the GPU benchmark imports it on machines without click or onnx).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any


def cell(value: Any) -> str:
    """A value as a table cell: None '-', booleans yes/no, floats to 3 decimals (1 from 100 on)."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}" if value < 100 else f"{value:.1f}"
    return str(value)


def format_table(head: Sequence[str], rows: Iterable[Sequence[Any]], rule: bool = True) -> str:
    """Left-aligned columns as wide as their widest cell, a dashed rule under the head."""
    cells = [tuple(head)] + [tuple(cell(v) for v in row) for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    lines = [_line(r, widths, right=False) for r in cells]
    if rule:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(head: Sequence[str], align: str, rows: Iterable[Sequence[str]]) -> str:
    """A Markdown table; align has one letter a column: 'l' left (---), 'r' right (---:)."""
    rule = "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"
    lines = [_markdown_row(head), rule, *(_markdown_row(row) for row in rows)]
    return "\n".join(lines)


def _markdown_row(row: Sequence[str]) -> str:
    return "| " + " | ".join(row) + " |"


class StreamTable:
    """Right-aligned columns printed as rows arrive (benchmarks take a while per row)."""

    def __init__(
        self, columns: str | Sequence[str], echo: Callable[[str], None] = print, min_width: int = 10
    ):
        self.columns = columns.split() if isinstance(columns, str) else list(columns)
        self.widths = [max(min_width, len(c)) for c in self.columns]
        self.echo = echo
        self.echo(self._line(self.columns))

    def row(self, values: dict) -> None:
        self.echo(self._line(cell(values[c]) for c in self.columns))

    def _line(self, cells: Iterable[str]) -> str:
        return _line(list(cells), self.widths, right=True)


def _line(cells: Sequence[str], widths: Sequence[int], right: bool) -> str:
    """One row: cells padded to their column's width, two spaces apart."""
    padded = (c.rjust(w) if right else c.ljust(w) for c, w in zip(cells, widths, strict=False))
    return "  ".join(padded).rstrip()
