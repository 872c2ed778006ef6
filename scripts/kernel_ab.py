"""Two builds of the operator library side by side, in one thread's CPU time.

    python scripts/kernel_ab.py --base OLD/libtfsa_ops.so --seq-len 4096 --causal
    python scripts/kernel_ab.py --base OLD/libtfsa_ops.so --seq-len 4096 --causal --estimate antidiagonal \\
        --max-density 0.3 --selection

Sessions (one intra-op thread, so the run happens on the calling thread and time.thread_time()
counts only its CPU time, which a shared machine moves far less than wall-clock time), run
round by round, the minimum over the rounds printed: the sparse op of `--base` and of this
checkout's library (tfsa_onnx.get_library_path()), `bench kernel`'s problem (random inputs,
12 heads x 64, global 0, local 0, threshold 1, the cap alone at --max-density); our dense op and
torch SDPA (when torch imports) as the yardsticks; with --selection the selection-only runs too
(TFSA_SELECTION_ONLY: the selection's share of each library's sparse run). --compute-precision
bf16 runs our op (both libraries, sparse and dense) in bf16; torch stays float32. Checks that
both libraries choose the same density.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np

from tfsa_onnx import get_library_path
from tfsa_onnx.bench.timing import KernelCase
from tfsa_onnx.opmodel import sparse_attention_model
from tfsa_onnx.reference import COMPUTE_PRECISIONS, ESTIMATES
from tfsa_onnx.runtime import make_session


def _runs(args: argparse.Namespace, feeds: dict) -> dict[str, Callable[[], object]]:
    case = KernelCase(
        args.seq_len,
        heads=args.heads,
        head_dim=args.head_dim,
        max_density=args.max_density,
        causal=args.causal,
    )
    attrs = case.attributes(
        estimate=ESTIMATES.index(args.estimate),
        estimate_stride=args.estimate_stride,
        compute_precision=COMPUTE_PRECISIONS.index(args.compute_precision),
    )
    model = sparse_attention_model(**attrs)
    runs: dict[str, Callable[[], object]] = {}
    for name, library in (("base", args.base), ("new", get_library_path())):
        for selection in (False, True) if args.selection else (False,):
            session = make_session(
                model, 1, inter_threads=1, register=True, library=library, selection_only_run=selection
            )
            runs[f"{name}_{'selection' if selection else 'sparse'}"] = lambda s=session: s.run(
                ["density"], feeds
            )
    dense = make_session(sparse_attention_model(**attrs | {"max_density": 1.0}), 1, inter_threads=1)
    runs["our_dense"] = lambda: dense.run(["Y"], feeds)
    try:
        import torch
    except ImportError:
        return runs
    torch.set_num_threads(1)
    tq, tk, tv = (torch.from_numpy(feeds[name]) for name in ("query", "key", "value"))

    def sdpa() -> object:
        with torch.inference_mode():
            return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=args.causal)

    runs["torch_sdpa"] = sdpa
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", required=True, help="the other build of libtfsa_ops.so")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--max-density", type=float, default=0.125)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--estimate", choices=ESTIMATES, default="mean")
    parser.add_argument("--estimate-stride", type=int, default=16)
    parser.add_argument(
        "--compute-precision", choices=COMPUTE_PRECISIONS, default="float32", help="ours only"
    )
    parser.add_argument("--selection", action="store_true", help="also the selection-only runs")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    shape = (1, args.heads, args.seq_len, args.head_dim)
    feeds = {name: rng.standard_normal(shape, dtype=np.float32) for name in ("query", "key", "value")}
    runs = _runs(args, feeds)
    densities = {name: float(run()[0].mean()) for name, run in runs.items() if name.endswith("_sparse")}
    assert len(set(densities.values())) == 1, densities
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            start = time.thread_time()
            run()
            times[name].append(1e3 * (time.thread_time() - start))
    ms = {name: min(values) for name, values in times.items()}
    density = densities["new_sparse"]
    print(f"S={args.seq_len} causal={args.causal} estimate={args.estimate} density={density:.3f}")
    print("  " + "  ".join(f"{name} {value:.1f} ms" for name, value in ms.items()))
    for name in ("base", "new"):
        sparse = ms[f"{name}_sparse"]
        line = f"  {name}: vs our dense {ms['our_dense'] / sparse:.2f}x"
        if "torch_sdpa" in ms:
            line += f", vs torch SDPA {ms['torch_sdpa'] / sparse:.2f}x"
        if args.selection:
            line += f", selection share {ms[f'{name}_selection'] / sparse:.1%}"
        print(line)
    print(f"  new / base sparse: {ms['new_sparse'] / ms['base_sparse']:.3f}")


if __name__ == "__main__":
    main()
