"""Encoder-decoder attention (BART and T5: encoder, causal decoder, cross-attention with Sq != Sk
and the encoder's padding; T5's relative position bias in its encoder and decoder) and Whisper's
audio encoder (no mask), on real exports of small random configs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import feeds, sessions
from test_rewrite_bias import _runtime_shapes
from test_rewrite_families import DENSE, check_structure

from tfsa_onnx.rewrite import optimize


def _decoder_self(name: str) -> bool:
    return "decoder" in name and ("self_attn" in name or "SelfAttention" in name)


CASES = [(f, a, d) for f in ("bart", "whisper-encoder") for a in ("eager", "sdpa") for d in (False, True)]
CASES += [("t5", "eager", False), ("t5", "eager", True)]  # T5 has one attention implementation
ENCODER_DECODER = ("bart", "t5")


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-{'dynamo' if c[2] else 'ts'}")
def test_seq2seq_dense_equivalence(exports, case) -> None:
    family, attn, dynamo = case
    path = exports.get(family, attn, dynamo, None if dynamo else 17)
    original = onnx.load(str(path))
    optimized, report = optimize(path, DENSE)
    layers = 6 if family in ENCODER_DECODER else 2
    check_structure(original, optimized, layers=layers)
    assert all(s.replaced for s in report.sites), report.table()
    if family in ENCODER_DECODER:  # encoder x2, then decoder self / cross per layer
        kinds = [
            (_decoder_self(s.name), "encoder_attn" in s.name or "EncDecAttention" in s.name)
            for s in report.sites
        ]
        for (decoder_self, cross), site in zip(kinds, report.sites, strict=True):
            assert site.causal == decoder_self, site
            assert not (decoder_self and site.masked), "the decoder's causal mask is an attribute, not a mask"
            assert site.masked == (not decoder_self), site  # the encoder's padding, [B, 1, 1, Sk]
            assert not cross or not site.causal
    else:
        assert not any(s.masked or s.causal for s in report.sites)
    if family == "t5":  # the padding is a [B, 1, 1, Sk] key mask beside the position bias
        x = feeds(sessions(original, optimized)[0], 33)
        nodes = [n for n in optimized.graph.node if n.op_type == "SparseAttention"]
        masks = [n.input[3] for n in nodes if len(n.input) > 3 and n.input[3]]
        shapes = _runtime_shapes(optimized, masks, x)
        assert set(shapes.values()) <= {(2, 1, 1, 33), (1,)}, shapes  # (1,): no mask beside a bias
        assert sum(len(n.input) > 4 and bool(n.input[4]) for n in nodes) >= 4  # position biases
    a, b = sessions(original, optimized)
    for seq in (5, 16, 33) if family in ENCODER_DECODER else (64,):
        x = feeds(a, seq)
        np.testing.assert_allclose(b.run(None, x)[0], a.run(None, x)[0], atol=1e-4, rtol=0)
