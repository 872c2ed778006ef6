"""onnxruntime-genai folders for the tests, made offline: a tiny byte-level BPE tokenizer trained
here, tiny random Llama / Qwen2 models from transformers' classes, converted by genai's model
builder (`python -m onnxruntime_genai.models.builder`) in subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import DECODER

KINDS = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}
SPECIAL = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2: unk, bos, eos (= pad)
TEXT = (
    "Sparse attention computes only the key blocks that matter: a few global tokens, a local "
    "window, and the blocks a cheap estimate ranks highest. The quick brown fox jumps over the "
    "lazy dog while long prompts wait for their first token. "
)


def save_tokenizer(folder: Path, vocab: int = 320) -> int:
    """A byte-level BPE tokenizer (transformers' fast format) in folder; returns its vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([TEXT] * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(folder)
    return tokenizer.get_vocab_size()


def save_hf_model(folder: Path, kind: str, vocab: int, tokenizer: Path, **config) -> Path:
    """A tiny random decoder with 2 KV heads, saved with the tokenizer's files beside it."""
    import shutil

    import torch
    import transformers

    config_class, model_class = KINDS[kind]
    settings = {
        **DECODER,
        "intermediate_size": 128,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
    }
    settings |= dict(
        vocab_size=vocab, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2
    )
    settings["initializer_range"] = 0.2  # larger than the default so that greedy tokens vary
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**{**settings, **config}))
    model.save_pretrained(folder)
    for f in tokenizer.iterdir():
        shutil.copy(f, folder / f.name)
    return folder


# One interpreter converts every folder: `python -m onnxruntime_genai.models.builder ARGS` each
# time (runpy runs the module as __main__), without paying torch's import per folder.
_DRIVER = """
import json, runpy, sys
for argv in json.loads(sys.argv[1]):
    sys.argv = ["builder", *argv]
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)
"""


# MatMulNBits with float32 activations (accuracy level 1). At the builder's CPU default (4) the
# activations are quantized to int8 per block: a 1e-6 change in an attention output can move one
# of them across a rounding step, and the logits then differ by up to ~0.1 (measured layer by
# layer), which would hide what the tests check, the op's own agreement with GroupQueryAttention.
INT4_OPTIONS = ["--extra_options", "accuracy_level=1"]


def _args(hf: Path, out: Path, precision: str) -> list[str]:
    provider = "cuda" if precision == "fp16" else "cpu"
    extra = INT4_OPTIONS if precision == "int4" else []
    return ["-i", str(hf), "-o", str(out), "-p", precision, "-e", provider, *extra]


def run_builder(jobs: list[tuple[Path, Path, str]], cache: Path) -> None:
    """Convert (hf_dir, out_dir, precision) jobs with genai's builder: fp32 and int4 for the CPU
    provider, fp16 for CUDA (the builder accepts fp16 only for GPU providers; it needs no GPU)."""
    import json

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    argv = [[*_args(hf, out, p), "-c", str(cache / out.name)] for hf, out, p in jobs]
    done = subprocess.run(
        [sys.executable, "-c", _DRIVER, json.dumps(argv)], env=env, capture_output=True, text=True
    )
    missing = [out.name for _, out, _ in jobs if not (out / "genai_config.json").is_file()]
    if done.returncode or missing:
        raise RuntimeError(f"the genai builder failed ({missing}):\n{(done.stdout + done.stderr)[-3000:]}")


def checksums(folder: Path) -> dict[str, tuple[int, str]]:
    """(size, sha256) of every file under folder, by relative path."""
    import hashlib

    return {
        str(p.relative_to(folder)): (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }
