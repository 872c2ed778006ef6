"""The samples work: the C++ and Python apps run optimized models, every config applies, the demo's table."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from conftest import VOCAB

import tfsa_onnx
from tfsa_onnx.config import TUNABLE, SparsityConfig
from tfsa_onnx.rewrite import OptimizeError

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"
BERT = ("bert", "eager", False, 17)
# Sparse even at 96 tokens, so that the C++ app runs the kernel's block selection.
SPARSE = {
    "defaults": {
        "min_seq_len": 0,
        "block_size": 16,
        "global_tokens": 0,
        "local_window": 0,
        "threshold": 0.5,
        "max_density": 0.5,
    }
}


def _ort_headers() -> Path:
    """Where the build found the ONNX Runtime headers (ORT_INCLUDE_DIR, else the cache)."""
    if os.environ.get("ORT_INCLUDE_DIR"):
        return Path(os.environ["ORT_INCLUDE_DIR"])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "tfsa-onnx" / "ort-headers-1.29.0"


@pytest.fixture(scope="module")
def cpp_app(tmp_path_factory) -> Path:
    """samples/cpp_app built with CMake against the onnxruntime wheel's own library."""
    headers = _ort_headers()
    assert (headers / "onnxruntime_cxx_api.h").is_file(), f"no ONNX Runtime headers in {headers}"
    runtime = next((Path(ort.__file__).parent / "capi").glob("libonnxruntime.so*"))
    build = tmp_path_factory.mktemp("cpp_app")
    configure = ["cmake", "-S", str(SAMPLES / "cpp_app"), "-B", str(build)]
    configure += [f"-DORT_INCLUDE_DIR={headers}", f"-DORT_LIBRARY={runtime}"]
    for command in (configure, ["cmake", "--build", str(build)]):
        out = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout + out.stderr
    return build / "run_model"


def _cpp_app_feeds(seq: int) -> dict[str, np.ndarray]:
    """The inputs run_model.cc makes for a [1, seq] text model with --vocab VOCAB."""
    ids = (7 * np.arange(seq, dtype=np.int64) + 1) % VOCAB
    return {"input_ids": ids[None], "attention_mask": np.ones((1, seq), np.int64)}


def test_cpp_app_runs_an_optimized_model_like_python(cpp_app, exports, tmp_path):
    model, report = tfsa_onnx.optimize(str(exports.get(*BERT)), SPARSE)
    assert report.replaced == 2
    path = tmp_path / "bert.tfsa.onnx"
    onnx.save(model, path)
    seq = 96
    command = [str(cpp_app), "--vocab", str(VOCAB), "--dump", str(tmp_path), str(path)]
    command += [tfsa_onnx.get_library_path(), f"1,{seq}", f"1,{seq}"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr

    so = tfsa_onnx.session_options()
    so.intra_op_num_threads = 2  # as the app, so that both split the work the same way
    expected = ort.InferenceSession(str(path), so).run(None, _cpp_app_feeds(seq))[0]
    got = np.fromfile(tmp_path / "last_hidden_state.f32", dtype=np.float32).reshape(expected.shape)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    name, count, total = out.stdout.split()
    assert (name, int(count)) == ("last_hidden_state", expected.size)
    assert abs(float(total) - float(expected.astype(np.float64).sum())) < 1e-3


def test_cpp_app_reports_a_missing_library_as_an_error(cpp_app, exports, tmp_path):
    missing = str(tmp_path / "missing.so")
    so = ort.SessionOptions()
    with pytest.raises(Exception, match="missing.so"):  # ORT raises its own error types
        so.register_custom_ops_library(missing)
    command = [str(cpp_app), str(exports.get(*BERT)), missing, "1,8", "1,8"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert out.stderr.startswith("error: ") and "missing.so" in out.stderr


def _word_tokenizer(directory: Path) -> Path:
    """A tokenizer.json with VOCAB tokens ([PAD] [UNK] [CLS] [SEP] w0 w1 ...), BERT-style framing."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + [f"w{i}" for i in range(VOCAB - 4)]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    special = [("[CLS]", 2), ("[SEP]", 3)]
    tokenizer.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=special)
    directory.mkdir()
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory


def _mean_pooled(session: ort.InferenceSession, ids: list[int]) -> np.ndarray:
    """One text, unpadded: its tokens' mean hidden state, unit length."""
    feeds = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)}
    pooled = session.run(None, feeds)[0][0].mean(axis=0)
    return pooled / np.linalg.norm(pooled)


def test_python_app_embeds_texts(exports, tmp_path):
    original = exports.get(*BERT)
    model, _ = tfsa_onnx.optimize(str(original), None)
    path = tmp_path / "bert.tfsa.onnx"
    onnx.save(model, path)
    tokenizer = _word_tokenizer(tmp_path / "tokenizer")
    texts = ["w1 w2 w3", " ".join(f"w{i}" for i in range(10, 40)), "w1 w2 unknown"]
    saved = tmp_path / "embeddings.npy"
    command = [sys.executable, str(SAMPLES / "python_app.py"), str(path), *texts]
    command += ["--tokenizer", str(tokenizer), "--save", str(saved)]
    out = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "cosine similarities:" in out.stdout

    # Each text alone through the original model: the padded batch and the library change nothing.
    from tokenizers import Tokenizer

    encode = Tokenizer.from_file(str(tokenizer / "tokenizer.json")).encode
    session = ort.InferenceSession(str(original), providers=["CPUExecutionProvider"])
    expected = np.stack([_mean_pooled(session, encode(t).ids) for t in texts])
    np.testing.assert_allclose(np.load(saved), expected, atol=1e-5)


# Every shipped config, and the tiny export of the family it is written for.
CONFIG_MODELS = {
    "conservative.yaml": BERT,
    "per_layer.json": BERT,
    "encoder.yaml": BERT,
    "vit.yaml": ("vit", "eager", False, 17),
    "causal-lm.yaml": ("gpt2", "eager", False, 17),
    "smollm2-135m-4096-ppl1.json": ("llama", "sdpa", False, 17),
    "smollm2-135m-4096-ppl2.json": ("llama", "sdpa", False, 17),
    "smollm2-135m-4096-ppl1-antidiagonal.json": ("llama", "sdpa", False, 17),
    "smollm2-135m-genai-4096-ppl1.json": ("llama", "sdpa", False, 17),  # calibrated on the genai folder
    "smollm2-135m-4096-ppl1-heads.json": ("llama", "sdpa", False, 17),  # per head: 9, the export has 4
    "smollm2-135m-4096-ppl1-heads-retrieval.json": ("llama", "sdpa", False, 17),  # calibrate --retrieval 0.75
}


@pytest.mark.parametrize("name", sorted(p.name for p in (SAMPLES / "configs").iterdir()))
def test_sample_config_lands_on_the_nodes(exports, name):
    assert name in CONFIG_MODELS, f"samples/configs/{name}: add it to CONFIG_MODELS with a matching export"
    config = SparsityConfig.load(SAMPLES / "configs" / name)
    per_head = any("head_thresholds" in v for v in config.layers.values())
    try:
        model, report = tfsa_onnx.optimize(str(exports.get(*CONFIG_MODELS[name])), config)
    except OptimizeError as e:
        # a per-head config gives its own model's head count; the tiny export has other heads
        assert per_head and "head_thresholds, but it has" in str(e), str(e)
        return
    nodes = {n.name: n for n in model.graph.node if n.op_type == tfsa_onnx.OP_TYPE}
    causal = CONFIG_MODELS[name][0] in ("gpt2", "llama")
    for site in report.sites:
        wanted = config.for_site(site.layer, site.name)
        if wanted is None:
            assert (site.replaced, site.reason, site.name in nodes) == (False, "skipped by the config", False)
            continue
        assert site.replaced, site.reason
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[site.name].attribute}
        heads = wanted.pop("head_thresholds")  # a list (none: no attribute)
        assert {k: attributes[k] for k in TUNABLE if k != "head_thresholds"} == pytest.approx(wanted)
        assert attributes.get("head_thresholds", []) == pytest.approx(list(heads))
        assert attributes["is_causal"] == int(causal)
    if name == "per_layer.json":
        assert [s.replaced for s in report.sites] == [False, True]  # its layer 0 is skipped


def _load_demo():
    spec = importlib.util.spec_from_file_location("demo", SAMPLES / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_table_reads_what_optimize_and_validate_write(exports, tmp_path):
    from tfsa_onnx.cli import main

    original, optimized = exports.get(*BERT), tmp_path / "bert.tfsa.onnx"
    sites, figures = tmp_path / "sites.json", tmp_path / "validate.json"
    runner = CliRunner()
    runs = [
        [
            "optimize",
            original,
            "-o",
            optimized,
            "--config",
            SAMPLES / "configs/per_layer.json",
            "--report",
            sites,
        ],
        ["validate", original, optimized, "--seq-len", "32", "--samples", "1", "--json", figures],
    ]
    for args in runs:
        result = runner.invoke(main, [str(a) for a in args], catch_exceptions=False)
        assert result.exit_code == 0, result.output

    table = _load_demo().summary(sites, figures)
    lines = dict(line.strip().split("  ", 1) for line in table.splitlines()[1:])
    assert lines["attention sites replaced"].strip() == "1 of 2"
    assert lines["mean density"].strip().startswith("1.000")
    assert lines["cosine vs original"].strip().startswith("1.00000")
    assert lines["latency ratio"].strip().endswith("ms)")
