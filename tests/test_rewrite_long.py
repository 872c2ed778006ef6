"""A sparse setting at about 2,048 tokens on the encoders that take that length: vision encoders
with 45 x 45 patches (360 x 360 images, 8 x 8 patches, plus class and register tokens) and text
encoders with 2,100 positions or relative ones. Random weights: near-uniform attention, so this
checks that the sparse path keeps the model's output (mean per-token cosine >= 0.99) while it
skips blocks; real-model accuracy is docs/accuracy.md's."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
from conftest import VOCAB, sessions
from test_rewrite_sparse import SPARSE, with_density_outputs

from tfsa_onnx.rewrite import optimize
from tfsa_onnx.validation import row_cosines

IMAGE, PATCH, TOKENS = 360, 8, 2048
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def _model(family: str):
    import transformers as T

    vision = dict(SMALL, image_size=IMAGE, patch_size=PATCH, attn_implementation="eager")
    text = dict(SMALL, vocab_size=VOCAB, max_position_embeddings=2100, attn_implementation="eager")
    if family == "clip-vision":
        return T.CLIPVisionModel(T.CLIPVisionConfig(**vision))
    if family == "siglip-vision":
        return T.SiglipVisionModel(T.SiglipVisionConfig(**vision))
    if family == "dinov2":
        return T.Dinov2Model(T.Dinov2Config(**vision))
    if family == "vit":
        return T.ViTModel(T.ViTConfig(**vision), add_pooling_layer=False)
    if family == "bert":
        return T.BertModel(T.BertConfig(**text), add_pooling_layer=False)
    if family == "mpnet":
        return T.MPNetModel(T.MPNetConfig(**text), add_pooling_layer=False)
    if family == "deberta-v2":
        extra = dict(relative_attention=True, position_buckets=64, pos_att_type=["p2c", "c2p"])
        return T.DebertaV2Model(T.DebertaV2Config(**text, **extra))
    config = T.T5Config(d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, vocab_size=VOCAB)
    return T.T5EncoderModel(config)


def _inputs(family: str, batch: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    if family.endswith("vision") or family in ("dinov2", "vit"):
        return {"pixel_values": rng.standard_normal((batch, 3, IMAGE, IMAGE)).astype(np.float32)}
    ids = rng.integers(0, VOCAB, (batch, TOKENS)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


# (family, dynamo): TorchScript exports (the dynamo exports of the same families are tested dense)
FAMILIES = [
    ("clip-vision", False),
    ("siglip-vision", False),
    ("dinov2", False),
    ("vit", False),
    ("bert", False),
    ("mpnet", False),
    ("t5-encoder", False),
    ("deberta-v2", False),
]


@pytest.mark.parametrize("family,dynamo", FAMILIES, ids=lambda x: str(x))
def test_sparse_setting_keeps_the_output_at_2048_tokens(tmp_path, family, dynamo) -> None:
    import torch

    from tfsa_onnx.exporter import export_hf_model

    torch.manual_seed(0)
    path = tmp_path / f"{family}.onnx"
    example = {k: torch.from_numpy(v[:, : 16 if v.ndim == 2 else None]) for k, v in _inputs(family).items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_hf_model(_model(family), example, path, dynamo=dynamo, opset=None if dynamo else 17)
    optimized, report = optimize(path, SPARSE)
    assert report.replaced == len(report.sites) == 2, report.table()
    a, b = sessions(onnx.load(str(path)), with_density_outputs(optimized))
    x = _inputs(family)
    expected = a.run(None, x)[0]
    got, *densities = b.run(None, x)
    assert expected.shape[1] >= 2025  # the length this test is about
    cosine, density = float(row_cosines(expected, got).mean()), float(np.mean(densities))
    print(f"{family}: {expected.shape[1]} tokens, mean token cosine {cosine:.5f}, density {density:.3f}")
    assert cosine >= 0.99
    assert density < 0.9, "the sparse setting computed (nearly) everything"
