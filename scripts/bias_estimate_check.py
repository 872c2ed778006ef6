"""How much the estimate's block-centre bias helps: reference outputs with the selection made
with and without the bias term, against dense attention, on random Q/K/V with an ALiBi bias
(BLOOM's slopes, bias = slope * -(i - j)) and a T5-like bucketed bias. Cosine per row, mean.

    python scripts/bias_estimate_check.py
"""

from __future__ import annotations

import numpy as np

from tfsa_onnx.reference import (
    SparseAttentionAttributes,
    _attendable,
    _block_any,
    effective,
    select_blocks,
    sparse_attention,
)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    return float(np.mean(np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))))


def main() -> None:
    rng = np.random.default_rng(0)
    h, s, d = 8, 1024, 64
    q, k, v = (rng.standard_normal((1, h, s, d)).astype(np.float32) for _ in range(3))
    i, j = np.arange(s)[:, None], np.arange(s)[None, :]
    slopes = 2.0 ** (-8.0 * np.arange(1, h + 1) / h)
    biases = {
        "alibi": (slopes[:, None, None] * -np.abs(i - j)[None]).astype(np.float32)[None],
        "buckets": (-2.0 * np.log1p(np.abs(i - j)))[None, None].astype(np.float32).repeat(h, 1),
    }
    attrs = dict(
        block_size=64, global_tokens=0, local_window=64, threshold=0.9, max_density=0.25, min_seq_len=0
    )
    a = effective(SparseAttentionAttributes(**attrs), s, s)
    allowed = _block_any(_attendable(None, (1, h, s, s), False)[1], a.block_size)
    dense = dict(attrs, threshold=1.0, max_density=1.0)
    for name, bias in biases.items():
        y_dense, _ = sparse_attention(q, k, v, None, bias, **dense)
        for label, chosen in (
            ("with the bias at block centres", select_blocks(q, k, allowed, a, attn_bias=bias)),
            ("without it", select_blocks(q, k, allowed, a)),
        ):
            y, density = sparse_attention(q, k, v, None, bias, selected=chosen, **attrs)
            print(f"{name:8s} {label:32s} cosine {_cosine(y, y_dense):.4f}  density {density.mean():.3f}")


if __name__ == "__main__":
    main()
