"""Running onnxruntime-genai folders: greedy generation through og.Generator, prompt logits
through an ONNX Runtime session on the decoder, and `tfsa-onnx validate ORIG_DIR OPT_DIR`.

onnxruntime-genai is an optional dependency (the test and eval extras): it is imported here,
on first use, never by the rewriter.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tfsa_onnx.genai import GenaiError, custom_ops_library, decoder_path, read_config


def _og():
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise GenaiError(
            "running a genai folder needs onnxruntime-genai: pip install onnxruntime-genai"
        ) from None
    return og


def og_model(folder: str | os.PathLike, threads: int | None = None, cpu: bool = False):
    """og.Model of a folder; threads sets the decoder session's intra-op thread count; cpu runs
    it on the CPU whatever provider its config names (the builder's fp16 folders name CUDA)."""
    og = _og()
    config = og.Config(str(folder))
    if cpu:
        config.clear_providers()
    if threads:
        overlay = {"model": {"decoder": {"session_options": {"intra_op_num_threads": int(threads)}}}}
        config.overlay(json.dumps(overlay))
    return og.Model(config)


def pad_left(prompts: list[np.ndarray], pad_id: int) -> np.ndarray:
    """Prompts of different lengths as one [B, S] int32 batch, padded on the left (genai's
    attention mask is `tokens != pad_token_id`)."""
    width = max(len(p) for p in prompts)
    out = np.full((len(prompts), width), pad_id, dtype=np.int32)
    for row, p in enumerate(prompts):
        out[row, width - len(p) :] = p
    return out


def greedy(model, prompts: np.ndarray, new_tokens: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Greedy tokens [B, n] after a [B, S] prompt batch, and the logits [B, V] of every step
    (the prompt's last position first); n < new_tokens when every row hits end of sequence."""
    og = _og()
    params = og.GeneratorParams(model)
    batch, length = prompts.shape
    params.set_search_options(max_length=length + new_tokens, do_sample=False, batch_size=batch)
    generator = og.Generator(model, params)
    generator.append_tokens(prompts)
    tokens, logits = [], []
    for _ in range(new_tokens):
        if generator.is_done():
            break
        logits.append(np.array(generator.get_logits()).reshape(batch, -1))
        generator.generate_next_token()
        tokens.append(np.array(generator.get_next_tokens()).reshape(batch))
    return np.stack(tokens, axis=1) if tokens else np.zeros((batch, 0), np.int32), logits


def decoder_session(folder: str | os.PathLike, threads: int | None = None):
    """An ORT CPU session on the folder's decoder, with the library its config names (the copy in
    the folder, as genai loads it)."""
    from tfsa_onnx.runtime import make_session

    config = read_config(folder)
    library = custom_ops_library(config)
    copy = None if library is None else Path(folder) / library
    return make_session(decoder_path(folder, config), threads, register=copy is not None, library=copy)


def prompt_feeds(session, config: dict[str, Any], ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """input_ids, attention_mask and empty past K/V (past length 0) for a prompt step."""
    return _prompt_feeds({i.name: i.type for i in session.get_inputs()}, config, ids, mask)


def folder_prompt_feeds(folder: str | os.PathLike, prompts: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
    """prompt_feeds of each prompt (one row, no padding) for the folder's decoder, read from its
    graph (no session, no weights loaded): what calibrate runs the decoder on."""
    import onnx

    config = read_config(folder)
    graph = onnx.load(str(decoder_path(folder, config)), load_external_data=False).graph
    half = onnx.TensorProto.FLOAT16
    types = {i.name: "tensor(float16)" if i.type.tensor_type.elem_type == half else "" for i in graph.input}
    return [_prompt_feeds(types, config, p[None], np.ones((1, len(p)), np.int64)) for p in prompts]


def _prompt_feeds(types: dict[str, str], config: dict[str, Any], ids: np.ndarray, mask: np.ndarray):
    decoder = config["model"]["decoder"]
    names = decoder["inputs"]
    kv_heads, head_size = decoder["num_key_value_heads"], decoder["head_size"]
    feeds: dict[str, np.ndarray] = {names["input_ids"]: ids.astype(np.int64)}
    feeds[names["attention_mask"]] = mask.astype(np.int64)
    for layer in range(decoder["num_hidden_layers"]):
        for kind in ("past_key_names", "past_value_names"):
            name = names[kind] % layer
            dtype = np.float16 if "float16" in types[name] else np.float32
            feeds[name] = np.zeros((ids.shape[0], kv_heads, 0, head_size), dtype=dtype)
    return {k: v for k, v in feeds.items() if k in types}


def prompt_outputs(
    session, config: dict[str, Any], ids: np.ndarray, mask: np.ndarray
) -> dict[str, np.ndarray]:
    """Every output (logits, present K/V) of one prompt step."""
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, prompt_feeds(session, config, ids, mask)), strict=True))


# ---------------------------------------------------------------- validate


@dataclass
class FolderValidation:
    """Original vs optimized folder on the same prompts."""

    seq_len: int
    samples: int
    new_tokens: int
    logits_max_abs: float = 0.0
    logits_cos_mean: float = 1.0
    logits_cos_min: float = 1.0
    ppl_original: float | None = None
    ppl_optimized: float | None = None
    predicted_tokens: int = 0
    greedy_match: float | None = None  # share of generated tokens equal in both folders
    greedy_first_diff: list[int | None] = field(default_factory=list)  # per sample

    @property
    def ppl_increase(self) -> float | None:
        if not self.ppl_original or self.ppl_optimized is None:
            return None
        return self.ppl_optimized / self.ppl_original - 1.0

    def failures(self, atol: float | None, cos_min: float, max_ppl_increase: float | None) -> list[str]:
        out = []
        if atol is not None and self.logits_max_abs > atol:
            out.append(f"logits max abs error {self.logits_max_abs:.3g} > {atol}")
        if self.logits_cos_mean < cos_min:
            out.append(f"logits mean cosine {self.logits_cos_mean:.5f} < {cos_min}")
        rise = self.ppl_increase
        if max_ppl_increase is not None and rise is not None and rise > max_ppl_increase:
            out.append(f"perplexity +{rise:.2%} > +{max_ppl_increase:.2%}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ppl_increase": self.ppl_increase}

    def table(self) -> str:
        from tfsa_onnx.table import format_table

        rise = self.ppl_increase
        rows = [
            ("prompt logits max abs error", f"{self.logits_max_abs:.3g}"),
            ("prompt logits cosine (mean / min)", f"{self.logits_cos_mean:.6f} / {self.logits_cos_min:.6f}"),
            ("perplexity original", self.ppl_original),
            ("perplexity optimized", self.ppl_optimized),
            ("perplexity change", None if rise is None else f"{rise:+.2%}"),
            ("predicted tokens", self.predicted_tokens),
            ("greedy tokens equal", None if self.greedy_match is None else f"{self.greedy_match:.1%}"),
        ]
        return format_table(("check", "value"), rows)


def validate_folders(
    original: str | os.PathLike,
    optimized: str | os.PathLike,
    prompts: list[np.ndarray],
    *,
    new_tokens: int = 16,
    threads: int | None = None,
) -> FolderValidation:
    """Prompt logits and perplexity (ORT sessions), then greedy tokens (og.Generator), per prompt."""
    from tfsa_onnx.validation import row_cosines, token_nll

    config = read_config(original)
    result = FolderValidation(seq_len=len(prompts[0]), samples=len(prompts), new_tokens=new_tokens)
    cosines, nll = [], {"original": 0.0, "optimized": 0.0}
    sessions = {
        "original": decoder_session(original, threads),
        "optimized": decoder_session(optimized, threads),
    }
    logits_name = config["model"]["decoder"]["outputs"]["logits"]
    for ids in prompts:
        ids, mask = ids[None].astype(np.int64), np.ones((1, len(ids)), np.int64)
        ref = prompt_outputs(sessions["original"], config, ids, mask)[logits_name]
        opt = prompt_outputs(sessions["optimized"], config, ids, mask)[logits_name]
        result.logits_max_abs = max(result.logits_max_abs, float(np.abs(ref - opt).max()))
        cosines.append(row_cosines(ref, opt))
        for name, logits in (("original", ref), ("optimized", opt)):
            total, count = token_nll(logits, ids, mask)
            nll[name] += total
        result.predicted_tokens += count
        del ref, opt
    del sessions
    cos = np.concatenate(cosines)
    result.logits_cos_mean, result.logits_cos_min = float(cos.mean()), float(cos.min())
    if result.predicted_tokens:
        result.ppl_original = float(np.exp(nll["original"] / result.predicted_tokens))
        result.ppl_optimized = float(np.exp(nll["optimized"] / result.predicted_tokens))
    if new_tokens:
        _greedy_match(result, original, optimized, prompts, new_tokens, threads)
    return result


def _greedy_match(result, original, optimized, prompts, new_tokens: int, threads) -> None:
    models = [og_model(original, threads), og_model(optimized, threads)]
    equal = total = 0
    for ids in prompts:
        a, b = (greedy(m, ids[None].astype(np.int32), new_tokens)[0][0] for m in models)
        n = min(len(a), len(b))
        same = a[:n] == b[:n]
        equal += int(same.sum())
        total += max(len(a), len(b))
        result.greedy_first_diff.append(None if same.all() and len(a) == len(b) else int(np.argmin(same)))
    result.greedy_match = equal / total if total else None


def text_prompts(folder: str | os.PathLike, text: str, seq_len: int, samples: int) -> list[np.ndarray]:
    """`samples` windows of `seq_len` tokens of the text, tokenized by the folder's tokenizer."""
    og = _og()
    tokenizer = og.Tokenizer(og_model(folder))
    ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
    if len(ids) < seq_len * samples:
        raise GenaiError(
            f"the text has {len(ids)} tokens, fewer than --samples {samples} x --seq-len {seq_len}; "
            "give a longer text or fewer samples."
        )
    return [ids[i * seq_len : (i + 1) * seq_len] for i in range(samples)]


def random_prompts(folder: str | os.PathLike, seq_len: int, samples: int, seed: int = 0) -> list[np.ndarray]:
    """Random token ids below the folder's vocab_size."""
    vocab = int(read_config(folder)["model"]["vocab_size"])
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, seq_len, dtype=np.int64) for _ in range(samples)]
