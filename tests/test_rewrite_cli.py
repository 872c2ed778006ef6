"""`tfsa-onnx optimize` / `inspect`: defaults, options, config, report, idempotency, bad inputs."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import feeds, sessions
from onnx import TensorProto, helper

from tfsa_onnx.cli import main


@pytest.fixture()
def bert(exports, tmp_path) -> Path:
    path = tmp_path / "bert.onnx"
    shutil.copy(exports.get("bert", "eager", False, 17), path)
    return path


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def attrs(model: onnx.ModelProto) -> list[dict]:
    return [
        {a.name: helper.get_attribute_value(a) for a in n.attribute}
        for n in model.graph.node
        if n.op_type == "SparseAttention"
    ]


def test_optimize_defaults_and_report(bert: Path) -> None:
    before = digest(bert)
    result = run("optimize", bert, "--report", bert.with_name("report.json"))
    assert result.exit_code == 0, result.output
    out = bert.with_name("bert.tfsa.onnx")
    assert out.is_file() and digest(bert) == before
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    assert [a["min_seq_len"] for a in attrs(model)] == [1024, 1024]
    assert all(a["scale"] == pytest.approx(0.25) for a in attrs(model))
    entries = json.loads(bert.with_name("report.json").read_text())
    assert len(entries) == 2 and all(e["replaced"] for e in entries)
    assert set(entries[0]) == {
        "name", "family", "layer", "heads", "kv_heads", "head_dim", "masked", "causal", "window",
        "window_ahead", "replaced", "reason", "notes",
    }  # fmt: skip
    # The table says the same as the JSON: one row per entry, same name/heads/flags.
    rows = [line.split() for line in result.output.splitlines()[2:4]]
    for row, e in zip(rows, entries, strict=True):
        assert row[:6] == [str(e["layer"]), e["name"], e["family"], str(e["heads"]), str(e["kv_heads"]), "16"]
        assert row[6:8] == ["yes" if e[k] else "no" for k in ("masked", "causal")]
        assert row[8:11] == [
            "-" if e["window"] is None else str(e["window"]),
            "-" if e["window_ahead"] is None else str(e["window_ahead"]),
            "yes" if e["replaced"] else "no",
        ]


def test_options_config_and_skip(bert: Path, tmp_path: Path) -> None:
    config = tmp_path / "sparsity.yaml"
    config.write_text(
        'defaults:\n  threshold: 0.8\nlayers:\n  "0": {skip: true}\n  "*layer.1*": {block_size: 32}\n'
    )
    out = tmp_path / "out.onnx"
    result = run("optimize", bert, "-o", out, "--config", config, "--max-density", "0.5")
    assert result.exit_code == 0, result.output
    model = onnx.load(str(out))
    (only,) = attrs(model)
    assert (only["threshold"], only["max_density"], only["block_size"]) == (pytest.approx(0.8), 0.5, 32)
    assert sum(n.op_type == "Softmax" for n in model.graph.node) == 1
    assert "skipped by the config" in result.output


def test_idempotent_and_reapply(bert: Path, tmp_path: Path) -> None:
    first = tmp_path / "first.onnx"
    assert run("optimize", bert, "-o", first).exit_code == 0
    second = tmp_path / "second.onnx"
    result = run("optimize", first, "-o", second)
    assert result.exit_code == 0 and "0 replaced, 2 already SparseAttention" in result.output
    a, b = onnx.load(str(first)), onnx.load(str(second))
    assert [n.SerializeToString() for n in a.graph.node] == [n.SerializeToString() for n in b.graph.node]
    third = tmp_path / "third.onnx"
    assert run("optimize", first, "-o", third, "--reapply", "--threshold", "0.5").exit_code == 0
    assert [x["threshold"] for x in attrs(onnx.load(str(third)))] == [0.5, 0.5]


def test_inspect_writes_nothing(bert: Path) -> None:
    listing = sorted(p.name for p in bert.parent.iterdir())
    result = run("inspect", bert)
    assert result.exit_code == 0 and "2 attention sites" in result.output
    assert sorted(p.name for p in bert.parent.iterdir()) == listing


def test_external_data(bert: Path, tmp_path: Path) -> None:
    model = onnx.load(str(bert))
    source = tmp_path / "ext" / "model.onnx"
    source.parent.mkdir()
    onnx.save(model, str(source), save_as_external_data=True, size_threshold=0, location="model.onnx.data")
    out = tmp_path / "outdir" / "opt.onnx"
    assert run("optimize", source, "-o", out).exit_code == 0
    assert (out.parent / "opt.onnx.data").is_file()
    onnx.checker.check_model(str(out), full_check=True)
    a, b = sessions(onnx.load(str(bert)), out)
    x = feeds(a, 9)
    np.testing.assert_allclose(b.run(None, x)[0], a.run(None, x)[0], atol=1e-4)


def _no_attention(path: Path, opset: int = 17) -> Path:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    graph = helper.make_graph([helper.make_node("Softmax", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), str(path))
    return path


@pytest.mark.parametrize(
    "case", ["no-attention", "not-onnx", "truncated", "old-opset", "same-path", "missing"]
)
def test_bad_inputs(case: str, bert: Path, tmp_path: Path) -> None:
    path = tmp_path / "in.onnx"
    out = tmp_path / "out.onnx"
    expected = {
        "no-attention": "no attention block",
        "not-onnx": "not a readable ONNX model",
        "truncated": "not a readable ONNX model",
        "old-opset": "opset 12",
        "same-path": "output path is the input path",
        "missing": "does not exist",
    }[case]
    if case == "no-attention":
        _no_attention(path)
    elif case == "not-onnx":
        path.write_text("this is not a model\n")
    elif case == "truncated":
        data = bert.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "old-opset":
        _no_attention(path, opset=12)
    elif case == "same-path":
        shutil.copy(bert, path)
        out = path
    before = sorted(p.name for p in tmp_path.iterdir())
    result = run("optimize", path, "-o", out)
    assert result.exit_code != 0
    assert expected in result.output and result.output.count("\n") == 1, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    if case == "no-attention":  # the Softmax looked at, and why it is not attention
        assert "Not taken as attention:" in result.output and "graph output" in result.output
        assert "graph output" in run("inspect", path).output
