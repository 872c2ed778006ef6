"""com.microsoft.Attention and com.microsoft.MultiHeadAttention (onnxruntime's fusions)."""

from __future__ import annotations

import onnx_ir as ir

from tfsa_onnx.rewrite.common import GiveUp, Match


class OrtAttentionRule:
    family = "ort-attention"

    def is_anchor(self, node: ir.Node) -> bool:
        return node.op_type == "Attention" and node.domain == "com.microsoft"

    def match(self, node: ir.Node, builder_factory) -> Match:
        raise GiveUp("not implemented yet")


class OrtMultiHeadAttentionRule:
    family = "ort-multihead-attention"

    def is_anchor(self, node: ir.Node) -> bool:
        return node.op_type == "MultiHeadAttention" and node.domain == "com.microsoft"

    def match(self, node: ir.Node, builder_factory) -> Match:
        raise GiveUp("not implemented yet")
