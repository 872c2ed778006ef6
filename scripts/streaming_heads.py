"""What a streaming head saves: SparseAttention with every head streaming (head_thresholds all
0: global tokens and the local window only, the estimate never computed) against the same
forced blocks plus the estimate's single heaviest pick per query block (threshold 1e-6: the
estimate is computed, then at most one more block taken), and our dense op, interleaved round
by round (median ms; 2 intra-op threads). `selection` columns: the TFSA_SELECTION_ONLY run of
each (the selection and the estimate's key packing, nothing computed). With --base-library (a
build from before streaming heads existed), also that library at threshold 0: the same blocks
as streaming, with the estimate computed and then unused, as every head did before.

    python scripts/streaming_heads.py --seq-len 4096,8192 --estimate antidiagonal --base-library OLD.so

Inputs: random, causal, 9 query heads and 3 KV heads of 64 (SmolLM2-135M's shapes), block 64,
64 global tokens, a 128-token local window (the operator's defaults).
"""

from __future__ import annotations

import argparse

import numpy as np

from tfsa_onnx.bench.timing import WallTimer, interleaved_medians
from tfsa_onnx.opmodel import sparse_attention_model
from tfsa_onnx.reference import ESTIMATES
from tfsa_onnx.runtime import make_session

KINDS = ("streaming", "base_threshold0", "one_pick", "dense")


def _attributes(kind: str, heads: int, estimate: str) -> dict:
    name, _, stride = estimate.partition(":")
    base = dict(is_causal=1, min_seq_len=0, estimate=ESTIMATES.index(name), estimate_stride=int(stride or 16))
    if kind == "base_threshold0":
        return base | {"threshold": 0.0}
    if kind == "streaming":
        return base | {"head_thresholds": (0.0,) * heads}
    if kind == "one_pick":
        return base | {"threshold": 1e-6}
    return base | {"threshold": 1.0}  # dense


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seq-len", default="4096,8192")
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--estimate", default="antidiagonal")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--base-library", help="an earlier build of the library, timed at threshold 0")
    args = parser.parse_args()
    kinds = [k for k in KINDS if args.base_library or k != "base_threshold0"]
    rng = np.random.default_rng(0)
    print("| S | estimate | run | density | ms | selection ms |")
    print("|---:|---|---|---:|---:|---:|")
    for seq_len in (int(s) for s in args.seq_len.split(",")):
        feeds = {
            "query": rng.standard_normal((1, args.heads, seq_len, 64), dtype=np.float32),
            "key": rng.standard_normal((1, args.kv_heads, seq_len, 64), dtype=np.float32),
            "value": rng.standard_normal((1, args.kv_heads, seq_len, 64), dtype=np.float32),
        }
        runs, density = {}, {}
        for kind in kinds:
            model = sparse_attention_model(**_attributes(kind, args.heads, args.estimate))
            library = args.base_library if kind == "base_threshold0" else None
            for selection in (False, True):
                session = make_session(
                    model, 2, inter_threads=1, selection_only_run=selection, library=library
                )
                runs[kind + (" selection" if selection else "")] = lambda s=session, f=feeds: s.run(["Y"], f)
                if not selection:
                    density[kind] = float(session.run(["density"], feeds)[0].mean())
        if args.base_library:  # the same blocks, so the same output
            same = np.array_equal(runs["streaming"]()[0], runs["base_threshold0"]()[0])
            assert same, "streaming heads and the base library at threshold 0 disagree"
        ms = interleaved_medians(runs, WallTimer(), 1, args.repeat)
        for kind in kinds:
            row = (seq_len, args.estimate, kind, f"{density[kind]:.3f}", f"{ms[kind]:.1f}")
            print("| " + " | ".join(map(str, row)) + f" | {ms[kind + ' selection']:.1f} |")


if __name__ == "__main__":
    main()
