"""Where benchmark figures go: a result is a Row, printed as a table row as it comes and written
with the others as JSON (standard library only)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from tfsa_onnx.table import StreamTable

__all__ = ["Row", "StreamTable", "write_json"]


class Row:
    """A benchmark result (a dataclass): as_dict() is its table row and its JSON object."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]


def write_json(path: str | None, data: Any, echo: Callable[[str], None] = print) -> None:
    """Every figure as JSON, written atomically (tfsa_onnx.files.OutputError when it cannot be)."""
    if path:
        from tfsa_onnx.files import atomic_write_text

        atomic_write_text(path, json.dumps(data, indent=2) + "\n")
        echo(f"wrote {path}")
