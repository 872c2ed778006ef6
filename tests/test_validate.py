"""validate: metrics, inputs, exit status; runs the real ORT kernel."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from tiny_attention import VOCAB, SessionWatch, sparse_twin, tiny_feeds, tiny_model

from tfsa_onnx.cli import main
from tfsa_onnx.inputs import InputError, generate, graph_inputs, load_feeds, load_npz, load_text
from tfsa_onnx.validation import token_nll, validate

DENSE = {"threshold": 1.0, "max_density": 1.0, "min_seq_len": 0}
BAD = {"threshold": 0.05, "max_density": 0.05, "min_seq_len": 0, "global_tokens": 0, "local_window": 0}


@pytest.fixture
def models(tmp_path: Path) -> dict[str, str]:
    paths = {
        "original": tiny_model(),
        "dense": sparse_twin(**DENSE),
        "bad": sparse_twin(block_size=16, **BAD),
    }
    out = {}
    for name, model in paths.items():
        out[name] = str(tmp_path / f"{name}.onnx")
        onnx.save(model, out[name])
    return out


def test_dense_config_passes_with_cosine_one(models, tmp_path):
    report = tmp_path / "v.json"
    args = ["validate", models["original"], models["dense"], "--seq-len", "256", "--batch", "2"]
    result = CliRunner().invoke(main, [*args, "--samples", "2", "--json", str(report), "--atol", "1e-3"])
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output
    data = json.loads(report.read_text())
    for name in ("hidden", "logits"):
        assert data["outputs"][name]["cosine_min"] > 1 - 1e-6
        assert data["outputs"][name]["max_abs_error"] < 1e-3
    assert data["outputs"]["logits"]["argmax_agreement"] == 1.0
    assert "argmax_agreement" not in data["outputs"]["hidden"]
    assert data["density"] == pytest.approx(1.0)
    assert data["latency_original_s"] > 0 and data["speedup"] > 0


def test_bad_config_fails_with_exit_1(models):
    args = ["validate", models["original"], models["bad"], "--seq-len", "256", "--samples", "2"]
    result = CliRunner().invoke(main, [*args, "--cos-min", "0.99"])
    assert result.exit_code == 1, result.output
    assert "FAIL hidden: mean cosine" in result.output
    assert re.search(r"^density +0\.06", result.output, re.M)


def test_mismatched_inputs_is_a_clear_error_before_any_run(models, tmp_path):
    other = tiny_model()
    other.graph.input[1].name = "mask"
    for node in other.graph.node:
        node.input[:] = ["mask" if i == "attention_mask" else i for i in node.input]
    path = tmp_path / "other.onnx"
    onnx.save(other, str(path))
    result = CliRunner().invoke(main, ["validate", models["original"], str(path)])
    assert result.exit_code != 0
    assert "different inputs" in result.output


def test_npz_missing_input_is_a_clear_error(models, tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, input_ids=np.zeros((2, 1, 8), dtype=np.int64))
    result = CliRunner().invoke(
        main, ["validate", models["original"], models["dense"], "--inputs", str(path)]
    )
    assert result.exit_code != 0
    assert "no array for graph input(s) attention_mask" in result.output


def test_npz_samples_on_the_first_axis(tmp_path):
    specs = graph_inputs(tiny_model())
    path = tmp_path / "x.npz"
    np.savez(path, input_ids=np.ones((3, 16), dtype=np.int32), attention_mask=np.ones((3, 1, 16)))
    feeds = load_npz(path, specs)
    assert len(feeds) == 3
    assert feeds[0]["input_ids"].shape == (1, 16) and feeds[0]["input_ids"].dtype == np.int64
    assert feeds[2]["attention_mask"].shape == (1, 16)


def test_generated_inputs_have_ids_in_range_and_real_padding():
    model = tiny_model()
    feeds = generate(model, graph_inputs(model), seq_len=32, batch=3, samples=2)
    assert len(feeds) == 2
    ids, mask = feeds[0]["input_ids"], feeds[0]["attention_mask"]
    assert ids.shape == (3, 32) and ids.max() < VOCAB
    assert mask[0].all() and not mask[-1].all()  # later rows are padded
    assert (ids[mask == 0] == 0).all()


def test_text_inputs_from_a_tokenizer_directory(tmp_path):
    tokenizer_dir = _word_tokenizer(tmp_path)
    text = tmp_path / "t.txt"
    text.write_text(("alpha beta gamma delta " * 30 + "\n\n") * 4)
    feeds = load_text(text, tokenizer_dir, graph_inputs(tiny_model()), seq_len=40, samples=3)
    assert len(feeds) == 3
    assert feeds[0]["input_ids"].shape == (1, 40)
    assert feeds[0]["attention_mask"].all()
    with pytest.raises(InputError, match="--tokenizer"):
        load_feeds(tiny_model(), text=text)


def _word_tokenizer(tmp_path: Path) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "alpha", "beta", "gamma", "delta"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]")
    directory = tmp_path / "tok"
    fast.save_pretrained(str(directory))
    return str(directory)


def test_token_nll_matches_a_direct_computation():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((2, 7, 11)).astype(np.float32)
    ids = rng.integers(0, 11, size=(2, 7))
    mask = np.ones((2, 7), dtype=np.int64)
    mask[1, 5:] = 0
    total, count = token_nll(logits, ids, mask)
    expected, n = 0.0, 0
    for b in range(2):
        for t in range(6):
            if mask[b, t] and mask[b, t + 1]:
                row = logits[b, t].astype(np.float64)
                expected += np.log(np.exp(row).sum()) - row[ids[b, t + 1]]
                n += 1
    assert count == n and total == pytest.approx(expected, rel=1e-9)


def test_perplexity_for_causal_models():
    model = sparse_twin(is_causal=1, **DENSE)
    result = validate(model, model, tiny_feeds(2, 128), progress=False)
    logits = result.outputs["logits"]
    assert logits["perplexity_original"] == pytest.approx(logits["perplexity_optimized"], rel=1e-5)
    assert abs(logits["perplexity_increase"]) < 1e-5
    assert "perplexity_original" not in result.outputs["hidden"]
    assert result.failures(max_ppl_increase=0.01) == []


def _old_figures(ref_outputs, opt_outputs, names, feeds) -> dict[str, dict]:
    """The comparison as validate computed it with both full outputs in memory, written out."""
    figures = {}
    for j, name in enumerate(names):
        refs = [r[j].astype(np.float64) for r in ref_outputs]
        opts = [o[j].astype(np.float64) for o in opt_outputs]
        diffs = [np.abs(a - b) for a, b in zip(refs, opts, strict=True)]
        cosines = []
        for a, b in zip(refs, opts, strict=True):
            x, y = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
            cos = (x * y).sum(axis=1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
            cosines.append(float(cos.mean()))
        out = {
            "max_abs_error": max(float(d.max()) for d in diffs),
            "mean_abs_error": sum(float(d.sum()) for d in diffs) / sum(d.size for d in diffs),
            "relative_l2_error": float(
                np.sqrt(sum(float((d**2).sum()) for d in diffs) / sum(float((a**2).sum()) for a in refs))
            ),
            "cosine_min": min(cosines),
            "cosine_mean": float(np.mean(cosines)),
        }
        if name == "logits":
            agree = [(a.argmax(-1) == b.argmax(-1)) for a, b in zip(refs, opts, strict=True)]
            out["argmax_agreement"] = sum(int(g.sum()) for g in agree) / sum(g.size for g in agree)
            nll = [
                [token_nll(x[j], f["input_ids"], f["attention_mask"]) for x, f in zip(o, feeds, strict=True)]
                for o in (ref_outputs, opt_outputs)
            ]
            tokens = sum(n for _, n in nll[0])
            ppl = [float(np.exp(sum(t for t, _ in side) / tokens)) for side in nll]
            out |= {
                "perplexity_original": ppl[0],
                "perplexity_optimized": ppl[1],
                "perplexity_tokens": tokens,
            }
            out["perplexity_increase"] = ppl[1] / ppl[0] - 1.0
        figures[name] = out
    return figures


def test_metrics_equal_the_in_memory_computation_with_one_session_at_a_time(monkeypatch):
    """Chunked, spooled figures equal the direct ones; no session is created while another lives."""
    from tfsa_onnx import validation

    original = sparse_twin(is_causal=1, **DENSE)
    optimized = sparse_twin(is_causal=1, block_size=16, **BAD)
    feeds = tiny_feeds(3, 200, batch=2)
    feeds[1]["attention_mask"][1, 150:] = 0
    sessions = [validation.make_session(m) for m in (original, optimized)]
    names = [o.name for o in sessions[0].get_outputs()]
    ref_outputs = [sessions[0].run(names, f) for f in feeds]
    opt_outputs = [sessions[1].run(names, f) for f in feeds]
    del sessions
    expected = _old_figures(ref_outputs, opt_outputs, names, feeds)

    watch = SessionWatch(monkeypatch, validation)
    monkeypatch.setattr(validation, "_ROWS", 7)  # many uneven chunks, [rows, width] split inside
    result = validate(original, optimized, feeds, warmup=1, progress=False)
    assert watch.overlaps == [0, 0]  # two sessions, each created with no other alive
    assert watch.all_released()  # and both released at the end
    assert result.samples == 3 and result.latency_original_s > 0 and result.latency_optimized_s > 0
    for name in names:
        got, want = result.outputs[name], expected[name]
        assert set(got) == set(want)
        assert got["max_abs_error"] == want["max_abs_error"] > 0.01
        for key in ("cosine_min", "cosine_mean", "argmax_agreement", "perplexity_tokens"):
            if key in want:
                assert got[key] == want[key], key
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key
    assert expected["logits"]["perplexity_increase"] > 0.01  # the bad config is really compared


def test_spool_reads_row_ranges_back():
    from tfsa_onnx.validation import Spool

    rng = np.random.default_rng(0)
    arrays = {"a": rng.standard_normal((2, 5, 7)).astype(np.float32), "b": np.arange(9), "c": np.float64(3)}
    with Spool() as spool:
        for key, value in arrays.items():
            spool.put(key, np.asarray(value))
        assert np.array_equal(spool.rows("a", 3, 8), arrays["a"].reshape(10, 7)[3:8])
        assert np.array_equal(spool.get("b"), arrays["b"]) and spool.get("c").shape == ()
        assert np.array_equal(spool.get("a"), arrays["a"])


def test_sessions_run_without_a_memory_pattern():
    """A memory pattern would allocate a second planned block from the second run on."""
    from tfsa_onnx.validation import make_session

    session = make_session(tiny_model())
    assert session.get_session_options().enable_mem_pattern is False


def test_every_validate_run_shrinks_the_arena(monkeypatch):
    """Each run hands back what it grew the CPU arena by, so later runs do not pile up."""
    from tfsa_onnx import validation

    seen = []
    real = validation.make_session

    class Recording:
        def __init__(self, session) -> None:
            self.session = session

        def run(self, names, feed, options=None):
            seen.append(options and options.get_run_config_entry("memory.enable_memory_arena_shrinkage"))
            return self.session.run(names, feed, options)

    monkeypatch.setattr(validation, "make_session", lambda *a, **k: Recording(real(*a, **k)))
    model = tiny_model()
    validate(model, model, tiny_feeds(2, 20), warmup=1, progress=False)
    assert seen == ["cpu:0"] * 6  # warmup + 2 samples, each model
