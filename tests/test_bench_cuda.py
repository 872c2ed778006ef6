"""`tfsa-onnx bench kernel --provider cuda` (tfsa_onnx.bench.cuda) and scripts/gpu_check.sh, without a GPU.

The GPU side is exercised by scripts/gpu_check.sh on a GPU machine; here: the option and its
errors, the timing and ratio helpers on fake timings, the row assembly on CPU stand-ins for the
GPU ops, and the scripts' syntax.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from tfsa_onnx.bench import cuda as bench_cuda
from tfsa_onnx.bench import timing
from tfsa_onnx.cli import main

REPO = Path(__file__).resolve().parent.parent
needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error given without a GPU")


@needs_no_gpu
def test_provider_cuda_without_a_gpu_is_a_one_line_error():
    result = CliRunner().invoke(main, ["bench", "kernel", "--provider", "cuda", "--seq-len", "1024"])
    assert result.exit_code == 1
    assert "--provider cuda needs an NVIDIA GPU: torch.cuda.is_available() is False" in result.output
    assert isinstance(result.exception, SystemExit)  # a ClickException, not a crash


@needs_no_gpu
def test_module_entry_without_a_gpu_exits_1_with_the_same_message():
    out = subprocess.run(
        [sys.executable, "-m", "tfsa_onnx.bench.cuda", "--seq-len", "1024"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
    )
    assert out.returncode == 1, out.stderr
    assert (
        out.stderr.strip() == "Error: --provider cuda needs an NVIDIA GPU: torch.cuda.is_available() is False"
    )


def test_provider_and_dtype_options_are_checked():
    runner = CliRunner()
    help_text = runner.invoke(main, ["bench", "kernel", "--help"]).output
    assert "--provider [cpu|cuda]" in help_text and "--dtype [float16|bfloat16|float32]" in help_text
    bad = runner.invoke(main, ["bench", "kernel", "--provider", "rocm"])
    assert bad.exit_code == 2 and "'rocm' is not one of 'cpu', 'cuda'" in bad.output
    plot = runner.invoke(main, ["bench", "kernel", "--provider", "cuda", "--plot", "x.png"])
    assert plot.exit_code == 2 and "--plot is for --provider cpu" in plot.output


def test_the_cuda_bench_imports_neither_click_nor_onnxruntime():
    # The GPU machine may lack click; onnxruntime is needed only with its CUDA provider.
    script = (
        "import sys, tfsa_onnx.bench.cuda as b; b._parser(); "
        "print(sorted(m for m in ('click', 'onnxruntime', 'onnx') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


class FakeTimer:
    """Hands out preset times per run, in call order; counts the runs it saw."""

    def __init__(self, times: dict[str, list[float]]) -> None:
        self.times = {name: iter(values) for name, values in times.items()}
        self.order: list[str] = []
        self.synced = 0

    def time(self, run):
        name = run()
        self.order.append(name)
        value = next(self.times[name])
        return lambda: value

    def sync(self) -> None:
        self.synced += 1


def test_interleaved_medians_time_every_run_once_per_round_after_warmup():
    calls: list[str] = []

    def make(name):
        return lambda: calls.append(name) or name

    timer = FakeTimer({"a": [5.0, 1.0, 3.0], "b": [10.0, 30.0, 20.0]})
    ms = timing.interleaved_medians({"a": make("a"), "b": make("b")}, timer, warmup=2, repeat=3)
    assert ms == {"a": 3.0, "b": 20.0}
    assert calls[:4] == ["a", "b", "a", "b"]  # warm-up, untimed
    assert timer.order == ["a", "b"] * 3
    assert timer.synced == 2  # after warm-up, and before the events are read


def test_ratios_pick_the_fastest_dense_baseline():
    ms = {"ours": 2.0, "selection": 0.1, "sdpa_flash": 8.0, "ort_mha": 6.0, "ours_dense": 10.0}
    r = bench_cuda.ratios(ms)
    assert r["best_dense"] == "ort_mha"
    assert r["speedup_vs_best_dense"] == pytest.approx(3.0)
    assert r["selection_share"] == pytest.approx(0.05)
    assert r["dense_mode_ratio"] == pytest.approx(0.6)


def test_ratios_without_baselines_or_dense_mode_are_none():
    r = bench_cuda.ratios({"ours": 2.0, "selection": 1.0, "sdpa_flash": None, "ort_mha": None})
    assert r["best_dense"] is None and r["speedup_vs_best_dense"] is None and r["dense_mode_ratio"] is None
    only_sdpa = bench_cuda.ratios({"ours": 2.0, "selection": 1.0, "sdpa_flash": 4.0})
    assert only_sdpa["best_dense"] == "sdpa_flash" and only_sdpa["dense_mode_ratio"] is None


def test_flops_and_path_choice():
    assert timing.dense_flops(1, 2, 4, 8, causal=False) == 4.0 * 2 * 16 * 8
    assert timing.dense_flops(1, 2, 4, 8, causal=True) == 2.0 * 2 * 16 * 8
    assert timing.rate(2e12, 1000.0, 1e12) == pytest.approx(2.0)
    assert timing.rate(1.0, None, 1e12) is None
    assert bench_cuda.choose_path("float16", ort_has_cuda=True) == bench_cuda.PATH_ORT
    assert bench_cuda.choose_path("bfloat16", ort_has_cuda=True) == bench_cuda.PATH_DIRECT
    assert bench_cuda.choose_path("float16", ort_has_cuda=False) == bench_cuda.PATH_DIRECT


def test_direct_op_reports_what_the_cuda_entry_point_refuses():
    # The entry point checks a call on the host, before touching the GPU: runs without one.
    try:
        import tfsa_onnx

        tfsa_onnx.get_library_path("cuda")
    except FileNotFoundError:
        pytest.skip("the CUDA library was not built here")
    q = k = torch.zeros(1, 2, 64, 32)
    v = torch.zeros(1, 2, 64, 300)
    with pytest.raises(RuntimeError, match="value head dims up to 256, got 300"):
        bench_cuda._direct_op(q, k, v, dict(threshold=1.0, max_density=0.5))


def _cpu_op(q, k, v, causal: bool, density: float = 1.0) -> bench_cuda._Op:
    """Exact attention on the CPU in place of a GPU op."""
    out: list = [None]

    def run() -> None:
        out[0] = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

    run()
    return bench_cuda._Op(run, lambda: out[0], torch.full(q.shape[:2], density))


@pytest.fixture
def cpu_stand_ins(monkeypatch):
    """The GPU calls of bench_cuda replaced by CPU ones, so the row assembly runs here."""

    def ours_ops(path, q, k, v, attributes, dense_mode):
        causal = bool(attributes["is_causal"])
        ops = {"ours": _cpu_op(q, k, v, causal, 0.25), "selection": _cpu_op(q, k, v, causal, 0.25)}
        if dense_mode and attributes["max_density"] < 1:
            ops["ours_dense"] = _cpu_op(q, k, v, causal)
        return ops

    def sdpa_op(q, k, v, causal):
        return _cpu_op(q, k, v, causal), "flash_attention"

    monkeypatch.setattr(bench_cuda, "require_gpu", lambda: None)
    monkeypatch.setattr(bench_cuda, "_inputs", lambda b, h, s, d, dtype: [torch.randn(b, h, s, d)] * 3)
    monkeypatch.setattr(bench_cuda, "_ours_ops", ours_ops)
    monkeypatch.setattr(bench_cuda, "_sdpa_op", sdpa_op)
    monkeypatch.setattr(bench_cuda, "EventTimer", timing.WallTimer)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "Stream", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "stand-in")
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)


def test_rows_assemble_from_the_measurements(cpu_stand_ins, tmp_path, capsys):
    path = tmp_path / "rows.json"
    failures = bench_cuda.main(
        ["--seq-len", "128,256", "--heads", "2", "--head-dim", "16", "--repeat", "2", "--causal"]
        + ["--json", str(path)]
    )
    assert failures == 0
    rows = json.loads(path.read_text())
    assert [r["seq_len"] for r in rows] == [128, 256]
    for r in rows:
        assert r["density"] == pytest.approx(0.25) and r["causal"] and r["gpu"] == "stand-in"
        assert r["ours_ms"] > 0 and r["sdpa_flash_ms"] > 0 and r["ours_dense_ms"] > 0
        assert r["best_dense"] == "sdpa_flash" and r["ort_mha_ms"] is None
        assert r["speedup_vs_best_dense"] == pytest.approx(r["sdpa_flash_ms"] / r["ours_ms"])
        assert r["dense_mode_ratio"] == pytest.approx(r["sdpa_flash_ms"] / r["ours_dense_ms"])
        assert r["dense_max_err"] == 0.0  # the stand-in's dense mode is the baseline itself
        assert any("onnxruntime has no CUDAExecutionProvider" in n for n in r["notes"])
    printed = capsys.readouterr().out
    assert "GPU: stand-in" in printed and "speedup_vs_best_dense" in printed


def test_dense_mode_reuses_ours_at_max_density_1(cpu_stand_ins):
    r = bench_cuda.bench_kernel_cuda(
        timing.KernelCase(128, heads=2, head_dim=16, max_density=1.0), repeat=1, warmup=0
    )
    assert r.ours_dense_ms == r.ours_ms and r.dense_mode_ratio == pytest.approx(r.sdpa_flash_ms / r.ours_ms)


def test_a_failing_length_is_reported_and_the_next_still_runs(cpu_stand_ins, monkeypatch):
    real = bench_cuda.bench_kernel_cuda

    def flaky(case, **options):
        if case.seq_len == 128:
            raise RuntimeError("CUDA out of memory.\nmore detail")
        return real(case, **options)

    monkeypatch.setattr(bench_cuda, "bench_kernel_cuda", flaky)
    result = CliRunner().invoke(
        main,
        ["bench", "kernel", "--provider", "cuda", "--seq-len", "128,256", "--heads", "2", "--repeat", "1"],
    )
    assert result.exit_code == 1
    assert "seq_len 128 failed: CUDA out of memory." in result.output
    assert "Error: seq_len 128: CUDA out of memory." in result.output
    assert "\n       256" in result.output  # the table row of the length that ran


def test_gpu_scripts_parse():
    for script in ("gpu_check.sh", "stage_ort_headers.sh", "stage_gpu_pylib.sh"):
        out = subprocess.run(["bash", "-n", str(REPO / "scripts" / script)], capture_output=True, text=True)
        assert out.returncode == 0, f"{script}: {out.stderr}"
