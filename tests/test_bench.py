"""`tfsa-onnx bench kernel` and the kernel's memory footprint."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from click.testing import CliRunner

from tfsa_onnx.bench import bench_kernel
from tfsa_onnx.bench.timing import KernelCase
from tfsa_onnx.cli import main


def test_bench_kernel_reports_all_three_and_the_density_reached():
    result = bench_kernel(KernelCase(512, heads=2, head_dim=32, max_density=0.25), repeat=2, threads=1)
    assert abs(result.density - 0.25) < 1e-6
    assert result.sparse_ms > 0 and result.ort_mha_ms > 0 and result.unfused_ms > 0
    assert result.speedup_vs_ort_mha == result.ort_mha_ms / result.sparse_ms


def test_bench_kernel_times_the_causal_peers_and_names_the_fastest():
    result = bench_kernel(
        KernelCase(256, heads=2, head_dim=32, max_density=0.25, causal=True), repeat=2, threads=1
    )
    peers = {
        "ort_mha": result.ort_mha_ms,
        "ort_gqa": result.ort_gqa_ms,
        "torch_sdpa": result.torch_sdpa_ms,
        "unfused": result.unfused_ms,
    }
    assert all(ms > 0 for ms in peers.values()), peers  # torch is installed for the tests
    assert result.best_peer == min(peers, key=peers.get)
    assert result.speedup_vs_best_peer == peers[result.best_peer] / result.sparse_ms
    assert result.dense_ms > 0 and result.dense_speedup_vs_ort_mha == result.ort_mha_ms / result.dense_ms
    non_causal = bench_kernel(
        KernelCase(256, heads=2, head_dim=32), repeat=1, threads=1, unfused=False, dense=False
    )
    assert non_causal.ort_gqa_ms is None and non_causal.dense_ms is None  # GQA is causal only


def test_bench_kernel_with_grouped_query_heads_times_every_peer_on_the_same_problem():
    case = KernelCase(256, heads=4, kv_heads=2, head_dim=32, max_density=0.25, causal=True)
    result = bench_kernel(case, repeat=1, threads=1, group_selection=2)
    assert result.kv_heads == 2 and result.unfused_ms is None  # the unfused graph has no groups
    assert result.ort_mha_ms > 0 and result.ort_gqa_ms > 0 and result.torch_sdpa_ms > 0
    assert 0.25 <= result.density < 0.5
    args = ["bench", "kernel", "--seq-len", "128", "--heads", "4", "--kv-heads", "3", "--threads", "1"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0 and "multiple of kv_heads" in str(result.exception)


def test_bench_kernel_cli_writes_json_and_plot(tmp_path):
    out, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    options = "--seq-len 128,256 --heads 2 --head-dim 16 --max-density 0.5 --causal --threads 1 --repeat 1"
    args = ["bench", "kernel", *options.split(), "--json", str(out), "--plot", str(plot)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    assert [r["seq_len"] for r in rows] == [128, 256]
    assert all(r["causal"] and r["density"] <= 0.75 for r in rows)
    assert plot.stat().st_size > 1000
    assert "speedup_vs_ort_mha" in result.output


def test_long_sequence_memory_grows_with_blocks_not_with_s_squared():
    # S = 32768: an S x S score matrix would be 32 GiB (8 heads); the kernel must stay far below.
    script = textwrap.dedent(
        """
        import resource, numpy as np, onnxruntime as ort, tfsa_onnx
        from tfsa_onnx.opmodel import sparse_attention_model
        s, h, d = 32768, 8, 64
        rng = np.random.default_rng(0)
        q, k, v = (rng.standard_normal((1, h, s, d), dtype=np.float32) for _ in range(3))
        so = tfsa_onnx.session_options()
        so.intra_op_num_threads = 2
        model = sparse_attention_model(global_tokens=0, local_window=0, threshold=1.0, max_density=0.05,
                                       min_seq_len=0)
        session = ort.InferenceSession(model.SerializeToString(), so)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        y, density = session.run(None, {"query": q, "key": k, "value": v})
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) / 2**20, float(density.mean()), bool(np.isfinite(y).all()))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    growth_gib, density, finite = out.stdout.split()
    assert float(growth_gib) < 1.0, f"peak RSS grew by {growth_gib} GiB"
    assert abs(float(density) - 0.05) < 0.01
    assert finite == "True"


def test_bench_model_compares_with_the_ort_fused_original(exports, tmp_path):
    import tfsa_onnx

    original = exports.get("bert", "eager")
    optimized_model, _ = tfsa_onnx.optimize(str(original), None)
    optimized = tmp_path / "bert.tfsa.onnx"
    import onnx

    onnx.save(optimized_model, optimized)
    out = tmp_path / "model.json"
    args = ["bench", "model", str(original), str(optimized), *"--seq-len 64 --threads 1 --repeat 1".split()]
    args += ["--json", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    (row,) = json.loads(out.read_text())
    assert row["ort_fused_attention_nodes"] == 2, "the transformers optimizer fuses this BERT export"
    assert row["best_dense"] in ("original", "ort_fused")
    assert row["density"] == 1.0  # 64 tokens: below min_seq_len, dense
    assert row["speedup_vs_best_dense"] == min(row["original_ms"], row["ort_fused_ms"]) / row["optimized_ms"]
