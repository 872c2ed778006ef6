"""Inputs for validate and calibrate: from an .npz file, from text, or generated from graph specs.

Every loader returns a list of feeds (one dict name -> array per sample, each with its batch axis).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper


class InputError(ValueError):
    """Inputs that cannot be used with the model; the message says what to fix."""


@dataclass(frozen=True)
class InputSpec:
    """One graph input: name, numpy dtype and dims (int, or a name/None when symbolic)."""

    name: str
    dtype: np.dtype
    dims: tuple[int | str | None, ...]

    @property
    def rank(self) -> int:
        return len(self.dims)


Feed = dict[str, np.ndarray]


def graph_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The inputs a caller must feed (initializers that double as inputs are left out)."""
    initializers = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        dims = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim
        )
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type))
        specs.append(InputSpec(value.name, dtype, dims))
    return specs


def check_same_inputs(original: list[InputSpec], optimized: list[InputSpec]) -> None:
    """Raise InputError unless both models take the same inputs (names, types, ranks)."""
    a, b = {s.name: s for s in original}, {s.name: s for s in optimized}
    if set(a) != set(b):
        raise InputError(f"the models take different inputs: original {sorted(a)}, optimized {sorted(b)}")
    for name, spec in a.items():
        other = b[name]
        if spec.dtype != other.dtype or spec.rank != other.rank:
            raise InputError(
                f"input {name!r} differs: original {spec.dtype}[rank {spec.rank}], "
                f"optimized {other.dtype}[rank {other.rank}]"
            )


# ---------------------------------------------------------------- .npz


def load_npz(path: str | Path, specs: list[InputSpec]) -> list[Feed]:
    """Feeds from an .npz with one array per graph input, first axis = samples."""
    try:
        data = np.load(str(path))
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read inputs file {path}: {e}") from None
    missing = [s.name for s in specs if s.name not in data.files]
    if missing:
        raise InputError(f"inputs file {path} has no array for graph input(s) {', '.join(missing)}")
    arrays = {s.name: data[s.name] for s in specs}
    counts = {name: len(a) for name, a in arrays.items()}
    if len(set(counts.values())) != 1:
        raise InputError(f"arrays in {path} disagree on the number of samples (first axis): {counts}")
    feeds = []
    for i in range(next(iter(counts.values()))):
        feed = {}
        for spec in specs:
            arr = arrays[spec.name]
            if arr.ndim == spec.rank + 1:
                sample = arr[i]
            elif arr.ndim == spec.rank:
                sample = arr[i : i + 1]
            else:
                raise InputError(
                    f"array {spec.name!r} in {path} has rank {arr.ndim}; the graph input has rank "
                    f"{spec.rank} (give [samples, ...] with rank {spec.rank + 1} or {spec.rank})"
                )
            feed[spec.name] = np.ascontiguousarray(sample.astype(spec.dtype, copy=False))
        feeds.append(feed)
    return feeds


# ---------------------------------------------------------------- text


def load_tokenizer(directory: str | Path):
    """A Hugging Face tokenizer from a local directory, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise InputError("--tokenizer needs the transformers package: pip install transformers") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any loader failure is one sentence for the user
        raise InputError(f"cannot load a tokenizer from {directory}: {e}") from None
    tokenizer.model_max_length = 1 << 30  # we cut windows ourselves; silence the length warning
    return tokenizer


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The ids a tokenizer puts before and after a single text (e.g. [CLS] / [SEP], or BOS)."""
    plain = tokenizer("hello", add_special_tokens=False)["input_ids"]
    full = tokenizer("hello", add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return list(full[:i]), list(full[i + len(plain) :])
    return [], []


def text_windows(text: str, tokenizer, seq_len: int, count: int) -> list[list[int]]:
    """Cut the token stream of `text` into up to `count` windows of seq_len tokens (specials included)."""
    prefix, suffix = special_tokens(tokenizer)
    body = seq_len - len(prefix) - len(suffix)
    if body <= 0:
        raise InputError(f"--seq-len {seq_len} leaves no room for the tokenizer's special tokens")
    paragraphs = text.split("\n\n")
    ids: list[int] = []
    step = 16  # tokenize a few paragraphs at a time, only as far as needed
    for start in range(0, len(paragraphs), step):
        if len(ids) >= body * count:
            break
        piece = "\n\n".join(paragraphs[start : start + step]) + "\n\n"
        ids.extend(tokenizer(piece, add_special_tokens=False)["input_ids"])
    windows = []
    for start in range(0, len(ids), body):
        chunk = ids[start : start + body]
        if windows and len(chunk) < body:
            break  # a short tail after full windows: leave it out
        windows.append(prefix + chunk + suffix)
        if len(windows) == count:
            break
    return windows


def load_text(
    path: str | Path,
    tokenizer_dir: str | Path,
    specs: list[InputSpec],
    *,
    seq_len: int,
    samples: int,
    batch: int = 1,
) -> list[Feed]:
    """Feeds from a text file: its token stream cut to windows of seq_len, `batch` windows a sample."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise InputError(f"cannot read text file {path}: {e.strerror}") from None
    tokenizer = load_tokenizer(tokenizer_dir)
    windows = text_windows(text, tokenizer, seq_len, samples * batch)
    if not windows:
        raise InputError(f"text file {path} holds no tokens")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    feeds = []
    for i in range(0, len(windows), batch):
        group = windows[i : i + batch]
        width = max(len(w) for w in group)
        ids = np.full((len(group), width), pad, dtype=np.int64)
        mask = np.zeros((len(group), width), dtype=np.int64)
        for row, w in enumerate(group):
            ids[row, : len(w)] = w
            mask[row, : len(w)] = 1
        feeds.append(token_feed(specs, ids, mask))
    return feeds


def token_feed(specs: list[InputSpec], ids: np.ndarray, mask: np.ndarray) -> Feed:
    """Fill a text model's inputs (ids, masks, token types, positions) from ids [B, S] and mask [B, S]."""
    feed = {}
    for spec in specs:
        role = input_role(spec)
        if role == "ids":
            value = ids
        elif role == "mask":
            value = mask
        elif role == "token_type":
            value = np.zeros_like(ids)
        elif role == "position":
            value = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
        else:
            raise InputError(
                f"cannot fill graph input {spec.name!r} from text; give --inputs FILE.npz instead"
            )
        feed[spec.name] = np.ascontiguousarray(value.astype(spec.dtype))
    return feed


def input_role(spec: InputSpec) -> str:
    """What a graph input carries, judged by its name and type."""
    name = spec.name.lower()
    if "mask" in name:
        return "mask"
    if "token_type" in name or "segment" in name:
        return "token_type"
    if "position" in name:
        return "position"
    if spec.dtype.kind in "iu" and ("id" in name or "token" in name):
        return "ids"
    if spec.dtype.kind == "f" and spec.rank == 4:
        return "image"
    return "other"


# ---------------------------------------------------------------- generated


def vocab_size(model: onnx.ModelProto, name: str) -> int | None:
    """Rows of the embedding table that a Gather looks `name` up in, if the graph says so."""
    tables = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == name:
            table = tables.get(node.input[0])
            if table is not None and table.dims:
                return int(table.dims[0])
    return None


def generate(
    model: onnx.ModelProto,
    specs: list[InputSpec],
    *,
    seq_len: int,
    batch: int,
    samples: int,
    seed: int = 0,
) -> list[Feed]:
    """Synthetic feeds from the graph's input specs: ids in range, masks with real padding, images."""
    rng = np.random.default_rng(seed)
    lengths = [max(1, seq_len - row * seq_len // (2 * batch)) for row in range(batch)]
    mask = (np.arange(seq_len)[None, :] < np.array(lengths)[:, None]).astype(np.int64)
    feeds = []
    for _ in range(samples):
        feed = {}
        for spec in specs:
            feed[spec.name] = _generated(model, spec, rng, mask, seq_len, batch)
        feeds.append(feed)
    return feeds


def _generated(
    model: onnx.ModelProto,
    spec: InputSpec,
    rng: np.random.Generator,
    mask: np.ndarray,
    seq_len: int,
    batch: int,
) -> np.ndarray:
    role = input_role(spec)
    if role in ("ids", "mask", "token_type", "position") and spec.rank == 2:
        if role == "ids":
            high = vocab_size(model, spec.name) or 1000
            ids = rng.integers(min(5, high - 1), high, size=(batch, seq_len))
            value = np.where(mask == 1, ids, 0)
        elif role == "mask":
            value = mask
        elif role == "token_type":
            value = np.zeros((batch, seq_len))
        else:
            value = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
        return value.astype(spec.dtype)
    shape = _concrete_shape(spec, seq_len, batch)
    if spec.dtype == np.bool_:
        return np.ones(shape, dtype=bool)
    if spec.dtype.kind in "iu":
        return rng.integers(0, 2, size=shape).astype(spec.dtype)
    return rng.standard_normal(shape).astype(spec.dtype)


def _concrete_shape(spec: InputSpec, seq_len: int, batch: int) -> tuple[int, ...]:
    image_defaults = {1: 3, 2: 224, 3: 224}
    shape = []
    for axis, dim in enumerate(spec.dims):
        if isinstance(dim, int) and dim > 0:
            shape.append(dim)
        elif axis == 0:
            shape.append(batch)
        elif input_role(spec) == "image":
            shape.append(image_defaults.get(axis, 1))
        else:
            shape.append(seq_len)
    return tuple(shape)


def describe(feeds: list[Feed]) -> str:
    """One line: how many samples and the first one's shapes."""
    if not feeds:
        return "no samples"
    shapes = ", ".join(f"{k}{list(v.shape)}" for k, v in feeds[0].items())
    return f"{len(feeds)} sample(s): {shapes}"


def load_feeds(
    model: onnx.ModelProto,
    *,
    inputs: str | Path | None = None,
    text: str | Path | None = None,
    tokenizer: str | Path | None = None,
    seq_len: int = 128,
    batch: int = 1,
    samples: int = 4,
    seed: int = 0,
) -> list[Feed]:
    """Feeds from --inputs, or --text with --tokenizer, or generated from the graph's specs."""
    specs = graph_inputs(model)
    if inputs is not None and text is not None:
        raise InputError("give either --inputs or --text, not both")
    if inputs is not None:
        return load_npz(inputs, specs)[:samples] if samples else load_npz(inputs, specs)
    if text is not None:
        if tokenizer is None:
            raise InputError("--text needs --tokenizer DIR (a Hugging Face tokenizer directory)")
        return load_text(text, tokenizer, specs, seq_len=seq_len, samples=samples, batch=batch)
    return generate(model, specs, seq_len=seq_len, batch=batch, samples=samples, seed=seed)
