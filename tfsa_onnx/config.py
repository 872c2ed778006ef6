"""SparsityConfig: the operator attributes to use, with per-layer overrides.

File format (JSON or YAML):

    defaults:            # any SparseAttention attribute except scale/is_causal
      threshold: 0.9
      min_seq_len: 1024
    layers:              # key: layer index in graph order, or a glob on the node name
      "0": {skip: true}              # leave layer 0 as it is
      "3": {threshold: 0.95, estimate: token}
      "*layers.1[0-9]*": {max_density: 0.5}
      "4": {head_thresholds: [0.9, 0, 0.7, 0.95]}   # one per query head; 0: a streaming head

Later keys win over earlier ones when several match. Values are checked strictly against the
operator's bounds (BOUNDS; skip is a bool); a negative index is refused, and keys that select no
site are reported (unmatched()).
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from tfsa_onnx.reference import (
    ATTRIBUTE_BOUNDS,
    COMPUTE_PRECISIONS,
    ESTIMATES,
    GROUP_SELECTIONS,
    HEAD_THRESHOLDS_MAX,
    SparseAttentionAttributes,
)

# Attributes a user may set; scale and is_causal come from the model itself.
TUNABLE = (
    "block_size",
    "global_tokens",
    "local_window",
    "threshold",
    "max_density",
    "min_seq_len",
    "estimate",
    "estimate_stride",
    "compute_precision",
    "head_thresholds",
    "group_selection",
)
# Settings that are lists of numbers (each value within BOUNDS), with the most values they hold.
LISTS: dict[str, int] = {"head_thresholds": HEAD_THRESHOLDS_MAX}
# The bounds the operator enforces on them (contract.h, mirrored in reference.py), checked here
# first: name -> (low, high, low excluded).
BOUNDS: dict[str, tuple[float, float, bool]] = {name: ATTRIBUTE_BOUNDS[name] for name in TUNABLE}
_INTS = {f.name for f in fields(SparseAttentionAttributes) if f.type in (int, "int")} & set(TUNABLE)
_INDEX = re.compile(r"-?[0-9]+")
# Settings that may be given by name, kept as the index of the name.
NAMED: dict[str, tuple[str, ...]] = {
    "estimate": ESTIMATES,
    "compute_precision": COMPUTE_PRECISIONS,
    "group_selection": GROUP_SELECTIONS,
}


class ConfigError(ValueError):
    """A sparsity config that cannot be used; the message says what to fix."""


def check_setting(name: str, value: Any, where: str) -> Any:
    """The value of one setting, checked strictly: skip is a bool; integer settings are integers
    (an integral float such as 32.0 is taken as 32; bools and 32.7 are refused); float settings
    are finite numbers; every value within the operator's bounds (BOUNDS). The estimate and the
    compute precision may be named (NAMED: "mean", "antidiagonal", "token"; "float32", "bf16")
    and are kept as the name's index."""
    if name == "skip":
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: skip must be true or false, got {value!r}")
        return value
    if name in NAMED and isinstance(value, str):
        if value.strip() not in NAMED[name]:
            raise ConfigError(f"{where}: {name} must be one of {', '.join(NAMED[name])}, got {value!r}")
        return NAMED[name].index(value.strip())
    if name not in TUNABLE:
        expected = ", ".join((*TUNABLE, "skip"))
        raise ConfigError(f"{where}: unknown setting {name!r}; expected one of {expected}")
    if name in LISTS:
        return _check_list(name, value, where)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = "an integer" if name in _INTS else "a number"
        raise ConfigError(f"{where}: {name} must be {kind}, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{where}: {name} must be a finite number, got {value!r}")
    given = value
    if name in _INTS:
        if value != int(value):
            raise ConfigError(f"{where}: {name} must be an integer, got {value!r}")
        value = int(value)
    else:
        value = float(value)
    low, high, low_open = BOUNDS[name]
    if value < low or value > high or (low_open and value == low):
        interval = f"{'(' if low_open else '['}{low}, {high}]"
        raise ConfigError(f"{where}: {name} must be in {interval}, got {given!r}")
    return value


def _check_list(name: str, value: Any, where: str) -> tuple[float, ...]:
    """A list setting (head_thresholds): at most LISTS[name] numbers, each checked as a number
    setting of the same name would be; kept as a tuple of floats (empty: not set)."""
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where}: {name} must be a list of numbers (one per query head), got {value!r}")
    if len(value) > LISTS[name]:
        raise ConfigError(f"{where}: {name} may hold at most {LISTS[name]} values, got {len(value)}")
    low, high, _ = BOUNDS[name]
    out = []
    for i, x in enumerate(value):
        if (
            isinstance(x, bool)
            or not isinstance(x, (int, float))
            or not math.isfinite(x)
            or not low <= x <= high
        ):
            raise ConfigError(f"{where}: {name}[{i}] must be a number in [{low}, {high}], got {x!r}")
        out.append(float(x))
    return tuple(out)


def attribute_value(value: Any) -> Any:
    """A resolved setting as a node attribute's value: float, int, or a list of floats."""
    if isinstance(value, (list, tuple)):
        return [float(x) for x in value]
    return float(value) if isinstance(value, float) else int(value)


def parse_setting(name: str, text: str, where: str) -> Any:
    """A setting given as text (a command-line option): parsed as a number, then check_setting."""
    if name in NAMED and not _INDEX.fullmatch(text.strip()):
        return check_setting(name, text, where)
    try:
        value: Any = int(text) if _INDEX.fullmatch(text.strip()) else float(text)
    except ValueError:
        kind = "an integer" if name in _INTS else "a number"
        raise ConfigError(f"{where}: {name} must be {kind}, got {text!r}") from None
    return check_setting(name, value, where)


def _check_values(values: Any, where: str) -> dict[str, Any]:
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a mapping of settings, got {values!r}")
    return {str(name): check_setting(str(name), value, where) for name, value in values.items()}


def _check_key(key: Any) -> str:
    """A layers key: a layer index (0, 1, ...) or a glob on node names."""
    key = str(key)
    if _INDEX.fullmatch(key):
        if int(key) < 0:
            raise ConfigError(f"layers[{key!r}]: a layer index is 0 or more (graph order), got {key}")
        return str(int(key))
    if not key:
        raise ConfigError("layers: an empty key selects no layer; use an index or a glob on node names")
    return key


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    """Settings as JSON writes them (a list setting as a list)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


@dataclass
class SparsityConfig:
    """Defaults for every attention site plus overrides by layer index or node-name glob."""

    defaults: dict[str, Any] = field(default_factory=dict)
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.defaults = _check_values(self.defaults, "defaults")
        if not isinstance(self.layers, dict):
            raise ConfigError(f"layers must be a mapping of index or glob to settings, got {self.layers!r}")
        self.layers = {_check_key(k): _check_values(v, f"layers[{str(k)!r}]") for k, v in self.layers.items()}

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

    def unmatched(self, sites: list[tuple[int, str]]) -> list[str]:
        """One sentence per layers key that selects none of the (index, name) sites."""
        out = []
        for key in self.layers:
            if key.isdigit():
                if not any(int(key) == index for index, _ in sites):
                    known = f"0 to {len(sites) - 1}" if sites else "none"
                    out.append(
                        f"layers[{key!r}] matches no attention site (the model's layers are {known}); "
                        "it was ignored"
                    )
            elif not any(fnmatch.fnmatchcase(name, key) for _, name in sites):
                out.append(f"layers[{key!r}] matches no attention site's node name; it was ignored")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"defaults": _plain(self.defaults), "layers": {k: _plain(v) for k, v in self.layers.items()}}

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
