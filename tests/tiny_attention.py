"""A tiny hand-made attention model (token ids -> hidden, logits) and its hand-optimized twin.

Used by the fast tests of validate and calibrate: it has the MatMul -> Mul -> Add{mask} ->
Softmax -> MatMul neighbourhood the rewriter matches, and `sparse_twin` builds the same model
with that neighbourhood replaced by ai.tfsa::SparseAttention directly (no rewriter needed).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tfsa_onnx import DOMAIN, OP_TYPE, OP_VERSION

VOCAB, DIM, HEADS = 64, 32, 2


def _weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    head = DIM // HEADS
    return {
        "embedding": rng.standard_normal((VOCAB, DIM)).astype(np.float32),
        "wq": (rng.standard_normal((DIM, DIM)) * 2.0 / np.sqrt(DIM)).astype(np.float32),
        "wk": (rng.standard_normal((DIM, DIM)) * 2.0 / np.sqrt(DIM)).astype(np.float32),
        "wv": (rng.standard_normal((DIM, DIM)) / np.sqrt(DIM)).astype(np.float32),
        "unembedding": rng.standard_normal((DIM, VOCAB)).astype(np.float32),
        "heads_shape": np.array([0, 0, HEADS, head], dtype=np.int64),
        "merge_shape": np.array([0, 0, DIM], dtype=np.int64),
        "scale": np.array(1.0 / np.sqrt(head), dtype=np.float32),
        "one": np.array(1.0, dtype=np.float32),
        "neg": np.array(-10000.0, dtype=np.float32),
        "axes12": np.array([1, 2], dtype=np.int64),
    }


def _common_nodes() -> list[onnx.NodeProto]:
    mk = helper.make_node
    return [
        mk("Gather", ["embedding", "input_ids"], ["x"]),
        mk("MatMul", ["x", "wq"], ["q0"]),
        mk("MatMul", ["x", "wk"], ["k0"]),
        mk("MatMul", ["x", "wv"], ["v0"]),
        mk("Reshape", ["q0", "heads_shape"], ["q1"]),
        mk("Reshape", ["k0", "heads_shape"], ["k1"]),
        mk("Reshape", ["v0", "heads_shape"], ["v1"]),
        mk("Transpose", ["q1"], ["q"], perm=[0, 2, 1, 3]),
        mk("Transpose", ["v1"], ["v"], perm=[0, 2, 1, 3]),
        mk("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
        mk("Sub", ["one", "mask_f"], ["mask_inv"]),
        mk("Mul", ["mask_inv", "neg"], ["mask_add"]),
        mk("Unsqueeze", ["mask_add", "axes12"], ["bias"]),
    ]


def _tail_nodes() -> list[onnx.NodeProto]:
    mk = helper.make_node
    return [
        mk("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3]),
        mk("Reshape", ["ctx_t", "merge_shape"], ["hidden"]),
        mk("MatMul", ["hidden", "unembedding"], ["logits"]),
    ]


def _model(nodes: list[onnx.NodeProto], seed: int, name: str) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(v, k) for k, v in _weights(seed).items()]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
    ]
    outputs = [
        helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "seq", DIM]),
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", VOCAB]),
    ]
    graph = helper.make_graph(nodes, name, inputs, outputs, inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, OP_VERSION)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return model


def tiny_model(seed: int = 0) -> onnx.ModelProto:
    """ids/mask -> one attention layer (MatMul, Mul, Add{mask}, Softmax, MatMul) -> hidden, logits."""
    mk = helper.make_node
    attention = [
        mk("Transpose", ["k1"], ["kt"], perm=[0, 2, 3, 1]),
        mk("MatMul", ["q", "kt"], ["scores0"]),
        mk("Mul", ["scores0", "scale"], ["scores1"]),
        mk("Add", ["scores1", "bias"], ["scores"]),
        mk("Softmax", ["scores"], ["probs"], axis=-1),
        mk("MatMul", ["probs", "v"], ["ctx"]),
    ]
    model = _model(_common_nodes() + attention + _tail_nodes(), seed, "tiny")
    model.opset_import.pop()  # the original uses only the standard domain
    return model


def sparse_twin(seed: int = 0, *, is_causal: int = 0, **attributes) -> onnx.ModelProto:
    """tiny_model with its attention replaced by SparseAttention(**attributes) by hand."""
    head = DIM // HEADS
    attrs = {"scale": float(1.0 / np.sqrt(head)), "is_causal": is_causal, **attributes}
    attention = [
        helper.make_node("Transpose", ["k1"], ["k"], perm=[0, 2, 1, 3]),
        helper.make_node(OP_TYPE, ["q", "k", "v", "bias"], ["ctx"], domain=DOMAIN, name="attn0", **attrs),
    ]
    return _model(_common_nodes() + attention + _tail_nodes(), seed, "tiny_sparse")


def tiny_feeds(samples: int, seq_len: int, batch: int = 1, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Token-id feeds with a local structure (repeated motifs), so attention is peaked."""
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(samples):
        ids = rng.integers(0, VOCAB, size=(batch, seq_len))
        feeds.append({"input_ids": ids.astype(np.int64), "attention_mask": np.ones_like(ids, dtype=np.int64)})
    return feeds


class SessionWatch:
    """Stands in for a module's make_session: records how many of its sessions were alive as
    each one was made (overlaps) and keeps a weak reference to each (all_released)."""

    def __init__(self, monkeypatch, module) -> None:
        import weakref

        self.real = module.make_session
        self.overlaps: list[int] = []
        self.live: list[weakref.ref] = []
        self._ref = weakref.ref
        monkeypatch.setattr(module, "make_session", self._make)

    def _make(self, model, threads=None):
        self.overlaps.append(sum(r() is not None for r in self.live))
        session = self.real(model, threads)
        self.live.append(self._ref(session))
        return session

    def all_released(self) -> bool:
        return all(r() is None for r in self.live)
