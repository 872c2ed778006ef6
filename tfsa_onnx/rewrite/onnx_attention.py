"""The standard ONNX Attention op (opset 23): 4-D inputs, or 3-D with q_num_heads/kv_num_heads."""

from __future__ import annotations

import onnx_ir as ir

from tfsa_onnx.rewrite.common import GiveUp, Match


class OnnxAttentionRule:
    family = "onnx-attention"

    def is_anchor(self, node: ir.Node) -> bool:
        return node.op_type == "Attention" and node.domain in ("", "ai.onnx")

    def match(self, node: ir.Node, builder_factory) -> Match:
        raise GiveUp("not implemented yet")
