"""Bad inputs and hostile output paths: one sentence, exit 1, the input and any previous output intact."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from click.testing import CliRunner
from model_files import digest, digests, run, save_model
from onnx import helper

from tfsa_onnx.cli import main


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def one_sentence(result, *words: str) -> None:
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1, result.output
    assert "Traceback" not in result.output
    for word in words:
        assert str(word) in result.output, result.output


def thresholds(path: Path) -> list[float]:
    model = onnx.load(str(path), load_external_data=False)
    return [
        helper.get_attribute_value(a)
        for n in model.graph.node
        if n.op_type == "SparseAttention"
        for a in n.attribute
        if a.name == "threshold"
    ]


# ---------------------------------------------------------------- graph and data as one unit


def test_rewriting_an_output_with_external_data_switches_graph_and_weights_together(tmp_path):
    a = save_model(tmp_path / "a.onnx", "a.onnx.data", seed=1)
    b = save_model(tmp_path / "b.onnx", "b.onnx.data", seed=2)
    out = tmp_path / "out.onnx"
    names = []
    for source in (a, b, a):
        assert cli("optimize", source, "-o", out, "--min-seq-len", "0").exit_code == 0
        np.testing.assert_allclose(run(out), run(source), atol=1e-5)
        names.append(sorted(p.name for p in tmp_path.glob("out.onnx*")))
    # A new data file name each time the previous one is in use, the previous one removed after.
    assert names == [
        ["out.onnx", "out.onnx.data"],
        ["out.onnx", "out.onnx.1.data"],
        ["out.onnx", "out.onnx.data"],
    ]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("when", ["after the weights", "before the graph is renamed"])
def test_interrupted_write_keeps_the_previous_output(tmp_path, monkeypatch, when):
    a = save_model(tmp_path / "a.onnx", "a.onnx.data", seed=1)
    b = save_model(tmp_path / "b.onnx", "b.onnx.data", seed=2)
    out = tmp_path / "out.onnx"
    assert cli("optimize", a, "-o", out).exit_code == 0
    before, inputs = digests(tmp_path), (digest(b), digest(tmp_path / "b.onnx.data"))
    real_save, real_replace = ir.save, os.replace

    def save_then_interrupt(*args, **kwargs):
        real_save(*args, **kwargs)  # the new weights are complete, the graph not yet in place
        raise KeyboardInterrupt

    def replace(src, dst):
        if Path(dst) == out:
            raise KeyboardInterrupt
        real_replace(src, dst)

    if when == "after the weights":
        monkeypatch.setattr(ir, "save", save_then_interrupt)
    else:
        monkeypatch.setattr(os, "replace", replace)
    result = cli("optimize", b, "-o", out)  # Ctrl-C: click aborts with exit status 1
    assert result.exit_code == 1 and "Aborted" in result.output
    assert digests(tmp_path) == before  # old graph, old weights, no temporary left
    assert (digest(b), digest(tmp_path / "b.onnx.data")) == inputs
    np.testing.assert_allclose(run(out), run(a), atol=1e-5)


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    from tfsa_onnx.files import remove_stale_temporaries

    out = save_model(tmp_path / "out.onnx")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale_dir = tmp_path / f".out.onnx.{dead.pid}.k3j_x.tmp"
    (stale_dir / "sub").mkdir(parents=True)
    (stale_dir / "out.onnx.data").write_bytes(b"half")
    stale_file = tmp_path / f".out.onnx.{dead.pid}.abc123.tmp"
    stale_file.write_bytes(b"half")
    live = tmp_path / f".out.onnx.{os.getppid()}.abc123.tmp"  # a writer still running
    other = tmp_path / f".other.onnx.{dead.pid}.abc123.tmp"  # another output's
    live.write_bytes(b"busy")
    other.write_bytes(b"other")
    assert sorted(remove_stale_temporaries(out)) == sorted([stale_dir, stale_file])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out.onnx", live.name, other.name])


def test_a_killed_run_leaves_nothing_that_the_next_run_does_not_clean(tmp_path):
    """SIGKILL in the middle of a write: the next write to the same output removes its temporaries."""
    a = save_model(tmp_path / "a.onnx", "a.onnx.data", seed=1)
    out = tmp_path / "out.onnx"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    code = (
        "import os, onnx_ir as ir\n"
        "from tfsa_onnx.cli import main\n"
        "real = ir.save\n"
        "def save(*a, **k):\n"
        "    real(*a, **k)\n"
        "    os.kill(os.getpid(), 9)\n"
        "ir.save = save\n"
        f"main(['optimize', {str(a)!r}, '-o', {str(out)!r}])\n"
    )
    killed = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=120)
    assert killed.returncode == -9
    assert [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # what the kill left
    assert cli("optimize", a, "-o", out).exit_code == 0
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    np.testing.assert_allclose(run(out), run(a), atol=1e-5)


# ---------------------------------------------------------------- outputs that are the input


@pytest.mark.parametrize("case", ["data-named-like-output-data", "input-named-like-output-data", "hardlink"])
def test_output_that_is_a_file_of_the_input_is_refused(tmp_path, case):
    if case == "data-named-like-output-data":  # the input's weights are o.onnx.data
        source, out, data = (
            save_model(tmp_path / "in.onnx", "o.onnx.data"),
            tmp_path / "o.onnx",
            "o.onnx.data",
        )
    elif case == "input-named-like-output-data":  # the input model itself is a.onnx.data
        source, out, data = save_model(tmp_path / "a.onnx.data", "w.bin"), tmp_path / "a.onnx", "a.onnx.data"
    else:  # the output is a hard link of the input
        source, data = save_model(tmp_path / "in.onnx", "in.onnx.data"), "in.onnx.data"
        out = tmp_path / "link.onnx"
        os.link(source, out)
    before = digests(tmp_path)
    result = cli("optimize", source, "-o", out)
    if case == "hardlink":
        one_sentence(result, "the output path is the input path")
    else:
        one_sentence(result, data, "which the input model reads", "choose another output path")
    assert digests(tmp_path) == before


def test_links_at_the_output_paths_are_replaced_not_followed(tmp_path):
    source = save_model(tmp_path / "in.onnx", "in.onnx.data")
    precious = tmp_path / "precious.bin"
    precious.write_bytes(b"keep me")
    other = tmp_path / "other.onnx"
    other.write_bytes(b"keep me too")
    out = tmp_path / "out.onnx"
    out.symlink_to(other)
    (tmp_path / "out.onnx.data").symlink_to(precious)
    (tmp_path / "out.onnx.1.data").symlink_to(precious)
    assert cli("optimize", source, "-o", out).exit_code == 0
    assert precious.read_bytes() == b"keep me" and other.read_bytes() == b"keep me too"
    assert not out.is_symlink() and not any(p.is_symlink() for p in tmp_path.glob("out.onnx*"))
    np.testing.assert_allclose(run(out), run(source), atol=1e-5)


# ---------------------------------------------------------------- one sentence, nothing written


def _traversal(tmp_path: Path) -> Path:
    """A model naming its external data '../w.data' (onnx_ir refuses it with a ValueError)."""
    (tmp_path / "sub").mkdir()
    source = save_model(tmp_path / "sub" / "in.onnx", "w.data")
    (tmp_path / "sub" / "w.data").rename(tmp_path / "w.data")
    model = onnx.load(str(source), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../w.data"
    source.write_bytes(model.SerializeToString())
    return source


@pytest.mark.parametrize(
    "case",
    [
        "config-1e30",
        "missing-data",
        "truncated-data",
        "data-outside-folder",
        "output-under-proc",
        "output-under-a-file",
        "output-folder-read-only",
        "report-under-proc",
        "report-under-a-file",
        "triton-repo-under-proc",
    ],
)
def test_bad_paths_and_values_give_one_sentence_and_write_nothing(tmp_path, monkeypatch, case):
    source = save_model(tmp_path / "in.onnx", "in.onnx.data")
    out = tmp_path / "out.onnx"
    args = ["optimize", source, "-o", out]
    words: list = []
    if case == "config-1e30":
        (tmp_path / "c.json").write_text('{"defaults": {"block_size": 1e30}}')
        args += ["--config", tmp_path / "c.json"]
        words = ["block_size must be in [1, 1048576]", "1e+30"]
    elif case == "missing-data":
        (tmp_path / "in.onnx.data").unlink()
        words = [tmp_path / "in.onnx.data", "missing"]
    elif case == "truncated-data":
        with open(tmp_path / "in.onnx.data", "r+b") as f:
            f.truncate(10)
        words = [tmp_path / "in.onnx.data", "truncated"]
    elif case == "data-outside-folder":
        source = _traversal(tmp_path)
        args[1] = source
        words = ["'../w.data'", "outside its folder"]
    elif case == "output-under-proc":
        args[3] = "/proc/tfsa/out.onnx"
        words = ["/proc/tfsa/out.onnx", "choose another output path"]
    elif case == "output-under-a-file":
        args[3] = tmp_path / "in.onnx" / "out.onnx"
        words = [tmp_path / "in.onnx", "not a folder"]
    elif case == "output-folder-read-only":  # as a non-root user in a read-only folder (tests run as root)
        locked = tmp_path / "locked"
        locked.mkdir()
        args[3] = locked / "out.onnx"
        _deny_writes_in(monkeypatch, locked)
        words = [locked, "not writable", "Permission denied"]
    elif case == "report-under-proc":
        args += ["--report", "/proc/tfsa-report.json"]
        words = ["/proc/tfsa-report.json"]
    elif case == "report-under-a-file":
        args += ["--report", tmp_path / "in.onnx" / "r.json"]
        words = ["r.json", "not a folder"]
    elif case == "triton-repo-under-proc":
        args = ["triton-repo", source, "-o", "/proc/repo", "--name", "m", "--max-batch", "0"]
        words = ["/proc/repo", "choose another output path"]
    before = digests(tmp_path)
    one_sentence(cli(*args), *words)
    assert digests(tmp_path) == before


def _deny_writes_in(monkeypatch, folder: Path) -> None:
    """os.open / os.mkdir fail in folder with EACCES, as they do for a user without write permission."""
    real_open, real_mkdir = os.open, os.mkdir

    def denied(path) -> bool:
        return Path(os.fspath(path)).resolve().is_relative_to(folder.resolve())

    def fake_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and denied(path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    def fake_mkdir(path, *args, **kwargs):
        if denied(path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)


def test_unwritable_report_is_found_before_the_model_is_written(tmp_path):
    """The old order wrote OUT, then failed on --report: now neither is written."""
    source = save_model(tmp_path / "in.onnx", "in.onnx.data")
    (tmp_path / "file").write_text("x")
    before = digests(tmp_path)
    result = cli("optimize", source, "-o", tmp_path / "out.onnx", "--report", tmp_path / "file" / "r.json")
    one_sentence(result, "not a folder")
    assert digests(tmp_path) == before and not (tmp_path / "out.onnx").exists()


# ---------------------------------------------------------------- settings on an optimized model


def test_settings_on_an_optimized_model_apply_with_reapply_only_and_the_output_says_so(tmp_path):
    source = save_model(tmp_path / "in.onnx")
    first = tmp_path / "first.onnx"
    assert cli("optimize", source, "-o", first).exit_code == 0
    kept = cli("optimize", first, "-o", tmp_path / "kept.onnx", "--threshold", "0.5")
    assert kept.exit_code == 0
    assert "kept theirs; --reapply sets" in kept.output and "settings: unchanged" in kept.output
    assert thresholds(tmp_path / "kept.onnx") == pytest.approx([0.95])
    applied = cli("optimize", first, "-o", tmp_path / "applied.onnx", "--threshold", "0.5", "--reapply")
    assert applied.exit_code == 0 and "also set on the 1 existing" in applied.output
    assert thresholds(tmp_path / "applied.onnx") == pytest.approx([0.5])


def test_export_moves_graph_and_data_into_place_as_one_unit(tmp_path):
    from tfsa_onnx.exporter import _move_into_place

    out = tmp_path / "model.onnx"
    for seed in (1, 2, 3):
        staging = tmp_path / f".model.onnx.{os.getpid()}.s{seed}.tmp"
        staging.mkdir()
        staged = save_model(staging / "model.onnx", "weights.bin", seed=seed)
        expected = run(staged)
        _move_into_place(staged, out)
        np.testing.assert_allclose(run(out), expected, atol=1e-6)
        assert not (staging / "weights.bin").exists()  # the weights were moved, not copied
        shutil.rmtree(staging)  # as export() does
        assert sorted(p.name for p in tmp_path.iterdir()) in (
            ["model.onnx", "model.onnx.data"],
            ["model.onnx", "model.onnx.1.data"],
        )
