"""calibrate's retrieval criterion: needles planted in a node's captured inputs, each head's
share of them found, and no head chosen below the share asked for."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from onnx import helper
from tiny_attention import HEADS, tiny_feeds, tiny_model

from tfsa_onnx import DOMAIN, OP_TYPE
from tfsa_onnx import calibrate as cal
from tfsa_onnx.calibrate import NEEDLE_SHARE, CalibrationError, calibrate
from tfsa_onnx.cli import main
from tfsa_onnx.config import SparsityConfig

BASE = {"block_size": 16, "global_tokens": 16, "local_window": 16, "min_seq_len": 0}


def _node(**attributes):
    return helper.make_node(OP_TYPE, ["q", "k", "v"], ["y"], domain=DOMAIN, name="attn", **attributes)


def _sample(hq: int, hkv: int, s: int, d: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((1, h, s, d)).astype(np.float32) for h in (hq, hkv, hkv))
    return [q, k, v, None, None]


@pytest.mark.parametrize(("hq", "hkv", "s", "causal"), [(4, 2, 203, 1), (3, 3, 160, 0), (6, 1, 250, 1)])
def test_planted_needles_take_their_share_and_only_a_selection_that_computes_them_finds_them(
    hq, hkv, s, causal
):
    d, scale = 8, 0.3
    attrs = {"block_size": 16, "global_tokens": 16, "local_window": 32, "is_causal": causal, "scale": scale}
    attrs["min_seq_len"] = 0  # sparse at these lengths
    node = _node(**attrs)
    original = _sample(hq, hkv, s, d)
    planted = cal._plant(node, original, 3, 1, np.random.default_rng(5))
    q, k, v = (planted.feed[x] for x in ("query", "key", "value"))
    group = hq // hkv
    assert (planted.rows >= 0).sum(axis=0).tolist() == [3] * hq  # three needles per head
    for r, h in zip(*np.nonzero(planted.rows >= 0), strict=True):
        row, g = planted.rows[r, h], h // group
        visible = row + 1 if causal else s
        scores = scale * (k[r, g, :visible].astype(np.float64) @ q[r, h, row])
        p = np.exp(scores - scores.max())
        p /= p.sum()
        key = int(np.argmax(p))
        assert p[key] == pytest.approx(NEEDLE_SHARE, abs=1e-3)
        assert 16 <= key < (row // 16) * 16 - 32  # outside the global and local blocks
        assert np.linalg.norm(v[r, g, key]) == pytest.approx(
            10 * np.linalg.norm(original[2][0, g], axis=-1).max(), rel=1e-5
        )
        dense = p @ v[r, g, :visible].astype(np.float64)
        assert planted.dense[r, h] == pytest.approx(dense, abs=1e-4)
    dense_y = planted.dense[:, :, None, :].repeat(s, axis=2)  # the needle rows hold dense values
    assert planted.found(dense_y).all()
    streaming, _ = cal._single_node(node, _sample(hq, hkv, s, d), 0.0)  # global + local blocks only
    y = cal.make_session(streaming, 1).run(["Y"], planted.feed)[0]
    assert not planted.found(y).any()


def test_no_needles_when_every_key_is_global_or_local():
    node = _node(block_size=16, global_tokens=16, local_window=64, is_causal=1)
    assert cal._plant(node, _sample(2, 2, 96, 8), 2, 1, np.random.default_rng(0)) is None


def test_sparsest_point_respects_the_recall_floor():
    points = [(0.0, 0.1, 0.01), (0.5, 0.4, 0.005), (0.9, 0.7, 0.001)]
    assert cal._sparsest(points, 0.02) == points[0]
    assert cal._sparsest(points, 0.02, [0.0, 0.5, 1.0], 0.5) == points[1]
    assert cal._sparsest(points, 0.02, [0.0, 0.5, 0.75], 1.0) == (1.0, 1.0, 0.0)  # dense


def test_retrieval_calibration_keeps_every_head_finding_its_needles():
    feeds = tiny_feeds(2, 256)
    plain = calibrate(tiny_model(), feeds, "cos>=0.9", base=BASE, output="hidden", progress=False)
    curves = []
    real = cal._curve

    def keep(*args):
        curves.append(real(*args))
        return curves[-1]

    with pytest.MonkeyPatch.context() as m:
        m.setattr(cal, "_curve", keep)
        result = calibrate(
            tiny_model(),
            feeds,
            "cos>=0.9",
            base=BASE,
            output="hidden",
            progress=False,
            retrieval=1.0,
            needles=2,
        )
    (curve,) = curves
    assert len(curve.head_recall) == HEADS and curve.head_recall[0][0] == 0.0  # a streaming head finds none
    heads = result.config.layers["0"]["head_thresholds"]
    recalls = result.layers[0]["needle_recall"]
    assert 0.0 not in heads and recalls == [1.0] * HEADS
    assert result.score >= 0.9
    assert "needle_recall" not in plain.layers[0]
    # the floor only removes choices: at least as dense as the target alone, and denser wherever
    # the target alone chose a point that misses needles
    assert result.density >= plain.density - 1e-9
    misses = [curve.recall_at(t, h) < 1.0 for h, t in enumerate(plain.config.layers["0"]["head_thresholds"])]
    assert not any(misses) or result.density > plain.density


def test_calibrate_cli_retrieval_options(tmp_path: Path):
    model = tmp_path / "m.onnx"
    import onnx

    onnx.save(tiny_model(), model)
    args = ["calibrate", str(model), "--seq-len", "256", "--samples", "2", "--target", "cos>=0.9"]
    args += ["--output-name", "hidden", "--block-size", "16", "--global-tokens", "16", "--local-window", "16"]
    out = tmp_path / "c.json"
    result = CliRunner().invoke(main, [*args, "-o", str(out), "--retrieval", "1", "--needles", "2"])
    assert result.exit_code == 0, result.output
    assert 0.0 not in SparsityConfig.load(out).layers["0"]["head_thresholds"]
    bad = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "d.json"), "--retrieval", "1.5"])
    assert bad.exit_code != 0 and "retrieval" in bad.output and not (tmp_path / "d.json").exists()
    with pytest.raises(CalibrationError, match="needle"):
        calibrate(tiny_model(), tiny_feeds(1, 64), "cos>=0.9", base=BASE, retrieval=0.5, needles=0)
