"""Where benchmark figures go: a table printed row by row, and the JSON file (standard library only)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from tfsa_onnx.table import StreamTable

__all__ = ["StreamTable", "write_json"]


def write_json(path: str | None, data: Any, echo: Callable[[str], None] = print) -> None:
    """Every figure as JSON, written atomically (tfsa_onnx.files.OutputError when it cannot be)."""
    if path:
        from tfsa_onnx.files import atomic_write_text

        atomic_write_text(path, json.dumps(data, indent=2) + "\n")
        echo(f"wrote {path}")
