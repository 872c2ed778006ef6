"""SparseGroupQueryAttention's CUDA face (custom_ops/src/cuda/gqa.cu: rotary, the present write
and SparseAttention's CUDA engine over views of the cache) through its C entry point, against
the CPU op on the cases of tests/test_gqa_op.py: prompts, decode steps, chunks, shared and
separate buffers, ragged seqlens_k, local windows, both rotary layouts, packed QKV, float16.
Two backends, as in tests/test_cuda.py: the sources built for the CPU emulation (everywhere),
and the CUDA library on an NVIDIA GPU with torch tensors (skipped, saying why, without one)."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from test_gqa_op import DENSE_CASES, SPARSE, SPARSE_CASES, Case, make_feeds, reference, run

import tfsa_onnx
from tfsa_onnx import cuda
from tfsa_onnx.reference import SparseAttentionAttributes


def gqa_args(case: Case, feeds: dict) -> cuda.GqaArgs:
    """The entry point's sizes and attributes for a case, as the op's glue derives them."""
    b, s, _ = feeds["query"].shape
    total = int(feeds["total_sequence_length"])
    past_rows = feeds["past_key"].shape[2] if "past_key" in feeds else 0
    cos = feeds.get("cos_cache")
    sparsity = case.sparsity_attrs() | {k: v for k, v in case.attrs.items() if k in ("scale", "softcap")}
    return cuda.GqaArgs(
        dtype=cuda.FLOAT16 if case.dtype == np.float16 else cuda.FLOAT32,
        packed=int(case.packed),
        interleaved=int(case.interleaved),
        first_prompt=int(s == total),
        shared_buffer=int(case.shared),
        batch=b,
        seq=s,
        q_heads=case.q_heads,
        kv_heads=case.kv_heads,
        head_dim=case.head_dim,
        past_rows=past_rows,
        present_rows=max(total, past_rows),
        rotary_half=cos.shape[1] if cos is not None else 0,
        rotary_positions=cos.shape[0] if cos is not None else 0,
        local_window_size=case.attrs.get("local_window_size", -1),
        attributes=cuda.Attributes.of(SparseAttentionAttributes(**sparsity)),
    )


class Emulated:
    """The emulated kernels: device memory is host (numpy) memory."""

    def __init__(self, lib) -> None:
        self.lib, self.stream = lib, 0

    put = staticmethod(np.ascontiguousarray)
    get = staticmethod(np.asarray)
    pointer = staticmethod(lambda x: x.ctypes.data)
    full = staticmethod(lambda shape, dtype: np.full(shape, np.nan, dtype))
    sync = staticmethod(lambda: None)


class Gpu:
    """The CUDA library on the GPU, with torch CUDA tensors."""

    def __init__(self) -> None:
        import torch

        self.torch, self.lib = torch, cuda.library()
        self.stream = torch.cuda.current_stream().cuda_stream

    def put(self, x: np.ndarray):
        return self.torch.from_numpy(np.ascontiguousarray(x)).cuda()

    def get(self, x) -> np.ndarray:
        return x.cpu().numpy()

    pointer = staticmethod(lambda x: x.data_ptr())

    def full(self, shape, dtype):
        return self.put(np.full(shape, np.nan, dtype))

    def sync(self) -> None:
        self.torch.cuda.synchronize()


@pytest.fixture(scope="module", params=["emulated", "gpu"])
def backend(request, emulated_library):
    if request.param == "emulated":
        return Emulated(cuda.load(str(emulated_library)))
    try:
        import torch
    except ImportError:
        pytest.skip("gpu backend: torch is not installed")
    if not torch.cuda.is_available():
        pytest.skip("gpu backend: no NVIDIA GPU on this machine (the emulated backend ran the same checks)")
    return Gpu()


@pytest.fixture(scope="module")
def lib(emulated_library):
    return cuda.load(str(emulated_library))


def run_cuda(backend, case: Case, feeds: dict, call: cuda.GqaArgs | None = None) -> list[np.ndarray]:
    """output, present_key, present_value, density of the CUDA face. Outputs start as NaN, so a
    byte the kernels do not write shows. seqlens_k stays in host memory, as the op hands it over."""
    call = call or gqa_args(case, feeds)
    keep = {name: backend.put(value) for name, value in feeds.items() if name != "seqlens_k"}
    seqlens = np.ascontiguousarray(feeds["seqlens_k"])
    names = {"cos": "cos_cache", "sin": "sin_cache"}
    for field in cuda.GQA_POINTERS:
        value = keep.get(names.get(field, field))
        setattr(call, field, backend.pointer(value) if value is not None else None)
    call.seqlens_k = seqlens.ctypes.data
    present_shape = (call.batch, call.kv_heads, call.present_rows, call.head_dim)
    if case.shared:  # one buffer as past and present, written in place
        present = [keep["past_key"], keep["past_value"]]
    else:
        present = [backend.full(present_shape, case.dtype) for _ in range(2)]
    output = backend.full((call.batch, call.seq, call.q_heads * call.head_dim), case.dtype)
    density = backend.full((call.batch, call.q_heads), np.float32)
    call.present_key, call.present_value = backend.pointer(present[0]), backend.pointer(present[1])
    call.output, call.density = backend.pointer(output), backend.pointer(density)
    size = max(1, cuda.gqa_workspace_bytes(call, backend.lib))
    workspace = backend.put(np.zeros(size, np.uint8))
    call.workspace, call.workspace_size = backend.pointer(workspace), size
    cuda.run_gqa(call, backend.stream, backend.lib)
    backend.sync()
    return [backend.get(x) for x in (output, *present, density)]


def run_emulated(lib, case: Case, feeds: dict, call: cuda.GqaArgs | None = None) -> list[np.ndarray]:
    return run_cuda(Emulated(lib), case, feeds, call)


def check_against_cpu_op(backend, case: Case, seed: int, atol: float) -> list[np.ndarray]:
    feeds = make_feeds(case, np.random.default_rng(seed))
    expected = run(case, feeds, tfsa_onnx.DOMAIN)
    got = run_cuda(backend, case, feeds)
    np.testing.assert_allclose(got[0].astype(np.float32), expected[0].astype(np.float32), atol=atol, rtol=0)
    np.testing.assert_array_equal(got[1], expected[1])  # rotary rounds as the CPU face does
    np.testing.assert_array_equal(got[2], expected[2])
    return got


@pytest.mark.parametrize("name", DENSE_CASES)
def test_dense_config_equals_the_cpu_op(backend, name):
    case = DENSE_CASES[name]
    got = check_against_cpu_op(backend, case, 0, 2e-3 if case.dtype == np.float16 else 2e-5)
    assert (got[3] == 1.0).all()  # below min_seq_len every allowed block is computed


@pytest.mark.parametrize("name", SPARSE_CASES)
def test_sparse_config_equals_the_cpu_op_and_the_reference(backend, name):
    case = SPARSE_CASES[name]
    got = check_against_cpu_op(backend, case, 1, 2e-5)
    expected = reference(case, make_feeds(case, np.random.default_rng(1)), return_density=True)
    np.testing.assert_allclose(got[0], expected[0], atol=2e-5, rtol=0)
    np.testing.assert_allclose(got[3], expected[3], rtol=1e-6)  # the density output
    assert got[3].min() < 0.999


def test_fp16_sparse_prompt_and_decode(backend):
    check_against_cpu_op(backend, Case(dtype=np.float16, seq=150, packed=True, attrs=SPARSE), 3, 2e-3)
    decode = Case(dtype=np.float16, seq=1, past=(90, 150), cache=160, shared=True)
    check_against_cpu_op(backend, decode, 3, 2e-3)


def test_a_batched_chunk_after_a_past_equals_the_reference(backend):
    case = Case(seq=20, past=(30, 9), cache=64, shared=True, packed=True, attrs={"local_window_size": 25})
    feeds = make_feeds(case, np.random.default_rng(2))
    expected = reference(case, feeds)
    for got, want in zip(run_cuda(backend, case, feeds)[:3], expected, strict=True):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


def test_bad_calls_are_errors_with_a_reason(lib):
    case = Case(seq=1, past=(33,))
    feeds = make_feeds(case, np.random.default_rng(0))
    feeds["seqlens_k"] = np.array([40], np.int32)  # past 40 rows, the past buffer holds 33
    call = gqa_args(case, feeds)
    assert cuda.gqa_workspace_bytes(call, lib) == 0
    with pytest.raises(RuntimeError, match=r"seqlens_k\[0\] = 40 does not fit the present cache of 34 rows"):
        run_emulated(lib, case, feeds, call)
    call = gqa_args(case, make_feeds(case, np.random.default_rng(0)))
    call.dtype = cuda.BFLOAT16
    with pytest.raises(RuntimeError, match="dtype must be float32 or float16"):
        run_emulated(lib, case, make_feeds(case, np.random.default_rng(0)), call)
    error = ctypes.create_string_buffer(64)
    assert lib.tfsa_cuda_group_query_attention(None, None, error, 64) == 1 and error.value == b"no call"
    grouped = Case(seq=150, attrs=SPARSE | {"group_selection": 2})  # one selection per KV group: CPU only
    with pytest.raises(RuntimeError, match="group_selection 2 .*not implemented in the CUDA kernel"):
        run_emulated(lib, grouped, make_feeds(grouped, np.random.default_rng(0)))
