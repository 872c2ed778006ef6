"""Kernel benchmark: our SparseAttention against ONNX Runtime's own dense attention.

Three single-node ONNX Runtime sessions with the same thread count run on the same random
inputs, interleaved round by round so that a noisy machine slows all of them alike:
  sparse   ai.tfsa::SparseAttention (global 0, local 0, threshold 1, the given max_density)
  ort_mha  com.microsoft.MultiHeadAttention (dense; ORT's flash-attention CPU path)
  unfused  MatMul -> Mul -> (Add mask) -> Softmax -> MatMul, what an exporter emits
Times are medians; ratios are what to read, absolute times depend on the machine's load.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

import tfsa_onnx
from tfsa_onnx.opmodel import sparse_attention_model
from tfsa_onnx.reference import SparseAttentionAttributes

UNFUSED_MEMORY_LIMIT = 8 * 2**30


@dataclass
class KernelResult:
    seq_len: int
    heads: int
    head_dim: int
    batch: int
    threads: int
    causal: bool
    max_density: float
    density: float
    sparse_ms: float
    selection_ms: float
    selection_share: float
    ort_mha_ms: float
    unfused_ms: float | None
    speedup_vs_ort_mha: float
    speedup_vs_unfused: float | None
    sparse_gflops: float
    ort_mha_gflops: float
    unfused_gflops: float | None

    def as_dict(self) -> dict:
        return asdict(self)


def _mha_model(heads: int, causal: bool) -> onnx.ModelProto:
    """com.microsoft.MultiHeadAttention on [B, S, H*D] query/key/value."""
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", "seq", "hidden"]) for n in "qkv"]
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", "hidden"])
    node = helper.make_node(
        "MultiHeadAttention",
        ["q", "k", "v"],
        ["y"],
        domain="com.microsoft",
        num_heads=heads,
        unidirectional=int(causal),
    )
    graph = helper.make_graph([node], "mha", io, [out])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def _unfused_model(seq_len: int, head_dim: int, causal: bool) -> onnx.ModelProto:
    """MatMul(Q, K^T) * scale (+ causal mask) -> Softmax -> MatMul(V) on [B, H, S, D]."""
    dims = ["batch", "heads", "seq", "head_dim"]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, dims) for n in ("query", "key", "value")]
    out = helper.make_tensor_value_info("Y", TensorProto.FLOAT, dims)
    scale = helper.make_tensor("scale", TensorProto.FLOAT, [], [1.0 / math.sqrt(head_dim)])
    nodes = [
        helper.make_node("Transpose", ["key"], ["key_t"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["query", "key_t"], ["scores"]),
        helper.make_node("Mul", ["scores", "scale"], ["scaled"]),
    ]
    inits = [scale]
    logits = "scaled"
    if causal:
        mask = np.triu(np.full((seq_len, seq_len), -np.inf, np.float32), k=1)
        inits.append(onnx.numpy_helper.from_array(mask, "causal_mask"))
        nodes.append(helper.make_node("Add", ["scaled", "causal_mask"], ["masked"]))
        logits = "masked"
    nodes += [
        helper.make_node("Softmax", [logits], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "value"], ["Y"]),
    ]
    graph = helper.make_graph(nodes, "unfused", inputs, [out], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _session(
    model: onnx.ModelProto | str, threads: int, ours: bool = False, selection_only: bool = False
) -> ort.InferenceSession:
    """A CPU session (a model or a path) with `threads` intra-op threads; `ours` registers the library."""
    so = tfsa_onnx.session_options() if ours else ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    # The kernel reads TFSA_SELECTION_ONLY when the session is created: block selection
    # (and key packing) alone, no attention computed, to time the schedule's share.
    previous = os.environ.pop("TFSA_SELECTION_ONLY", None)
    if selection_only:
        os.environ["TFSA_SELECTION_ONLY"] = "1"
    try:
        source = model if isinstance(model, str) else model.SerializeToString()
        return ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])
    finally:
        os.environ.pop("TFSA_SELECTION_ONLY", None)
        if previous is not None:
            os.environ["TFSA_SELECTION_ONLY"] = previous


def _interleaved_medians(runs: dict[str, Callable[[], object]], warmup: int, repeat: int) -> dict[str, float]:
    for _ in range(warmup):
        for run in runs.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeat):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def bench_kernel(
    seq_len: int,
    heads: int = 12,
    head_dim: int = 64,
    batch: int = 1,
    max_density: float = 0.125,
    causal: bool = False,
    threads: int = 2,
    warmup: int = 1,
    repeat: int = 5,
    unfused: bool = True,
    block_size: int = 64,
) -> KernelResult:
    """Time sparse / ORT MHA / unfused attention at one sequence length (see module doc)."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((batch, heads, seq_len, head_dim), dtype=np.float32) for _ in range(3))
    packed = [x.transpose(0, 2, 1, 3).reshape(batch, seq_len, heads * head_dim).copy() for x in (q, k, v)]

    op_model = sparse_attention_model(
        **SparseAttentionAttributes.capped(max_density, int(causal), block_size).as_dict()
    )
    sparse = _session(op_model, threads, ours=True)
    selection = _session(op_model, threads, ours=True, selection_only=True)
    feeds = {"query": q, "key": k, "value": v}
    mha = _session(_mha_model(heads, causal), threads)
    mha_feeds = dict(zip("qkv", packed, strict=True))
    runs: dict[str, Callable[[], object]] = {
        "sparse": lambda: sparse.run(["Y"], feeds),
        "ort_mha": lambda: mha.run(None, mha_feeds),
    }
    # The unfused graph holds a few [B, H, S, S] float tensors at once: skip it where they
    # would not fit comfortably (S = 16384, 12 heads: ~13 GB each).
    if unfused and 3 * 4 * batch * heads * seq_len**2 <= UNFUSED_MEMORY_LIMIT:
        plain = _session(_unfused_model(seq_len, head_dim, causal), threads)
        runs["unfused"] = lambda: plain.run(None, feeds)
    ms = _interleaved_medians(runs, warmup, repeat)
    # The selection alone takes a few ms: many back-to-back runs give a steadier median.
    ms.update(_interleaved_medians({"selection": lambda: selection.run(["density"], feeds)}, 2, 20))
    density = float(sparse.run(["density"], feeds)[0].mean())

    # Dense attention work: QK^T and PV, 2 flops per multiply-add; causal halves it.
    dense_flops = 4.0 * batch * heads * seq_len * seq_len * head_dim * (0.5 if causal else 1.0)
    gflops = lambda flops, t: flops / (t * 1e-3) / 1e9  # noqa: E731
    unfused_ms = ms.get("unfused")
    return KernelResult(
        seq_len=seq_len,
        heads=heads,
        head_dim=head_dim,
        batch=batch,
        threads=threads,
        causal=causal,
        max_density=max_density,
        density=density,
        sparse_ms=ms["sparse"],
        selection_ms=ms["selection"],
        selection_share=ms["selection"] / ms["sparse"],
        ort_mha_ms=ms["ort_mha"],
        unfused_ms=unfused_ms,
        speedup_vs_ort_mha=ms["ort_mha"] / ms["sparse"],
        speedup_vs_unfused=unfused_ms / ms["sparse"] if unfused_ms else None,
        sparse_gflops=gflops(dense_flops * density, ms["sparse"]),
        ort_mha_gflops=gflops(dense_flops, ms["ort_mha"]),
        unfused_gflops=gflops(dense_flops, unfused_ms) if unfused_ms else None,
    )


def plot_kernel_results(results: list[KernelResult], path: str) -> None:
    """Latency against sequence length for the three implementations (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    seq = [r.seq_len for r in results]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(seq, [r.sparse_ms for r in results], "o-", label="tfsa SparseAttention")
    ax.plot(seq, [r.ort_mha_ms for r in results], "s-", label="ORT MultiHeadAttention (dense)")
    unfused = [(r.seq_len, r.unfused_ms) for r in results if r.unfused_ms]
    if unfused:
        ax.plot(*zip(*unfused, strict=True), "^-", label="MatMul-Softmax-MatMul (dense)")
    r0 = results[0]
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="sequence length",
        ylabel="latency (ms, median)",
        title=f"H={r0.heads} D={r0.head_dim} max_density={r0.max_density} threads={r0.threads}",
    )
    ax.set_xticks(seq, [str(s) for s in seq])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- whole models


@dataclass
class ModelResult:
    seq_len: int
    batch: int
    threads: int
    density: float | None
    original_ms: float
    ort_fused_ms: float | None
    ort_fused_attention_nodes: int
    optimized_ms: float
    best_dense: str
    speedup_vs_original: float
    speedup_vs_best_dense: float

    def as_dict(self) -> dict:
        return asdict(self)


def ort_fused_model(original: str, work_dir: str) -> tuple[str | None, int]:
    """The original after onnxruntime.transformers.optimizer fusion, if it fuses any attention.

    Returns (path, fused attention nodes); (None, 0) when the optimizer fuses nothing or fails,
    since then the original itself is the best dense alternative.
    """
    import logging

    from onnxruntime.transformers.optimizer import optimize_model

    from tfsa_onnx.rewrite import find_sites

    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    logging.getLogger("fusion_attention").setLevel(logging.ERROR)
    # The optimizer cannot always detect the head count; our own matcher can.
    sites = [s for s in find_sites(original).sites if s.heads and s.head_dim]
    heads = sites[0].heads if sites else 0
    hidden = sites[0].heads * sites[0].head_dim if sites else 0
    best: tuple[str | None, int] = (None, 0)
    for model_type in ("bert", "gpt2"):
        try:
            fused = optimize_model(
                original, model_type=model_type, num_heads=heads, hidden_size=hidden, opt_level=0
            )
        except Exception:  # noqa: BLE001 - a model the optimizer does not understand: no fused alternative
            continue
        count = sum(
            n.op_type in ("Attention", "MultiHeadAttention", "GroupQueryAttention")
            for n in fused.model.graph.node
        )
        if count > best[1]:
            path = os.path.join(work_dir, f"ort_fused_{model_type}.onnx")
            fused.save_model_to_file(path, use_external_data_format=True)
            best = (path, count)
    return best


def bench_model(
    original: str,
    optimized: str,
    seq_len: int,
    batch: int = 1,
    threads: int = 2,
    warmup: int = 1,
    repeat: int = 5,
    fuse: bool = True,
) -> ModelResult:
    """Median latency of the original, its ORT-fused form (when fusion applies) and ours."""
    import tempfile

    from tfsa_onnx.inputs import check_same_inputs, generate, graph_inputs
    from tfsa_onnx.validation import expose_density

    original_model = onnx.load(original, load_external_data=False)
    optimized_model = onnx.load(optimized)
    specs = graph_inputs(original_model)
    check_same_inputs(specs, graph_inputs(optimized_model))
    feeds = generate(original_model, specs, seq_len=seq_len, batch=batch, samples=1)[0]

    with tempfile.TemporaryDirectory() as work_dir:
        fused_path, fused_nodes = ort_fused_model(original, work_dir) if fuse else (None, 0)
        with_density, density_names = expose_density(optimized_model)
        sessions = {
            "original": _session(original, threads),
            "optimized": _session(with_density, threads, ours=True),
        }
        if fused_path:
            sessions["ort_fused"] = _session(fused_path, threads)
        first_output = [o.name for o in original_model.graph.output]
        runs = {name: (lambda s=s: s.run(first_output, feeds)) for name, s in sessions.items()}
        ms = _interleaved_medians(runs, warmup, repeat)
        density = None
        if density_names:
            values = sessions["optimized"].run(density_names, feeds)
            density = float(np.mean([v.mean() for v in values]))

    dense = {k: v for k, v in ms.items() if k != "optimized"}
    best_dense = min(dense, key=dense.get)
    return ModelResult(
        seq_len=seq_len,
        batch=batch,
        threads=threads,
        density=density,
        original_ms=ms["original"],
        ort_fused_ms=ms.get("ort_fused"),
        ort_fused_attention_nodes=fused_nodes,
        optimized_ms=ms["optimized"],
        best_dense=best_dense,
        speedup_vs_original=ms["original"] / ms["optimized"],
        speedup_vs_best_dense=dense[best_dense] / ms["optimized"],
    )
