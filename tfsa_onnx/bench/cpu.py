"""Kernel benchmark: our SparseAttention against ONNX Runtime's own dense attention.

Single-node ONNX Runtime sessions (and torch) with the same thread count run on the same
random inputs, interleaved round by round so that a noisy machine slows all of them alike:
  sparse     ai.tfsa::SparseAttention (global 0, local 0, threshold 1, the given max_density)
  dense      the same op with every block (max_density 1): our own dense attention
  ort_mha    com.microsoft.MultiHeadAttention (dense; ORT's flash-attention CPU path)
  ort_gqa    com.microsoft.GroupQueryAttention, causal runs only (the op is always causal)
  torch_sdpa torch.nn.functional.scaled_dot_product_attention, when torch is installed
  unfused    MatMul -> Mul -> (Add mask) -> Softmax -> MatMul, what an exporter emits
With fewer key/value heads than query heads (kv_heads, grouped-query attention) ORT MHA and
torch SDPA get the key/value heads repeated beforehand (not timed), ORT GQA and our op the
grouped ones; the unfused graph is not run.
The peers are every dense run but ours; speedup_vs_best_peer divides the fastest by sparse.
Times are medians; ratios are what to read, absolute times depend on the machine's load.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import onnx

from tfsa_onnx.bench.output import Row
from tfsa_onnx.bench.timing import KernelCase, WallTimer, interleaved_medians, rate
from tfsa_onnx.opmodel import group_query_attention_model, mha_model, sparse_attention_model, unfused_model
from tfsa_onnx.reference import COMPUTE_PRECISIONS
from tfsa_onnx.runtime import make_session

UNFUSED_MEMORY_LIMIT = 8 * 2**30


KERNEL_COLUMNS = (
    "seq_len causal compute_precision density sparse_ms selection_share dense_ms ort_mha_ms ort_gqa_ms "
    "torch_sdpa_ms unfused_ms best_peer speedup_vs_best_peer speedup_vs_ort_mha dense_speedup_vs_ort_mha"
)
MODEL_COLUMNS = (
    "seq_len batch threads density original_ms ort_fused_ms optimized_ms best_dense "
    "speedup_vs_original speedup_vs_best_dense"
)


@dataclass(kw_only=True)
class KernelResult(KernelCase):
    threads: int
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
    compute_precision: str = "float32"
    dense_ms: float | None = None
    ort_gqa_ms: float | None = None
    torch_sdpa_ms: float | None = None
    best_peer: str = ""
    speedup_vs_best_peer: float = 0.0
    dense_speedup_vs_ort_mha: float | None = None


def bench_kernel(
    case: KernelCase,
    *,
    threads: int = 2,
    warmup: int = 1,
    repeat: int = 5,
    unfused: bool = True,
    estimate: int = 0,
    estimate_stride: int = 16,
    compute_precision: int = 0,
    group_selection: int = 0,
    dense: bool = True,
    peers: bool = True,
) -> KernelResult:
    """Time sparse / our dense / the dense peers on one case (see module doc)."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal(case.shape, dtype=np.float32)
    k, v = (rng.standard_normal(case.kv_shape, dtype=np.float32) for _ in range(2))
    batch, heads, seq_len, head_dim = case.shape
    group = heads // case.kv_shape[1]
    if heads % case.kv_shape[1]:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({case.kv_shape[1]})")

    def packed_heads(x: np.ndarray) -> np.ndarray:
        return x.transpose(0, 2, 1, 3).reshape(batch, seq_len, -1).copy()

    repeated = [q, *(np.repeat(x, group, axis=1) for x in (k, v))]  # for the peers without groups
    packed = [packed_heads(x) for x in repeated]

    attributes = case.attributes(
        estimate=estimate,
        estimate_stride=estimate_stride,
        compute_precision=compute_precision,
        group_selection=group_selection,
    )
    op_model = sparse_attention_model(**attributes)
    sparse = _session(op_model, threads)
    selection = _session(op_model, threads, selection_only=True)
    feeds = {"query": q, "key": k, "value": v}
    mha = _session(mha_model(heads, case.causal), threads)
    mha_feeds = dict(zip("qkv", packed, strict=True))
    runs: dict[str, Callable[[], object]] = {
        "sparse": lambda: sparse.run(["Y"], feeds),
        "ort_mha": lambda: mha.run(None, mha_feeds),
    }
    if dense:
        ours_dense = _session(sparse_attention_model(**attributes | {"max_density": 1.0}), threads)
        runs["dense"] = lambda: ours_dense.run(["Y"], feeds)
    if peers:
        grouped = [packed[0], packed_heads(k), packed_heads(v)]
        runs.update(_peer_runs(repeated, packed, grouped, case.causal, threads))
    # The unfused graph holds a few [B, H, S, S] float tensors at once: skip it where they
    # would not fit comfortably (S = 16384, 12 heads: ~13 GB each).
    if unfused and group == 1 and 3 * 4 * batch * heads * seq_len**2 <= UNFUSED_MEMORY_LIMIT:
        plain = _session(unfused_model(seq_len, head_dim, case.causal), threads)
        runs["unfused"] = lambda: plain.run(None, feeds)
    ms = interleaved_medians(runs, WallTimer(), warmup, repeat)
    # The selection alone takes a few ms: many back-to-back runs give a steadier median.
    selection_run = {"selection": lambda: selection.run(["density"], feeds)}
    ms.update(interleaved_medians(selection_run, WallTimer(), 2, 20))
    density = float(sparse.run(["density"], feeds)[0].mean())
    return _kernel_result(case, threads, density, ms, COMPUTE_PRECISIONS[compute_precision])


def _kernel_result(
    case: KernelCase, threads: int, density: float, ms: dict[str, float], precision: str
) -> KernelResult:
    flops, sparse_ms, unfused_ms = case.flops(), ms["sparse"], ms.get("unfused")
    peer_ms = {name: ms[name] for name in ("ort_mha", "ort_gqa", "torch_sdpa", "unfused") if name in ms}
    best_peer = min(peer_ms, key=peer_ms.get)
    return KernelResult(
        **asdict(case),
        threads=threads,
        density=density,
        sparse_ms=sparse_ms,
        selection_ms=ms["selection"],
        selection_share=ms["selection"] / sparse_ms,
        ort_mha_ms=ms["ort_mha"],
        unfused_ms=unfused_ms,
        speedup_vs_ort_mha=ms["ort_mha"] / sparse_ms,
        speedup_vs_unfused=unfused_ms / sparse_ms if unfused_ms else None,
        sparse_gflops=rate(flops * density, sparse_ms, 1e9),
        ort_mha_gflops=rate(flops, ms["ort_mha"], 1e9),
        unfused_gflops=rate(flops, unfused_ms, 1e9),
        compute_precision=precision,
        dense_ms=ms.get("dense"),
        ort_gqa_ms=ms.get("ort_gqa"),
        torch_sdpa_ms=ms.get("torch_sdpa"),
        best_peer=best_peer,
        speedup_vs_best_peer=peer_ms[best_peer] / sparse_ms,
        dense_speedup_vs_ort_mha=ms["ort_mha"] / ms["dense"] if "dense" in ms else None,
    )


def _peer_runs(qkv, packed, grouped, causal: bool, threads: int) -> dict[str, Callable[[], object]]:
    """ORT's GroupQueryAttention (causal only; on the grouped [B, S, heads * D] inputs) and torch
    SDPA (when torch imports; on the [B, H, S, D] inputs qkv, key/value heads repeated)."""
    runs: dict[str, Callable[[], object]] = {}
    q, k, v = qkv
    batch, heads, seq_len, head_dim = q.shape
    if causal:
        kv_heads = grouped[1].shape[2] // head_dim
        gqa = _session(
            group_query_attention_model(past=False, rotary=False, num_heads=heads, kv_num_heads=kv_heads),
            threads,
        )
        gqa_feeds = dict(zip(("query", "key", "value"), grouped, strict=True)) | {
            "seqlens_k": np.full(batch, seq_len - 1, np.int32),
            "total_sequence_length": np.array([seq_len], np.int32),
        }
        runs["ort_gqa"] = lambda: gqa.run(["output"], gqa_feeds)
    try:
        import torch
    except ImportError:
        return runs
    torch.set_num_threads(threads)
    tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))

    def sdpa() -> object:
        with torch.inference_mode():
            return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)

    runs["torch_sdpa"] = sdpa
    return runs


def _session(model: onnx.ModelProto | str, threads: int, register: bool | None = None, selection_only=False):
    """A CPU session with `threads` intra-op threads and one inter-op thread."""
    return make_session(model, threads, inter_threads=1, register=register, selection_only_run=selection_only)


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
class ModelResult(Row):
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
            "original": _session(original, threads, register=False),
            "optimized": _session(with_density, threads),
        }
        if fused_path:
            sessions["ort_fused"] = _session(fused_path, threads, register=False)
        first_output = [o.name for o in original_model.graph.output]
        runs = {name: (lambda s=s: s.run(first_output, feeds)) for name, s in sessions.items()}
        ms = interleaved_medians(runs, WallTimer(), warmup, repeat)
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
