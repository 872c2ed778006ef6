"""The selection's share of a sparse run, per estimate, in CPU time on one thread.

`tfsa-onnx bench kernel` reports the same share from wall-clock medians on two threads, which a
shared machine moves by tens of percent; this script runs one intra-op thread, so that the run
happens on the calling thread and time.thread_time() counts only its own CPU time, and
interleaves every session round by round. The minimum over the rounds is printed.

    python scripts/selection_cost.py --seq-len 4096 --estimates mean,antidiagonal:16,antidiagonal:32

Sessions: SparseAttention, causal, the cap alone at --max-density (global 0, local 0, threshold
1: every estimate computes the same number of blocks), 12 heads x 64, random inputs; `selection`
is the TFSA_SELECTION_ONLY run (selection and the estimate's key packing, nothing computed).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from tfsa_onnx.opmodel import sparse_attention_model
from tfsa_onnx.reference import ESTIMATES, SparseAttentionAttributes
from tfsa_onnx.runtime import make_session


def _sessions(estimate: str, max_density: float, block: int) -> dict[str, object]:
    name, _, stride = estimate.partition(":")
    attrs = SparseAttentionAttributes.capped(
        max_density,
        is_causal=1,
        block_size=block,
        estimate=ESTIMATES.index(name),
        estimate_stride=int(stride or 16),
    )
    model = sparse_attention_model(**attrs.as_dict())
    return {
        kind: make_session(model, 1, inter_threads=1, selection_only_run=kind == "selection")
        for kind in ("selection", "sparse")
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--max-density", type=float, default=0.3)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--estimates", default="mean,antidiagonal:16,antidiagonal:32,antidiagonal:64")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    shape = (1, args.heads, args.seq_len, args.head_dim)
    feeds = {name: rng.standard_normal(shape, dtype=np.float32) for name in ("query", "key", "value")}
    estimates = args.estimates.split(",")
    sessions = {e: _sessions(e, args.max_density, args.block_size) for e in estimates}
    kinds = ("selection", "sparse")
    times: dict[tuple[str, str], list[float]] = {(e, k): [] for e in estimates for k in kinds}
    for e in estimates:  # warm-up
        for session in sessions[e].values():
            session.run(["density"], feeds)
    for _ in range(args.rounds):
        for e in estimates:
            for kind, session in sessions[e].items():
                start = time.thread_time()
                session.run(["density"], feeds)
                times[(e, kind)].append(time.thread_time() - start)
    print("| estimate | selection ms | sparse ms | selection share |")
    print("|---|---:|---:|---:|")
    for e in estimates:
        selection, sparse = (1e3 * min(times[(e, k)]) for k in kinds)
        print(f"| {e} | {selection:.1f} | {sparse:.1f} | {selection / sparse:.1%} |")


if __name__ == "__main__":
    main()
