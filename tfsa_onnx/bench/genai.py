"""onnxruntime-genai folders: time to first token and decode speed through og.Generator.

For one prompt length, each round generates from the same prompt with the original folder and
then the optimized one (timing.rounds: interleaved, so a noisy machine slows both alike): time
to first token is append_tokens (the prompt step) plus choosing the first token; decode tokens/s
is the rest of the `decode_tokens` tokens over their time. Medians over the rounds are reported.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np

from tfsa_onnx.bench.output import Row
from tfsa_onnx.bench.timing import rounds

COLUMNS = (
    "prompt_len decode_tokens threads original_ttft_ms optimized_ttft_ms ttft_speedup "
    "original_decode_tok_s optimized_decode_tok_s decode_ratio"
)


@dataclass
class GenaiResult(Row):
    prompt_len: int
    decode_tokens: int
    threads: int
    original_ttft_ms: float
    optimized_ttft_ms: float
    ttft_speedup: float
    original_decode_tok_s: float
    optimized_decode_tok_s: float
    decode_ratio: float


def _one_generation(model, prompt: np.ndarray, decode_tokens: int) -> tuple[float, float]:
    """(time to first token ms, decode tokens/s) of one greedy generation."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=prompt.shape[1] + decode_tokens, do_sample=False)
    generator = og.Generator(model, params)
    start = time.perf_counter()
    generator.append_tokens(prompt)
    generator.generate_next_token()
    first = time.perf_counter()
    steps = 0
    while steps < decode_tokens - 1 and not generator.is_done():
        generator.generate_next_token()
        steps += 1
    end = time.perf_counter()
    return (first - start) * 1e3, steps / (end - first) if steps else float("nan")


def bench_genai(
    original: str,
    optimized: str,
    prompt: np.ndarray,
    *,
    decode_tokens: int = 32,
    threads: int = 2,
    warmup: int = 1,
    repeat: int = 3,
) -> GenaiResult:
    """Interleaved rounds of greedy generation from `prompt` (token ids [S]) in both folders."""
    from tfsa_onnx.genai_eval import og_model

    models = {"original": og_model(original, threads), "optimized": og_model(optimized, threads)}
    ids = prompt.reshape(1, -1).astype(np.int32)
    for _ in range(warmup):  # a short prompt: session and arena set-up, not a full prefill
        for model in models.values():
            _one_generation(model, ids[:, : min(ids.shape[1], 256)], 2)
    generate = {
        name: (lambda m=model: _one_generation(m, ids, decode_tokens)) for name, model in models.items()
    }
    times = rounds(generate, repeat)
    ttft = {name: statistics.median(t for t, _ in runs) for name, runs in times.items()}
    rate = {name: statistics.median(r for _, r in runs) for name, runs in times.items()}
    return GenaiResult(
        prompt_len=ids.shape[1],
        decode_tokens=decode_tokens,
        threads=threads,
        original_ttft_ms=ttft["original"],
        optimized_ttft_ms=ttft["optimized"],
        ttft_speedup=ttft["original"] / ttft["optimized"],
        original_decode_tok_s=rate["original"],
        optimized_decode_tok_s=rate["optimized"],
        decode_ratio=rate["optimized"] / rate["original"],
    )
