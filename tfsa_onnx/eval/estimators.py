"""Which block-mass estimate picks the right key blocks? A measurement on SmolLM2 attention.

    python -m tfsa_onnx.eval.estimators --seq-len 4096 --layers 2,5,8,11,14,17,20,23,26,29

Captures the query/key/value of every attention layer of SmolLM2-135M on one BBC text window
(--tensors FILE.npz keeps them for the next run), then, per layer and head (one head per KV
group; --all-heads for all), selects key blocks with each estimate at a range of thresholds (the
operator's rule: global + local blocks, then candidates by mass until the threshold) and
measures the attention output's relative L2 error against dense. Printed: the mean density
each estimate needs to stay within an error.

Estimates (cost: the share of the QK^T products each computes):
  mean            the operator's default: mean-pooled Q and K blocks (1/block_size^2)
  tokq_max/_mean  every query row against each key block's mean, a softmax per row over the
                  candidate blocks, the max or mean over the block's rows (1/block_size);
                  _all: the softmax over the forced blocks too
  antidiag8/16    XAttention: each stride x stride tile scored by its antidiagonal's mean q.k,
                  a softmax per tile row, summed into blocks (1/stride)
  antidiag8_exp/16_exp/32_exp/64_exp  the same pairs, but each query row's softmax over its
                  own sampled pairs (exact probabilities of 1/stride of the pairs); the
                  operator's estimate=1 (antidiagonal)
  antidiag16_exp_fp32  antidiag16_exp with float operands; antidiag16_exp (the operator's,
                  like every _exp estimate here) rounds the scaled q and k to bf16 first
  antidiagS_exp_rowsR  the same, rows of one stride-row tile in R only (1/(S R))
  sampled4        exact probabilities of 4 query rows per block (4/block_size)
  oracle          the true block mass
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from tfsa_onnx.reference import to_bf16

BLOCK, GLOBAL, WINDOW = 64, 64, 128
THRESHOLDS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999)


def capture(seq_len: int, split: str = "calib") -> dict[str, np.ndarray]:
    """q{i}, k{i}, v{i} of every SparseAttention node of the dense-optimized SmolLM2, on the
    first window of BBC text `split` (calib: the calibration text's, eval: held-out)."""
    from onnx import helper

    from tfsa_onnx.config import SparsityConfig
    from tfsa_onnx.eval.models import bbc_texts, smollm2_dir, smollm2_onnx
    from tfsa_onnx.inputs import load_feeds
    from tfsa_onnx.rewrite import optimize
    from tfsa_onnx.runtime import make_session

    dense = SparsityConfig(defaults={"threshold": 1.0, "max_density": 1.0, "min_seq_len": 0})
    model, _ = optimize(str(smollm2_onnx()), dense)
    nodes = [n for n in model.graph.node if n.op_type == "SparseAttention"]
    names = [x for n in nodes for x in n.input[:3]]
    model.graph.output.extend(helper.make_empty_tensor_value_info(x) for x in names)
    feed = load_feeds(model, text=bbc_texts(split), tokenizer=smollm2_dir(), seq_len=seq_len, samples=1)[0]
    values = make_session(model, mem_pattern=False).run(names, feed)
    return {
        f"{kind}{i // 3}": values[i][0] for i, kind in zip(range(len(names)), "qkv" * len(nodes), strict=True)
    }


def _grid(seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Causal allowed / forced (global + local) / candidate block masks, [nQ, nK]."""
    qb = np.arange(seq_len // BLOCK)[:, None]
    kb = np.arange(seq_len // BLOCK)[None, :]
    allowed = kb <= qb
    forced = allowed & ((kb * BLOCK < GLOBAL) | (kb >= qb - WINDOW // BLOCK))
    return allowed, forced, allowed & ~forced


def _select(mass: np.ndarray, threshold: float, forced: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    share = np.where(candidates, mass, 0.0)
    share = np.where(candidates, share / np.maximum(share.sum(1, keepdims=True), 1e-30), -1.0)
    order = np.argsort(-share, axis=1, kind="stable")
    ranked = np.take_along_axis(share, order, 1)
    before = np.cumsum(np.maximum(ranked, 0), 1) - np.maximum(ranked, 0)
    take = np.zeros_like(ranked, dtype=bool)
    np.put_along_axis(take, order, (before < threshold) & (ranked >= 0), 1)
    return forced | take


def _softmax_rows(scores: np.ndarray) -> np.ndarray:
    """Row softmax; rows with no finite score give zeros."""
    best = scores.max(1, keepdims=True)
    weights = np.exp(scores - np.where(np.isfinite(best), best, 0.0))
    return weights / np.maximum(weights.sum(1, keepdims=True), 1e-300)


def _antidiagonal(q: np.ndarray, k: np.ndarray, stride: int) -> np.ndarray:
    """XAttention's estimate: each stride x stride tile is scored by the mean of its
    antidiagonal's q.k (query row t of the tile against key stride-1-t), a softmax over each
    tile row's keys (causal), summed into blocks. Costs 1/stride of the scores."""
    s, d = q.shape
    n = s // stride
    q_tiles = q.reshape(n, stride, d)[:, ::-1, :].reshape(n, stride * d)
    scores = q_tiles @ k.reshape(n, stride * d).T / (np.sqrt(d) * stride)
    scores[np.triu_indices(n, 1)] = -np.inf
    per = BLOCK // stride
    return _softmax_rows(scores).reshape(s // BLOCK, per, s // BLOCK, per).sum((1, 3))


def _antidiagonal_exp(
    q: np.ndarray, k: np.ndarray, stride: int, every: int = 1, bf16: bool = True
) -> np.ndarray:
    """The same sampled pairs (each query row against one key in every `stride` keys, the
    tile's antidiagonal), but a softmax over each query row's sampled keys: the exact
    probabilities of 1/stride of the pairs, summed into blocks. every > 1: only the rows of
    one stride-row tile in `every` take part (1/(stride * every) of the pairs). bf16: the
    scaled q and k rounded to bf16 first, as the operator's estimate takes them."""
    s, d = q.shape
    n = s // stride
    if bf16:
        q = to_bf16((q / np.sqrt(d)).astype(np.float32)).astype(np.float64) * np.sqrt(d)
        k = to_bf16(k.astype(np.float32)).astype(np.float64)
    rows = np.arange(s)
    keys = np.arange(n)[None, :] * stride + (stride - 1 - rows % stride)[:, None]  # [s, n]
    scores = np.empty((s, n))
    for c in range(stride):  # rows c, c + stride, ... sample keys stride - 1 - c, 2 stride - 1 - c, ...
        scores[c::stride] = q[c::stride] @ k[stride - 1 - c :: stride].T / np.sqrt(d)
    scores = np.where(keys <= rows[:, None], scores, -np.inf)
    scores[(rows // stride) % every != 0] = -np.inf  # rows left out weigh nothing
    return _softmax_rows(scores).reshape(s // BLOCK, BLOCK, s // BLOCK, BLOCK // stride).sum((1, 3))


def _token_queries(q: np.ndarray, k_mean: np.ndarray, forced: np.ndarray, candidates: np.ndarray) -> dict:
    """Every query row against each key block's mean (1/block_size of the scores), a softmax
    per row over the candidate blocks (`_all`: over every allowed block, forced ones too),
    then the max or the mean over the block's rows."""
    n = k_mean.shape[0]
    scores = (q @ k_mean.T / np.sqrt(q.shape[1])).reshape(n, BLOCK, n)
    only = _softmax_rows(np.where(candidates[:, None, :], scores, -np.inf).reshape(n * BLOCK, n))
    every = _softmax_rows(np.where((candidates | forced)[:, None, :], scores, -np.inf).reshape(n * BLOCK, n))
    only, every = only.reshape(n, BLOCK, n), every.reshape(n, BLOCK, n)
    return {"tokq_max": only.max(1), "tokq_mean": only.mean(1), "tokq_mean_all": every.mean(1)}


def _mean_mass(q: np.ndarray, k_mean: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """The mean estimate's block masses: block-mean queries against block-mean keys, exponentiated
    over each query block's candidate blocks."""
    n = q.shape[0] // BLOCK
    pooled = q.reshape(n, BLOCK, -1).mean(1) @ k_mean.T / np.sqrt(q.shape[1])
    pooled = np.where(candidates, pooled, -np.inf)
    best = np.where(np.isfinite(pooled).any(1, keepdims=True), pooled.max(1, keepdims=True), 0.0)
    return np.exp(pooled - best)


def _estimates(
    q: np.ndarray, k: np.ndarray, probs: np.ndarray, forced: np.ndarray, candidates: np.ndarray
) -> dict[str, np.ndarray]:
    n = q.shape[0] // BLOCK
    per_row = probs.reshape(n, BLOCK, n, BLOCK).sum(3)  # [qb, row, kb]
    k_mean = k.reshape(n, BLOCK, -1).mean(1)
    return {
        "mean": _mean_mass(q, k_mean, candidates),
        **_token_queries(q, k_mean, forced, candidates),
        "antidiag8": _antidiagonal(q, k, 8),
        "antidiag16": _antidiagonal(q, k, 16),
        "antidiag8_exp": _antidiagonal_exp(q, k, 8),
        "antidiag16_exp": _antidiagonal_exp(q, k, 16),
        "antidiag16_exp_fp32": _antidiagonal_exp(q, k, 16, bf16=False),
        "antidiag32_exp": _antidiagonal_exp(q, k, 32),
        "antidiag64_exp": _antidiagonal_exp(q, k, 64),
        "antidiag8_exp_rows4": _antidiagonal_exp(q, k, 8, every=4),
        "antidiag16_exp_rows2": _antidiagonal_exp(q, k, 16, every=2),
        "antidiag16_exp_rows4": _antidiagonal_exp(q, k, 16, every=4),
        "sampled4": per_row[:, [15, 31, 47, 63], :].sum(1),
        "oracle": per_row.sum(1),
    }


def curves(
    tensors: dict[str, np.ndarray], layers: list[int], all_heads: bool = False, only: tuple[str, ...] = ()
) -> dict[str, list]:
    """Per estimate (those in `only`, or all), per (layer, head): [(threshold, density, error)]."""
    out: dict[str, list[list[tuple]]] = {}
    for layer in layers:
        q, k, v = tensors[f"q{layer}"], tensors[f"k{layer}"], tensors[f"v{layer}"]
        group = q.shape[0] // k.shape[0]
        allowed, forced, candidates = _grid(q.shape[1])
        for head in range(0, q.shape[0], 1 if all_heads else group):
            qh, kh, vh = (x.astype(np.float64) for x in (q[head], k[head // group], v[head // group]))
            row_mass, row_values, probs = _head_outputs(qh, kh, vh)
            for name, mass in _estimates(qh, kh, probs, forced, candidates).items():
                if only and name not in only:
                    continue
                points = []
                for threshold in THRESHOLDS:
                    chosen = _select(mass, threshold, forced, candidates)
                    error = _selection_error(row_mass, row_values, chosen)
                    points.append((threshold, chosen.sum() / allowed.sum(), error))
                out.setdefault(name, []).append(points)
            del probs, row_values
    return out


def _head_outputs(
    qh: np.ndarray, kh: np.ndarray, vh: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dense causal attention of one head as per-row block sums: each row's mass and weighted
    values per key block ([row, kb], [row, kb, d]; any selection's output follows), and the
    probabilities."""
    n = qh.shape[0] // BLOCK
    scores = qh @ kh.T / np.sqrt(qh.shape[1])
    scores[np.triu_indices(scores.shape[0], 1)] = -np.inf
    probs = np.exp(scores - scores.max(1, keepdims=True))
    del scores
    probs /= probs.sum(1, keepdims=True)
    row_mass = probs.reshape(-1, n, BLOCK).sum(2)
    row_values = np.einsum("snb,nbd->snd", probs.reshape(-1, n, BLOCK), vh.reshape(n, BLOCK, -1))
    return row_mass, row_values, probs


def _group_masses(q: np.ndarray, k: np.ndarray, forced, candidates) -> dict[str, np.ndarray]:
    """The operator's mean and antidiagonal (stride 16) masses of one head's q (or a group's mean q)."""
    k_mean = k.reshape(q.shape[0] // BLOCK, BLOCK, -1).mean(1)
    return {"mean": _mean_mass(q, k_mean, candidates), "antidiag16_exp": _antidiagonal_exp(q, k, 16)}


def group_curves(tensors: dict[str, np.ndarray], layers: list[int]) -> dict[str, list]:
    """The operator's group selections (group_selection) of the mean and antidiagonal estimates,
    per (layer, query head): [(threshold, density, error)]. `_head`: each head its own picks;
    `_union`: each head computes its KV group's picks together; `_shared`: one pick per group,
    from the group's mean query."""
    out: dict[str, dict[tuple, list]] = {}
    for layer in layers:
        q, k, v = tensors[f"q{layer}"], tensors[f"k{layer}"], tensors[f"v{layer}"]
        group = q.shape[0] // k.shape[0]
        allowed, forced, candidates = _grid(q.shape[1])
        for g in range(k.shape[0]):
            kh, vh = k[g].astype(np.float64), v[g].astype(np.float64)
            heads = [q[h].astype(np.float64) for h in range(g * group, (g + 1) * group)]
            outputs = [_head_outputs(qh, kh, vh)[:2] for qh in heads]
            per_head = [_group_masses(qh, kh, forced, candidates) for qh in heads]
            shared = _group_masses(sum(heads) / group, kh, forced, candidates)
            for name, threshold in ((name, t) for name in shared for t in THRESHOLDS):
                picks = [_select(m[name], threshold, forced, candidates) for m in per_head]
                union, one = np.logical_or.reduce(picks), _select(shared[name], threshold, forced, candidates)
                for mode, chosen in (("head", picks), ("union", [union] * group), ("shared", [one] * group)):
                    rows = out.setdefault(f"{name}_{mode}", {})
                    for x, ((row_mass, row_values), c) in enumerate(zip(outputs, chosen, strict=True)):
                        error = _selection_error(row_mass, row_values, c)
                        rows.setdefault((layer, g, x), []).append((threshold, c.sum() / allowed.sum(), error))
            del outputs
    return {name: list(rows.values()) for name, rows in out.items()}


def _selection_error(row_mass: np.ndarray, row_values: np.ndarray, chosen: np.ndarray) -> float:
    """The relative L2 error of one head's output over the `chosen` blocks against dense."""
    keep = np.repeat(chosen, BLOCK, 0)  # [row, kb]
    kept = (row_mass * keep).sum(1, keepdims=True)
    dense = row_values.sum(1)
    return float(
        np.linalg.norm(np.einsum("snd,sn->sd", row_values, keep) / kept - dense) / np.linalg.norm(dense)
    )


def load_or_capture(seq_len: int, path: str | None, split: str = "calib") -> dict[str, np.ndarray]:
    """The captured tensors, from `path` when it exists (else captured and saved there)."""
    if path and Path(path).is_file():
        with np.load(path) as saved:
            return dict(saved)
    tensors = capture(seq_len, split)
    if path:
        np.savez(path, **tensors)
    return tensors


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--layers", default="2,5,8,11,14,17,20,23,26,29")
    parser.add_argument("--all-heads", action="store_true", help="every query head, not one per KV group")
    parser.add_argument("--tensors", help="an .npz of captured tensors: read if it exists, else written")
    parser.add_argument("--only", default="", help="comma-separated estimates to measure (default: all)")
    parser.add_argument(
        "--groups",
        action="store_true",
        help="the group selections instead (mean and antidiag16_exp: per head, union, shared), every head",
    )
    args = parser.parse_args()
    tensors = load_or_capture(args.seq_len, args.tensors)
    layers = [int(x) for x in args.layers.split(",")]
    if args.groups:
        results = group_curves(tensors, layers)
    else:
        results = curves(tensors, layers, args.all_heads, tuple(x for x in args.only.split(",") if x))
    limits = (0.01, 0.02, 0.05, 0.1)
    print("| estimate | " + " | ".join(f"density at error <= {x}" for x in limits) + " |")
    print("|---|" + "---:|" * len(limits))
    for name, per_head in results.items():
        cells = []
        for limit in limits:
            needed = [min([d for _, d, e in points if e <= limit], default=1.0) for points in per_head]
            cells.append(f"{np.mean(needed):.3f}")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
