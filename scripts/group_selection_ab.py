"""The three group selections of grouped-query attention side by side, in one thread's CPU time.

    python scripts/group_selection_ab.py --seq-len 4096 --heads 9 --kv-heads 3 --causal
    python scripts/group_selection_ab.py --seq-len 8192 --causal --estimate antidiagonal --rounds 3

Sessions with one intra-op thread (time.thread_time() then counts only the calling thread's CPU
time, which a shared machine moves far less than wall-clock time), run round by round, the
minimum over the rounds printed: our sparse op at group_selection head, union and shared (each
also selection-only, TFSA_SELECTION_ONLY: the selection's share), on `bench kernel`'s problem
(random inputs, global 0, local 0, threshold 1, the cap alone at --max-density; the union's
density is that of its heads' picks together); our dense op and torch SDPA (key/value heads
repeated beforehand, not timed) as the yardsticks.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np

from tfsa_onnx.bench.timing import KernelCase
from tfsa_onnx.opmodel import sparse_attention_model
from tfsa_onnx.reference import ESTIMATES, GROUP_SELECTIONS
from tfsa_onnx.runtime import make_session


def _runs(args: argparse.Namespace, feeds: dict) -> dict[str, Callable[[], object]]:
    shape = dict(heads=args.heads, head_dim=args.head_dim, max_density=args.max_density, causal=args.causal)
    case = KernelCase(args.seq_len, **shape)
    attrs = case.attributes(estimate=ESTIMATES.index(args.estimate), estimate_stride=args.estimate_stride)
    runs: dict[str, Callable[[], object]] = {}
    for mode, name in enumerate(GROUP_SELECTIONS):
        model = sparse_attention_model(**attrs | {"group_selection": mode})
        for selection in (False, True):
            session = make_session(model, 1, inter_threads=1, register=True, selection_only_run=selection)
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
    group = args.heads // args.kv_heads
    tq = torch.from_numpy(feeds["query"])
    tk, tv = (torch.from_numpy(np.repeat(feeds[name], group, axis=1)) for name in ("key", "value"))

    def sdpa() -> object:
        with torch.inference_mode():
            return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=args.causal)

    runs["torch_sdpa"] = sdpa
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--max-density", type=float, default=0.125)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--estimate", choices=ESTIMATES, default="mean")
    parser.add_argument("--estimate-stride", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    q_shape = (1, args.heads, args.seq_len, args.head_dim)
    kv_shape = (1, args.kv_heads, args.seq_len, args.head_dim)
    feeds = {"query": rng.standard_normal(q_shape, dtype=np.float32)}
    feeds |= {name: rng.standard_normal(kv_shape, dtype=np.float32) for name in ("key", "value")}
    runs = _runs(args, feeds)
    densities = {name: float(run()[0].mean()) for name, run in runs.items() if name.endswith("_sparse")}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            start = time.thread_time()
            run()
            times[name].append(1e3 * (time.thread_time() - start))
    ms = {name: min(values) for name, values in times.items()}
    print(
        f"S={args.seq_len} Hq={args.heads} Hkv={args.kv_heads} D={args.head_dim} causal={args.causal} "
        f"estimate={args.estimate} max_density={args.max_density} rounds={args.rounds} (one thread, CPU ms)"
    )
    print("  " + "  ".join(f"{name} {value:.1f}" for name, value in ms.items()))
    for name in GROUP_SELECTIONS:
        sparse = ms[f"{name}_sparse"]
        line = f"  {name:6s}: density {densities[f'{name}_sparse']:.3f}"
        line += f", vs our dense {ms['our_dense'] / sparse:.2f}x"
        if "torch_sdpa" in ms:
            line += f", vs torch SDPA {ms['torch_sdpa'] / sparse:.2f}x"
        line += f", selection share {ms[f'{name}_selection'] / sparse:.1%}"
        line += f", time / head's {sparse / ms['head_sparse']:.3f}"
        print(line)


if __name__ == "__main__":
    main()
