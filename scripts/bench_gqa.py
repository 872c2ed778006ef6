"""Times ai.tfsa::SparseGroupQueryAttention against ORT's com.microsoft.GroupQueryAttention on
the CPU: one prompt of S tokens into an empty cache, and one decode step after S - 1 tokens,
both with past and present bound to one buffer as onnxruntime-genai does. Rounds interleave
the two ops on the same inputs; the medians are printed.

python scripts/bench_gqa.py --seq-len 1024,4096 --threshold 1.0,0.9   (SmolLM2-135M's shapes)
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto

import tfsa_onnx
from tfsa_onnx.opmodel import group_query_attention_model


def _bound_run(domain: str, feeds: dict, threads: int, **attrs):
    """A no-argument callable running one call of the op through a fixed IO binding."""
    model = group_query_attention_model(domain, TensorProto.FLOAT, packed=True, **attrs)
    so = tfsa_onnx.session_options()
    so.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    binding = session.io_binding()
    for name in ("query", "seqlens_k", "total_sequence_length", "cos_cache", "sin_cache"):
        binding.bind_cpu_input(name, feeds[name])
    binding.bind_output("output")
    caches = [feeds["past_key"].copy(), feeds["past_value"].copy()]  # the OrtValues borrow them
    pairs = (("past_key", "present_key"), ("past_value", "present_value"))
    for cache, (past, present) in zip(caches, pairs, strict=True):
        value = ort.OrtValue.ortvalue_from_numpy(cache)
        binding.bind_ortvalue_input(past, value)
        binding.bind_ortvalue_output(present, value)
    return lambda: (session.run_with_iobinding(binding), caches)


def _feeds(seq: int, new_rows: int, q_heads: int, kv_heads: int, head_dim: int) -> dict:
    rng = np.random.default_rng(0)
    angles = rng.uniform(0, 2 * np.pi, (seq, head_dim // 2))
    return {
        "query": rng.standard_normal((1, new_rows, (q_heads + 2 * kv_heads) * head_dim)).astype(np.float32),
        "past_key": rng.standard_normal((1, kv_heads, seq, head_dim)).astype(np.float32),
        "past_value": rng.standard_normal((1, kv_heads, seq, head_dim)).astype(np.float32),
        "seqlens_k": np.array([seq - 1], np.int32),
        "total_sequence_length": np.array(seq, np.int32),  # prompt: S == total; decode: past = S - 1
        "cos_cache": np.cos(angles).astype(np.float32),
        "sin_cache": np.sin(angles).astype(np.float32),
    }


def _time_round(run, calls: int, rounds: list[float]) -> None:
    run()  # warm
    start = time.perf_counter()
    for _ in range(calls):
        run()
    rounds.append((time.perf_counter() - start) / calls * 1e3)


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--seq-len", default="1024,4096")
    parser.add_argument("--threshold", default="1.0,0.9", help="the sparse op's thresholds (1.0: dense)")
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    heads = dict(num_heads=args.heads, kv_num_heads=args.kv_heads, do_rotary=1)
    print("| step | S | threshold | ORT GroupQueryAttention ms | SparseGroupQueryAttention ms | ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    for seq in (int(s) for s in args.seq_len.split(",")):
        for step, new_rows, calls in (("prompt", seq, 1), ("decode", 1, 50)):
            thresholds = [float(t) for t in args.threshold.split(",")] if step == "prompt" else [1.0]
            feeds = _feeds(seq, new_rows, args.heads, args.kv_heads, args.head_dim)
            base = _bound_run("com.microsoft", feeds, args.threads, **heads)
            for threshold in thresholds:
                ours = _bound_run(tfsa_onnx.DOMAIN, feeds, args.threads, **heads, threshold=threshold)
                times: dict[str, list[float]] = {"ort": [], "ours": []}
                for _ in range(args.rounds):
                    _time_round(base, calls, times["ort"])
                    _time_round(ours, calls, times["ours"])
                ort_ms, ours_ms = statistics.median(times["ort"]), statistics.median(times["ours"])
                ratio = ort_ms / ours_ms
                print(f"| {step} | {seq} | {threshold} | {ort_ms:.2f} | {ours_ms:.2f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
