"""ai.tfsa::SparseGroupQueryAttention against ORT's own com.microsoft.GroupQueryAttention node
(dense configs: the same outputs and present K/V) and against the numpy reference (sparse
configs), on prompts, decode steps, chunked prompts, shared and separate KV buffers, ragged
batches, local windows, both rotary layouts, packed and separate QKV."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from dataclasses import dataclass, field, replace

import numpy as np
import onnxruntime as ort
import pytest
from contract_rows import check_mirror, library_rows
from onnx import TensorProto, helper

import tfsa_onnx
from tfsa_onnx.opmodel import group_query_attention_model
from tfsa_onnx.reference import (
    GQA_ATTRIBUTE_BOUNDS,
    HEADS_MAX,
    GroupQueryAttentionAttributes,
    SparseAttentionAttributes,
    group_query_attention,
)


@dataclass
class Case:
    """One call: batch rows with their past lengths, `seq` new rows each (a prompt when every
    past is 0: rows may then be shorter than seq, right padded), and the cache buffers."""

    q_heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    seq: int = 20
    past: tuple[int, ...] = (0,)
    lengths: tuple[int, ...] | None = None  # prompt rows' lengths (default: seq)
    cache: int = 0  # rows of the past buffer (0: no past input on a prompt, else max past)
    shared: bool = False  # past and present bound to one buffer of `cache` rows
    packed: bool = False
    rotary: bool = True
    interleaved: bool = False
    rotary_dim: int | None = None  # default head_dim
    attrs: dict = field(default_factory=dict)
    dtype: type = np.float32

    @property
    def prompt(self) -> bool:
        return all(p == 0 for p in self.past)

    def gqa_attrs(self) -> dict:
        a = dict(num_heads=self.q_heads, kv_num_heads=self.kv_heads, do_rotary=int(self.rotary))
        a["rotary_interleaved"] = int(self.interleaved)
        return a | {k: v for k, v in self.attrs.items() if k in ("local_window_size", "scale", "softcap")}

    def sparsity_attrs(self) -> dict:
        return {k: v for k, v in self.attrs.items() if k not in ("local_window_size", "scale", "softcap")}


def make_feeds(case: Case, rng: np.random.Generator) -> dict:
    b, s, d = len(case.past), case.seq, case.head_dim
    hq, hkv = case.q_heads, case.kv_heads
    dt = case.dtype
    feeds = {}
    if case.packed:
        feeds["query"] = rng.standard_normal((b, s, (hq + 2 * hkv) * d)).astype(dt)
    else:
        feeds["query"] = rng.standard_normal((b, s, hq * d)).astype(dt)
        feeds["key"] = rng.standard_normal((b, s, hkv * d)).astype(dt)
        feeds["value"] = rng.standard_normal((b, s, hkv * d)).astype(dt)
    if case.prompt:
        lengths = case.lengths or (s,) * b
        totals = np.array(lengths)
        total_sequence_length = s
    else:
        totals = np.array(case.past) + s
        total_sequence_length = int(totals.max())
    cache = case.cache or (0 if case.prompt else max(case.past))
    if cache:
        past = rng.standard_normal((b, hkv, cache, d)).astype(dt)
        feeds["past_key"], feeds["past_value"] = past, rng.standard_normal(past.shape).astype(dt)
    feeds["seqlens_k"] = (totals - 1).astype(np.int32)
    feeds["total_sequence_length"] = np.array(total_sequence_length, np.int32)
    if case.rotary:
        half = (case.rotary_dim or d) // 2
        positions = max(total_sequence_length, cache) + 3
        angles = rng.uniform(0, 2 * np.pi, (positions, half))
        feeds["cos_cache"], feeds["sin_cache"] = np.cos(angles).astype(dt), np.sin(angles).astype(dt)
    return feeds


@functools.cache
def _session(domain: str, dtype: int, packed: bool, past: bool, rotary: bool, attrs: tuple):
    model = group_query_attention_model(domain, dtype, packed, past, rotary, **dict(attrs))
    so = tfsa_onnx.session_options()
    so.intra_op_num_threads = 2
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run(case: Case, feeds: dict, domain: str) -> list[np.ndarray]:
    """output, present_key, present_value of the node of `domain` (ORT's or ours)."""
    attrs = case.gqa_attrs() | (case.sparsity_attrs() if domain == tfsa_onnx.DOMAIN else {})
    dtype = TensorProto.FLOAT16 if case.dtype == np.float16 else TensorProto.FLOAT
    session = _session(
        domain, dtype, case.packed, "past_key" in feeds, case.rotary, tuple(sorted(attrs.items()))
    )
    if not case.shared:
        return session.run(None, feeds)
    binding = session.io_binding()  # genai's past_present_share_buffer: one buffer, in place
    for name, value in feeds.items():
        if name not in ("past_key", "past_value"):
            binding.bind_cpu_input(name, value)
    binding.bind_output("output")
    buffers = {name: feeds[name].copy() for name in ("past_key", "past_value")}  # the OrtValues borrow them
    for past, present in (("past_key", "present_key"), ("past_value", "present_value")):
        value = ort.OrtValue.ortvalue_from_numpy(buffers[past])
        binding.bind_ortvalue_input(past, value)
        binding.bind_ortvalue_output(present, value)
    session.run_with_iobinding(binding)
    output = binding.copy_outputs_to_cpu()[0]
    return [output, buffers["past_key"], buffers["past_value"]]


def check_against_ort(case: Case, seed: int = 0, atol: float = 1e-5) -> None:
    feeds = make_feeds(case, np.random.default_rng(seed))
    expected = run(case, feeds, "com.microsoft")
    got = run(case, feeds, tfsa_onnx.DOMAIN)
    np.testing.assert_allclose(got[0], expected[0], atol=atol, rtol=0)
    np.testing.assert_array_equal(got[1], expected[1])
    np.testing.assert_array_equal(got[2], expected[2])


DENSE_CASES = {
    "prompt": Case(),
    "prompt_packed": Case(packed=True),
    "prompt_interleaved": Case(interleaved=True),
    "prompt_partial_rotary": Case(rotary_dim=16),
    "prompt_no_rotary": Case(rotary=False),
    "prompt_mqa_d64": Case(q_heads=6, kv_heads=1, head_dim=64, seq=37),
    "prompt_ragged": Case(past=(0, 0), lengths=(20, 13), seq=20),
    "prompt_ragged_packed_window": Case(
        past=(0, 0), lengths=(9, 20), packed=True, attrs={"local_window_size": 5}
    ),
    "prompt_into_shared_cache": Case(cache=48, shared=True),
    "prompt_window": Case(seq=70, attrs={"local_window_size": 16}),
    "decode": Case(seq=1, past=(33,)),
    "decode_shared": Case(seq=1, past=(33,), cache=64, shared=True),
    "decode_ragged_shared": Case(seq=1, past=(40, 17), cache=64, shared=True, packed=True),
    "decode_ragged_separate": Case(seq=1, past=(40, 17), cache=45),
    "decode_window": Case(seq=1, past=(70,), attrs={"local_window_size": 16}),
    "decode_mqa_interleaved": Case(q_heads=6, kv_heads=1, head_dim=64, seq=1, past=(50,), interleaved=True),
    "chunk": Case(seq=23, past=(41,)),
    "chunk_shared_window": Case(seq=23, past=(41,), cache=80, shared=True, attrs={"local_window_size": 30}),
    "scale": Case(attrs={"scale": 0.3}),
    "window_of_no_key": Case(attrs={"local_window_size": 0}),
    "fp16_prompt_interleaved_packed": Case(dtype=np.float16, interleaved=True, packed=True),
    "fp16_decode_ragged_shared": Case(dtype=np.float16, seq=1, past=(30, 12), cache=40, shared=True),
    "fp16_chunk_window": Case(dtype=np.float16, seq=23, past=(41,), attrs={"local_window_size": 30}),
    # Gemma 2's logit softcap (scores capped to c * tanh(s / c) before the causal and window masks)
    "prompt_softcap": Case(attrs={"softcap": 1.0}),
    "prompt_ragged_softcap_scale": Case(past=(0, 0), lengths=(20, 13), attrs={"softcap": 0.7, "scale": 0.5}),
    "decode_softcap_shared": Case(seq=1, past=(33,), cache=64, shared=True, attrs={"softcap": 1.0}),
    "chunk_softcap_window": Case(seq=23, past=(41,), attrs={"softcap": 1.5, "local_window_size": 30}),
    "fp16_prompt_softcap_packed": Case(dtype=np.float16, packed=True, attrs={"softcap": 1.0}),
}


@pytest.mark.parametrize("name", DENSE_CASES)
def test_dense_config_equals_ort(name):
    case = DENSE_CASES[name]
    check_against_ort(case, atol=2e-3 if case.dtype == np.float16 else 1e-5)


SPARSE = dict(block_size=16, global_tokens=16, local_window=16, threshold=0.6, min_seq_len=0)
SPARSE_CASES = {
    "prompt": Case(seq=150, attrs=SPARSE),
    "prompt_packed_mqa_d64": Case(q_heads=6, kv_heads=1, head_dim=64, seq=133, packed=True, attrs=SPARSE),
    "prompt_ragged": Case(past=(0, 0), lengths=(150, 71), seq=150, attrs=SPARSE),
    "prompt_window": Case(seq=200, attrs=SPARSE | {"local_window_size": 120}),
    "prompt_capped": Case(seq=150, interleaved=True, attrs=SPARSE | {"max_density": 0.3, "threshold": 1.0}),
    "chunk_shared": Case(seq=70, past=(100,), cache=200, shared=True, attrs=SPARSE),
    "chunk_global_past": Case(seq=130, past=(24,), attrs=SPARSE | {"global_tokens": 40}),
    "prompt_softcap": Case(seq=150, attrs=SPARSE | {"softcap": 1.0}),
    # per-head budgets: a streaming head (0) and a dense one (1) among them
    "prompt_head_thresholds": Case(seq=150, attrs=SPARSE | {"head_thresholds": (0.9, 0.0, 0.4, 1.0)}),
    "chunk_head_thresholds_mqa": Case(
        q_heads=3, kv_heads=1, seq=70, past=(100,), attrs=SPARSE | {"head_thresholds": (0.0, 0.5, 0.0)}
    ),
}


# one selection per KV group (group_selection 1 union, 2 shared; the CPU kernel's alone)
GROUP_CASES = {
    "prompt_union": Case(seq=150, attrs=SPARSE | {"group_selection": 1}),
    "prompt_ragged_shared_antidiagonal": Case(
        q_heads=6,
        past=(0, 0),
        lengths=(150, 71),
        seq=150,
        attrs=SPARSE | {"group_selection": 2, "estimate": 1},
    ),
    "chunk_shared_window": Case(
        seq=130, past=(24,), attrs=SPARSE | {"group_selection": 2, "local_window_size": 90}
    ),
    "prompt_union_head_thresholds": Case(
        seq=150, attrs=SPARSE | {"group_selection": 1, "head_thresholds": (0.9, 0.0, 0.0, 0.0)}
    ),
    "decode_shared": Case(seq=1, past=(90,), cache=100, shared=True, attrs=SPARSE | {"group_selection": 2}),
}


def reference(case: Case, feeds: dict, return_density: bool = False) -> tuple[np.ndarray, ...]:
    inputs = [feeds.get(name) for name in ("query", "key", "value", "past_key", "past_value", "seqlens_k")]
    total = int(feeds["total_sequence_length"])
    attrs = case.gqa_attrs() | case.sparsity_attrs()
    cos, sin = feeds.get("cos_cache"), feeds.get("sin_cache")
    return group_query_attention(
        *inputs, total, cos, sin, shared_buffer=case.shared, return_density=return_density, **attrs
    )


@pytest.mark.parametrize("name", SPARSE_CASES)
def test_sparse_config_equals_reference(name):
    case = SPARSE_CASES[name]
    feeds = make_feeds(case, np.random.default_rng(1))
    got = run(case, feeds, tfsa_onnx.DOMAIN)
    expected = reference(case, feeds)
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, atol=2e-5, rtol=0)
    dense = run(
        replace(case, attrs={k: v for k, v in case.attrs.items() if k == "local_window_size"}),
        feeds,
        "com.microsoft",
    )
    assert np.abs(got[0] - dense[0]).max() > 1e-3  # the config is sparse here


@pytest.mark.parametrize("name", GROUP_CASES)
def test_group_selection_equals_reference(name):
    case = GROUP_CASES[name]
    feeds = make_feeds(case, np.random.default_rng(2))
    got = run(case, feeds, tfsa_onnx.DOMAIN)
    expected = reference(case, feeds)
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, atol=2e-5, rtol=0)
    per_head = {k: v for k, v in case.attrs.items() if k != "group_selection"}
    if case.seq > 1:  # the group's selection is not the heads' own here
        assert np.abs(got[0] - run(replace(case, attrs=per_head), feeds, tfsa_onnx.DOMAIN)[0]).max() > 1e-4


@pytest.mark.parametrize("past", [(200,), (90, 300)])
def test_decode_is_exact_with_a_sparse_config(past):
    check_against_ort(Case(seq=1, past=past, cache=320, shared=True, attrs=SPARSE | {"threshold": 0.1}))


def test_attributes_agree_with_the_cpp_contract():
    # contract.h's kGqaAttributeRules (tfsa_gqa_attribute_info) and the Python mirror: the same
    # names in the struct's order, defaults and bounds.
    check_mirror(library_rows("tfsa_gqa_attribute_info"), GroupQueryAttentionAttributes, GQA_ATTRIBUTE_BOUNDS)
    assert GQA_ATTRIBUTE_BOUNDS["num_heads"][1] == HEADS_MAX
    # The sparsity attributes are SparseAttention's, is_causal aside; GroupQueryAttention's
    # softcap is the same field of the engine (gqa_op.cc copies it).
    shared = set(GroupQueryAttentionAttributes.names()) & set(SparseAttentionAttributes.names())
    assert shared == {"softcap"}


# Bad input in a child process: each case must give an error that names the problem, never a
# crash (a signal would end the child: the last case it started is the culprit).
CHILD = r"""
import json, sys
import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper
from tfsa_onnx.opmodel import group_query_attention_model

library, cases = sys.argv[1], json.loads(sys.argv[2])
so = ort.SessionOptions()
so.register_custom_ops_library(library)
so.log_severity_level = 4
for index, (model_args, attrs, feeds) in enumerate(cases):
    print("START", index, flush=True)
    try:
        model = group_query_attention_model("ai.tfsa", TensorProto.FLOAT, *model_args, **attrs)
        session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        arrays = {}
        for name, spec in feeds.items():
            if name in ("seqlens_k", "total_sequence_length"):
                arrays[name] = np.array(spec, np.int32)
            else:
                arrays[name] = np.random.default_rng(0).standard_normal(spec).astype(np.float32)
        session.run(None, arrays)
        print("RESULT", index, "OK", flush=True)
    except Exception as error:
        print("RESULT", index, "ERROR", str(error).replace("\n", " "), flush=True)
"""

HEADS = dict(num_heads=4, kv_num_heads=2)


def _feeds(s=8, t=None, b=1, d=16, hq=4, hkv=2, past=None, seqlens=None, cos=(32, 8), packed=False) -> dict:
    t = s if t is None else t
    feeds = {"query": [b, s, (hq + 2 * hkv) * d if packed else hq * d]}
    if not packed:
        feeds |= {"key": [b, s, hkv * d], "value": [b, s, hkv * d]}
    if past is not None:
        feeds |= {"past_key": [b, hkv, past, d], "past_value": [b, hkv, past, d]}
    feeds |= {"seqlens_k": seqlens if seqlens is not None else [t - 1] * b, "total_sequence_length": t}
    if cos is not None:
        feeds |= {"cos_cache": list(cos), "sin_cache": list(cos)}
    return feeds


# (model args (packed, past, rotary), attributes, feeds, words the error must hold)
BAD_INPUTS = [
    ((False, False, True), {"kv_num_heads": 2, "do_rotary": 1}, _feeds(), "num_heads"),
    ((False, False, True), HEADS | {"num_heads": 3}, _feeds(hq=3), "multiple of kv_num_heads"),
    ((False, False, True), HEADS | {"num_heads": 2**40}, _feeds(), "num_heads"),
    ((False, False, True), HEADS | {"softcap": -1.0}, _feeds(), "softcap must be a finite float in [0, inf)"),
    ((False, False, True), HEADS | {"local_window_size": -2}, _feeds(), "local_window_size"),
    ((False, False, True), HEADS | {"do_rotary": 2}, _feeds(), "do_rotary"),
    ((False, False, True), HEADS | {"block_size": 0}, _feeds(), "block_size"),
    ((False, False, True), HEADS | {"threshold": float("nan")}, _feeds(), "threshold"),
    ((False, False, True), HEADS | {"block_size": 64.0}, _feeds(), "block_size must be an integer"),
    ((False, False, True), HEADS | {"smooth_softmax": 1}, _feeds(), "smooth_softmax is not supported"),
    ((False, False, True), HEADS | {"qk_output": 1}, _feeds(), "qk_output is not supported"),
    ((False, False, True), HEADS, _feeds() | {"query": [8, 64]}, "query must be 3-D"),
    ((False, False, True), HEADS, _feeds() | {"query": [1, 8, 62]}, "hidden size"),
    ((False, False, True), HEADS, _feeds() | {"key": [1, 8, 16]}, "key and value must be"),
    ((False, False, True), HEADS, _feeds() | {"value": [1, 7, 32]}, "key and value must be"),
    ((True, False, True), HEADS, _feeds(packed=True) | {"query": [1, 8, 100]}, "hidden size"),
    (
        (False, True, True),
        HEADS,
        _feeds(s=1, t=9, past=8) | {"past_key": [1, 2, 8]},
        "past_key and past_value must",
    ),
    (
        (False, True, True),
        HEADS,
        _feeds(s=1, t=9, past=8) | {"past_key": [1, 3, 8, 16]},
        "past_key and past_value",
    ),
    (
        (False, True, True),
        HEADS,
        _feeds(s=1, t=9, past=8) | {"past_value": [1, 2, 7, 16]},
        "past_key and past_value",
    ),
    ((False, False, True), HEADS, _feeds(seqlens=[7, 7]), "seqlens_k must be [batch]"),
    ((False, False, True), HEADS, _feeds(seqlens=[8]), "seqlens_k[0] = 8"),
    ((False, False, True), HEADS, _feeds(seqlens=[-1]), "negative"),
    ((False, False, True), HEADS, _feeds(b=2, seqlens=[3, 2**31 - 1]), "seqlens_k[1]"),
    ((False, True, True), HEADS, _feeds(s=1, t=9, past=8, seqlens=[20]), "does not fit"),
    ((False, True, True), HEADS, _feeds(s=1, t=30, past=8, seqlens=[20]), "past rows"),
    ((False, False, True), HEADS, _feeds(s=1, t=9, seqlens=[8]), "past_key is absent"),
    ((False, True, True), HEADS, _feeds(s=4, t=9, past=8, seqlens=[1]), "less than sequence length - 1"),
    ((False, False, True), HEADS, _feeds() | {"total_sequence_length": -3}, "total_sequence_length"),
    ((False, False, True), HEADS, _feeds() | {"total_sequence_length": [8, 8]}, "total_sequence_length"),
    ((False, False, False), HEADS | {"do_rotary": 1}, _feeds(cos=None), "cos_cache and sin_cache"),
    ((False, False, True), HEADS | {"do_rotary": 1}, _feeds(cos=(4, 8)), "rotary positions"),
    ((False, False, True), HEADS | {"do_rotary": 1}, _feeds(cos=(32, 9)), "rotary_dim"),
    ((False, False, True), HEADS | {"do_rotary": 1}, _feeds() | {"sin_cache": [32, 4]}, "one shape"),
    ((False, False, True), HEADS | {"do_rotary": 1}, _feeds() | {"cos_cache": [32]}, "cos_cache"),
]


def test_bad_input_is_an_error_not_a_crash():
    cases = [list(case[:3]) for case in BAD_INPUTS]
    command = [sys.executable, "-c", CHILD, tfsa_onnx.get_library_path(), json.dumps(cases)]
    child = subprocess.run(command, capture_output=True, text=True, timeout=120)
    results = {}
    for line in child.stdout.splitlines():
        if line.startswith("RESULT"):
            _, index, outcome = line.split(" ", 2)
            results[int(index)] = outcome
    started = [int(line.split()[1]) for line in child.stdout.splitlines() if line.startswith("START")]
    assert child.returncode == 0, f"child died (rc {child.returncode}) in case {BAD_INPUTS[started[-1]]}"
    for index, (*_, words) in enumerate(BAD_INPUTS):
        assert results[index].startswith("ERROR"), (BAD_INPUTS[index], results[index])
        assert "SparseGroupQueryAttention" in results[index] and words in results[index], (
            words,
            results[index],
        )


def test_a_batched_chunk_after_a_past_equals_the_reference():
    # ORT's node refuses S > 1 after a past when the batch has several rows; this op computes
    # each row over its own cache.
    case = Case(seq=20, past=(30, 9), cache=64, shared=True, packed=True, attrs={"local_window_size": 25})
    feeds = make_feeds(case, np.random.default_rng(2))
    for got, expected in zip(run(case, feeds, tfsa_onnx.DOMAIN), reference(case, feeds), strict=True):
        np.testing.assert_allclose(got, expected, atol=2e-5, rtol=0)


def _inferred_shapes(
    domain: str, packed: bool, query: list, past: list | None, kv: list | None = None
) -> dict[str, list]:
    """The output shapes ORT infers for one node whose inputs have these shapes."""
    model = group_query_attention_model(
        domain, TensorProto.FLOAT, packed, past is not None, True, num_heads=4, kv_num_heads=2, do_rotary=1
    )
    kv = [*query[:2], 64] if kv is None else kv
    shapes = {"query": query, "key": kv or None, "value": kv or None}
    shapes |= {"past_key": past, "past_value": past}
    for value in model.graph.input:
        if value.name in shapes:
            value.CopyFrom(helper.make_tensor_value_info(value.name, TensorProto.FLOAT, shapes[value.name]))
    session = ort.InferenceSession(model.SerializeToString(), tfsa_onnx.session_options())
    return {o.name: o.shape for o in session.get_outputs()}


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("past", [["batch", 2, "past_seq", 32], ["batch", 2, 128, "d"], None])
@pytest.mark.parametrize("hidden", [None, "known"])
def test_output_shapes_are_the_ones_ort_infers(packed, past, hidden):
    query = ["batch", "seq", (8 if packed else 4) * 32 if hidden else "hidden"]
    ours = _inferred_shapes(tfsa_onnx.DOMAIN, packed, query, past)
    theirs = _inferred_shapes("com.microsoft", packed, query, past)
    for name, shape in theirs.items():
        if not shape:  # ORT infers no shape (a prompt whose head size is unknown): ours has unknowns
            assert len(ours[name]) == (3 if name == "output" else 4) and all(
                isinstance(d, str) for d in ours[name]
            )
            continue
        assert len(ours[name]) == len(shape), name
        for mine, dim in zip(ours[name], shape, strict=True):
            assert mine == dim if dim is not None else mine.startswith("tfsa_unknown_"), (name, ours, theirs)
    assert ours["present_key"] == ours["present_value"]


def test_a_key_without_a_shape_is_not_taken_for_packed_qkv():
    query, past = ["batch", "seq", 4 * 32], ["batch", 2, "past_seq", 32]
    ours = _inferred_shapes(tfsa_onnx.DOMAIN, False, query, past, kv=[])
    assert ours["output"] == _inferred_shapes("com.microsoft", False, query, past, kv=[])["output"] == query


@pytest.mark.parametrize("name", ["prompt", "prompt_ragged", "prompt_window", "chunk_global_past"])
def test_the_density_output_equals_the_reference(name):
    case = SPARSE_CASES[name]
    feeds = make_feeds(case, np.random.default_rng(1))
    attrs = case.gqa_attrs() | case.sparsity_attrs()
    past = "past_key" in feeds
    model = group_query_attention_model(
        tfsa_onnx.DOMAIN, TensorProto.FLOAT, case.packed, past, case.rotary, density=True, **attrs
    )
    session = ort.InferenceSession(model.SerializeToString(), tfsa_onnx.session_options())
    *outputs, density = session.run(None, feeds)
    *expected, expected_density = reference(case, feeds, return_density=True)
    np.testing.assert_allclose(outputs[0], expected[0], atol=2e-5, rtol=0)
    np.testing.assert_allclose(density, expected_density, rtol=1e-6)
    assert density.shape == (len(case.past), case.q_heads) and density.min() < 0.999  # sparse here
