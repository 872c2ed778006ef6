"""SparsityConfig: the operator attributes to use, with per-layer overrides.

File format (JSON or YAML):

    defaults:            # any SparseAttention attribute except scale/is_causal
      threshold: 0.9
      min_seq_len: 1024
    layers:              # key: layer index in graph order, or a glob on the node name
      "0": {skip: true}              # leave layer 0 as it is
      "3": {threshold: 0.95}
      "*layers.1[0-9]*": {max_density: 0.5}

Later keys win over earlier ones when several match.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tfsa_onnx.reference import SparseAttentionAttributes

# Attributes a user may set; scale and is_causal come from the model itself.
TUNABLE = ("block_size", "global_tokens", "local_window", "threshold", "max_density", "min_seq_len")
_INTS = {"block_size", "global_tokens", "local_window", "min_seq_len"}


class ConfigError(ValueError):
    """A sparsity config that cannot be used; the message says what to fix."""


def _check_values(values: dict[str, Any], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in values.items():
        if name == "skip":
            out[name] = bool(value)
            continue
        if name not in TUNABLE:
            expected = ", ".join((*TUNABLE, "skip"))
            raise ConfigError(f"{where}: unknown setting {name!r}; expected one of {expected}")
        try:
            value = int(value) if name in _INTS else float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: {name} must be a number, got {value!r}") from None
        if name == "block_size" and value <= 0:
            raise ConfigError(f"{where}: block_size must be > 0, got {value}")
        if name in ("threshold", "max_density") and not 0.0 < value <= 1.0:
            raise ConfigError(f"{where}: {name} must be in (0, 1], got {value}")
        if name in ("global_tokens", "local_window", "min_seq_len") and value < 0:
            raise ConfigError(f"{where}: {name} must be >= 0, got {value}")
        out[name] = value
    return out


@dataclass
class SparsityConfig:
    """Defaults for every attention site plus overrides by layer index or node-name glob."""

    defaults: dict[str, Any] = field(default_factory=dict)
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.defaults = _check_values(dict(self.defaults), "defaults")
        self.layers = {str(k): _check_values(dict(v), f"layers[{k!r}]") for k, v in self.layers.items()}

    def for_site(self, index: int, name: str) -> dict[str, Any] | None:
        """Tunable attributes for the attention site `index` (graph order) named `name`; None = skip."""
        base = SparseAttentionAttributes()
        values: dict[str, Any] = {n: getattr(base, n) for n in TUNABLE}
        values.update(self.defaults)
        skip = bool(values.pop("skip", False))
        for key, override in self.layers.items():
            if key == str(index) or (not key.isdigit() and fnmatch.fnmatchcase(name, key)):
                override = dict(override)
                skip = override.pop("skip", skip)
                values.update(override)
        return None if skip else values

    def to_dict(self) -> dict[str, Any]:
        return {"defaults": dict(self.defaults), "layers": {k: dict(v) for k, v in self.layers.items()}}

    def save(self, path: str | Path) -> None:
        from tfsa_onnx.files import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SparsityConfig:
        if not isinstance(data, dict):
            raise ConfigError("a sparsity config must be a mapping with 'defaults' and/or 'layers'")
        unknown = set(data) - {"defaults", "layers"}
        if unknown:
            raise ConfigError(f"unknown top-level keys {sorted(unknown)}; expected 'defaults' and 'layers'")
        return cls(defaults=data.get("defaults") or {}, layers=data.get("layers") or {})

    @classmethod
    def load(cls, path: str | Path) -> SparsityConfig:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
        try:
            if path.suffix.lower() in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except Exception as e:  # noqa: BLE001 - any parse error becomes one clear sentence
            raise ConfigError(f"cannot parse config {path}: {e}") from None
        return cls.from_dict(data)
