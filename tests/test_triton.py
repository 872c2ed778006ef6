"""triton-repo: config.pbtxt read by Triton's own protobuf, the copied model run with the copied library."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from google.protobuf import text_format
from onnx import TensorProto, helper
from tiny_attention import sparse_twin, tiny_feeds

import tfsa_onnx
from tfsa_onnx import triton
from tfsa_onnx.cli import main
from tfsa_onnx.opmodel import sparse_attention_model
from tfsa_onnx.triton import TritonRepoError, TritonRepoWarning, write_triton_repository

try:
    from tritonclient.grpc import model_config_pb2
except (ImportError, RuntimeError) as e:  # without its grpc extra, tritonclient.grpc raises RuntimeError
    raise ImportError(
        "tests/test_triton.py needs tritonclient with grpc: pip install 'tritonclient[grpc]'"
    ) from e

LIBRARY = Path(tfsa_onnx.get_library_path())


def parse(folder: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def entries(tensors) -> dict[str, tuple]:
    """name -> (data type, dims, reshape or None) of config inputs or outputs."""
    return {
        t.name: (
            model_config_pb2.DataType.Name(t.data_type),
            list(t.dims),
            list(t.reshape.shape) if t.HasField("reshape") else None,
        )
        for t in tensors
    }


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under root with its bytes (None for folders)."""
    return {
        str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))
    }


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def plain_model() -> onnx.ModelProto:
    """Standard ops only (no SparseAttention): a [batch] input with an awkward name and an unknown dim."""
    odd = 'in"put é'
    inputs = [
        helper.make_tensor_value_info(odd, TensorProto.INT64, ["b"]),
        helper.make_tensor_value_info("y", TensorProto.INT32, ["b", None, 3]),
    ]
    outputs = [
        helper.make_tensor_value_info("out", TensorProto.INT64, ["b"]),
        helper.make_tensor_value_info("y2", TensorProto.INT32, ["b", None, 3]),
    ]
    nodes = [helper.make_node("Identity", [odd], ["out"]), helper.make_node("Identity", ["y"], ["y2"])]
    return helper.make_model(helper.make_graph(nodes, "plain", inputs, outputs))


def fixed_batch_model() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4])
    return helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["z"])], "fixed", [x], [z]))


@pytest.mark.parametrize(
    "dtype, triton_type",
    [
        (TensorProto.FLOAT, "TYPE_FP32"),
        (TensorProto.FLOAT16, "TYPE_FP16"),
        (TensorProto.BFLOAT16, "TYPE_BF16"),
    ],
)
def test_config_of_a_sparse_attention_model(tmp_path, dtype, triton_type):
    source = save(sparse_attention_model(dtype, mask_dtype=TensorProto.BOOL), tmp_path / "sa.onnx")
    repo = tmp_path / "repo"
    assert write_triton_repository(source, repo, "sa") == repo / "sa"

    config = parse(repo / "sa")
    assert (config.name, config.platform, config.max_batch_size) == ("sa", "onnxruntime_onnx", 8)
    assert config.HasField("dynamic_batching")
    assert [(g.count, g.kind) for g in config.instance_group] == [
        (1, model_config_pb2.ModelInstanceGroup.KIND_CPU)
    ]
    assert list(config.model_operations.op_library_filename) == ["/models/sa/libtfsa_ops.so"]
    three = [-1, -1, -1]  # [batch, heads, len, dim] less the batch
    assert entries(config.input) == {
        "query": (triton_type, three, None),
        "key": (triton_type, three, None),
        "value": (triton_type, three, None),
        "attn_mask": ("TYPE_BOOL", three, None),
    }
    assert entries(config.output) == {"Y": (triton_type, three, None), "density": ("TYPE_FP32", [-1], None)}
    assert sorted(snapshot(repo)) == ["sa", "sa/1", "sa/1/model.onnx", "sa/config.pbtxt", "sa/libtfsa_ops.so"]
    assert (repo / "sa/1/model.onnx").read_bytes() == source.read_bytes()
    assert (repo / "sa/libtfsa_ops.so").read_bytes() == LIBRARY.read_bytes()


def _session(model: Path, library: str) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.register_custom_ops_library(library)
    return ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])


def _onnx_shape(arg) -> list[int]:
    return [d if isinstance(d, int) else -1 for d in arg.shape]


@pytest.mark.parametrize("external", [False, True])
def test_repository_model_runs_with_the_library_its_config_names(tmp_path, external):
    source = tmp_path / "src" / "tiny.onnx"
    source.parent.mkdir()
    twin = sparse_twin(min_seq_len=0, block_size=16, threshold=0.9)
    if external:
        onnx.save_model(twin, str(source), save_as_external_data=True, location="tiny.data")
    else:
        save(twin, source)
    before = snapshot(source.parent)
    repo = tmp_path / "repo"
    write_triton_repository(source, repo, "tiny", max_batch=4, library_dir=str(repo / "tiny"))

    config = parse(repo / "tiny")
    library = config.model_operations.op_library_filename[0]
    assert Path(library) == repo / "tiny" / LIBRARY.name
    model = repo / "tiny/1/model.onnx"
    if external:  # Triton's layout for a multi-file model: 1/model.onnx/ holds model.onnx and its data
        assert model.is_dir()
        assert (model / "tiny.data").read_bytes() == (source.parent / "tiny.data").read_bytes()
        model = model / "model.onnx"
    served, original = _session(model, library), _session(source, tfsa_onnx.get_library_path())

    # What Triton's onnxruntime backend checks: [batch] + config dims agree with the model's shapes.
    for io, args in ((config.input, served.get_inputs()), (config.output, served.get_outputs())):
        assert {t.name: [-1, *t.dims] for t in io} == {a.name: _onnx_shape(a) for a in args}
    assert entries(config.input) == {
        "input_ids": ("TYPE_INT64", [-1], None),
        "attention_mask": ("TYPE_INT64", [-1], None),
    }
    assert entries(config.output)["logits"] == ("TYPE_FP32", [-1, 64], None)
    feeds = tiny_feeds(1, seq_len=96, batch=3)[0]
    for got, want in zip(served.run(None, feeds), original.run(None, feeds), strict=True):
        np.testing.assert_array_equal(got, want)
    assert snapshot(source.parent) == before  # the input model and its data are untouched


def fake_libraries(folder: Path, monkeypatch, cuda: bool) -> None:
    """An installation whose library folder is FOLDER, with or without the CUDA build."""
    folder.mkdir()
    (folder / "libtfsa_ops.so").write_bytes(b"cpu")
    if cuda:
        (folder / triton.CUDA_LIBRARY).write_bytes(b"cuda")
    monkeypatch.setattr(triton, "get_library_path", lambda: str(folder / "libtfsa_ops.so"))


def test_gpu_instances_and_no_batching(tmp_path, monkeypatch):
    fake_libraries(tmp_path / "lib", monkeypatch, cuda=False)
    source = save(sparse_attention_model(), tmp_path / "sa.onnx")
    with pytest.warns(TritonRepoWarning, match=r"no CUDA build .* runs the SparseAttention nodes on the CPU"):
        write_triton_repository(source, tmp_path / "repo", "sa", max_batch=0, instance_count=3, gpu=True)
    config = parse(tmp_path / "repo/sa")
    assert [(g.count, g.kind) for g in config.instance_group] == [
        (3, model_config_pb2.ModelInstanceGroup.KIND_GPU)
    ]
    assert config.max_batch_size == 0
    assert not config.HasField("dynamic_batching")  # Triton batches only when max_batch_size > 0
    assert entries(config.input)["query"] == ("TYPE_FP32", [-1, -1, -1, -1], None)
    assert list(config.model_operations.op_library_filename) == ["/models/sa/libtfsa_ops.so"]


def test_gpu_instances_get_the_cuda_build_when_it_is_installed(tmp_path, monkeypatch):
    fake_libraries(tmp_path / "lib", monkeypatch, cuda=True)
    source = save(sparse_attention_model(), tmp_path / "sa.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("error", TritonRepoWarning)
        write_triton_repository(source, tmp_path / "repo", "gpu", gpu=True)
        write_triton_repository(source, tmp_path / "repo", "cpu")
    config = parse(tmp_path / "repo/gpu")
    assert list(config.model_operations.op_library_filename) == ["/models/gpu/libtfsa_ops_cuda.so"]
    assert (tmp_path / "repo/gpu/libtfsa_ops_cuda.so").read_bytes() == b"cuda"
    assert not (tmp_path / "repo/gpu/libtfsa_ops.so").exists()
    assert (tmp_path / "repo/cpu/libtfsa_ops.so").read_bytes() == b"cpu"


def test_model_without_our_op_warns_and_writes_everything(tmp_path):
    source = save(plain_model(), tmp_path / "plain.onnx")
    with pytest.warns(TritonRepoWarning, match=r"has no ai\.tfsa::SparseAttention node"):
        write_triton_repository(source, tmp_path / "repo", "plain", max_batch=4)
    config = parse(tmp_path / "repo/plain")
    # A [batch] tensor becomes dims [1] reshaped to [] (Triton needs a non-empty dims); unknown dims are -1.
    assert entries(config.input) == {'in"put é': ("TYPE_INT64", [1], []), "y": ("TYPE_INT32", [-1, 3], None)}
    assert entries(config.output) == {"out": ("TYPE_INT64", [1], []), "y2": ("TYPE_INT32", [-1, 3], None)}
    assert list(config.model_operations.op_library_filename) == ["/models/plain/libtfsa_ops.so"]
    assert (tmp_path / "repo/plain/libtfsa_ops.so").is_file()


def test_fixed_batch_dimension_needs_max_batch_0(tmp_path):
    source = save(fixed_batch_model(), tmp_path / "fixed.onnx")
    before = snapshot(tmp_path)
    with pytest.raises(TritonRepoError, match=r"input 'x' has a fixed leading dimension of 1.*--max-batch 0"):
        write_triton_repository(source, tmp_path / "repo", "fixed")
    assert snapshot(tmp_path) == before
    with pytest.warns(TritonRepoWarning):
        write_triton_repository(source, tmp_path / "repo", "fixed", max_batch=0)
    assert entries(parse(tmp_path / "repo/fixed").input) == {"x": ("TYPE_FP32", [1, 4], None)}


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "does not exist"),
        (b"not a model\n", "not a readable ONNX model"),
        (b"", "not a readable ONNX model"),
    ],
)
def test_bad_model_file_writes_nothing(tmp_path, content, message):
    source = tmp_path / "model.onnx"
    if content is not None:
        source.write_bytes(content)
    before = snapshot(tmp_path)
    with pytest.raises(TritonRepoError, match=message):
        write_triton_repository(source, tmp_path / "repo", "m")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("name", ["", "..", "../m", "a/b", ".hidden", "a b", "-m"])
def test_invalid_names_are_refused(tmp_path, name):
    source = save(sparse_attention_model(), tmp_path / "sa.onnx")
    with pytest.raises(TritonRepoError, match="model name"):
        write_triton_repository(source, tmp_path / "repo", name)
    assert not (tmp_path / "repo").exists()


def test_relative_library_dir_and_missing_external_data_are_refused(tmp_path):
    source = save(sparse_attention_model(), tmp_path / "sa.onnx")
    with pytest.raises(TritonRepoError, match="is relative"):
        write_triton_repository(source, tmp_path / "repo", "sa", library_dir="lib")
    ext = tmp_path / "ext" / "tiny.onnx"
    ext.parent.mkdir()
    onnx.save_model(sparse_twin(), str(ext), save_as_external_data=True, location="w.data", size_threshold=0)
    (ext.parent / "w.data").unlink()
    with pytest.raises(TritonRepoError, match="w.data, external data of tiny.onnx, is missing"):
        write_triton_repository(ext, tmp_path / "repo", "tiny")
    assert not (tmp_path / "repo").exists()


def test_existing_model_folder_needs_force(tmp_path):
    source = save(sparse_attention_model(), tmp_path / "sa.onnx")
    source_digest = digest(source)
    repo = tmp_path / "repo"
    (repo / "sa").mkdir(parents=True)
    write_triton_repository(source, repo, "sa")  # an empty folder is simply filled
    (repo / "sa/keep.txt").write_text("mine")
    before = snapshot(tmp_path)
    with pytest.raises(TritonRepoError, match="exists and is not empty; use --force"):
        write_triton_repository(source, repo, "sa", instance_count=2)
    assert snapshot(tmp_path) == before

    write_triton_repository(source, repo, "sa", instance_count=2, force=True)
    assert sorted(snapshot(repo)) == ["sa", "sa/1", "sa/1/model.onnx", "sa/config.pbtxt", "sa/libtfsa_ops.so"]
    assert parse(repo / "sa").instance_group[0].count == 2
    assert digest(source) == source_digest


def test_force_refuses_to_delete_the_input_model(tmp_path):
    repo = tmp_path / "repo"
    (repo / "sa").mkdir(parents=True)
    source = save(sparse_attention_model(), repo / "sa" / "sa.onnx")
    before = snapshot(tmp_path)
    with pytest.raises(TritonRepoError, match="the input model is inside"):
        write_triton_repository(source, repo, "sa", force=True)
    assert snapshot(tmp_path) == before


def test_target_that_is_a_file_is_refused(tmp_path):
    source = save(sparse_attention_model(), tmp_path / "sa.onnx")
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo/sa").write_text("x")
    before = snapshot(tmp_path)
    with pytest.raises(TritonRepoError, match="exists and is not a folder"):
        write_triton_repository(source, tmp_path / "repo", "sa", force=True)
    assert snapshot(tmp_path) == before


def test_a_failed_write_leaves_the_old_repository_as_it_was(tmp_path, monkeypatch):
    source = save(sparse_attention_model(), tmp_path / "sa.onnx")
    repo = tmp_path / "repo"
    write_triton_repository(source, repo, "sa")
    before = snapshot(tmp_path)

    def disk_full(*_args, **_kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(triton.shutil, "copy", disk_full)
    with pytest.raises(TritonRepoError, match="No space left"):
        write_triton_repository(source, repo, "sa", instance_count=2, force=True)
    with pytest.raises(TritonRepoError, match="No space left"):
        write_triton_repository(source, repo, "other")
    assert snapshot(tmp_path) == before  # no half-written model, no temporary folder


def test_cli_writes_the_repository_and_prints_how_to_serve_it(tmp_path):
    source = save(sparse_attention_model(), tmp_path / "sa.onnx")
    repo = tmp_path / "repo"
    args = ["triton-repo", str(source), "-o", str(repo), "--name", "sa", "--max-batch", "4"]
    result = CliRunner().invoke(main, [*args, "--instance-count", "2", "--gpu"])
    assert result.exit_code == 0, result.output
    assert f"wrote {repo / 'sa'}" in result.stdout
    assert f"--gpus all -p 8000:8000 -p 8001:8001 -v {repo.resolve()}:/models" in result.stdout
    config = parse(repo / "sa")
    assert (config.max_batch_size, config.instance_group[0].count) == (4, 2)
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU

    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert "Error: " in result.output and "exists and is not empty; use --force" in result.output
    result = CliRunner().invoke(main, [*args, "--force", "--library-dir", "/opt/tfsa"])
    assert result.exit_code == 0, result.output
    assert list(parse(repo / "sa").model_operations.op_library_filename) == ["/opt/tfsa/libtfsa_ops.so"]
    assert "docker run" not in result.stdout  # the library is not where the repository is mounted
    assert CliRunner().invoke(main, [*args, "--instance-count", "0"]).exit_code == 2


def test_cli_warns_on_a_model_without_our_op(tmp_path):
    source = save(plain_model(), tmp_path / "plain.onnx")
    result = CliRunner().invoke(main, ["triton-repo", str(source), "-o", str(tmp_path / "r"), "--name", "p"])
    assert result.exit_code == 0, result.output
    assert "Warning: " in result.stderr and "has no ai.tfsa::SparseAttention node" in result.stderr
    assert (tmp_path / "r/p/config.pbtxt").is_file()
