"""A retrieval probe on real attention inputs: does the selection find the one key a late query needs?

    python -m tfsa_onnx.eval.retrieval --tensors /tmp/smollm2-4096.npz \\
        --run mean=samples/configs/smollm2-135m-4096-ppl1.json \\
        --run antidiagonal:16=samples/configs/smollm2-135m-4096-ppl1-antidiagonal.json

Perplexity averages over every token and hides the one a sparse selection loses. Each trial
draws, on SmolLM2's captured attention inputs (tfsa_onnx.eval.estimators --tensors), a layer,
a query head, a late query row i (the last eighth of the window) and a needle key j before
i's global and local-window blocks. Key j of the head's KV group is moved along q_i so that, in
dense attention, row i gives it `--share` of its probability (the other keys keep their
proportions), and value j gets a large random direction (10x the largest value norm) that
no other key carries. The operator (the real kernel, the layer's attributes from a calibrated
config, its estimate as given) then runs on the modified inputs. A trial succeeds when row i's
output is within half the needle's contribution (share x its value norm) of dense attention's:
the needle's block was computed. Dense attention succeeds by construction.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from tfsa_onnx.calibrate import plant_needle
from tfsa_onnx.config import SparsityConfig
from tfsa_onnx.opmodel import sparse_attention_model
from tfsa_onnx.reference import ESTIMATES, SparseAttentionAttributes
from tfsa_onnx.runtime import make_session


def _attributes(config: SparsityConfig, layer: int, estimate: str) -> dict:
    """The layer's SparseAttention attributes from the config, causal, with `estimate` (name:stride)."""
    name, _, stride = estimate.partition(":")
    values = dict(config.for_site(layer, "") or {})  # a skipped layer: the defaults
    values |= {"estimate": ESTIMATES.index(name), "estimate_stride": int(stride or 16), "is_causal": 1}
    return SparseAttentionAttributes(**values).as_dict()


def _needle(q, k, v, head: int, row: int, key: int, share: float, rng) -> tuple[np.ndarray, np.ndarray]:
    """k, v with key `key` of head's KV group moved so that `row` gives it `share` of its mass."""
    g = head // (q.shape[0] // k.shape[0])
    k, v = k.copy(), v.copy()
    plant_needle(q[head, row], k[g], v[g], row + 1, key, 1.0 / np.sqrt(q.shape[-1]), rng, share)
    return k, v


def _dense_row(q, k, v, head: int, row: int) -> np.ndarray:
    g = head // (q.shape[0] // k.shape[0])
    scores = (k[g, : row + 1].astype(np.float64) @ q[head, row]) / np.sqrt(q.shape[-1])
    weights = np.exp(scores - scores.max())
    return (weights / weights.sum()) @ v[g, : row + 1].astype(np.float64)


def probe(
    tensors,
    runs: dict[str, tuple[str, SparsityConfig]],
    trials: int,
    share: float,
    seed: int = 0,
    streaming: dict[str, list[bool]] | None = None,
) -> dict[str, int]:
    """Per run (label -> (estimate, config)): the number of trials whose needle was found.
    `streaming`, when given, gets per run and trial whether the trial's head was a streaming
    head (head_thresholds 0: it cannot find a key outside its global and local blocks)."""
    rng = np.random.default_rng(seed)
    layers = sorted(int(name[1:]) for name in tensors.files if name.startswith("q"))
    found = dict.fromkeys(runs, 0)
    if streaming is not None:
        streaming.update({label: [] for label in runs})
    for _ in range(trials):
        layer = int(rng.choice(layers))
        q, k, v = (tensors[f"{x}{layer}"] for x in "qkv")
        s = q.shape[1]
        head, row = int(rng.integers(q.shape[0])), int(rng.integers(s - s // 8, s))
        key = int(rng.integers(64, (row // 64) * 64 - 192))  # before the global + local blocks
        k2, v2 = _needle(q, k, v, head, row, key, share, rng)
        dense = _dense_row(q, k2, v2, head, row)
        room = 0.5 * share * np.linalg.norm(v2[head // (q.shape[0] // k.shape[0]), key])
        for label, (estimate, config) in runs.items():
            attributes = _attributes(config, layer, estimate)
            session = make_session(sparse_attention_model(**attributes), 2)
            y = session.run(["Y"], {"query": q[None], "key": k2[None], "value": v2[None]})[0]
            found[label] += bool(np.linalg.norm(y[0, head, row] - dense) < room)
            if streaming is not None:
                heads = attributes["head_thresholds"]
                streaming[label].append(bool(heads) and heads[head] == 0.0)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tensors", required=True, help="captured tensors (tfsa_onnx.eval.estimators); captured if missing"
    )
    parser.add_argument(
        "--split",
        choices=("calib", "eval"),
        default="calib",
        help="when capturing: the first window of the calibration text, or of the held-out text",
    )
    parser.add_argument("--seq-len", type=int, default=4096, help="when capturing")
    parser.add_argument(
        "--run", action="append", required=True, help="ESTIMATE[:STRIDE]=CONFIG.json (repeatable)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--share", type=float, default=0.5, help="the needle's share of its row's mass")
    args = parser.parse_args()
    runs = {}
    for item in args.run:
        estimate, _, path = item.partition("=")
        runs[f"{estimate} ({Path(path).stem})"] = (estimate, SparsityConfig.load(path))
    streaming: dict[str, list[bool]] = {}
    if not Path(args.tensors).is_file():
        from tfsa_onnx.eval.estimators import load_or_capture

        load_or_capture(args.seq_len, args.tensors, args.split)
    with np.load(args.tensors) as tensors:
        found = probe(tensors, runs, args.trials, args.share, args.seed, streaming)
    print(f"| estimate | needle found (share {args.share}) | trials on a streaming head |")
    print("|---|---:|---:|")
    print(f"| dense | {args.trials}/{args.trials} | - |")
    for name, count in found.items():
        print(f"| {name} | {count}/{args.trials} | {sum(streaming[name])} |")


if __name__ == "__main__":
    main()
