"""onnxruntime-genai folders: optimize, inspect, validate and bench on real builder output.

Tiny random Llama and Qwen2 models (2 KV heads, 2 layers, hidden 64) are converted by genai's
model builder at fp32 and int4 once per module; with a dense config the optimized folders must
generate the same greedy tokens and logits as the originals, through og.Generator.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from genai_folders import checksums, run_builder, save_hf_model, save_tokenizer

from tfsa_onnx import DOMAIN, GQA_OP_TYPE, get_library_path
from tfsa_onnx.cli import main
from tfsa_onnx.config import TUNABLE
from tfsa_onnx.genai import GenaiError, optimize_folder
from tfsa_onnx.reference import SparseAttentionAttributes

FOLDERS = ("llama-fp32", "llama-int4", "qwen2-fp32", "qwen2-int4")  # run on the CPU here
CUDA_FOLDERS = ("llama-fp16",)  # the builder's fp16 is for CUDA: rewritten, and run on the CPU
# Every block computed (threshold 1, no cap) on small blocks, so prompts of a few dozen tokens
# take the sparse path over several blocks and must still equal dense attention.
DENSE = {
    "defaults": {
        "block_size": 16,
        "global_tokens": 0,
        "local_window": 0,
        "threshold": 1.0,
        "max_density": 1.0,
        "min_seq_len": 1,
    }
}
# every tunable attribute is written: the config's defaults where DENSE does not set one (an empty
# list, head_thresholds by default, is no attribute)
TUNABLES = {n: getattr(SparseAttentionAttributes(), n) for n in TUNABLE} | DENSE["defaults"]
TUNABLES = {n: v for n, v in TUNABLES.items() if v != ()}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("genai")


@pytest.fixture(scope="module")
def folders(root) -> dict[str, Path]:
    (root / "tok").mkdir()
    vocab = save_tokenizer(root / "tok")
    jobs = []
    for kind in ("llama", "qwen2"):
        hf = root / f"hf-{kind}"
        hf.mkdir()
        save_hf_model(hf, kind, vocab, root / "tok")
        jobs += [(hf, root / f"{kind}-{p}", p) for p in ("fp32", "int4")]
    jobs.append((root / "hf-llama", root / "llama-fp16", "fp16"))
    run_builder(jobs, root / "cache")
    return {name: root / name for name in (*FOLDERS, *CUDA_FOLDERS)}


@pytest.fixture(scope="module")
def optimized(folders, root) -> dict[str, Path]:
    before = {name: checksums(path) for name, path in folders.items()}
    out = {name: root / f"{name}.tfsa" for name in folders}
    for name, path in folders.items():
        optimize_folder(path, out[name], DENSE)
    assert {name: checksums(path) for name, path in folders.items()} == before  # input untouched
    return out


def _model(folder: Path) -> onnx.ModelProto:
    return onnx.load(str(folder / "model.onnx"), load_external_data=False)


def _attributes(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


# ---------------------------------------------------------------- the rewrite


@pytest.mark.parametrize("name", [*FOLDERS, *CUDA_FOLDERS])
def test_every_gqa_node_becomes_the_sparse_op(folders, optimized, name):
    original, rewritten = _model(folders[name]), _model(optimized[name])
    gqa = [n for n in original.graph.node if n.op_type == "GroupQueryAttention"]
    ours = [n for n in rewritten.graph.node if n.op_type == GQA_OP_TYPE and n.domain == DOMAIN]
    assert len(gqa) == 2 and len(ours) == 2
    assert not [n for n in rewritten.graph.node if n.op_type == "GroupQueryAttention"]
    for old, new in zip(gqa, ours, strict=True):
        assert list(new.input) == list(old.input[:9])
        assert list(new.output) == list(old.output)
        attributes = _attributes(new)
        assert attributes == {**_attributes(old), **TUNABLES}
    assert [o.name for o in rewritten.graph.output] == [o.name for o in original.graph.output]
    assert [i.name for i in rewritten.graph.input] == [i.name for i in original.graph.input]
    if "int4" in name:
        assert any(n.op_type == "MatMulNBits" for n in rewritten.graph.node)
    if "fp16" in name:
        assert rewritten.graph.input[2].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16


def test_bfloat16_is_left_alone():
    import onnx_ir as ir

    from tfsa_onnx.rewrite import GiveUp
    from tfsa_onnx.rewrite.gqa import check

    node = _gqa_node({})
    node.inputs[0].dtype = ir.DataType.BFLOAT16
    with pytest.raises(GiveUp, match="element type .query is BFLOAT16"):
        check(node)


def test_a_cuda_folder_gets_the_cuda_library_when_built(folders, optimized):
    from tfsa_onnx.genai import uses_cuda

    config = json.loads((optimized["llama-fp16"] / "genai_config.json").read_text())
    assert uses_cuda(config)  # the builder's -e cuda: provider_options name "cuda"
    library = config["model"]["decoder"]["session_options"]["custom_ops_library"]
    try:
        expected = Path(get_library_path("cuda")).name
    except FileNotFoundError:
        expected = Path(get_library_path("cpu")).name  # with a warning: the op runs on the CPU
    assert library == expected and (optimized["llama-fp16"] / library).is_file()


@pytest.mark.parametrize("name", FOLDERS[:2])
def test_the_folder_has_the_library_and_its_config(folders, optimized, name):
    src, out = folders[name], optimized[name]
    config = json.loads((out / "genai_config.json").read_text())
    library = config["model"]["decoder"]["session_options"].pop("custom_ops_library")
    assert library == Path(get_library_path("cpu")).name
    assert (out / library).read_bytes() == Path(get_library_path("cpu")).read_bytes()
    assert config == json.loads((src / "genai_config.json").read_text())
    copied = checksums(out)
    for file, digest in checksums(src).items():
        if file not in ("model.onnx", "model.onnx.data", "genai_config.json"):
            assert copied[file] == digest
    assert set(copied) == set(checksums(src)) | {library}


def test_inspect_lists_the_gqa_nodes(folders):
    result = CliRunner().invoke(main, ["inspect", str(folders["llama-int4"])])
    assert result.exit_code == 0, result.output
    assert result.output.count("/attn/GroupQueryAttention") == 2
    assert "ort-gqa" in result.output and "2 attention sites" in result.output


def test_optimize_cli_writes_the_folder_and_replaces_its_previous_output(folders, root):
    out = root / "cli-out"
    for _ in range(2):  # the second run replaces the first one's folder
        result = CliRunner().invoke(main, ["optimize", str(folders["qwen2-fp32"]), "-o", str(out)])
        assert result.exit_code == 0, result.output
        assert "2 replaced" in result.output
    assert len([n for n in _model(out).graph.node if n.op_type == GQA_OP_TYPE]) == 2
    assert not [p for p in root.iterdir() if p.name.endswith(".tmp")]


def _refused(args: list[str], watched: list[Path]) -> str:
    before = {p: checksums(p) for p in watched}
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert {p: checksums(p) for p in watched} == before
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def test_refusals_write_nothing(folders, root):
    src = folders["llama-fp32"]
    line = _refused(["optimize", str(root / "hf-llama"), "-o", str(root / "x1")], [root / "hf-llama"])
    assert "without genai_config.json" in line and not (root / "x1").exists()
    line = _refused(["optimize", str(src), "-o", str(src / "inner")], [src])
    assert "inside the input folder" in line and not (src / "inner").exists()
    line = _refused(["optimize", str(src), "-o", str(src)], [src])
    assert "is the input folder" in line
    line = _refused(["optimize", str(src), "-o", str(folders["qwen2-fp32"])], [src, folders["qwen2-fp32"]])
    assert "not a folder written by tfsa-onnx optimize" in line


def _with_attribute(src: Path, dst: Path, layers: list[int], name: str, value) -> Path:
    shutil.copytree(src, dst)
    model = onnx.load(str(dst / "model.onnx"), load_external_data=False)
    gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    for layer in layers:  # replaces the builder's own value (it writes softcap 0)
        kept = [a for a in gqa[layer].attribute if a.name != name]
        del gqa[layer].attribute[:]
        gqa[layer].attribute.extend([*kept, onnx.helper.make_attribute(name, value)])
    onnx.save(model, str(dst / "model.onnx"))
    return dst


def test_unsupported_gqa_settings_are_left_alone_with_the_reason(folders, root):
    one = _with_attribute(folders["llama-fp32"], root / "smooth-one", [1], "smooth_softmax", 1)
    result = optimize_folder(one, root / "smooth-one.tfsa", DENSE)
    sites = result.report.sites
    assert [s.replaced for s in sites] == [True, False]
    assert "smooth_softmax" in sites[1].reason
    ops = [n.op_type for n in _model(root / "smooth-one.tfsa").graph.node]
    assert ops.count("GroupQueryAttention") == 1 and ops.count(GQA_OP_TYPE) == 1
    every = _with_attribute(folders["llama-fp32"], root / "smooth-all", [0, 1], "smooth_softmax", 1)
    line = _refused(["optimize", str(every), "-o", str(root / "smooth-all.tfsa")], [every])
    assert "smooth_softmax" in line and "nothing was written" in line
    assert not (root / "smooth-all.tfsa").exists()


def test_softcap_nodes_are_replaced_and_equal_the_original(folders, root):
    # Gemma 2's setting on every GroupQueryAttention node: carried over, the same logits and
    # present K/V as ORT's node with it (and not those of the folder without it).
    from tfsa_onnx.genai import read_config
    from tfsa_onnx.genai_eval import decoder_session, prompt_outputs

    capped = _with_attribute(folders["llama-fp32"], root / "softcap", [0, 1], "softcap", 0.05)
    result = optimize_folder(capped, root / "softcap.tfsa", DENSE)
    assert all(s.replaced for s in result.report.sites)
    nodes = [n for n in _model(root / "softcap.tfsa").graph.node if n.op_type == GQA_OP_TYPE]
    assert [_attributes(n)["softcap"] for n in nodes] == [np.float32(0.05)] * 2
    config = read_config(capped)
    ids = np.stack([PROMPTS[1], PROMPTS[1][::-1]]).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, :9] = 0
    ref, out, plain = (
        prompt_outputs(decoder_session(f, 1), config, ids, mask)
        for f in (capped, root / "softcap.tfsa", folders["llama-fp32"])
    )
    for key in ref:
        np.testing.assert_allclose(out[key], ref[key], atol=1e-4, rtol=0, err_msg=key)
    assert np.abs(ref["logits"] - plain["logits"]).max() > 1e-3, "the cap should change the logits"


@pytest.mark.parametrize(
    "setting, value, reason",
    [
        ("smooth_softmax", 1, "smooth_softmax"),
        ("qk_output", 1, "qk_output"),
        ("causal", 0, "non-causal"),
        ("k_quant_type", "PER_TENSOR", "quantized KV cache"),
        ("kv_cache_bit_width", 8, "quantized KV cache"),
        ("sliding_window_cache", 1, "window-sized KV cache"),
        ("some_future_attribute", 1, "attribute some_future_attribute"),
        ("softcap", -1.0, "softcap=-1.0"),
        ("softcap", 0.0, None),  # GQA's defaults change nothing: the node is replaced
        ("softcap", 50.0, None),  # carried over: the op caps the scores
        ("smooth_softmax", 0, None),
    ],
)
def test_each_unsupported_attribute_names_itself(setting, value, reason):
    from tfsa_onnx.rewrite import GiveUp
    from tfsa_onnx.rewrite.gqa import check

    node = _gqa_node({setting: value})
    if reason is None:
        check(node)
        return
    with pytest.raises(GiveUp, match=reason):
        check(node)


@pytest.mark.parametrize("index, name", [(9, "position_ids"), (10, "attention_bias"), (11, "head_sink")])
def test_unsupported_inputs_name_themselves(index, name):
    from tfsa_onnx.rewrite import GiveUp
    from tfsa_onnx.rewrite.gqa import check

    with pytest.raises(GiveUp, match=f"the {name} input is not supported"):
        check(_gqa_node({}, extra_input=index))


def _gqa_node(attributes: dict, extra_input: int | None = None):
    import onnx_ir as ir

    def value(name: str, dtype=ir.DataType.FLOAT) -> ir.Value:
        return ir.Value(name=name, type=ir.TensorType(dtype))

    inputs: list[ir.Value | None] = [value("qkv"), None, None, value("pk"), value("pv")]
    inputs += [
        value("seqlens", ir.DataType.INT32),
        value("total", ir.DataType.INT32),
        value("cos"),
        value("sin"),
    ]
    if extra_input is not None:
        inputs += [None] * (extra_input - len(inputs)) + [value("extra")]
    base = {"num_heads": 4, "kv_num_heads": 2, "scale": 0.25, "do_rotary": 1, "local_window_size": -1}
    return ir.Node(
        "com.microsoft",
        "GroupQueryAttention",
        inputs,
        attributes=ir.convenience.convert_attributes({**base, **attributes}),
        num_outputs=3,
    )


# ---------------------------------------------------------------- running the folders


PROMPTS = [np.arange(5, 42) % 300 + 3, (np.arange(50) * 7) % 300 + 3]  # 37 and 50 tokens
BATCH = [(np.arange(23) * 11) % 300 + 3, (np.arange(41) * 13) % 300 + 3]  # one batch, 23 and 41


@pytest.mark.parametrize("name", FOLDERS)
def test_greedy_tokens_and_logits_equal_the_original(folders, optimized, name):
    from tfsa_onnx.genai_eval import greedy, og_model, pad_left

    models = [og_model(folders[name], threads=1), og_model(optimized[name], threads=1)]
    batches = [p[None].astype(np.int32) for p in PROMPTS] + [pad_left(BATCH, 2)]
    for batch in batches:
        (ref_tokens, ref_logits), (tokens, logits) = (greedy(m, batch, 32) for m in models)
        assert ref_tokens.shape[1] == 32
        np.testing.assert_array_equal(tokens, ref_tokens)
        for step, (a, b) in enumerate(zip(ref_logits, logits, strict=True)):
            np.testing.assert_allclose(b, a, atol=1e-4, rtol=0, err_msg=f"step {step}")
    assert len(set(ref_tokens[0].tolist())) > 4  # the random model does not just repeat itself


def test_an_fp16_folder_generates_the_original_tokens_on_the_cpu(folders, optimized):
    from tfsa_onnx.genai_eval import greedy, og_model, pad_left

    name = "llama-fp16"
    models = [og_model(folders[name], threads=1, cpu=True), og_model(optimized[name], threads=1, cpu=True)]
    for batch in [p[None].astype(np.int32) for p in PROMPTS] + [pad_left(BATCH, 2)]:
        (ref_tokens, ref_logits), (tokens, logits) = (greedy(m, batch, 32) for m in models)
        assert ref_tokens.shape[1] == 32
        np.testing.assert_array_equal(tokens, ref_tokens)
        for step, (a, b) in enumerate(zip(ref_logits, logits, strict=True)):
            np.testing.assert_allclose(b, a, atol=2e-2, rtol=0, err_msg=f"step {step}")
    assert len(set(ref_tokens[0].tolist())) > 4
    # float16 attention on the CPU: both ORT's GroupQueryAttention and ours (genai returns float32 logits)
    past = _model(optimized[name]).graph.input[2]
    assert "past_key" in past.name and past.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16


@pytest.mark.parametrize("name", ["llama-fp32", "qwen2-int4"])
def test_prompt_logits_and_present_kv_equal(folders, optimized, name):
    from tfsa_onnx.genai import read_config
    from tfsa_onnx.genai_eval import decoder_session, prompt_outputs

    config = read_config(folders[name])
    ids = np.stack([PROMPTS[1], PROMPTS[1][::-1]]).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, :9] = 0  # left padding, as genai feeds a ragged batch
    ref = prompt_outputs(decoder_session(folders[name], 1), config, ids, mask)
    out = prompt_outputs(decoder_session(optimized[name], 1), config, ids, mask)
    assert set(ref) == set(out)
    for key in ref:
        np.testing.assert_allclose(out[key], ref[key], atol=1e-4, rtol=0, err_msg=key)


def test_validate_and_bench_cli_on_folders(folders, optimized, root):
    src, out = str(folders["llama-fp32"]), str(optimized["llama-fp32"])
    report = root / "validate.json"
    args = ["validate", src, out, *"--seq-len 48 --samples 2 --new-tokens 8 --json".split(), str(report)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["logits_max_abs"] < 1e-4 and data["greedy_match"] == 1.0 and abs(data["ppl_increase"]) < 1e-5
    args = ["bench", "genai", src, out, "--prompt-len", "40", "--decode-tokens", "4", "--repeat", "1"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "ttft_speedup" in result.output.splitlines()[0]


def test_validate_refuses_a_folder_and_a_file(folders):
    src = folders["llama-fp32"]
    result = CliRunner().invoke(main, ["validate", str(src), str(src / "model.onnx")])
    assert result.exit_code == 1 and "two onnxruntime-genai folders" in result.output


def test_a_folder_without_config_is_a_genai_error(root):
    from tfsa_onnx.genai import read_config

    with pytest.raises(GenaiError, match="without genai_config.json"):
        read_config(root / "tok")


def test_per_layer_settings_and_skip(folders, root):
    config = {"defaults": TUNABLES, "layers": {"0": {"threshold": 0.5}, "1": {"skip": True}}}
    result = optimize_folder(folders["llama-int4"], root / "per-layer", config)
    assert [s.reason for s in result.report.sites] == ["", "skipped by the config"]
    nodes = [n for n in _model(root / "per-layer").graph.node if "GroupQueryAttention" in n.op_type]
    assert [n.op_type for n in nodes] == [GQA_OP_TYPE, "GroupQueryAttention"]
    assert _attributes(nodes[0])["threshold"] == 0.5


def test_calibrate_a_folder_writes_a_config_optimize_takes(folders, root):
    src = folders["llama-fp32"]
    cfg, record, out = root / "calib.json", root / "calib-record.json", root / "calibrated"
    sparse = ["--block-size", "16", "--min-seq-len", "16", "--global-tokens", "0", "--local-window", "16"]
    args = ["calibrate", str(src), "--seq-len", "96", "--samples", "3", "--target", "ppl<=+1%", *sparse]
    result = CliRunner().invoke(main, [*args, "-o", str(cfg), "--json", str(record)])
    assert result.exit_code == 0, result.output
    calibrated = json.loads(record.read_text())
    assert calibrated["density"] < 1.0 and calibrated["score"] <= 0.01  # sparse, and the target holds
    assert sorted(json.loads(cfg.read_text())["layers"]) == ["0", "1"]
    result = CliRunner().invoke(main, ["optimize", str(src), "-o", str(out), "--config", str(cfg)])
    assert result.exit_code == 0, result.output
    thresholds = [_attributes(n)["threshold"] for n in _model(out).graph.node if n.op_type == GQA_OP_TYPE]
    assert thresholds == pytest.approx([calibrated["layers"][i]["threshold"] for i in (0, 1)])  # float32
    report = root / "calib-validate.json"
    args = ["validate", str(src), str(out), "--seq-len", "96", "--samples", "3", "--new-tokens", "0"]
    CliRunner().invoke(main, [*args, "--json", str(report)])
    # the same prompts (random, seeded) end to end: the perplexity change calibrate measured
    assert json.loads(report.read_text())["ppl_increase"] == pytest.approx(calibrated["score"], abs=1e-6)


def test_calibrate_refuses_model_file_options_on_a_folder(folders, root):
    args = ["calibrate", str(folders["llama-fp32"]), "--target", "ppl<=+1%", "-o", str(root / "no.json")]
    result = CliRunner().invoke(main, [*args, "--tokenizer", str(root / "tok")])
    assert result.exit_code == 1 and "the folder's own tokenizer" in result.output
    args = ["calibrate", str(root / "tok"), "--target", "ppl<=+1%", "-o", str(root / "no.json")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "without genai_config.json" in result.output
    assert not (root / "no.json").exists()
