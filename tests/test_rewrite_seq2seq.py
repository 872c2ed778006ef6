"""Encoder-decoder attention (BART: encoder, causal decoder, cross-attention with Sq != Sk and the
encoder's padding) and Whisper's audio encoder (no mask), on real exports of small random configs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import feeds, sessions
from test_rewrite_families import DENSE, check_structure

from tfsa_onnx.rewrite import optimize

CASES = [(f, a, d) for f in ("bart", "whisper-encoder") for a in ("eager", "sdpa") for d in (False, True)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-{'dynamo' if c[2] else 'ts'}")
def test_seq2seq_dense_equivalence(exports, case) -> None:
    family, attn, dynamo = case
    path = exports.get(family, attn, dynamo, None if dynamo else 17)
    original = onnx.load(str(path))
    optimized, report = optimize(path, DENSE)
    layers = 6 if family == "bart" else 2
    check_structure(original, optimized, layers=layers)
    assert all(s.replaced for s in report.sites), report.table()
    if family == "bart":  # encoder x2, then decoder self / cross per layer
        kinds = [
            ("self_attn" in s.name and "decoder" in s.name, "encoder_attn" in s.name) for s in report.sites
        ]
        for (decoder_self, cross), site in zip(kinds, report.sites, strict=True):
            assert site.causal == decoder_self, site
            assert not (decoder_self and site.masked), "the decoder's causal mask is an attribute, not a mask"
            assert site.masked == (not decoder_self), site  # the encoder's padding, [B, 1, 1, Sk]
            assert not cross or not site.causal
    else:
        assert not any(s.masked or s.causal for s in report.sites)
    a, b = sessions(original, optimized)
    for seq in (5, 16, 33) if family == "bart" else (64,):
        x = feeds(a, seq)
        np.testing.assert_allclose(b.run(None, x)[0], a.run(None, x)[0], atol=1e-4, rtol=0)
