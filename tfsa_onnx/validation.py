"""Compare an optimized model with its original in ONNX Runtime: accuracy, latency, density.

    from tfsa_onnx.validation import validate
    result = validate("model.onnx", "model.tfsa.onnx", feeds)
    print(result.table()); failures = result.failures(cos_min=0.995)

Per output: max / mean abs error, relative L2 error, cosine similarity per sample (the mean of
the cosines of the last-axis vectors: per token for hidden states), argmax agreement for outputs
that look like classes or a vocabulary, and perplexity of both models for causal language models.
The density the kernel reached comes from each SparseAttention node's `density` output, which an
in-memory copy of the optimized model exposes as extra graph outputs.
"""

from __future__ import annotations

import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from tfsa_onnx import DOMAIN, GQA_OP_TYPE, OP_TYPE, runtime
from tfsa_onnx.inputs import Feed, check_same_inputs, graph_inputs
from tfsa_onnx.table import format_table

DENSITY_SUFFIX = "__tfsa_density"
_CLASS_NAMES = re.compile(r"logit|class|prob|score", re.IGNORECASE)
_ROWS = 512  # rows per chunk for the heavy per-vector metrics


# ---------------------------------------------------------------- which lengths to check

SHORT_CHECK = 64  # below every block and window: the dense, exact path
LONGEST_CHECK = 8192  # a longer window than this needs an explicit --extra-lengths


def check_lengths(original: str | Path | onnx.ModelProto, seq_len: int) -> tuple[list[int], str]:
    """Lengths to test besides seq_len with generated inputs, and why: a short one, and one past
    every integer the original's masks compute with (a 512-token window looks causal at 33)."""
    from tfsa_onnx.rewrite import find_sites

    try:
        sites = find_sites(original).sites
    except Exception:  # noqa: BLE001 - a model the rewriter cannot read still validates at seq_len
        sites = []
    longest = max((c for s in sites for c in s.mask_constants), default=0)
    lengths = {SHORT_CHECK} if seq_len > SHORT_CHECK else set()
    why = f"{SHORT_CHECK} tokens (short)" if lengths else ""
    if longest >= seq_len:
        past = min(-(-(longest + 1) // 64) * 64, LONGEST_CHECK)
        lengths.add(past)
        capped = "" if past > longest else f", capped at {LONGEST_CHECK}"
        why += f"{', ' if why else ''}{past} tokens (past the masks' largest constant, {longest}{capped})"
    return sorted(lengths - {seq_len}), why


# ---------------------------------------------------------------- models and sessions


def load_model(model: str | Path | onnx.ModelProto) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    return onnx.load(str(model))


def attention_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The SparseAttention and SparseGroupQueryAttention nodes of a model, in graph order."""
    return [n for n in model.graph.node if n.domain == DOMAIN and n.op_type in (OP_TYPE, GQA_OP_TYPE)]


def density_index(node: onnx.NodeProto) -> int:
    """The node's density output: SparseAttention's second, SparseGroupQueryAttention's fourth."""
    return 3 if node.op_type == GQA_OP_TYPE else 1


def expose_density(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """A copy whose attention nodes also output density, as graph outputs; returns (copy, names)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    outputs = {o.name for o in copy.graph.output}
    names = []
    for i, node in enumerate(attention_nodes(copy)):
        at = density_index(node)  # GQA's outputs before it (output, present K/V) are required
        if len(node.output) <= at or not node.output[at]:
            del node.output[at:]
            node.output.append(f"{node.name or f'sparse_attention_{i}'}{DENSITY_SUFFIX}")
        names.append(node.output[at])
        if node.output[at] not in outputs:
            copy.graph.output.append(helper.make_tensor_value_info(node.output[at], TensorProto.FLOAT, None))
    return copy, names


def is_causal_lm(model: onnx.ModelProto) -> bool:
    """Any causal SparseAttention node: the model is a causal (decoder) language model."""
    for node in attention_nodes(model):
        for a in node.attribute:
            if a.name == "is_causal" and a.i:
                return True
    return False


def make_session(model: onnx.ModelProto | str | Path, threads: int | None = None):
    """An ORT CPU session as validate and calibrate run them: without ORT's memory pattern."""
    from tfsa_onnx import runtime

    return runtime.make_session(model, threads, mem_pattern=False)


def timed_run(session, feed: Feed, names: list[str] | None = None) -> tuple[list[np.ndarray], float]:
    start = time.perf_counter()
    out = runtime.run_shrinking(session, names, feed)
    return out, time.perf_counter() - start


# ---------------------------------------------------------------- memory


def estimated_peak(model: str | Path | onnx.ModelProto, feeds: list[Feed], *, rewritten: bool = False) -> int:
    """A rough peak resident size, in bytes, of one model run on feeds[0] with our comparison:
    weights twice (the session's and a loaded copy), the outputs three times (the run's, ours, the
    arena's rounding), and where attention is not rewritten 4 [B, heads, S, S] float score tensors
    (fitted to SmolLM2-135M at 8,192 tokens before the arena shrank after each run: 15.6 GB
    estimated, 16.3 GB measured then, 13.0 GB now: it errs high)."""
    head = graph_only(model)
    weights = sum(
        int(np.prod(t.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        for t in head.graph.initializer
    )
    ids = (
        next((v for v in feeds[0].values() if v.ndim == 2 and v.dtype.kind in "iu"), None) if feeds else None
    )
    batch, seq = ids.shape if ids is not None else (1, 0)
    outputs = 0
    for o in head.graph.output:
        dims = o.type.tensor_type.shape.dim if o.type.tensor_type.HasField("shape") else []
        sizes = [d.dim_value or (batch if axis == 0 else seq) for axis, d in enumerate(dims)]
        outputs += 4 * int(np.prod(sizes, dtype=np.int64)) if dims else 0
    heads = 0 if rewritten or not seq else _unfused_heads(model)
    return 2 * weights + 3 * outputs + 4 * 4 * batch * heads * seq * seq


def _unfused_heads(model: str | Path | onnx.ModelProto) -> int:
    """The most heads of any attention block the rewriter finds (still unfused) in the model."""
    from tfsa_onnx.rewrite import find_sites

    key = str(model) if not isinstance(model, onnx.ModelProto) else None
    if key in _HEADS:
        return _HEADS[key]
    try:
        sites = [
            s
            for s in find_sites(graph_only(model)).sites
            if s.family != OP_TYPE and "SparseAttention" not in s.reason
        ]
        heads = max((s.heads or 1 for s in sites), default=0)
    except Exception:  # noqa: BLE001 - a model the rewriter cannot read: no score term
        heads = 0
    if key is not None:
        _HEADS[key] = heads
    return heads


_HEADS: dict[str, int] = {}


def available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes; None where there is none."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def memory_warning(models: list, feeds: list[Feed], *, rewritten: bool = False) -> str | None:
    """One sentence when the larger model's estimated peak (one model runs at a time) exceeds the
    memory available now; None when it fits or nothing can be said."""
    available = available_memory()
    if available is None or not feeds:
        return None
    peak = max(estimated_peak(m, feeds, rewritten=rewritten) for m in models)
    if peak <= available:
        return None
    shapes = ", ".join(f"{k}{list(v.shape)}" for k, v in feeds[0].items())
    return (
        f"warning: the run on {shapes} may need about {peak / 2**30:.1f} GB (a rough estimate) but "
        f"{available / 2**30:.1f} GB is available, so it may be killed for memory; use a shorter "
        "--seq-len or --batch, or free memory first."
    )


# ---------------------------------------------------------------- metrics


def looks_like_classes(name: str, shape: tuple[int, ...]) -> bool:
    """Argmax makes sense: a logits-like name, or a last axis as wide as a vocabulary."""
    if len(shape) < 2 or shape[-1] < 2:
        return False
    return bool(_CLASS_NAMES.search(name)) or shape[-1] >= 10_000


def row_cosines(ref: np.ndarray, opt: np.ndarray) -> np.ndarray:
    """Cosine of each last-axis vector pair (1.0 where both are zero)."""
    a = ref.reshape(-1, ref.shape[-1]) if ref.ndim > 1 else ref.reshape(1, -1)
    b = opt.reshape(a.shape)
    out = np.empty(a.shape[0])
    for s in range(0, a.shape[0], _ROWS):
        x, y = a[s : s + _ROWS].astype(np.float64), b[s : s + _ROWS].astype(np.float64)
        nx, ny = np.linalg.norm(x, axis=1), np.linalg.norm(y, axis=1)
        dot = (x * y).sum(axis=1)
        both_zero = (nx == 0) & (ny == 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[s : s + _ROWS] = np.where(both_zero, 1.0, dot / (nx * ny))
    return np.nan_to_num(out, nan=0.0)


def token_nll(logits: np.ndarray, ids: np.ndarray, mask: np.ndarray | None) -> tuple[float, int]:
    """Summed next-token negative log-likelihood and the number of predicted tokens."""
    b, s, v = logits.shape
    if mask is None:
        mask = np.ones((b, s), dtype=bool)
    keep = (mask[:, 1:] != 0) & (mask[:, :-1] != 0)
    total, count = 0.0, 0
    for row in range(b):
        for start in range(0, s - 1, _ROWS):
            end = min(start + _ROWS, s - 1)
            x = logits[row, start:end].astype(np.float64)
            top = x.max(axis=1, keepdims=True)
            lse = np.log(np.exp(x - top).sum(axis=1)) + top[:, 0]
            target = x[np.arange(end - start), ids[row, start + 1 : end + 1]]
            sel = keep[row, start:end]
            total += float((lse - target)[sel].sum())
            count += int(sel.sum())
    return total, count


def chunk_rows(width: int) -> int:
    """Rows per chunk for the float64 work on [rows, width] slices: about 4M values (32 MB)."""
    return max(1, min(_ROWS, (1 << 22) // max(width, 1)))


def as_rows(x: np.ndarray) -> np.ndarray:
    """The [rows, last axis] view every per-vector metric works on (one row for a 0-d/1-d output)."""
    return x.reshape(-1, x.shape[-1]) if x.ndim > 1 else x.reshape(1, -1)


class Spool:
    """Arrays written to a temporary file and read back by row ranges with plain reads (no mmap),
    so that a model's full outputs can wait for the other model's without taking memory."""

    def __init__(self) -> None:
        import tempfile

        self._file = tempfile.TemporaryFile(prefix="tfsa-onnx-")  # deleted on close, even on a crash
        self._where: dict[Any, tuple[int, tuple[int, ...], np.dtype]] = {}

    def put(self, key: Any, x: np.ndarray) -> None:
        self._file.seek(0, 2)
        self._where[key] = (self._file.tell(), x.shape, x.dtype)
        np.ascontiguousarray(x).tofile(self._file)

    def shape(self, key: Any) -> tuple[int, ...]:
        return self._where[key][1]

    def rows(self, key: Any, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of the stored array's as_rows view."""
        offset, shape, dtype = self._where[key]
        width = shape[-1] if len(shape) > 1 else int(np.prod(shape, dtype=np.int64))
        self._file.seek(offset + start * width * dtype.itemsize)
        return np.fromfile(self._file, dtype=dtype, count=(stop - start) * width).reshape(-1, width)

    def get(self, key: Any) -> np.ndarray:
        shape = self.shape(key)
        return self.rows(key, 0, as_rows(np.empty(shape, dtype=np.uint8)).shape[0]).reshape(shape)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()


def chunked_cosines(ref_rows, opt: np.ndarray) -> np.ndarray:
    """row_cosines of a spooled reference (ref_rows(start, stop) -> rows) against opt, by chunks."""
    b = as_rows(opt)
    step = chunk_rows(b.shape[1])
    parts = [row_cosines(ref_rows(s, min(s + step, len(b))), b[s : s + step]) for s in range(0, len(b), step)]
    return np.concatenate(parts) if parts else np.empty(0)


@dataclass
class OutputStats:
    """Running comparison figures of one output over all samples.

    Two passes, one model at a time: reference(i, ref) takes the original's output of sample i
    (its NLL, argmax and squared norm are reduced at once, the array itself goes to a Spool),
    then compare(i, opt) reads it back by row chunks against the optimized model's output.
    """

    name: str
    max_abs: float = 0.0
    sum_abs: float = 0.0
    count: int = 0
    sum_sq_diff: float = 0.0
    sum_sq_ref: float = 0.0
    cosines: list[float] = field(default_factory=list)
    argmax_agree: int = 0
    argmax_total: int = 0
    nll_ref: float = 0.0
    nll_opt: float = 0.0
    nll_tokens: int = 0
    spool: Spool | None = None
    _pending: dict[int, dict[str, Any]] = field(default_factory=dict)

    def reference(self, i: int, ref: np.ndarray, ids: np.ndarray | None, mask: np.ndarray | None) -> None:
        """The original's output of sample i: reduced now, spooled for compare(i, ...)."""
        if self.spool is None:
            self.spool = Spool()
        self._pending[i] = self._reduce_reference(ref, ids, mask)
        self.spool.put((self.name, i), ref)

    def compare(self, i: int, opt: np.ndarray, ids: np.ndarray | None, mask: np.ndarray | None) -> None:
        """The optimized model's output of sample i against the spooled reference."""
        key = (self.name, i)
        self._compare(i, lambda s, e: self.spool.rows(key, s, e), self.spool.shape(key), opt, ids, mask)

    def _reduce_reference(self, ref, ids, mask) -> dict[str, Any]:
        rows = as_rows(ref)
        step = chunk_rows(rows.shape[1])
        sum_sq = sum(
            float((rows[s : s + step].astype(np.float64) ** 2).sum()) for s in range(0, len(rows), step)
        )
        out: dict[str, Any] = {"sum_sq": sum_sq}
        if looks_like_classes(self.name, ref.shape):
            out["argmax"] = ref.argmax(axis=-1)
        if self._is_vocab(ref.shape, ids):
            out["nll"] = token_nll(ref, ids, mask)
        return out

    def _is_vocab(self, shape: tuple[int, ...], ids: np.ndarray | None) -> bool:
        is_vocab = ids is not None and len(shape) == 3 and shape[:2] == ids.shape
        return is_vocab and looks_like_classes(self.name, shape) and ids.max() < shape[-1]

    def _compare(self, key, ref_rows, shape, opt, ids, mask) -> None:
        if tuple(shape) != opt.shape:
            raise ValueError(f"output {self.name!r}: shapes differ, {tuple(shape)} vs {opt.shape}")
        reduced = self._pending.pop(key)
        b = as_rows(opt)
        step = chunk_rows(b.shape[1])
        cosines = []
        for s in range(0, len(b), step):
            x, y = ref_rows(s, min(s + step, len(b))), b[s : s + step]
            diff = np.abs(x.astype(np.float64) - y.astype(np.float64))
            self.max_abs = max(self.max_abs, float(np.nan_to_num(diff, nan=np.inf).max(initial=0.0)))
            self.sum_abs += float(diff.sum())
            self.sum_sq_diff += float((diff**2).sum())
            del diff
            cosines.append(row_cosines(x, y))
        self.count += opt.size
        self.sum_sq_ref += reduced["sum_sq"]
        self.cosines.append(float(np.concatenate(cosines).mean()) if opt.size else 1.0)
        if "argmax" in reduced:
            agree = reduced["argmax"] == opt.argmax(axis=-1)
            self.argmax_agree += int(agree.sum())
            self.argmax_total += agree.size
        if "nll" in reduced:
            nll, n = reduced["nll"]
            self.nll_ref += nll
            self.nll_opt += token_nll(opt, ids, mask)[0]
            self.nll_tokens += n

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "max_abs_error": self.max_abs,
            "mean_abs_error": self.sum_abs / max(self.count, 1),
            "relative_l2_error": float(np.sqrt(self.sum_sq_diff / self.sum_sq_ref))
            if self.sum_sq_ref
            else 0.0,
            "cosine_min": min(self.cosines, default=1.0),
            "cosine_mean": float(np.mean(self.cosines)) if self.cosines else 1.0,
        }
        if self.argmax_total:
            out["argmax_agreement"] = self.argmax_agree / self.argmax_total
        if self.nll_tokens:
            out["perplexity_original"] = float(np.exp(self.nll_ref / self.nll_tokens))
            out["perplexity_optimized"] = float(np.exp(self.nll_opt / self.nll_tokens))
            out["perplexity_increase"] = out["perplexity_optimized"] / out["perplexity_original"] - 1.0
            out["perplexity_tokens"] = self.nll_tokens
        return out


# ---------------------------------------------------------------- the comparison


@dataclass
class ValidationResult:
    """Every figure of one validate run."""

    outputs: dict[str, dict[str, Any]]
    latency_original_s: float
    latency_optimized_s: float
    density_per_layer: dict[str, float]
    samples: int
    threads: int | None
    compute_precision: str | None = None  # how the optimized model's sites compute (precision_note)

    @property
    def speedup(self) -> float:
        return (
            self.latency_original_s / self.latency_optimized_s if self.latency_optimized_s else float("nan")
        )

    @property
    def density(self) -> float | None:
        values = list(self.density_per_layer.values())
        return float(np.mean(values)) if values else None

    def failures(
        self, atol: float | None = None, cos_min: float | None = None, max_ppl_increase: float | None = None
    ) -> list[str]:
        """One sentence per threshold that does not hold; empty = pass."""
        out = []
        for name, m in self.outputs.items():
            if atol is not None and not m["max_abs_error"] <= atol:
                out.append(f"{name}: max abs error {m['max_abs_error']:.3g} > atol {atol:g}")
            if cos_min is not None and not m["cosine_mean"] >= cos_min:
                out.append(f"{name}: mean cosine {m['cosine_mean']:.6f} < {cos_min:g}")
            inc = m.get("perplexity_increase")
            if max_ppl_increase is not None and inc is not None and not inc <= max_ppl_increase:
                out.append(f"{name}: perplexity +{inc:.2%} > +{max_ppl_increase:.2%}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "threads": self.threads,
            "outputs": self.outputs,
            "latency_original_s": self.latency_original_s,
            "latency_optimized_s": self.latency_optimized_s,
            "speedup": self.speedup,
            "density": self.density,
            "density_per_layer": self.density_per_layer,
            "compute_precision": self.compute_precision,
        }

    def table(self) -> str:
        rows: list[tuple[str, str]] = []
        for name, m in self.outputs.items():
            rows += [
                (f"{name} {key}", f"{v:.6g}" if isinstance(v, float) else str(v)) for key, v in m.items()
            ]
        rows.append(("latency original", f"{self.latency_original_s * 1e3:.2f} ms (median)"))
        rows.append(("latency optimized", f"{self.latency_optimized_s * 1e3:.2f} ms (median)"))
        rows.append(("speedup", f"{self.speedup:.3f}x"))
        if self.density is not None:
            per_layer = " ".join(f"{v:.2f}" for v in self.density_per_layer.values())
            rows.append(("density", f"{self.density:.4f} (per layer: {per_layer})"))
        if self.compute_precision:
            rows.append(("compute precision", self.compute_precision))
        return format_table(("check", "value"), rows)


def precision_note(model: onnx.ModelProto) -> str | None:
    """How the model's SparseAttention / SparseGroupQueryAttention nodes compute here: "float32",
    or with compute_precision bf16 on some, how many and whether this CPU runs bf16 or falls
    back to float32 (its results then are float32 mode's). None without such nodes."""
    from tfsa_onnx import DOMAIN
    from tfsa_onnx.reference import COMPUTE_PRECISIONS

    nodes = [n for n in model.graph.node if n.domain == DOMAIN]
    if not nodes:
        return None
    values = [next((a.i for a in n.attribute if a.name == "compute_precision"), 0) for n in nodes]
    bf16 = sum(COMPUTE_PRECISIONS[v] == "bf16" for v in values)
    if not bf16:
        return "float32"
    from tfsa_onnx.runtime import cpu_bf16_kernels

    kernels = cpu_bf16_kernels()
    where = f"{kernels} on this CPU" if kernels else "this CPU falls back to float32"
    return f"bf16 on {bf16} of {len(nodes)} sites ({where})"


def validate(
    original: str | Path | onnx.ModelProto,
    optimized: str | Path | onnx.ModelProto,
    feeds: list[Feed],
    *,
    threads: int | None = None,
    warmup: int = 1,
    progress: bool = True,
) -> ValidationResult:
    """Run both models on the same feeds and compare every output; see the module docstring.

    One model at a time, so the peak is the larger model's own and not the sum of both: the
    original runs on every feed (its outputs reduced or spooled to a temporary file), its session
    and arena are released, then the optimized model runs and is compared as its outputs arrive.
    """
    original_head, optimized_head = graph_only(original), graph_only(optimized)
    check_same_inputs(graph_inputs(original_head), graph_inputs(optimized_head))
    out_names = [o.name for o in original_head.graph.output]
    density_names = expose_density(optimized_head)[1]
    known = {o.name for o in optimized_head.graph.output} | set(density_names)
    missing = [n for n in out_names if n not in known]
    if missing:
        raise ValueError(f"the optimized model lacks output(s) {', '.join(missing)} of the original")
    causal = is_causal_lm(optimized_head)
    precision = precision_note(optimized_head)
    del original_head, optimized_head
    names = (out_names, density_names)
    result = _compare(original, optimized, names, feeds, threads, warmup, progress, causal)
    result.compute_precision = precision
    return result


def graph_only(model: str | Path | onnx.ModelProto) -> onnx.ModelProto:
    """The model's graph without its large weights (a proto passed in is used as it is): every
    initializer over 1 MB keeps its name, type and dims and loses its data."""
    if isinstance(model, onnx.ModelProto):
        return model
    proto = onnx.load(str(model), load_external_data=False)
    for t in proto.graph.initializer:
        if len(t.raw_data) > 1 << 20:
            t.ClearField("raw_data")
    # A parsed message keeps the memory of cleared fields until the whole message is freed: a
    # fresh parse of the stripped bytes lets the weights of an embedded-weights file go now.
    slim = onnx.ModelProto.FromString(proto.SerializeToString())
    del proto
    runtime.release_memory()
    return slim


def _timed_phase(new_session, names, use, label, *, feeds, warmup, progress) -> list[float]:
    """A session from new_session(), `warmup` untimed runs on the first feed, then one timed run
    per feed, each output handed to use(i, feed, outputs) and dropped at once; the session and
    its arena are released before returning."""
    from tqdm.auto import tqdm

    session = new_session()
    for _ in range(warmup if feeds else 0):
        runtime.run_shrinking(session, names, feeds[0])
    times = []
    bar = tqdm(feeds, desc=f"validate: {label}", unit="sample", disable=not progress or len(feeds) < 2)
    for i, feed in enumerate(bar):
        outputs, dt = timed_run(session, feed, names)
        times.append(dt)
        use(i, feed, outputs)
        del outputs  # no output outlives its sample
    del session
    runtime.release_memory()
    return times


def _optimized_session(optimized, threads):
    """A session of the optimized model with its density outputs; no proto outlives the call."""
    return make_session(expose_density(load_model(optimized))[0], threads)


def _compare(original, optimized, names, feeds, threads, warmup, progress, causal) -> ValidationResult:
    """Latency stays fair with one session at a time: each model gets a fresh session, the same
    `warmup` untimed runs on the first feed and then one timed run per feed, the same feeds in the
    same order, so every timed run finds its model equally warm (arena grown, weights paged in)
    and neither model's timings include the other's allocations or page faults. The two models'
    phases alternate: the original's, then the optimized model's."""
    out_names, density_names = names
    stats = {n: OutputStats(n) for n in out_names}
    densities: dict[str, list[float]] = {n: [] for n in density_names}

    def keep_reference(i: int, feed: Feed, outputs: list[np.ndarray]) -> None:
        ids, mask = _ids_and_mask(feed) if causal else (None, None)
        for name, a in zip(out_names, outputs, strict=True):
            stats[name].reference(i, a, ids, mask)

    def compare(i: int, feed: Feed, outputs: list[np.ndarray]) -> None:
        ids, mask = _ids_and_mask(feed) if causal else (None, None)
        for name, b in zip(out_names, outputs, strict=False):
            stats[name].compare(i, b, ids, mask)
        for name, d in zip(density_names, outputs[len(out_names) :], strict=True):
            densities[name].append(float(np.mean(d)))

    phase = {"feeds": feeds, "warmup": warmup, "progress": progress}
    with Spool() as spool:
        for s in stats.values():
            s.spool = spool
        # Each session is released before the next allocates its own arena.
        ref_session, opt_session = (
            (lambda: make_session(original, threads)),
            (lambda: _optimized_session(optimized, threads)),
        )
        t_ref = _timed_phase(ref_session, out_names, keep_reference, "original", **phase)
        t_opt = _timed_phase(opt_session, out_names + density_names, compare, "optimized", **phase)
    per_layer = {n.removesuffix(DENSITY_SUFFIX): float(np.mean(v)) for n, v in densities.items() if v}
    return ValidationResult(
        outputs={n: s.result() for n, s in stats.items()},
        latency_original_s=statistics.median(t_ref) if t_ref else 0.0,
        latency_optimized_s=statistics.median(t_opt) if t_opt else 0.0,
        density_per_layer=per_layer,
        samples=len(feeds),
        threads=threads,
    )


def _ids_and_mask(feed: Feed) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The token ids and attention mask of a text feed, when it has them (for perplexity)."""
    ids = next((v for k, v in feed.items() if k.lower() in ("input_ids", "ids", "tokens")), None)
    mask = next((v for k, v in feed.items() if "attention_mask" in k.lower()), None)
    if ids is None or ids.ndim != 2:
        return None, None
    return ids, mask if mask is not None and mask.shape == ids.shape else None
