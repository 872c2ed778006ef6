"""calibrate: target parsing, a per-layer config that meets its target, the CLI; real models are slow."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner
from tiny_attention import SessionWatch, tiny_feeds, tiny_model

from tfsa_onnx.calibrate import CalibrationError, Target, calibrate
from tfsa_onnx.cli import main
from tfsa_onnx.config import SparsityConfig
from tfsa_onnx.validation import validate

BASE = {"block_size": 16, "global_tokens": 16, "local_window": 16, "min_seq_len": 0}


@pytest.mark.parametrize(
    ("text", "metric", "value"),
    [
        ("cos>=0.995", "cos", 0.995),
        ("ppl<=+1%", "ppl", 0.01),
        ("ppl <= 2 %", "ppl", 0.02),
        ("ppl<=1.01", "ppl", 0.01),
    ],
)
def test_target_parse(text, metric, value):
    target = Target.parse(text)
    assert target.metric == metric and target.value == pytest.approx(value)


@pytest.mark.parametrize("text", ["cos<=0.9", "latency<1", "ppl>=1%", ""])
def test_target_parse_rejects(text):
    with pytest.raises(CalibrationError):
        Target.parse(text)


def test_calibrated_config_meets_the_target_at_lower_density(tmp_path: Path):
    from tfsa_onnx import optimize

    feeds = tiny_feeds(3, 256)
    result = calibrate(
        tiny_model(), feeds, "cos>=0.99", base=BASE, output="hidden", progress=False, per_head=False
    )
    assert result.score >= 0.99
    assert result.density < 0.95  # something was skipped
    assert result.layers[0]["threshold"] < 1.0
    path = tmp_path / "c.json"
    result.config.save(path)
    optimized, _ = optimize(tiny_model(), SparsityConfig.load(path))
    check = validate(tiny_model(), optimized, feeds, progress=False)
    assert check.outputs["hidden"]["cosine_mean"] == pytest.approx(result.score, abs=1e-5)
    assert check.density == pytest.approx(result.density, abs=1e-6)


def test_calibrate_with_another_estimate_writes_it_into_the_config(tmp_path: Path):
    from tfsa_onnx import optimize

    feeds = tiny_feeds(2, 256)
    base = {**BASE, "estimate": 1, "estimate_stride": 4}
    result = calibrate(tiny_model(), feeds, "cos>=0.99", base=base, output="hidden", progress=False)
    assert result.config.defaults["estimate"] == 1 and result.config.defaults["estimate_stride"] == 4
    optimized, _ = optimize(tiny_model(), result.config)
    nodes = [n for n in optimized.graph.node if n.op_type == "SparseAttention"]
    values = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert values["estimate"] == 1 and values["estimate_stride"] == 4
    check = validate(tiny_model(), optimized, feeds, progress=False)
    assert check.outputs["hidden"]["cosine_mean"] == pytest.approx(result.score, abs=1e-5)


def test_calibrate_cli_writes_a_config_for_optimize(tmp_path: Path):
    model = tmp_path / "m.onnx"
    onnx.save(tiny_model(), str(model))
    config, record = tmp_path / "c.json", tmp_path / "r.json"
    args = ["calibrate", str(model), "--target", "cos>=0.98", "-o", str(config), "--json", str(record)]
    sizes = ["--seq-len", "256", "--samples", "2", "--block-size", "16", "--global-tokens", "16"]
    result = CliRunner().invoke(main, [*args, *sizes, "--local-window", "16", "--output-name", "hidden"])
    assert result.exit_code == 0, result.output
    assert "mean density" in result.output
    loaded = SparsityConfig.load(config)
    assert loaded.defaults["block_size"] == 16 and loaded.defaults["min_seq_len"] == 256
    assert "0" in loaded.layers
    assert json.loads(record.read_text())["score"] >= 0.98


def test_calibrate_cli_rejects_a_bad_target(tmp_path: Path):
    model = tmp_path / "m.onnx"
    onnx.save(tiny_model(), str(model))
    result = CliRunner().invoke(
        main, ["calibrate", str(model), "--target", "speed>2", "-o", str(tmp_path / "c")]
    )
    assert result.exit_code != 0
    assert "cannot read target" in result.output


def test_table_script_fast_variant(tmp_path: Path):
    """The accuracy table's code path on the tiny model: defaults row + one calibrated row."""
    from tfsa_onnx.eval.table import markdown, run_case

    model = tmp_path / "m.onnx"
    onnx.save(tiny_model(), str(model))
    structure = {k: BASE[k] for k in ("block_size", "global_tokens", "local_window")}
    rows = run_case(
        model, tiny_feeds(2, 256), tiny_feeds(2, 256, seed=1), "cos>=0.99", [structure], 256, False
    )
    assert [r["label"].split()[0] for r in rows] == ["defaults", "calibrated"]
    assert rows[1]["calib_score"] >= 0.99 and rows[1]["density"] < 1.0
    table = markdown([{"model": "tiny", "seq_len": 256, **r} for r in rows])
    assert table.count("\n") == 3 and "| tiny | 256 |" in table


def _real_case(model: str, seq_len: int):
    # Needs the eval extra (pip install .[eval]): a missing package fails, it is not skipped.
    from tfsa_onnx.eval.table import cases

    return next(c for c in cases() if c.model == model and c.seq_len == seq_len)


def _run_real(case) -> list[dict]:
    from tfsa_onnx.eval import models as m
    from tfsa_onnx.eval.table import run_case
    from tfsa_onnx.inputs import graph_inputs, load_text

    path = case.onnx_path()
    specs = graph_inputs(onnx.load(str(path), load_external_data=False))
    tok = case.tokenizer_dir()
    calib = load_text(m.bbc_texts("calib"), tok, specs, seq_len=case.seq_len, samples=case.calib_samples)
    evaluation = load_text(m.bbc_texts("eval"), tok, specs, seq_len=case.seq_len, samples=case.eval_samples)
    return run_case(path, calib, evaluation, case.target, case.structures[-1:], case.seq_len, False)


@pytest.mark.slow
def test_minilm_512_calibrated_keeps_cosine():
    rows = _run_real(_real_case("all-MiniLM-L6-v2", 512))
    assert rows[-1]["cosine_mean"] >= 0.995
    assert rows[-1]["density"] < 1.0


@pytest.mark.slow
def test_smollm2_2048_calibrated_keeps_perplexity():
    rows = _run_real(_real_case("SmolLM2-135M", 2048))
    assert rows[-1]["perplexity_increase"] <= 0.02
    assert rows[-1]["density"] < 0.8


@pytest.mark.parametrize(
    ("target", "output", "retrieval"),
    [("cos>=0.99", "hidden", 0.0), ("ppl<=+1%", "logits", 0.0), ("cos>=0.99", "hidden", 1.0)],
)
def test_calibrate_holds_one_session_at_a_time(monkeypatch, target, output, retrieval):
    """Dense run, layer curves and every end-to-end trial: no session is made while another lives;
    the captured tensors and dense outputs come back from disk as they were."""
    import numpy as np

    from tfsa_onnx import calibrate as cal

    watch = SessionWatch(monkeypatch, cal)
    captured = []
    real_curve = cal._curve

    def keep(index, node, samples, *rest):
        captured.append(samples)
        return real_curve(index, node, samples, *rest)

    monkeypatch.setattr(cal, "_curve", keep)
    monkeypatch.setattr(cal, "CAPTURE_BYTES", 1)
    feeds = tiny_feeds(3, 256)
    result = calibrate(
        tiny_model(), feeds, target, base=BASE, output=output, progress=False, retrieval=retrieval, needles=2
    )
    assert len(watch.overlaps) > 10 and watch.overlaps == [0] * len(watch.overlaps)
    assert watch.all_released()
    assert target != "cos>=0.99" or result.score >= 0.99
    assert target != "ppl<=+1%" or result.score <= 0.01
    # the first captured sample equals the dense model's q, k, v and attention output
    from tfsa_onnx import optimize

    dense, _ = optimize(tiny_model(), SparsityConfig(defaults={**BASE, "threshold": 1.0, "max_density": 1.0}))
    node = next(n for n in dense.graph.node if n.op_type == "SparseAttention")
    names = [x for x in list(node.input)[:3]] + [node.output[0]]
    dense.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    want = watch.real(dense).run(names, feeds[0])
    (samples,) = captured
    assert len(samples) == 2
    got = [samples[0][0], samples[0][1], samples[0][2], samples[0][4]]
    for a, b in zip(got, want, strict=True):
        assert np.array_equal(a, b)
