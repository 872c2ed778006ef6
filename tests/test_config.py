"""SparsityConfig values are checked strictly, with the operator's bounds; options say the same."""

from __future__ import annotations

import math

import pytest
from click.testing import CliRunner
from model_files import digests, save_model

from tfsa_onnx.cli import main
from tfsa_onnx.config import ConfigError, SparsityConfig


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"skip": "false"}, "skip must be true or false, got 'false'"),
        ({"skip": 0}, "skip must be true or false, got 0"),
        ({"block_size": True}, "block_size must be an integer, got True"),
        ({"block_size": 32.7}, "block_size must be an integer, got 32.7"),
        ({"block_size": "32"}, "block_size must be an integer, got '32'"),
        ({"block_size": 0}, "block_size must be in [1, 1048576], got 0"),
        ({"block_size": 1048577}, "block_size must be in [1, 1048576], got 1048577"),
        ({"block_size": 1e30}, "block_size must be in [1, 1048576], got 1e+30"),
        ({"global_tokens": -1}, "global_tokens must be in [0, 2147483647], got -1"),
        ({"local_window": 2**31}, "local_window must be in [0, 2147483647], got 2147483648"),
        ({"min_seq_len": False}, "min_seq_len must be an integer, got False"),
        ({"threshold": 1.5}, "threshold must be in [0.0, 1.0], got 1.5"),
        ({"threshold": math.nan}, "threshold must be a finite number, got nan"),
        ({"threshold": True}, "threshold must be a number, got True"),
        ({"max_density": 0}, "max_density must be in (0.0, 1.0], got 0"),
        ({"max_density": math.inf}, "max_density must be a finite number, got inf"),
        ({"scale": 0.5}, "unknown setting 'scale'"),
        ({"estimate": "best"}, "estimate must be one of mean, antidiagonal, token, got 'best'"),
        ({"estimate": 3}, "estimate must be in [0, 2], got 3"),
        ({"estimate_stride": 0}, "estimate_stride must be in [1, 1024], got 0"),
        ({"estimate_stride": 1025}, "estimate_stride must be in [1, 1024], got 1025"),
        ({"estimate": 0.5}, "estimate must be an integer, got 0.5"),
        ({"compute_precision": "fp16"}, "compute_precision must be one of float32, bf16, got 'fp16'"),
        ({"compute_precision": 2}, "compute_precision must be in [0, 1], got 2"),
    ],
)
def test_bad_values_are_refused_with_the_setting_and_value(values, message):
    with pytest.raises(ConfigError) as defaults:
        SparsityConfig.from_dict({"defaults": values})
    assert str(defaults.value).startswith(f"defaults: {message}")
    with pytest.raises(ConfigError) as layer:
        SparsityConfig.from_dict({"layers": {"3": values}})
    assert str(layer.value).startswith(f"layers['3']: {message}")


def test_good_values_keep_their_meaning():
    config = SparsityConfig.from_dict(
        {
            "defaults": {"block_size": 32.0, "threshold": 0, "max_density": 1, "min_seq_len": 2147483647},
            "layers": {"0": {"skip": True}, "1": {"skip": False, "block_size": 1048576}},
        }
    )
    assert config.defaults == {
        "block_size": 32,
        "threshold": 0.0,
        "max_density": 1.0,
        "min_seq_len": 2147483647,
    }
    assert isinstance(config.defaults["block_size"], int)
    assert config.for_site(0, "a") is None
    assert config.for_site(1, "b")["block_size"] == 1048576
    assert config.for_site(2, "c")["block_size"] == 32


def test_estimate_by_name_or_index():
    config = SparsityConfig.from_dict(
        {"defaults": {"estimate": "antidiagonal"}, "layers": {"1": {"estimate": 0}}}
    )
    assert config.for_site(0, "a")["estimate"] == 1
    assert config.for_site(1, "b")["estimate"] == 0
    assert SparsityConfig().for_site(0, "a")["estimate"] == 0  # the operator's default: mean


@pytest.mark.parametrize("key", ["-1", "-3"])
def test_negative_layer_index_is_refused(key):
    with pytest.raises(ConfigError, match="a layer index is 0 or more"):
        SparsityConfig.from_dict({"layers": {key: {"threshold": 0.5}}})


def test_layer_keys_that_select_nothing_are_reported():
    config = SparsityConfig.from_dict(
        {
            "layers": {
                "0": {"threshold": 0.5},
                "99": {"threshold": 0.5},
                "*nothing*": {"skip": True},
                "*att*": {},
            }
        }
    )
    assert config.unmatched([(0, "att0"), (1, "att1")]) == [
        "layers['99'] matches no attention site (the model's layers are 0 to 1); it was ignored",
        "layers['*nothing*'] matches no attention site's node name; it was ignored",
    ]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--block-size", "32.7", "block_size must be an integer, got 32.7"),
        ("--block-size", "0", "block_size must be in [1, 1048576], got 0"),
        ("--block-size", "1e30", "block_size must be in [1, 1048576], got 1e+30"),
        ("--global-tokens", "-1", "global_tokens must be in [0, 2147483647], got -1"),
        ("--threshold", "nan", "threshold must be a finite number, got nan"),
        ("--threshold", "1.01", "threshold must be in [0.0, 1.0], got 1.01"),
        ("--max-density", "0", "max_density must be in (0.0, 1.0], got 0"),
        ("--min-seq-len", "x", "min_seq_len must be an integer, got 'x'"),
        ("--estimate", "best", "estimate must be one of mean, antidiagonal, token, got 'best'"),
    ],
)
def test_options_are_checked_like_config_values(tmp_path, option, value, message):
    source = save_model(tmp_path / "in.onnx")
    before = digests(tmp_path)
    result = run("optimize", source, "-o", tmp_path / "out.onnx", option, value)
    assert result.exit_code == 2 and message in result.output, result.output
    assert digests(tmp_path) == before


def test_threshold_0_is_accepted_and_written(tmp_path):
    source = save_model(tmp_path / "in.onnx")
    result = run("optimize", source, "-o", tmp_path / "out.onnx", "--threshold", "0", "--block-size", "16")
    assert result.exit_code == 0 and "block_size=16" in result.output and "threshold=0.0" in result.output


def test_estimate_option_is_written_as_the_attribute(tmp_path):
    import onnx

    source = save_model(tmp_path / "in.onnx")
    options = ("--estimate", "antidiagonal", "--estimate-stride", "8", "--min-seq-len", "0")
    result = run("optimize", source, "-o", tmp_path / "out.onnx", *options)
    assert result.exit_code == 0 and "estimate=1" in result.output, result.output
    assert "estimate_stride=8" in result.output, result.output
    nodes = [n for n in onnx.load(str(tmp_path / "out.onnx")).graph.node if n.op_type == "SparseAttention"]
    assert nodes and all(
        onnx.helper.get_attribute_value(a) == 1 for n in nodes for a in n.attribute if a.name == "estimate"
    )
    assert all(any(a.name == "estimate" for a in n.attribute) for n in nodes)


def test_config_file_with_a_string_skip_is_refused_and_unmatched_keys_warn(tmp_path):
    source = save_model(tmp_path / "in.onnx")
    bad = tmp_path / "bad.yaml"
    bad.write_text('layers:\n  "0": {skip: "false"}\n')
    result = run("optimize", source, "-o", tmp_path / "out.onnx", "--config", bad)
    assert result.exit_code == 1 and "layers['0']: skip must be true or false, got 'false'" in result.output
    assert not (tmp_path / "out.onnx").exists()
    unmatched = tmp_path / "unmatched.json"
    unmatched.write_text('{"layers": {"99": {"threshold": 0.5}, "*decoder*": {"skip": true}}}')
    result = run("optimize", source, "-o", tmp_path / "out.onnx", "--config", unmatched)
    assert result.exit_code == 0
    assert "Warning: layers['99'] matches no attention site (the model's layers are 0 to 0)" in result.stderr
    assert "Warning: layers['*decoder*'] matches no attention site's node name" in result.stderr


def test_compute_precision_option_is_written_and_validate_reports_it(tmp_path):
    import onnx

    source = save_model(tmp_path / "in.onnx")
    out = tmp_path / "out.onnx"
    result = run("optimize", source, "-o", out, "--compute-precision", "bf16", "--min-seq-len", "0")
    assert result.exit_code == 0 and "compute_precision=1" in result.output, result.output
    nodes = [n for n in onnx.load(str(out)).graph.node if n.op_type == "SparseAttention"]
    assert nodes and all(
        onnx.helper.get_attribute_value(a) == 1
        for n in nodes
        for a in n.attribute
        if a.name == "compute_precision"
    )
    checked = run("validate", source, out, "--seq-len", "16", "--samples", "1", "--extra-lengths", "none")
    assert f"bf16 on {len(nodes)} of {len(nodes)} sites" in checked.output, checked.output
