"""Shared fixtures: tiny Hugging Face models exported by torch itself, cached per session."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

VOCAB = 100
VISION = ("vit", "clip-vision", "dinov2", "dinov2-registers", "siglip-vision")


def _text_encoder(config_class: str, model_class: str):
    """A tiny BERT-style encoder of the given transformers classes (padding mask, no pooler)."""

    def build(attn: str):
        import transformers as T

        config = getattr(T, config_class)(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            vocab_size=VOCAB,
            max_position_embeddings=1100,
            attn_implementation=attn,
        )
        return getattr(T, model_class)(config, add_pooling_layer=False)

    return build


def _vit(attn: str):
    import transformers as T

    config = T.ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        attn_implementation=attn,
    )
    return T.ViTModel(config, add_pooling_layer=False)


def _vision(config_class: str, model_class: str, **extra):
    """A tiny vision encoder (32x32 images, 8x8 patches: 16 patches + class/register tokens)."""

    def build(attn: str):
        import transformers as T

        config = getattr(T, config_class)(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
            attn_implementation=attn,
            **extra,
        )
        return getattr(T, model_class)(config)

    return build


def _gpt2(attn: str):
    import transformers as T

    config = T.GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=1100, attn_implementation=attn
    )
    return T.GPT2Model(config)


def _bart(attn: str):
    """An encoder-decoder: encoder self-attention, causal decoder self-attention, cross-attention."""
    import transformers as T

    config = T.BartConfig(
        vocab_size=VOCAB,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=1100,
        attn_implementation=attn,
    )
    return T.BartModel(config)


def _whisper_encoder(attn: str):
    """Whisper's audio encoder: no mask, a fixed number of frames (here 64 after the convolutions)."""
    import transformers as T

    config = T.WhisperConfig(
        vocab_size=VOCAB,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=0,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        num_mel_bins=16,
        max_source_positions=64,
        max_target_positions=64,
        attn_implementation=attn,
    )
    return T.WhisperModel(config).get_encoder()


def _decoder(config_class: str, model_class: str, kv_heads: int):
    """A tiny Llama-style decoder (grouped-query attention) of the given transformers classes."""

    def build(attn: str):
        import transformers as T

        config = getattr(T, config_class)(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=kv_heads,
            intermediate_size=64,
            vocab_size=VOCAB,
            max_position_embeddings=2048,
            attn_implementation=attn,
        )
        return getattr(T, model_class)(config)

    return build


_llama = _decoder("LlamaConfig", "LlamaModel", kv_heads=2)
_qwen2 = _decoder("Qwen2Config", "Qwen2Model", kv_heads=1)


def _sliding(config_class: str, model_class: str, layers: int, window: int, **extra):
    """A tiny decoder whose layers attend through a sliding window longer than short test inputs."""

    def build(attn: str):
        import transformers as T

        config = getattr(T, config_class)(
            hidden_size=64,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            intermediate_size=64,
            vocab_size=VOCAB,
            max_position_embeddings=2048,
            sliding_window=window,
            attn_implementation=attn,
            **extra,
        )
        return getattr(T, model_class)(config)

    return build


def _t5_encoder(attn: str):
    import transformers as T

    config = T.T5Config(
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_heads=2,
        vocab_size=VOCAB,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
        attn_implementation=attn,
    )
    return T.T5EncoderModel(config)


def _t5(attn: str):
    """The whole T5 (encoder, causal decoder with its own position bias, cross-attention)."""
    import transformers as T

    config = T.T5Config(
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_heads=2,
        vocab_size=VOCAB,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
        decoder_start_token_id=0,
        attn_implementation=attn,
    )
    return T.T5Model(config)


def _bloom(attn: str):
    import transformers as T

    config = T.BloomConfig(hidden_size=32, n_layer=2, n_head=2, vocab_size=VOCAB, attn_implementation=attn)
    return T.BloomModel(config)


def _deberta_v2(attn: str):
    import transformers as T

    config = T.DebertaV2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=1100,
        relative_attention=True,
        position_buckets=16,
        pos_att_type=["p2c", "c2p"],
        attn_implementation=attn,
    )
    return T.DebertaV2Model(config)


BUILDERS = {
    "bert": _text_encoder("BertConfig", "BertModel"),
    "vit": _vit,
    "gpt2": _gpt2,
    "bart": _bart,
    "clip-vision": _vision("CLIPVisionConfig", "CLIPVisionModel"),
    "dinov2": _vision("Dinov2Config", "Dinov2Model"),
    "dinov2-registers": _vision(
        "Dinov2WithRegistersConfig", "Dinov2WithRegistersModel", num_register_tokens=4
    ),
    "siglip-vision": _vision("SiglipVisionConfig", "SiglipVisionModel"),
    "whisper-encoder": _whisper_encoder,
    "llama": _llama,
    "qwen2": _qwen2,
    "mistral-window": _sliding("MistralConfig", "MistralModel", 2, 300),
    "qwen2-window": _sliding(
        "Qwen2Config", "Qwen2Model", 2, 300, use_sliding_window=True, max_window_layers=0
    ),
    # Gemma 3's pattern: five sliding-window layers, then one global layer.
    "gemma3": _sliding("Gemma3TextConfig", "Gemma3TextModel", 6, 512),
    # Gemma 2: sliding and global layers alternate, scores capped by softcap * tanh(s / softcap)
    # (a small cap, so that it bites on random weights)
    "gemma2": _sliding("Gemma2Config", "Gemma2Model", 2, 300, attn_logit_softcapping=0.05),
    "mpnet": _text_encoder("MPNetConfig", "MPNetModel"),
    "t5-encoder": _t5_encoder,
    "t5": _t5,
    "bloom": _bloom,
    "deberta-v2": _deberta_v2,
}


def example_inputs(family: str) -> dict:
    import torch

    if family in VISION:
        return {"pixel_values": torch.randn(2, 3, 32, 32)}
    if family == "whisper-encoder":
        return {"input_features": torch.randn(2, 16, 128)}
    ids = torch.randint(0, VOCAB, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 6:] = 0
    if family in ("bart", "t5"):
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "decoder_input_ids": torch.randint(3, VOCAB, (2, 5)),
        }
    return {"input_ids": ids, "attention_mask": mask}


class ExportCache:
    """Exports each (family, attention, exporter, opset) once per test session."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.paths: dict[tuple, Path] = {}

    def get(self, family: str, attn: str = "eager", dynamo: bool = False, opset: int | None = None) -> Path:
        key = (family, attn, dynamo, opset)
        if key not in self.paths:
            import torch

            from tfsa_onnx.exporter import export_hf_model

            torch.manual_seed(0)
            model = BUILDERS[family](attn)
            path = self.root / f"{family}_{attn}_{'dynamo' if dynamo else 'ts'}_{opset}.onnx"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                export_hf_model(model, example_inputs(family), path, dynamo=dynamo, opset=opset)
            self.paths[key] = path
        return self.paths[key]


@pytest.fixture(scope="session")
def exports(tmp_path_factory) -> ExportCache:
    return ExportCache(tmp_path_factory.mktemp("exports"))


def feeds(session, seq: int, batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for a session: token ids with right padding on the last row, or images."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in session.get_inputs():
        if i.name == "input_ids":
            out[i.name] = rng.integers(0, VOCAB, (batch, seq)).astype(np.int64)
        elif i.name == "attention_mask":
            mask = np.ones((batch, seq), np.int64)
            if batch > 1:
                mask[-1, max(1, seq * 2 // 3) :] = 0
            out[i.name] = mask
        elif i.name == "decoder_input_ids":  # a target of another length than the source
            out[i.name] = rng.integers(3, VOCAB, (batch, max(1, seq * 2 // 3 + 1))).astype(np.int64)
        elif i.name == "pixel_values":
            out[i.name] = rng.standard_normal((batch, 3, 32, 32)).astype(np.float32)
        elif i.name == "input_features":
            out[i.name] = rng.standard_normal((batch, 16, 128)).astype(np.float32)
        else:
            raise KeyError(i.name)
    return out


def sessions(original, optimized):
    """(ORT session of the original, ORT session of the optimized model with our library)."""
    import onnxruntime as ort

    import tfsa_onnx

    def load(model, so):
        data = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
        return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return load(original, so), load(optimized, tfsa_onnx.session_options())
