"""Shared fixtures: tiny Hugging Face models exported by torch itself, cached per session."""

from __future__ import annotations

import gc
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(autouse=True, scope="module")
def _frozen_heap():
    """validate and calibrate collect garbage between phases (runtime.release_memory); in this
    process a full collection walks everything torch, transformers and earlier modules left
    alive (about 0.3-0.6 s a call, most of some tests' time). Objects alive when a module starts
    are moved out of the collector's sight for that module, and collected again after it."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


VOCAB = 100
VISION = ("vit", "clip-vision", "dinov2", "dinov2-registers", "siglip-vision")


# The sizes the tiny models share, in transformers' config names: 32-wide encoders with 2 heads,
# 64-wide decoders with 4 query heads, encoder-decoders; two layers each.
ENCODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
TEXT = {**ENCODER, "vocab_size": VOCAB, "max_position_embeddings": 1100}
IMAGE = {**ENCODER, "image_size": 32, "patch_size": 8}  # 16 patches + class/register tokens
DECODER = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
DECODER |= dict(vocab_size=VOCAB, max_position_embeddings=2048)
WINDOWED = {**DECODER, "num_key_value_heads": 2, "head_dim": 16}  # windows beyond short inputs
SEQ2SEQ = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64)
SEQ2SEQ |= dict(encoder_attention_heads=2, decoder_attention_heads=2)
# Whisper's audio encoder: no mask, a fixed number of frames (here 64 after the convolutions).
WHISPER = {**SEQ2SEQ, "num_mel_bins": 16, "max_source_positions": 64, "max_target_positions": 64}
WHISPER |= dict(vocab_size=VOCAB, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=0)
T5 = dict(d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, vocab_size=VOCAB)
NO_POOLER = {"add_pooling_layer": False}


def _tiny(
    config_class: str, model_class: str, sizes: dict, model_args: dict | None = None, part=None, **extra
):
    """A builder of a tiny random model of transformers' classes: sizes and extra settings, the
    attention implementation given at build time; part: the method giving the part to keep."""

    def build(attn: str):
        import transformers as T

        config = getattr(T, config_class)(**{**sizes, **extra}, attn_implementation=attn)
        model = getattr(T, model_class)(config, **(model_args or {}))
        return getattr(model, part)() if part else model

    return build


BUILDERS = {
    "bert": _tiny("BertConfig", "BertModel", TEXT, NO_POOLER),
    "vit": _tiny("ViTConfig", "ViTModel", IMAGE, NO_POOLER),
    "gpt2": _tiny(
        "GPT2Config", "GPT2Model", dict(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=1100)
    ),
    # An encoder-decoder: encoder self-attention, causal decoder self-attention, cross-attention.
    "bart": _tiny("BartConfig", "BartModel", SEQ2SEQ, vocab_size=VOCAB, max_position_embeddings=1100),
    "clip-vision": _tiny("CLIPVisionConfig", "CLIPVisionModel", IMAGE),
    "dinov2": _tiny("Dinov2Config", "Dinov2Model", IMAGE),
    "dinov2-registers": _tiny(
        "Dinov2WithRegistersConfig", "Dinov2WithRegistersModel", IMAGE, num_register_tokens=4
    ),
    "siglip-vision": _tiny("SiglipVisionConfig", "SiglipVisionModel", IMAGE),
    "whisper-encoder": _tiny("WhisperConfig", "WhisperModel", WHISPER, part="get_encoder"),
    "llama": _tiny("LlamaConfig", "LlamaModel", DECODER, num_key_value_heads=2),
    "qwen2": _tiny("Qwen2Config", "Qwen2Model", DECODER, num_key_value_heads=1),
    "mistral-window": _tiny("MistralConfig", "MistralModel", WINDOWED, sliding_window=300),
    "qwen2-window": _tiny(
        "Qwen2Config",
        "Qwen2Model",
        WINDOWED,
        sliding_window=300,
        use_sliding_window=True,
        max_window_layers=0,
    ),
    # Gemma 3's pattern: five sliding-window layers, then one global layer.
    "gemma3": _tiny("Gemma3TextConfig", "Gemma3TextModel", WINDOWED, num_hidden_layers=6, sliding_window=512),
    # Gemma 2: sliding and global layers alternate, scores capped by softcap * tanh(s / softcap)
    # (a small cap, so that it bites on random weights)
    "gemma2": _tiny("Gemma2Config", "Gemma2Model", WINDOWED, sliding_window=300, attn_logit_softcapping=0.05),
    "mpnet": _tiny("MPNetConfig", "MPNetModel", TEXT, NO_POOLER),
    # ModernBERT: a global layer, then two local layers with a 16-token two-sided window.
    "modernbert": _tiny(
        "ModernBertConfig",
        "ModernBertModel",
        {**TEXT, "num_hidden_layers": 3},
        local_attention=16,
        global_attn_every_n_layers=3,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        cls_token_id=1,
        sep_token_id=2,
    ),
    "t5-encoder": _tiny(
        "T5Config", "T5EncoderModel", T5, relative_attention_num_buckets=8, relative_attention_max_distance=20
    ),
    # The whole T5: encoder, causal decoder with its own position bias, cross-attention.
    "t5": _tiny(
        "T5Config",
        "T5Model",
        T5,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
        decoder_start_token_id=0,
    ),
    "bloom": _tiny("BloomConfig", "BloomModel", dict(hidden_size=32, n_layer=2, n_head=2, vocab_size=VOCAB)),
    "deberta-v2": _tiny(
        "DebertaV2Config",
        "DebertaV2Model",
        TEXT,
        relative_attention=True,
        position_buckets=16,
        pos_att_type=["p2c", "c2p"],
    ),
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


@pytest.fixture(scope="session")
def emulated_library(tmp_path_factory) -> Path:
    """The CUDA sources built once for the CPU emulation (custom_ops/emulation), for every module."""
    build = tmp_path_factory.mktemp("cuda-emulation")
    cmake = shutil.which("cmake")
    assert cmake, "cmake is needed to build the CUDA emulation"
    subprocess.run(
        [cmake, "-S", str(Path(__file__).resolve().parents[1] / "custom_ops/emulation"), "-B", str(build)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    subprocess.run([cmake, "--build", str(build), "-j2"], check=True, capture_output=True, timeout=900)
    return next(build.glob("libtfsa_cuda_emulated.*"))
