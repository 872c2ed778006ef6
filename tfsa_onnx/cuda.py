"""The CUDA kernels called directly, without ONNX Runtime, on torch CUDA tensors.

The ONNX Runtime op and this module drive the same C entry point of the CUDA library
(custom_ops/src/cuda/entry.h), so the kernels can be tested and timed on a GPU machine that
has torch but not onnxruntime-gpu:

    y, density = tfsa_onnx.cuda.sparse_attention(q, k, v, mask, threshold=0.9, is_causal=1)
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import fields
from typing import Any

from tfsa_onnx.reference import HEAD_THRESHOLDS_MAX, SparseAttentionAttributes

FLOAT32, FLOAT16, BFLOAT16 = 0, 1, 2
MASK_NONE, MASK_BOOL, MASK_T = 0, 1, 2
_C_TYPES = {"float": ctypes.c_float, "int": ctypes.c_int64, float: ctypes.c_float, int: ctypes.c_int64}


# A list attribute is a fixed array and the count after it (contract.h kListAttributeRules).
_LISTS = {"head_thresholds": ("head_threshold_count", ctypes.c_float * HEAD_THRESHOLDS_MAX)}


def _c_fields(name: str, kind: Any) -> list[tuple[str, Any]]:
    if name in _LISTS:
        count, array = _LISTS[name]
        return [(name, array), (count, ctypes.c_int64)]
    return [(name, _C_TYPES[kind])]


class Attributes(ctypes.Structure):
    """TfsaAttributes of contract.h: the fields of SparseAttentionAttributes, in their order."""

    _fields_ = [c for f in fields(SparseAttentionAttributes) for c in _c_fields(f.name, f.type)]

    @classmethod
    def of(cls, attributes: SparseAttentionAttributes) -> Attributes:
        """The C struct of the attributes (a list: its values and their count)."""
        values = attributes.as_dict()
        lists = {name: values.pop(name) for name in _LISTS}
        out = cls(**values)
        for name, given in lists.items():
            if len(given) > HEAD_THRESHOLDS_MAX:
                raise ValueError(f"{name} may hold at most {HEAD_THRESHOLDS_MAX} values, got {len(given)}")
            getattr(out, name)[: len(given)] = [float(x) for x in given]
            setattr(out, _LISTS[name][0], len(given))
        return out


class Dims(ctypes.Structure):
    """TfsaDims of contract.h: query [B, Hq, Sq, D], key [B, Hkv, Sk, D], value [B, Hkv, Sk, Dv]."""

    _fields_ = [
        *[(name, ctypes.c_int64) for name in ("batch", "q_heads", "kv_heads", "q_len", "kv_len")],
        ("head_dim", ctypes.c_int64),
        ("v_head_dim", ctypes.c_int64),
        ("mask_stride", ctypes.c_int64 * 4),
        ("bias_stride", ctypes.c_int64 * 4),
    ]


class CudaArgs(ctypes.Structure):
    """TfsaCudaArgs of entry.h: the arguments of one tfsa_cuda_sparse_attention."""

    _fields_ = [
        ("dtype", ctypes.c_int32),
        ("mask_kind", ctypes.c_int32),
        ("bias_dtype", ctypes.c_int32),
        ("dims", Dims),
        ("attributes", Attributes),
        ("selection_only", ctypes.c_int32),
        *[(name, ctypes.c_void_p) for name in ("query", "key", "value", "mask", "bias", "output")],
        ("density", ctypes.c_void_p),
        ("selected", ctypes.c_void_p),
        ("workspace", ctypes.c_void_p),
        ("workspace_size", ctypes.c_size_t),
    ]


GQA_POINTERS = ("query", "key", "value", "past_key", "past_value", "cos", "sin")
GQA_OUTPUTS = ("present_key", "present_value", "output", "density")


class GqaArgs(ctypes.Structure):
    """TfsaCudaGqaArgs of entry.h: one tfsa_cuda_group_query_attention (SparseGroupQueryAttention)."""

    _fields_ = [
        ("dtype", ctypes.c_int32),
        *[(name, ctypes.c_int32) for name in ("packed", "interleaved", "first_prompt", "shared_buffer")],
        *[(name, ctypes.c_int64) for name in ("batch", "seq", "q_heads", "kv_heads", "head_dim")],
        *[(name, ctypes.c_int64) for name in ("past_rows", "present_rows", "rotary_half")],
        ("rotary_positions", ctypes.c_int64),
        ("local_window_size", ctypes.c_int64),
        ("attributes", Attributes),
        ("seqlens_k", ctypes.c_void_p),
        *[(name, ctypes.c_void_p) for name in GQA_POINTERS + GQA_OUTPUTS],
        ("workspace", ctypes.c_void_p),
        ("workspace_size", ctypes.c_size_t),
    ]


_library: ctypes.CDLL | None = None


def load(path: str) -> ctypes.CDLL:
    """A library with the entry point: the CUDA library, or the tests' CPU emulation of it."""
    lib = ctypes.CDLL(path)
    # each face: (its workspace query, its call), taking that face's argument struct
    for args, workspace, call in (
        (CudaArgs, lib.tfsa_cuda_workspace_bytes, lib.tfsa_cuda_sparse_attention),
        (GqaArgs, lib.tfsa_cuda_gqa_workspace_bytes, lib.tfsa_cuda_group_query_attention),
    ):
        workspace.argtypes, workspace.restype = [ctypes.POINTER(args)], ctypes.c_size_t
        call.argtypes = [ctypes.POINTER(args), ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
        call.restype = ctypes.c_int
    return lib


def library() -> ctypes.CDLL:
    """The CUDA library, loaded once (tfsa_onnx.get_library_path('cuda'))."""
    global _library
    if _library is None:
        import tfsa_onnx

        _library = load(tfsa_onnx.get_library_path("cuda"))
    return _library


def make_args(
    shapes: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]],
    dtype: int = FLOAT32,
    mask_kind: int = MASK_NONE,
    mask_strides: tuple[int, int, int, int] = (0, 0, 0, 0),
    bias_dtype: int = FLOAT32,
    bias_strides: tuple[int, int, int, int] = (0, 0, 0, 0),
    **attributes: Any,
) -> CudaArgs:
    """The arguments for query/key/value shapes and attributes (pointers left unset; the bias's
    dtype and strides apply once `bias` is set)."""
    (b, hq, sq, d), (_, hkv, sk, _), (_, _, _, dv) = shapes
    dims = Dims(batch=b, q_heads=hq, kv_heads=hkv, q_len=sq, kv_len=sk, head_dim=d, v_head_dim=dv)
    dims.mask_stride[:] = list(mask_strides)
    dims.bias_stride[:] = list(bias_strides)
    attrs = Attributes.of(SparseAttentionAttributes(**attributes))
    return CudaArgs(dtype=dtype, mask_kind=mask_kind, bias_dtype=bias_dtype, dims=dims, attributes=attrs)


def workspace_bytes(call: CudaArgs, lib: ctypes.CDLL | None = None) -> int:
    """Device workspace the call needs; 0 when its sizes or attributes are invalid."""
    return (lib or library()).tfsa_cuda_workspace_bytes(ctypes.byref(call))


def run(call: CudaArgs, stream: int = 0, lib: ctypes.CDLL | None = None) -> None:
    """Enqueue a call whose pointers are set; raises RuntimeError with the kernel's message."""
    error = ctypes.create_string_buffer(512)
    if (lib or library()).tfsa_cuda_sparse_attention(ctypes.byref(call), ctypes.c_void_p(stream), error, 512):
        raise RuntimeError(f"SparseAttention (CUDA): {error.value.decode()}")


def gqa_workspace_bytes(call: GqaArgs, lib: ctypes.CDLL | None = None) -> int:
    """Device workspace a SparseGroupQueryAttention call needs; 0 when it is invalid."""
    return (lib or library()).tfsa_cuda_gqa_workspace_bytes(ctypes.byref(call))


def run_gqa(call: GqaArgs, stream: int = 0, lib: ctypes.CDLL | None = None) -> None:
    """Enqueue a SparseGroupQueryAttention call whose pointers are set; raises RuntimeError."""
    error = ctypes.create_string_buffer(512)
    entry = (lib or library()).tfsa_cuda_group_query_attention
    if entry(ctypes.byref(call), ctypes.c_void_p(stream), error, 512):
        raise RuntimeError(f"SparseGroupQueryAttention (CUDA): {error.value.decode()}")


def block_counts(q_len: int, kv_len: int, block_size: int) -> tuple[int, int]:
    """(query blocks, key blocks) of the selection."""
    return math.ceil(q_len / block_size), math.ceil(kv_len / block_size)


class Prepared:
    """A call on torch CUDA tensors with its outputs and workspace allocated: run() enqueues it."""

    def __init__(
        self,
        query,
        key,
        value,
        attn_mask=None,
        attn_bias=None,
        *,
        selection_only=False,
        return_selected=False,
        **attributes,
    ):
        import torch

        dtypes = {torch.float32: FLOAT32, torch.float16: FLOAT16, torch.bfloat16: BFLOAT16}
        self.inputs = [t.contiguous() for t in (query, key, value)]  # kept alive with the call
        query, key, value = self.inputs
        b, hq, sq, _ = query.shape
        sk, dv = key.shape[2], value.shape[3]
        mask_kind, strides, mask = MASK_NONE, (0, 0, 0, 0), None
        if attn_mask is not None:
            mask_kind = MASK_BOOL if attn_mask.dtype == torch.bool else MASK_T
            full = attn_mask.contiguous().reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
            mask = full.expand(b, hq, sq, sk)  # broadcast axes get stride 0
            strides = tuple(mask.stride())
            self.inputs.append(mask)
        bias, bias_strides = None, (0, 0, 0, 0)
        if attn_bias is not None:
            full = attn_bias.contiguous().reshape((1,) * (4 - attn_bias.dim()) + tuple(attn_bias.shape))
            bias = full.expand(b, hq, sq, sk)
            bias_strides = tuple(bias.stride())
            self.inputs.append(bias)
        shapes = (tuple(query.shape), tuple(key.shape), tuple(value.shape))
        bias_dtype = dtypes[attn_bias.dtype] if attn_bias is not None else FLOAT32
        self.call = make_args(
            shapes, dtypes[query.dtype], mask_kind, strides, bias_dtype, bias_strides, **attributes
        )
        self.call.selection_only = int(selection_only)
        size = workspace_bytes(self.call)
        if size == 0:
            run(self.call)  # raises with the kernel's reason
        device = query.device
        self.workspace = torch.empty(size, dtype=torch.uint8, device=device)
        self.output = torch.empty((b, hq, sq, dv), dtype=query.dtype, device=device)
        self.density = torch.empty((b, hq), dtype=torch.float32, device=device)
        self.selected = None
        if return_selected:
            blocks = block_counts(sq, sk, self.call.attributes.block_size)
            self.selected = torch.zeros((b, hq, *blocks), dtype=torch.uint8, device=device)
        c = self.call
        c.query, c.key, c.value = query.data_ptr(), key.data_ptr(), value.data_ptr()
        c.mask = mask.data_ptr() if mask is not None else None
        c.bias = bias.data_ptr() if bias is not None else None
        c.output, c.density = self.output.data_ptr(), self.density.data_ptr()
        c.selected = self.selected.data_ptr() if self.selected is not None else None
        c.workspace, c.workspace_size = self.workspace.data_ptr(), size
        self.stream = torch.cuda.current_stream(device).cuda_stream

    def run(self) -> None:
        run(self.call, self.stream)


def sparse_attention(
    query, key, value, attn_mask=None, attn_bias=None, *, return_selected: bool = False, **attributes: Any
):
    """SparseAttention on torch CUDA tensors [B, H, S, D]: (Y, density[, selected [B, Hq, nQ, nK]])."""
    prepared = Prepared(
        query, key, value, attn_mask, attn_bias, return_selected=return_selected, **attributes
    )
    prepared.run()
    if return_selected:
        return prepared.output, prepared.density, prepared.selected.bool()
    return prepared.output, prepared.density
