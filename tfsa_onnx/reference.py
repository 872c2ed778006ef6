"""Executable specification of ai.tfsa::SparseAttention, in numpy.

The C++ and CUDA kernels must agree with this file. It favours clarity over speed:
everything is materialised at [B, H, Sq, Sk].

Selection (which key blocks a query block computes), per (batch, head, query block):
  1. allowed: key blocks holding at least one key that causality and the mask let
     some query of the block see.
  2. forced: allowed blocks holding a global token (key index < global_tokens) or
     touching the local window (|key - query position| <= local_window, W > 0).
     Query blocks holding a global query (index < global_tokens) take every allowed block.
  3. estimate: the other allowed blocks are ranked by softmax over key blocks of
     scale * mean(Q block) . mean(K block) + log(keys in block) + the attn_bias at the
     block pair's centre element (row (first + last) // 2 of the query block, the same of the
     key block; a non-finite value counts as 0); they are added in
     that order until their cumulative estimated mass reaches `threshold` or the block
     count reaches ceil(max_density * allowed) (forced blocks count against the cap,
     but are kept even when they alone exceed it).
  Below min_seq_len keys, every allowed block is computed.
Math: exactly softmax(scale * Q K^T + mask + attn_bias) V over the selected blocks, the rest
-inf; rows with nothing to attend give zeros.

attn_bias (optional, [B|1, H|1, Sq, Sk] broadcast like the mask, float32 or the query's type):
an additive score bias (relative position, ALiBi) kept apart from the mask. It is read only
inside the blocks computed (and at one element per block pair, for the estimate): it never
decides which blocks are allowed and is not in the density's denominator. Mask and bias add up
in float32; a pair whose sum is -inf is hidden like a masked pair (its score -inf whatever its
dot), so a -inf in the bias hides a pair without closing its block.

Attribute bounds (contract.h enforces the same; out of range is an error): block_size in
[1, BLOCK_SIZE_MAX]; global_tokens, local_window, min_seq_len in [0, TOKENS_MAX]; threshold in
[0, 1]; max_density in (0, 1]; scale finite and >= 0; is_causal 0 or 1. block_size,
global_tokens and local_window are cut to the longer sequence (`effective`), which changes no
result: the kernels never size memory or index blocks by the raw values.

NaN and infinity. A pair (i, j) counts for row i when its block is selected, causality and
the mask let i see j (a NaN or +inf mask value lets it: only -inf / false hide a pair), and
mask + bias is not -inf. Its score is scale * q_i . k_j + mask_ij + bias_ij; every other pair
has score -inf. A pair whose score is -inf carries no weight and is never read: neither its
key nor its value nor its mask or bias value can reach row i. So NaN in q_i, or in the key,
value, mask or bias value of a pair that counts (and +inf scores, through inf - inf), makes
row i NaN, as dense attention would; nothing else does. The selection is not steered by them:
non-finite query and key elements count as 0 in the block means, a NaN estimate ranks below
every other candidate with zero mass, and when the largest estimate is not finite the
candidates weigh the same (taken in block order).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

import numpy as np

BLOCK_SIZE_MAX = 1_048_576  # contract.h kBlockSizeMax
TOKENS_MAX = 2_147_483_647  # contract.h kTokensMax: global_tokens, local_window, min_seq_len


@dataclass(frozen=True)
class SparseAttentionAttributes:
    """The operator's attributes and their defaults, in the order of contract.h TfsaAttributes
    (tfsa_onnx/cuda.py builds its ctypes mirror from these fields; tests/test_kernel.py checks
    names, order, defaults and bounds against the library's tfsa_attribute_info)."""

    scale: float = 0.0
    is_causal: int = 0
    block_size: int = 64
    global_tokens: int = 64
    local_window: int = 128
    threshold: float = 0.95
    max_density: float = 1.0
    min_seq_len: int = 1024

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def capped(
        cls, max_density: float, is_causal: int = 0, block_size: int = 64
    ) -> SparseAttentionAttributes:
        """Blocks chosen by the estimate under the max_density cap alone (no global, local,
        threshold or min_seq_len): the setting the kernel benchmarks time."""
        return cls(
            is_causal=is_causal,
            block_size=block_size,
            global_tokens=0,
            local_window=0,
            threshold=1.0,
            max_density=max_density,
            min_seq_len=0,
        )


# Each attribute's bounds as contract.h checks them: name -> (low, high, low excluded); floats
# must also be finite.
ATTRIBUTE_BOUNDS: dict[str, tuple[float, float, bool]] = {
    "scale": (0.0, math.inf, False),
    "is_causal": (0, 1, False),
    "block_size": (1, BLOCK_SIZE_MAX, False),
    "global_tokens": (0, TOKENS_MAX, False),
    "local_window": (0, TOKENS_MAX, False),
    "threshold": (0.0, 1.0, False),
    "max_density": (0.0, 1.0, True),
    "min_seq_len": (0, TOKENS_MAX, False),
}


def effective(a: SparseAttentionAttributes, sq: int, sk: int) -> SparseAttentionAttributes:
    """block_size, global_tokens, local_window cut to the longer sequence: the same result.

    A block of at least both lengths is one query and one key block; global tokens past both
    lengths cover everything anyway; query positions lie in [sk - sq, sk - 1], so a window of
    the longer length already reaches every key."""
    longest = max(1, sq, sk)
    return replace(
        a,
        block_size=min(a.block_size, longest),
        global_tokens=min(a.global_tokens, longest),
        local_window=min(a.local_window, longest),
    )


def _attendable(mask, shape, is_causal: bool) -> tuple[np.ndarray, np.ndarray]:
    """Additive mask [B,H,Sq,Sk] (float64) and the boolean 'may attend' of each pair."""
    b, h, sq, sk = shape
    if mask is None:
        bias = np.zeros(shape)
    elif mask.dtype == np.bool_:
        bias = np.where(np.broadcast_to(mask, shape), 0.0, -np.inf)
    else:
        bias = np.broadcast_to(mask.astype(np.float64), shape).copy()
    if is_causal:
        i = np.arange(sq)[:, None]
        j = np.arange(sk)[None, :]
        bias = np.where(j <= i + (sk - sq), bias, -np.inf)
    return bias, bias != -np.inf


def _block_any(pairs: np.ndarray, bs: int) -> np.ndarray:
    """[.., Sq, Sk] bool -> [.., nQ, nK]: does the block hold any true pair."""
    *lead, sq, sk = pairs.shape
    nq, nk = -(-sq // bs), -(-sk // bs)
    padded = np.zeros((*lead, nq * bs, nk * bs), dtype=bool)
    padded[..., :sq, :sk] = pairs
    return padded.reshape(*lead, nq, bs, nk, bs).any(axis=(-3, -1))


def _block_means(x: np.ndarray, bs: int) -> np.ndarray:
    """[.., S, D] -> [.., nBlocks, D], mean over the rows each block holds (non-finite as 0)."""
    x = np.where(np.isfinite(x), x, 0.0)
    s = x.shape[-2]
    return np.stack([x[..., i : i + bs, :].mean(axis=-2) for i in range(0, s, bs)], axis=-2)


def _forced_blocks(sq: int, sk: int, a: SparseAttentionAttributes) -> np.ndarray:
    """[nQ, nK] bool: global and local-window blocks."""
    bs = a.block_size
    nq, nk = -(-sq // bs), -(-sk // bs)
    forced = np.zeros((nq, nk), dtype=bool)
    key_start = np.arange(nk) * bs
    key_end = np.minimum(key_start + bs, sk) - 1
    forced[:, key_start < a.global_tokens] = True
    for qb in range(nq):
        if qb * bs < a.global_tokens:
            forced[qb, :] = True
        if a.local_window > 0:
            first = qb * bs + (sk - sq)
            last = min(qb * bs + bs, sq) - 1 + (sk - sq)
            near = (key_end >= first - a.local_window) & (key_start <= last + a.local_window)
            forced[qb, near] = True
    return forced


def _block_centre_bias(attn_bias: np.ndarray | None, shape, bs: int) -> np.ndarray:
    """[B|1, H|1, nQ, nK]: attn_bias at each block pair's centre element (non-finite as 0)."""
    if attn_bias is None:
        return np.zeros((1, 1, 1, 1))
    *_, sq, sk = shape
    rows = [(i + min(i + bs, sq) - 1) // 2 for i in range(0, sq, bs)]
    cols = [(j + min(j + bs, sk) - 1) // 2 for j in range(0, sk, bs)]
    full = np.broadcast_to(attn_bias.reshape((1,) * (4 - attn_bias.ndim) + attn_bias.shape), shape)
    centre = full[:, :, rows][:, :, :, cols].astype(np.float64)
    return np.where(np.isfinite(centre), centre, 0.0)


def select_blocks(
    q: np.ndarray,
    k: np.ndarray,
    allowed: np.ndarray,
    a: SparseAttentionAttributes,
    attn_bias: np.ndarray | None = None,
) -> np.ndarray:
    """[B, Hq, nQ, nK] bool: the key blocks each query block computes."""
    sq, sk = q.shape[2], k.shape[2]
    if sk < a.min_seq_len:
        return allowed.copy()
    bs = a.block_size
    group = q.shape[1] // k.shape[1]
    scale = a.scale or 1.0 / math.sqrt(q.shape[-1])
    q_mean = _block_means(q.astype(np.float64), bs)
    k_mean = np.repeat(_block_means(k.astype(np.float64), bs), group, axis=1)
    keys_per_block = np.minimum(bs, sk - np.arange(0, sk, bs))
    estimate = scale * q_mean @ np.swapaxes(k_mean, -1, -2) + np.log(keys_per_block)
    estimate = estimate + _block_centre_bias(attn_bias, (*q.shape[:3], sk), bs)
    forced = _forced_blocks(sq, sk, a) & allowed
    selected = forced.copy()
    for idx in np.ndindex(*allowed.shape[:3]):
        candidates = np.flatnonzero(allowed[idx] & ~forced[idx])
        if candidates.size == 0:
            continue
        score = np.where(np.isnan(estimate[idx][candidates]), -np.inf, estimate[idx][candidates])
        mass = np.exp(score - score.max()) if np.isfinite(score.max()) else np.ones(score.size)
        mass /= mass.sum()
        # the tolerance keeps float32 attribute rounding from adding a block (0.1 * 30)
        cap = max(1, math.ceil(a.max_density * allowed[idx].sum() - 1e-4))
        budget = cap - forced[idx].sum()
        cumulative = 0.0
        for i in np.argsort(-mass, kind="stable")[: max(budget, 0)]:
            if cumulative >= a.threshold:
                break
            selected[idx][candidates[i]] = True
            cumulative += mass[i]
    return selected


def _weighted_values(weights: np.ndarray, weighs: np.ndarray, v: np.ndarray) -> np.ndarray:
    """sum over j of weights[.., i, j] * v[.., j, :], over the pairs with a score (`weighs`)
    only: a value row that a row does not attend is not read (0 * NaN would be NaN)."""
    if np.isfinite(v).all():
        return weights @ v  # the other pairs weigh 0: the same sums
    out = np.empty(weights.shape[:-1] + v.shape[-1:])
    for idx in np.ndindex(*weights.shape[:-1]):
        out[idx] = weights[idx][weighs[idx]] @ v[idx[:-1]][weighs[idx]]
    return out


def sparse_attention(
    query: np.ndarray,
    key: np.ndarray,
    value: np.ndarray,
    attn_mask: np.ndarray | None = None,
    attn_bias: np.ndarray | None = None,
    *,
    selected: np.ndarray | None = None,
    **attributes,
) -> tuple[np.ndarray, np.ndarray]:
    """Reference ai.tfsa::SparseAttention: returns (Y [B,Hq,Sq,Dv], density [B,Hq] float32).

    `selected` ([B, Hq, nQ, nK] bool) replaces the selection: a kernel's own block choice, to
    check its math apart from its selection.
    """
    b, hq, sq, d = query.shape
    hkv, sk = key.shape[1], key.shape[2]
    a = effective(SparseAttentionAttributes(**attributes), sq, sk)
    bias, may_attend = _attendable(attn_mask, (b, hq, sq, sk), bool(a.is_causal))
    allowed = _block_any(may_attend, a.block_size)
    if selected is None:
        selected = select_blocks(query, key, allowed, a, attn_bias)
    if attn_bias is not None:  # summed in float32, as the kernels do
        with np.errstate(invalid="ignore", over="ignore"):
            bias = (
                bias.astype(np.float32) + np.broadcast_to(attn_bias, bias.shape).astype(np.float32)
            ).astype(np.float64)

    bs = a.block_size
    in_selected = np.repeat(np.repeat(selected, bs, axis=2), bs, axis=3)[:, :, :sq, :sk]
    scale = a.scale or 1.0 / math.sqrt(d)
    k = np.repeat(key.astype(np.float64), hq // hkv, axis=1)
    v = np.repeat(value.astype(np.float64), hq // hkv, axis=1)
    counts = in_selected & may_attend & (bias != -np.inf)  # the pairs that count; the others are never read
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        scores = np.where(counts, scale * query.astype(np.float64) @ np.swapaxes(k, -1, -2) + bias, -np.inf)
        row_max = scores.max(axis=-1, keepdims=True)
        row_max = np.where(np.isneginf(row_max), 0.0, row_max)
        weights = np.exp(scores - row_max)
        total = weights.sum(axis=-1, keepdims=True)
        y = np.where(
            total > 0, _weighted_values(weights, scores != -np.inf, v) / np.where(total > 0, total, 1.0), 0.0
        )
    y = np.where(np.isnan(total), np.nan, y)

    allowed_pairs = allowed.sum(axis=(2, 3))
    density = np.where(allowed_pairs > 0, selected.sum(axis=(2, 3)) / np.maximum(allowed_pairs, 1), 1.0)
    return y.astype(query.dtype), density.astype(np.float32)
