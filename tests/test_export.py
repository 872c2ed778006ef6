"""`tfsa_onnx.export()` / `tfsa-onnx export`: tiny Hugging Face models saved into a temporary directory,
exported, checked against torch, optimized; and every way the export refuses."""

from __future__ import annotations

import hashlib
import importlib
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import BUILDERS, VOCAB

import tfsa_onnx
from tfsa_onnx.cli import main
from tfsa_onnx.exporter import TASKS, ExportCheckError, ExportError, ExportResult, infer_task

export_module = importlib.import_module("tfsa_onnx.exporter")

SEQ_LEN = 12  # example length: short keeps each export quick
EXPECTED = {  # family -> (task, ONNX inputs, ONNX output)
    "bert": ("feature-extraction", ["input_ids", "attention_mask", "token_type_ids"], "last_hidden_state"),
    "llama": ("text-generation", ["input_ids", "attention_mask"], "logits"),
    "vit": ("image-classification", ["pixel_values"], "logits"),
}


def tiny_model(family: str):
    """The conftest configs (2 layers, hidden 32/64) under the head each task loads."""
    import torch
    import transformers as T

    torch.manual_seed(0)
    base = BUILDERS[family]("sdpa")
    if family == "llama":
        return T.LlamaForCausalLM(base.config)
    if family == "vit":
        return T.ViTForImageClassification(base.config)
    return base


def digest_dir(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


class HfExports:
    """Saves each tiny model once and exports it once with the dynamo exporter (the default)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.results: dict[str, tuple[ExportResult, list[str], dict[str, str]]] = {}

    def model_dir(self, family: str) -> Path:
        directory = self.root / f"{family}-hf"
        if not directory.is_dir():
            tiny_model(family).save_pretrained(str(directory))
        return directory

    def get(self, family: str) -> tuple[ExportResult, list[str], dict[str, str]]:
        """(result, progress lines, digest of the input directory taken before the export)."""
        if family not in self.results:
            directory = self.model_dir(family)
            before = digest_dir(directory)
            lines: list[str] = []
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = tfsa_onnx.export(
                    directory, self.root / f"{family}.onnx", seq_len=SEQ_LEN, progress=lines.append
                )
            self.results[family] = (result, lines, before)
        return self.results[family]


@pytest.fixture(scope="module")
def hf_exports(tmp_path_factory) -> HfExports:
    return HfExports(tmp_path_factory.mktemp("hf_export"))


def ort_session(model: Path | bytes, so=None):
    import onnxruntime as ort

    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])


def make_feeds(names: list[str], batch: int, seq: int, seed: int = 3) -> dict[str, np.ndarray]:
    """Token ids with the last row right-padded, or 32x32 images."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for name in names:
        if name == "pixel_values":
            feeds[name] = rng.standard_normal((batch, 3, 32, 32)).astype(np.float32)
        elif name == "input_ids":
            feeds[name] = rng.integers(0, VOCAB, (batch, seq)).astype(np.int64)
        elif name == "attention_mask":
            mask = np.ones((batch, seq), np.int64)
            if batch > 1:
                mask[-1, seq // 2 :] = 0
            feeds[name] = mask
        elif name == "token_type_ids":
            feeds[name] = (np.arange(seq) >= seq // 3).astype(np.int64)[None].repeat(batch, 0)
    return feeds


def torch_reference(directory: Path, task: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
    import torch
    import transformers

    model = getattr(transformers, TASKS[task].auto_class).from_pretrained(str(directory)).eval()
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}, return_dict=True)
    return out[TASKS[task].output].numpy()


# ---------------------------------------------------------------- each task, dynamo


@pytest.mark.parametrize("family", ["bert", "llama", "vit"])
def test_each_task_exports_checks_and_leaves_the_input_alone(hf_exports: HfExports, family: str) -> None:
    result, lines, before = hf_exports.get(family)
    task, inputs, output = EXPECTED[family]
    assert result.task == task
    assert result.input_names == inputs and result.output_names == [output]
    assert 0 <= result.max_abs_error < 1e-4
    onnx.checker.check_model(str(result.path), full_check=True)
    assert any(line.startswith(f"task: {task} (inferred from the architecture") for line in lines)
    assert any("dynamo" in line for line in lines)
    assert f"max abs error {result.max_abs_error:.3g}" in "\n".join(lines)
    directory = hf_exports.model_dir(family)
    assert digest_dir(directory) == before
    # Nothing but the model is left beside it (no staging directory, no external data for tiny weights).
    assert sorted(p.name for p in result.path.parent.glob(f"*{family}.onnx*")) == [f"{family}.onnx"]


@pytest.mark.parametrize(("family", "batch", "seq"), [("bert", 1, 5), ("llama", 4, 21), ("vit", 5, 0)])
def test_batch_and_sequence_dims_are_dynamic(
    hf_exports: HfExports, family: str, batch: int, seq: int
) -> None:
    result, _, _ = hf_exports.get(family)
    session = ort_session(result.path)
    feeds = make_feeds(result.input_names, batch, seq)
    got = session.run(None, feeds)[0]
    want = torch_reference(hf_exports.model_dir(family), result.task, feeds)
    assert got.shape == want.shape and got.shape[0] == batch
    np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("family", ["bert", "llama", "vit"])
def test_the_export_can_be_optimized_with_every_site_replaced(hf_exports: HfExports, family: str) -> None:
    result, _, _ = hf_exports.get(family)
    optimized, report = tfsa_onnx.optimize(result.path)
    assert len(report.sites) == 2 and all(s.replaced for s in report.sites), report.table()
    assert sum(n.op_type == "SparseAttention" for n in optimized.graph.node) == 2
    feeds = make_feeds(result.input_names, 2, 9)
    original = ort_session(result.path).run(None, feeds)[0]
    sparse = ort_session(optimized.SerializeToString(), tfsa_onnx.session_options()).run(None, feeds)[0]
    np.testing.assert_allclose(sparse, original, atol=1e-4)  # below min_seq_len: dense


# ---------------------------------------------------------------- other paths


def test_torchscript_exporter_with_an_opset(hf_exports: HfExports, tmp_path: Path) -> None:
    lines: list[str] = []
    result = tfsa_onnx.export(
        hf_exports.model_dir("llama"),
        tmp_path / "llama-ts.onnx",
        seq_len=SEQ_LEN,
        legacy_exporter=True,
        opset=17,
        progress=lines.append,
    )
    assert result.max_abs_error < 1e-4 and result.output_names == ["logits"]
    assert any("TorchScript" in line for line in lines)
    model = onnx.load(str(result.path))
    assert {o.domain: o.version for o in model.opset_import}[""] == 17
    feeds = make_feeds(result.input_names, 3, 17)
    np.testing.assert_allclose(
        ort_session(result.path).run(None, feeds)[0],
        torch_reference(hf_exports.model_dir("llama"), "text-generation", feeds),
        atol=1e-4,
    )


def test_an_in_memory_module_is_exported_with_its_task_inferred(tmp_path: Path) -> None:
    lines: list[str] = []
    model = tiny_model("vit")
    result = tfsa_onnx.export(model, tmp_path / "vit.onnx", legacy_exporter=True, progress=lines.append)
    assert result.task == "image-classification" and result.max_abs_error < 1e-4
    assert "task: image-classification (inferred from the architecture ViTForImageClassification)" in lines


def test_cli_writes_the_model_and_prints_the_error(hf_exports: HfExports, tmp_path: Path) -> None:
    out = tmp_path / "cli" / "bert.onnx"
    args = ["export", hf_exports.model_dir("bert"), "-o", out, "--legacy-exporter", "--seq-len", "8"]
    result = CliRunner().invoke(main, [str(a) for a in args + ["--task", "feature-extraction"]])
    assert result.exit_code == 0, result.output
    assert out.is_file()
    for step in ("loading", "task: feature-extraction (given)", "exporting with the TorchScript", "checking"):
        assert step in result.output
    error = float(re.search(r"max abs error (\S+) \(atol 0.001\)", result.output).group(1))
    assert error < 1e-4
    assert f"wrote {out}" in result.output


def test_cli_failure_is_one_line_and_exits_non_zero(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(main, ["export", str(tmp_path / "empty"), "-o", str(tmp_path / "m.onnx")])
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "has no config.json" in errors[0]
    assert not (tmp_path / "m.onnx").exists()


def test_gguf_weights_are_loaded_and_exported(tmp_path: Path) -> None:
    embedding = write_tiny_llama_gguf(tmp_path / "gguf" / "tiny.gguf")
    lines: list[str] = []
    result = tfsa_onnx.export(
        tmp_path / "gguf",
        tmp_path / "tiny.onnx",
        gguf_file="tiny.gguf",
        seq_len=SEQ_LEN,
        legacy_exporter=True,
        progress=lines.append,
    )
    assert result.task == "text-generation" and result.max_abs_error < 1e-4
    assert "task: text-generation (inferred from model_type llama)" in lines
    weights = [onnx.numpy_helper.to_array(t) for t in onnx.load(str(result.path)).graph.initializer]
    assert any(w.shape == embedding.shape and np.array_equal(w, embedding) for w in weights)


def write_tiny_llama_gguf(path: Path) -> np.ndarray:
    """A float32 Llama GGUF (2 layers, hidden 32) in llama.cpp's tensor names; returns its embedding."""
    import gguf

    hidden, layers, heads, kv_heads, ffn = 32, 2, 4, 2, 64
    kv = kv_heads * hidden // heads
    rng = np.random.default_rng(0)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    path.parent.mkdir(parents=True)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_vocab_size(VOCAB)
    embedding = weight(VOCAB, hidden)
    writer.add_tensor("token_embd.weight", embedding)
    for i in range(layers):
        shapes = {
            "attn_q": (hidden, hidden),
            "attn_k": (kv, hidden),
            "attn_v": (kv, hidden),
            "attn_output": (hidden, hidden),
            "ffn_gate": (ffn, hidden),
            "ffn_up": (ffn, hidden),
            "ffn_down": (hidden, ffn),
        }
        for name, shape in shapes.items():
            writer.add_tensor(f"blk.{i}.{name}.weight", weight(*shape))
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{i}.{norm}.weight", np.ones(hidden, np.float32))
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    writer.add_tensor("output.weight", weight(VOCAB, hidden))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return embedding


# ---------------------------------------------------------------- refusals


def test_a_mismatch_raises_and_writes_nothing(hf_exports: HfExports, tmp_path: Path, monkeypatch) -> None:
    real = export_module._torch_output
    monkeypatch.setattr(export_module, "_torch_output", lambda *a: real(*a) + 0.5)
    out = tmp_path / "bert.onnx"
    out.write_text("the previous model")
    with pytest.raises(ExportCheckError, match="nothing was written") as caught:
        tfsa_onnx.export(hf_exports.model_dir("bert"), out, seq_len=SEQ_LEN, legacy_exporter=True)
    assert caught.value.max_abs_error == pytest.approx(0.5, abs=1e-4)
    assert out.read_text() == "the previous model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bert.onnx"]


def test_atol_zero_accepts_only_an_exact_match(hf_exports: HfExports, tmp_path: Path) -> None:
    out = tmp_path / "llama.onnx"
    try:
        result = tfsa_onnx.export(
            hf_exports.model_dir("llama"), out, seq_len=SEQ_LEN, legacy_exporter=True, atol=0
        )
    except ExportCheckError as e:
        assert e.max_abs_error > 0 and not out.exists()
    else:
        assert result.max_abs_error == 0 and out.is_file()


def test_directory_errors(hf_exports: HfExports, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="has no config.json; pass a directory written by save_pretrained"):
        tfsa_onnx.export(tmp_path / "empty", tmp_path / "m.onnx")
    with pytest.raises(ExportError, match="is not a directory"):
        tfsa_onnx.export(tmp_path / "missing", tmp_path / "m.onnx")
    with pytest.raises(ExportError, match=r"the GGUF file .*nope.gguf does not exist"):
        tfsa_onnx.export(tmp_path / "empty", tmp_path / "m.onnx", gguf_file="nope.gguf")
    bert = hf_exports.model_dir("bert")
    with pytest.raises(ExportError, match="is a file of the input model"):
        tfsa_onnx.export(bert, bert / "config.json")
    with pytest.raises(ExportError, match="is a directory; pass a file path"):
        tfsa_onnx.export(bert, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_unsupported_models_and_tasks(hf_exports: HfExports, tmp_path: Path) -> None:
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text('{"model_type": "not-a-model", "architectures": ["NotAModel"]}')
    with pytest.raises(ExportError, match="cannot read the model in .*not-a-model.*newer transformers"):
        tfsa_onnx.export(unknown, tmp_path / "m.onnx")
    with pytest.raises(
        ExportError, match="ViTForImageClassification does not support the task text-generation"
    ):
        tfsa_onnx.export(hf_exports.model_dir("vit"), tmp_path / "m.onnx", task="text-generation")
    with pytest.raises(ExportError, match="unknown task 'translation'; choose one of feature-extraction"):
        tfsa_onnx.export(hf_exports.model_dir("vit"), tmp_path / "m.onnx", task="translation")
    with pytest.raises(ExportError, match="seq_len 4000 is more than the model's 2048 positions"):
        tfsa_onnx.export(hf_exports.model_dir("llama"), tmp_path / "m.onnx", seq_len=4000)
    with pytest.raises(ExportError, match="not a dict"):
        tfsa_onnx.export({}, tmp_path / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unknown"]


def test_a_model_without_text_or_image_inputs_is_refused(tmp_path: Path) -> None:
    import transformers as T

    config = T.Wav2Vec2Config(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
        conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=4,
    )  # fmt: skip
    with pytest.raises(ExportError, match="takes input_values; tfsa-onnx exports text models"):
        tfsa_onnx.export(T.Wav2Vec2Model(config), tmp_path / "m.onnx", legacy_exporter=True)


def test_missing_or_old_dependencies_say_what_to_install(
    hf_exports: HfExports, tmp_path: Path, monkeypatch
) -> None:
    import torch

    monkeypatch.setattr(torch, "__version__", "2.4.1")
    with pytest.raises(ExportError, match=r"needs torch>=2.5 \(found 2.4.1\).*--legacy-exporter"):
        tfsa_onnx.export(hf_exports.model_dir("bert"), tmp_path / "m.onnx")
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(ExportError, match=r"needs transformers: pip install 'tfsa-onnx\[export\]'"):
        tfsa_onnx.export(hf_exports.model_dir("bert"), tmp_path / "m.onnx")
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ExportError, match=r"needs torch: pip install torch==2.13.0"):
        tfsa_onnx.export(hf_exports.model_dir("bert"), tmp_path / "m.onnx")


# ---------------------------------------------------------------- units


def test_task_inference_without_architectures() -> None:
    import transformers as T

    assert infer_task(T.LlamaConfig()) == ("text-generation", "inferred from model_type llama")
    assert infer_task(T.BertConfig()) == ("feature-extraction", "inferred from model_type bert")
    assert infer_task(T.BertConfig(architectures=["BertForMaskedLM"]))[0] == "feature-extraction"
    assert infer_task(T.GPT2Config(architectures=["GPT2LMHeadModel"]))[0] == "text-generation"


@pytest.mark.parametrize("one_file", [True, False])
def test_external_data_moves_as_one_data_file(tmp_path: Path, one_file: bool) -> None:
    from onnx import TensorProto, helper, numpy_helper

    weights = [np.full((64, 64), i, np.float32) for i in range(3)]
    nodes = [helper.make_node("Add", ["x", "w0"], ["y0"])]
    nodes += [helper.make_node("Add", [f"y{i - 1}", f"w{i}"], [f"y{i}"]) for i in (1, 2)]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 64])],
        [helper.make_tensor_value_info("y2", TensorProto.FLOAT, [64, 64])],
        [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)],
    )
    staging = tmp_path / ".staging"
    staging.mkdir()
    onnx.save_model(
        helper.make_model(graph), str(staging / "m.onnx"), save_as_external_data=True,
        all_tensors_to_one_file=one_file, location="m.onnx.data", size_threshold=0,
    )  # fmt: skip
    assert len(list(staging.iterdir())) == (2 if one_file else 4)
    export_module._move_into_place(staging / "m.onnx", tmp_path / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["m.onnx", "m.onnx.data"]
    x = np.ones((64, 64), np.float32)
    (y,) = ort_session(tmp_path / "m.onnx").run(None, {"x": x})
    np.testing.assert_array_equal(y, x + 3)


def test_cli_task_choices_are_the_api_tasks() -> None:
    command = main.commands["export"]
    task_option = next(p for p in command.params if p.name == "task")
    assert list(task_option.type.choices) == list(TASKS)
