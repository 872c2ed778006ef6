"""Which block-mass estimate picks the right key blocks? A measurement on SmolLM2 attention.

    python -m tfsa_onnx.eval.estimators --seq-len 4096 --layers 2,5,8,11,14,17,20,23,26,29

Captures the query/key/value of every attention layer of SmolLM2-135M on one BBC text window,
then, per layer and head (one head per KV group), selects key blocks with each estimate at a
range of thresholds (the operator's rule: global + local blocks, then candidates by mass until
the threshold) and measures the attention output's relative L2 error against dense. Printed:
the mean density each estimate needs to stay within an error.

Estimates: `mean` (the operator's: mean-pooled Q and K blocks), `sampled4` (exact probabilities
of 4 query rows per block: costs 4/block_size of the scores), `oracle` (the true block mass).
"""

from __future__ import annotations

import argparse

import numpy as np

BLOCK, GLOBAL, WINDOW = 64, 64, 128
THRESHOLDS = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)


def capture(seq_len: int) -> dict[str, np.ndarray]:
    """q{i}, k{i}, v{i} of every SparseAttention node of the dense-optimized SmolLM2."""
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
    feed = load_feeds(model, text=bbc_texts("calib"), tokenizer=smollm2_dir(), seq_len=seq_len, samples=1)[0]
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


def _estimates(
    q: np.ndarray, k: np.ndarray, probs: np.ndarray, candidates: np.ndarray
) -> dict[str, np.ndarray]:
    n = q.shape[0] // BLOCK
    per_row = probs.reshape(n, BLOCK, n, BLOCK).sum(3)  # [qb, row, kb]
    pooled = q.reshape(n, BLOCK, -1).mean(1) @ k.reshape(n, BLOCK, -1).mean(1).T / np.sqrt(q.shape[1])
    pooled = np.where(candidates, pooled, -np.inf)
    best = np.where(np.isfinite(pooled).any(1, keepdims=True), pooled.max(1, keepdims=True), 0.0)
    return {
        "mean": np.exp(pooled - best),
        "sampled4": per_row[:, [15, 31, 47, 63], :].sum(1),
        "oracle": per_row.sum(1),
    }


def curves(tensors: dict[str, np.ndarray], layers: list[int]) -> dict[str, list[list[tuple]]]:
    """Per estimate, per (layer, head): [(threshold, density, relative error)]."""
    out: dict[str, list[list[tuple]]] = {"mean": [], "sampled4": [], "oracle": []}
    for layer in layers:
        q, k, v = tensors[f"q{layer}"], tensors[f"k{layer}"], tensors[f"v{layer}"]
        group = q.shape[0] // k.shape[0]
        allowed, forced, candidates = _grid(q.shape[1])
        for head in range(0, q.shape[0], group):
            qh, kh, vh = q[head], k[head // group], v[head // group]
            scores = qh @ kh.T / np.sqrt(qh.shape[1])
            scores[np.triu_indices(scores.shape[0], 1)] = -np.inf
            probs = np.exp(scores - scores.max(1, keepdims=True))
            probs /= probs.sum(1, keepdims=True)
            dense = probs @ vh
            for name, mass in _estimates(qh, kh, probs, candidates).items():
                points = []
                for threshold in THRESHOLDS:
                    chosen = _select(mass, threshold, forced, candidates)
                    keep = np.repeat(np.repeat(chosen, BLOCK, 0), BLOCK, 1)
                    kept = probs * keep
                    sparse = (kept @ vh) / kept.sum(1, keepdims=True)
                    error = np.linalg.norm(sparse - dense) / np.linalg.norm(dense)
                    points.append((threshold, chosen.sum() / allowed.sum(), error))
                out[name].append(points)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--layers", default="2,5,8,11,14,17,20,23,26,29")
    args = parser.parse_args()
    results = curves(capture(args.seq_len), [int(x) for x in args.layers.split(",")])
    for limit in (0.01, 0.02, 0.05):
        cells = []
        for name, per_head in results.items():
            needed = [min([d for _, d, e in points if e <= limit], default=1.0) for points in per_head]
            cells.append(f"{name} {np.mean(needed):.3f}")
        print(f"relative error <= {limit}: mean density  " + "  ".join(cells))


if __name__ == "__main__":
    main()
