"""calibrate choosing one threshold per query head (streaming heads among them), the config
carrying them per layer, and optimize applying them."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner
from tiny_attention import HEADS, tiny_feeds, tiny_model

from tfsa_onnx import optimize
from tfsa_onnx.calibrate import HEAD_THRESHOLDS, calibrate
from tfsa_onnx.cli import main
from tfsa_onnx.config import ConfigError, SparsityConfig
from tfsa_onnx.reference import HEAD_THRESHOLDS_MAX
from tfsa_onnx.rewrite.passes import OptimizeError
from tfsa_onnx.validation import validate

BASE = {"block_size": 16, "global_tokens": 16, "local_window": 16, "min_seq_len": 0}


def _node_attributes(model: onnx.ModelProto) -> dict:
    node = next(n for n in model.graph.node if n.op_type == "SparseAttention")
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def test_per_head_calibration_meets_the_target_and_optimize_applies_it(tmp_path: Path):
    feeds = tiny_feeds(3, 256)
    result = calibrate(tiny_model(), feeds, "cos>=0.99", base=BASE, output="hidden", progress=False)
    assert result.score >= 0.99 and result.density < 0.95
    heads = result.config.layers["0"]["head_thresholds"]
    assert len(heads) == HEADS and set(heads) <= set(HEAD_THRESHOLDS)
    assert result.layers[0]["head_thresholds"] == list(heads)
    path = tmp_path / "c.json"
    result.config.save(path)
    optimized, _ = optimize(tiny_model(), SparsityConfig.load(path))
    assert _node_attributes(optimized)["head_thresholds"] == pytest.approx(list(heads))
    check = validate(tiny_model(), optimized, feeds, progress=False)
    assert check.outputs["hidden"]["cosine_mean"] == pytest.approx(result.score, abs=1e-5)
    assert check.density == pytest.approx(result.density, abs=1e-6)


def test_curves_per_head_come_from_the_same_runs():
    from tfsa_onnx import calibrate as cal

    curves = []
    real = cal._curve
    cal_feeds = tiny_feeds(2, 256)

    def keep(*args):
        curves.append(real(*args))
        return curves[-1]

    with pytest.MonkeyPatch.context() as m:
        m.setattr(cal, "_curve", keep)
        calibrate(tiny_model(), cal_feeds, "cos>=0.99", base=BASE, output="hidden", progress=False)
    (curve,) = curves
    assert [len(points) for points in curve.heads] == [len(HEAD_THRESHOLDS)] * HEADS
    for i, (t, density, error) in enumerate(curve.points):
        # the node's density is its heads' mean; its squared error the sum of theirs
        assert density == pytest.approx(sum(h[i][1] for h in curve.heads) / HEADS)
        assert error**2 == pytest.approx(sum(h[i][2] ** 2 for h in curve.heads), rel=1e-9, abs=1e-15)
        assert all(h[i][0] == t for h in curve.heads)
    assert curve.heads[0][0][0] == 0.0  # the streaming point is measured


def test_calibrate_cli_per_layer_flag_writes_one_threshold_per_layer(tmp_path: Path):
    model = tmp_path / "m.onnx"
    onnx.save(tiny_model(), str(model))
    written = {}
    for flag in ([], ["--per-layer"]):
        config = tmp_path / f"c{len(flag)}.json"
        args = [
            "calibrate",
            str(model),
            "--target",
            "cos>=0.98",
            "-o",
            str(config),
            "--output-name",
            "hidden",
        ]
        sizes = ["--seq-len", "256", "--samples", "2", "--block-size", "16", "--global-tokens", "16"]
        result = CliRunner().invoke(main, [*args, *sizes, "--local-window", "16", *flag])
        assert result.exit_code == 0, result.output
        written[bool(flag)] = json.loads(config.read_text())["layers"]["0"]
    assert set(written[False]) == {"head_thresholds"} and len(written[False]["head_thresholds"]) == HEADS
    assert set(written[True]) == {"threshold"}


def test_config_round_trip_and_checks(tmp_path: Path):
    config = SparsityConfig(defaults={"threshold": 0.9}, layers={"1": {"head_thresholds": [0, 0.5, 1]}})
    assert config.layers["1"]["head_thresholds"] == (0.0, 0.5, 1.0)
    path = tmp_path / "c.json"
    config.save(path)
    assert json.loads(path.read_text())["layers"]["1"]["head_thresholds"] == [0.0, 0.5, 1.0]
    assert SparsityConfig.load(path) == config
    assert config.for_site(0, "x")["head_thresholds"] == ()  # none: every head uses threshold
    bad = [
        ([0.5, 1.5], r"head_thresholds\[1\] must be a number in \[0.0, 1.0\]"),
        ([0.5, True], r"head_thresholds\[1\]"),
        (0.5, "must be a list of numbers"),
        ([0.5] * (HEAD_THRESHOLDS_MAX + 1), f"at most {HEAD_THRESHOLDS_MAX} values"),
    ]
    for value, words in bad:
        with pytest.raises(ConfigError, match=words):
            SparsityConfig(layers={"0": {"head_thresholds": value}})


def test_optimize_refuses_a_count_that_is_not_the_sites_heads():
    config = SparsityConfig(defaults=BASE, layers={"0": {"head_thresholds": [0.5] * (HEADS + 1)}})
    with pytest.raises(OptimizeError, match=f"{HEADS + 1} head_thresholds, but it has {HEADS} query heads"):
        optimize(tiny_model(), config)


def test_reapply_sets_and_removes_head_thresholds():
    with_heads = SparsityConfig(defaults=BASE, layers={"0": {"head_thresholds": [0.0, 0.7]}})
    optimized, _ = optimize(tiny_model(), with_heads)
    assert _node_attributes(optimized)["head_thresholds"] == pytest.approx([0.0, 0.7])
    again, _ = optimize(optimized, SparsityConfig(defaults=BASE | {"threshold": 0.8}), reapply=True)
    attributes = _node_attributes(again)
    assert "head_thresholds" not in attributes and attributes["threshold"] == pytest.approx(0.8)
