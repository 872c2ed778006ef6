"""Executable specification of ai.tfsa::SparseAttention, in numpy.

The C++ and CUDA kernels must agree with this file. It favours clarity over speed:
everything is materialised at [B, H, Sq, Sk].

Selection (which key blocks a query block computes), per (batch, head, query block):
  1. allowed: key blocks holding at least one key that causality, the sliding window and
     the mask let some query of the block see.
  2. forced: allowed blocks holding a global token (key index < global_tokens) or
     touching the local window (|key - query position| <= local_window, W > 0).
     Query blocks holding a global query (index < global_tokens) take every allowed block;
     with query_positions 1 the queries are the last Sq key positions (a KV-cache call) and a
     query's position i + Sk - Sq is what is compared.
  3. estimate: the other allowed blocks (candidates) get an estimated mass, and are added
     heaviest first until their cumulative mass reaches `threshold` or the block count
     reaches ceil(max_density * allowed) (forced blocks count against the cap, but are kept
     even when they alone exceed it). The mass, by `estimate` (ESTIMATES):
       0 "mean":  softmax over the candidates of scale * mean(Q block) . mean(K block)
                  + log(keys in block) + the attn_bias at the block pair's centre element
                  (row (first + last) // 2 of the query block, the same of the key block;
                  non-finite as 0);
       1 "antidiagonal": the probabilities of 1 pair in `estimate_stride`: the pairs
                  (i, j) with (i + j + 1) % estimate_stride == 0 (the antidiagonals of
                  stride x stride tiles, as XAttention scores them), in allowed blocks and
                  within the horizon (causality, window_ahead; the mask's values are not
                  read), the sliding window's side only through the allowed blocks; each row's
                  softmax over its sampled pairs, summed into blocks, then each candidate's
                  share of the candidates' total (equal shares when it is 0). The sampled
                  scores take bf16 operands: scale * q_i (in float32, non-finite as 0) and
                  k_j rounded to bfloat16 (to_bf16), products summed in float32 or better;
       2 "token": each query row's softmax over the candidates of scale * q_i . mean(K block)
                  + log(keys in block), averaged over the block's rows.
     (The token and antidiagonal estimates do not read attn_bias.) With softcap c > 0 every
     estimate caps its scores as the math does, before anything is added: the mean and token
     estimates' scale * mean(Q block) . mean(K block) and scale * q_i . mean(K block) become
     c * tanh(. / c) before the log(keys) and centre-bias terms, and the antidiagonal's sampled
     pairs are exact capped probabilities.
  Per-head budgets: with head_thresholds (one value per query head), query head h uses
  head_thresholds[h] as its threshold. A head whose threshold is 0 adds no candidate: it
  computes its forced blocks alone (a streaming head; the kernels skip its estimate).
  Grouped-query attention (group_selection, GROUP_SELECTIONS; G = Hq / Hkv query heads share a
  key/value head): "head" selects per query head as above. "union": every head selects as
  above, and each head of a group computes the union of its group's picks (within its own
  allowed blocks). "shared": one selection per group, from the group's mean query: row by row,
  the heads' scaled query rows (float32 scale * q, non-finite as 0) summed in head order in
  float32 and divided by G in float32, then steps 1-3 as for one head with scale 1, over the
  blocks some head of the group may attend, at the largest of the group's thresholds, the mean
  estimate adding the mean of the heads' centre biases; each head computes the group's blocks
  within its own allowed ones. With G = 1 all three are the same.
  Below min_seq_len keys, every allowed block is computed.
Math: exactly softmax(cap(scale * Q K^T) + mask + attn_bias) V over the selected blocks, the
rest -inf, where cap(x) = softcap * tanh(x / softcap) when softcap > 0 (Gemma 2's logit
softcapping, on the scaled scores, before mask and bias) and x itself when it is 0; causality
(key j <= p for the query at position p = i + Sk - Sq) and the sliding window (j > p -
sliding_window when it is > 0; j <= p + window_ahead when that is >= 0: together the band
p - W < j <= p + A of a bidirectional local layer) hide pairs as the mask does; rows with
nothing to attend give zeros. compute_precision "bf16": scale * Q (in float32), K, V and the unnormalised
probabilities P = exp(score - row max) are rounded to bfloat16 before the products, to nearest
even; the softmax's sums and the accumulation stay float32.

attn_bias (optional, [B|1, H|1, Sq, Sk] broadcast like the mask, float32 or the query's type):
an additive score bias (relative position, ALiBi) kept apart from the mask. It is read only
inside the blocks computed (and at one element per block pair, for the estimate): it never
decides which blocks are allowed and is not in the density's denominator. Mask and bias add up
in float32; a pair whose sum is -inf is hidden like a masked pair (its score -inf whatever its
dot), so a -inf in the bias hides a pair without closing its block.

Attribute bounds (contract.h enforces the same; out of range is an error): block_size in [1,
BLOCK_SIZE_MAX]; global_tokens, local_window, min_seq_len, sliding_window in [0, TOKENS_MAX];
window_ahead in [-1, TOKENS_MAX] (-1: no limit); threshold and each head_thresholds value in
[0, 1] (at most HEAD_THRESHOLDS_MAX values, and a call must have exactly one per query head when
any are given); max_density in (0, 1]; scale and softcap finite and >= 0; is_causal and
query_positions 0 or 1; estimate an index of ESTIMATES; estimate_stride in [1,
ESTIMATE_STRIDE_MAX]. threshold 1 leaves the max_density cap alone (blocks of zero estimated mass
are taken too). block_size, global_tokens, local_window, sliding_window and window_ahead are cut
to the longer sequence (`effective`), which changes no result: the kernels never size
memory or index blocks by the raw values.

NaN and infinity. A pair (i, j) counts for row i when its block is selected, causality and the
mask let i see j (a NaN or +inf mask value lets it: only -inf / false hide a pair), and mask +
bias is not -inf. Its score is cap(scale * q_i . k_j) + mask_ij + bias_ij (an infinite product
capped to +-softcap when softcap > 0); every other pair has score -inf. A pair whose score is
-inf carries no weight and is never read: neither its key nor its value nor its mask or bias
value can reach row i. So NaN in q_i, or in the key, value, mask or bias value of a pair that
counts (and +inf scores, through inf - inf), makes row i NaN, as dense attention would;
nothing else does. The selection is not steered by them: non-finite query and key elements
count as 0 in the block means and in the rows and keys the other estimates read, a NaN score
ranks below every other candidate with zero mass, and when the largest score (of a block, of a
row for "token" and "antidiagonal") is not finite the candidates (the row's sampled pairs)
weigh the same.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

import numpy as np

BLOCK_SIZE_MAX = 1_048_576  # contract.h kBlockSizeMax
TOKENS_MAX = 2_147_483_647  # contract.h kTokensMax: global_tokens, local_window, min_seq_len
ESTIMATES = ("mean", "antidiagonal", "token")  # contract.h TfsaEstimate, in its order
ESTIMATE_STRIDE_MAX = 1024  # contract.h kEstimateStrideMax
COMPUTE_PRECISIONS = ("float32", "bf16")  # contract.h TfsaComputePrecision, in its order
GROUP_SELECTIONS = ("head", "union", "shared")  # contract.h TfsaGroupSelection, in its order
HEAD_THRESHOLDS_MAX = 256  # contract.h TFSA_HEAD_THRESHOLDS_MAX: the most values head_thresholds holds


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
    sliding_window: int = 0  # W > 0: no key before position p - W + 1 (a mask rule, not selection)
    estimate: int = 0  # an index of ESTIMATES
    estimate_stride: int = 16  # the antidiagonal estimate samples 1 pair in this many
    query_positions: int = 0  # 1: queries are the last Sq key positions (global rule counts them)
    # c > 0: scores scale * q . k become c * tanh(score / c) before mask and bias (Gemma 2); 0: none
    softcap: float = 0.0
    # compute precision (an index of COMPUTE_PRECISIONS): 1 rounds the scaled Q, K, V and P to bf16
    compute_precision: int = 0
    # Per-head budgets: empty, or one threshold per query head (used instead of `threshold`;
    # 0 makes a streaming head: its forced blocks only). At most HEAD_THRESHOLDS_MAX values.
    head_thresholds: tuple[float, ...] = ()
    # grouped-query attention (an index of GROUP_SELECTIONS): per query head, the union of a KV
    # group's picks, or one estimate shared by the group
    group_selection: int = 0
    # A >= 0: no key after position p + A (sliding_window's other side: a two-sided band); -1: none
    window_ahead: int = -1

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def capped(cls, max_density: float, **settings: int) -> SparseAttentionAttributes:
        """Blocks chosen by the estimate under the max_density cap alone (no global, local,
        threshold or min_seq_len), the other settings (is_causal, block_size, estimate, ...)
        as given: the setting the kernel benchmarks time."""
        alone = dict(global_tokens=0, local_window=0, threshold=1.0, min_seq_len=0)
        return cls(**alone, max_density=max_density, **settings)


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
    "sliding_window": (0, TOKENS_MAX, False),
    "estimate": (0, len(ESTIMATES) - 1, False),
    "estimate_stride": (1, ESTIMATE_STRIDE_MAX, False),
    "query_positions": (0, 1, False),
    "softcap": (0.0, math.inf, False),
    "compute_precision": (0, len(COMPUTE_PRECISIONS) - 1, False),
    "head_thresholds": (0.0, 1.0, False),  # each value; a list of up to HEAD_THRESHOLDS_MAX
    "group_selection": (0, len(GROUP_SELECTIONS) - 1, False),
    "window_ahead": (-1, TOKENS_MAX, False),
}


def effective(a: SparseAttentionAttributes, sq: int, sk: int) -> SparseAttentionAttributes:
    """block_size, global_tokens, local_window, sliding_window, window_ahead cut to the longer
    sequence: the same result.

    A block of at least both lengths is one query and one key block; global tokens past both
    lengths cover everything anyway; query positions lie in [sk - sq, sk - 1], so a window of
    the longer length already reaches every key."""
    longest = max(1, sq, sk)
    return replace(
        a,
        block_size=min(a.block_size, longest),
        global_tokens=min(a.global_tokens, longest),
        local_window=min(a.local_window, longest),
        sliding_window=min(a.sliding_window, longest),
        window_ahead=min(a.window_ahead, longest),
    )


def _attendable(
    mask, shape, is_causal: bool, window: int = 0, ahead: int = -1
) -> tuple[np.ndarray, np.ndarray]:
    """Additive mask [B,H,Sq,Sk] (float64) and the boolean 'may attend' of each pair (query i
    at position p = i + Sk - Sq; a window W > 0 hides keys before p - W + 1, ahead A >= 0 keys
    after p + A)."""
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
    if window > 0:
        i = np.arange(sq)[:, None]
        j = np.arange(sk)[None, :]
        bias = np.where(j > i + (sk - sq) - window, bias, -np.inf)
    if ahead >= 0:
        i = np.arange(sq)[:, None]
        j = np.arange(sk)[None, :]
        bias = np.where(j <= i + (sk - sq) + ahead, bias, -np.inf)
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


def _forced_blocks(sq: int, sk: int, a: SparseAttentionAttributes, query_offset: int = 0) -> np.ndarray:
    """[nQ, nK] bool: global and local-window blocks (query i counts as global when
    i + query_offset < global_tokens)."""
    bs = a.block_size
    nq, nk = -(-sq // bs), -(-sk // bs)
    forced = np.zeros((nq, nk), dtype=bool)
    key_start = np.arange(nk) * bs
    key_end = np.minimum(key_start + bs, sk) - 1
    forced[:, key_start < a.global_tokens] = True
    for qb in range(nq):
        if qb * bs + query_offset < a.global_tokens:
            forced[qb, :] = True
        if a.local_window > 0:
            first = qb * bs + (sk - sq)
            last = min(qb * bs + bs, sq) - 1 + (sk - sq)
            near = (key_end >= first - a.local_window) & (key_start <= last + a.local_window)
            forced[qb, near] = True
    return forced


def _capped(score: np.ndarray, softcap: float) -> np.ndarray:
    """softcap * tanh(score / softcap) when softcap > 0 (NaN stays NaN, +-inf gives +-softcap)."""
    return softcap * np.tanh(score / softcap) if softcap > 0 else score


def _softmax(score: np.ndarray) -> np.ndarray:
    """Softmax over the last axis; NaN weighs 0; equal weights where the largest is not finite."""
    score = np.where(np.isnan(score), -np.inf, score)
    best = score.max(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", over="ignore"):
        weight = np.where(np.isfinite(best), np.exp(score - best), 1.0)
    return weight / weight.sum(axis=-1, keepdims=True)


def _sampled_softmax(score: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Each row's softmax over its `keep` entries (NaN weighs 0; equal weights where the best
    is not finite); a row with no such entry weighs nothing."""
    keep = keep & ~np.isnan(score)
    score = np.where(keep, score, -np.inf)
    best = score.max(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", over="ignore"):
        weight = np.where(np.isfinite(best), np.exp(score - best), keep * 1.0)
    total = weight.sum(axis=-1, keepdims=True)
    return weight / np.where(total > 0, total, 1.0)


def _antidiagonal_mass(q_rows, first_row, keys, allowed, a, scale, sq) -> np.ndarray:
    """[nK] block mass from the pairs (i, j) with (i + j + 1) % estimate_stride == 0 (the
    antidiagonals of stride x stride tiles), in allowed blocks and within the horizon (causal,
    window_ahead):
    each row's softmax over its sampled pairs, summed over the block's rows and keys."""
    sk, stride = keys.shape[0], a.estimate_stride
    i = np.arange(first_row, first_row + q_rows.shape[0])[:, None]
    j = np.arange(sk)[None, :]
    keep = ((i + j + 1) % stride == 0) & np.repeat(allowed, a.block_size)[None, :sk]
    if a.is_causal:
        keep &= j <= i + (sk - sq)
    if a.window_ahead >= 0:
        keep &= j <= i + (sk - sq) + a.window_ahead
    with np.errstate(invalid="ignore", over="ignore"):
        # bf16 operands (it only ranks blocks): scale * q in float32 (non-finite as 0), k, rounded
        scaled = np.float32(scale) * q_rows.astype(np.float32)
        rows = _operand(np.where(np.isfinite(scaled), scaled, np.float32(0)), True)
        score = rows @ _operand(keys, True).T
        weight = _sampled_softmax(_capped(score, a.softcap), keep).sum(axis=0)
    padded = np.zeros(allowed.size * a.block_size)
    padded[:sk] = weight
    return padded.reshape(allowed.size, a.block_size).sum(axis=1)


def _candidate_mass(q, k, k_mean, idx, allowed, candidates, a, scale, centre) -> np.ndarray:
    """[candidates] estimated share of the mass (sums to 1) for query block idx = (b, h, qb).
    q and k are finite (non-finite elements as 0); centre [nK]: the bias the mean estimate adds."""
    bs, sq = a.block_size, q.shape[2]
    rows = q[idx[0], idx[1], idx[2] * bs : (idx[2] + 1) * bs]
    sk = k.shape[2]
    log_keys = np.log(np.minimum(bs, sk - candidates * bs))
    means = k_mean[idx[0], idx[1] // (q.shape[1] // k.shape[1]), candidates]
    name = ESTIMATES[a.estimate]
    if name == "mean":
        pooled = _capped(scale * rows.mean(axis=0) @ means.T, a.softcap)
        return _softmax(pooled + log_keys + centre[candidates])
    if name == "token":
        return _softmax(_capped(scale * rows @ means.T, a.softcap) + log_keys).mean(axis=0)
    keys = k[idx[0], idx[1] // (q.shape[1] // k.shape[1])]
    mass = _antidiagonal_mass(rows, idx[2] * bs, keys, allowed, a, scale, sq)[candidates]
    total = mass.sum()
    return mass / total if total > 0 else np.full(candidates.size, 1.0 / candidates.size)


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
    query_offset: int = 0,
    attn_bias: np.ndarray | None = None,
) -> np.ndarray:
    """[B, Hq, nQ, nK] bool: the key blocks each query block computes."""
    sq, sk = q.shape[2], k.shape[2]
    if sk < a.min_seq_len:
        return allowed.copy()
    scale = a.scale or 1.0 / math.sqrt(q.shape[-1])
    centre = _block_centre_bias(attn_bias, (*q.shape[:3], sk), a.block_size)
    group = q.shape[1] // k.shape[1]
    mode = GROUP_SELECTIONS[a.group_selection]
    if group == 1 or mode == "head":
        return _select_per_head(q, k, allowed, a, query_offset, np.broadcast_to(centre, allowed.shape), scale)
    b, hkv, nq, nk = allowed.shape[0], k.shape[1], allowed.shape[2], allowed.shape[3]
    if mode == "union":
        picks = _select_per_head(
            q, k, allowed, a, query_offset, np.broadcast_to(centre, allowed.shape), scale
        )
        chosen = picks.reshape(b, hkv, group, nq, nk).any(axis=2)
    else:  # shared: the group's mean query, at the group's largest threshold
        with np.errstate(invalid="ignore", over="ignore"):
            scaled = np.float32(scale) * q.astype(np.float32)
        scaled = np.where(np.isfinite(scaled), scaled, np.float32(0)).reshape(b, hkv, group, sq, -1)
        pooled = scaled[:, :, 0].copy()
        for head in range(1, group):  # in head order, in float32
            pooled += scaled[:, :, head]
        pooled /= np.float32(group)
        group_allowed = allowed.reshape(b, hkv, group, nq, nk).any(axis=2)
        thresholds = a.head_thresholds
        if thresholds:
            thresholds = tuple(
                max(np.float32(t) for t in thresholds[g * group : (g + 1) * group]) for g in range(hkv)
            )
        heads = np.broadcast_to(centre, (centre.shape[0], q.shape[1], nq, nk)).astype(np.float64)
        pooled_centre = np.broadcast_to(
            heads.reshape(heads.shape[0], hkv, group, nq, nk).mean(axis=2), group_allowed.shape
        )
        shared = replace(a, head_thresholds=thresholds, group_selection=0)
        chosen = _select_per_head(pooled, k, group_allowed, shared, query_offset, pooled_centre, 1.0)
    return np.repeat(chosen, group, axis=1) & allowed


def _select_per_head(q, k, allowed, a, query_offset, centre, scale) -> np.ndarray:
    """select_blocks for each query head on its own; centre [B, Hq, nQ, nK]: the centre biases."""
    sq, sk = q.shape[2], k.shape[2]
    q = np.where(np.isfinite(q), q, 0.0).astype(np.float64)
    k = np.where(np.isfinite(k), k, 0.0).astype(np.float64)
    k_mean = _block_means(k, a.block_size)
    forced = _forced_blocks(sq, sk, a, query_offset) & allowed
    selected = forced.copy()
    for idx in np.ndindex(*allowed.shape[:3]):
        # the head's threshold, an ONNX float attribute as the kernels read it
        threshold = float(np.float32(a.head_thresholds[idx[1]] if a.head_thresholds else a.threshold))
        candidates = np.flatnonzero(allowed[idx] & ~forced[idx])
        if candidates.size == 0:
            continue
        mass = _candidate_mass(q, k, k_mean, idx, allowed[idx], candidates, a, scale, centre[idx])
        # the tolerance keeps float32 attribute rounding from adding a block (0.1 * 30)
        cap = max(1, math.ceil(a.max_density * allowed[idx].sum() - 1e-4))
        budget = cap - forced[idx].sum()
        cumulative = 0.0
        for i in np.argsort(-mass, kind="stable")[: max(budget, 0)]:
            if threshold < 1.0 and cumulative >= threshold:  # threshold 1: the cap alone
                break
            selected[idx][candidates[i]] = True
            cumulative += mass[i]
    return selected


def to_bf16(x: np.ndarray) -> np.ndarray:
    """x rounded to bfloat16 (round to nearest, ties to even), as float32; NaN stays NaN."""
    bits = np.asarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & 1)) & np.uint32(0xFFFF0000)).astype(np.uint32)
    return np.where(np.isnan(x), np.float32(np.nan), rounded.view(np.float32))


def _operand(x: np.ndarray, bf16: bool) -> np.ndarray:
    """A product's operand in float64: the values themselves, or rounded to bf16 (float32 first)."""
    return (to_bf16(x.astype(np.float32)) if bf16 else x).astype(np.float64)


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
    query_offset: int = 0,
    **attributes,
) -> tuple[np.ndarray, np.ndarray]:
    """Reference ai.tfsa::SparseAttention: returns (Y [B,Hq,Sq,Dv], density [B,Hq] float32).

    `selected` ([B, Hq, nQ, nK] bool) replaces the selection: a kernel's own block choice, to
    check its math apart from its selection. `query_offset` is added to query indices for the
    global-token rule (SparseGroupQueryAttention counts absolute positions).
    """
    b, hq, sq, d = query.shape
    hkv, sk = key.shape[1], key.shape[2]
    a = effective(SparseAttentionAttributes(**attributes), sq, sk)
    if a.head_thresholds and len(a.head_thresholds) != hq:
        raise ValueError(f"head_thresholds gives {len(a.head_thresholds)} thresholds for {hq} query heads")
    bias, may_attend = _attendable(
        attn_mask, (b, hq, sq, sk), bool(a.is_causal), a.sliding_window, a.window_ahead
    )
    allowed = _block_any(may_attend, a.block_size)
    if selected is None:
        offset = query_offset + (sk - sq if a.query_positions else 0)
        selected = select_blocks(query, key, allowed, a, offset, attn_bias)
    if attn_bias is not None:  # summed in float32, as the kernels do
        with np.errstate(invalid="ignore", over="ignore"):
            bias = (
                bias.astype(np.float32) + np.broadcast_to(attn_bias, bias.shape).astype(np.float32)
            ).astype(np.float64)

    bs = a.block_size
    in_selected = np.repeat(np.repeat(selected, bs, axis=2), bs, axis=3)[:, :, :sq, :sk]
    scale = a.scale or 1.0 / math.sqrt(d)
    bf16 = COMPUTE_PRECISIONS[a.compute_precision] == "bf16"
    k = np.repeat(_operand(key, bf16), hq // hkv, axis=1)
    v = np.repeat(_operand(value, bf16), hq // hkv, axis=1)
    counts = in_selected & may_attend & (bias != -np.inf)  # the pairs that count; the others are never read
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        # bf16: the query is scaled in float32 and then rounded, as the kernel scales it once
        scaled = np.float32(scale) * query.astype(np.float32)
        q = _operand(scaled, True) if bf16 else scale * query.astype(np.float64)
        scores = np.where(counts, _capped(q @ np.swapaxes(k, -1, -2), a.softcap) + bias, -np.inf)
        row_max = scores.max(axis=-1, keepdims=True)
        row_max = np.where(np.isneginf(row_max), 0.0, row_max)
        weights = np.exp(scores - row_max)
        total = weights.sum(axis=-1, keepdims=True)  # float32 softmax: the sum of unrounded weights
        products = _operand(weights, True) if bf16 else weights
        y = np.where(
            total > 0, _weighted_values(products, scores != -np.inf, v) / np.where(total > 0, total, 1.0), 0.0
        )
    y = np.where(np.isnan(total), np.nan, y)

    allowed_pairs = allowed.sum(axis=(2, 3))
    density = np.where(allowed_pairs > 0, selected.sum(axis=(2, 3)) / np.maximum(allowed_pairs, 1), 1.0)
    return y.astype(query.dtype), density.astype(np.float32)


HEADS_MAX = 65_536  # contract.h kHeadsMax


@dataclass(frozen=True)
class GroupQueryAttentionAttributes:
    """SparseGroupQueryAttention's attributes from com.microsoft.GroupQueryAttention, in the
    order of contract.h TfsaGqaAttributes (tests/test_gqa_op.py checks them against the
    library's tfsa_gqa_attribute_info); its other attributes are SparseAttentionAttributes'
    but is_causal (always 1). num_heads and kv_num_heads are required (0: absent)."""

    num_heads: int = 0
    kv_num_heads: int = 0
    local_window_size: int = -1  # a query at position p sees the w keys (p - w, p]; -1: all
    do_rotary: int = 0
    rotary_interleaved: int = 0
    softcap: float = 0.0  # c > 0: SparseAttention's softcap (scores capped to c * tanh(s / c))

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


GQA_ATTRIBUTE_BOUNDS: dict[str, tuple[float, float, bool]] = {
    "num_heads": (1, HEADS_MAX, False),
    "kv_num_heads": (1, HEADS_MAX, False),
    "local_window_size": (-1, TOKENS_MAX, False),
    "do_rotary": (0, 1, False),
    "rotary_interleaved": (0, 1, False),
    "softcap": (0.0, math.inf, False),
}


def rotary(
    x: np.ndarray, positions: np.ndarray, cos: np.ndarray, sin: np.ndarray, interleaved: bool
) -> np.ndarray:
    """x [.., S, D] rotated at positions [S] (cos/sin [max_pos, R/2]): pairs (c, c + R/2), or
    (2c, 2c + 1) when interleaved, for c < R/2; columns past R unchanged."""
    half = cos.shape[1]
    c, s = cos[positions].astype(np.float32), sin[positions].astype(np.float32)
    out = x.astype(np.float32)
    i = np.arange(half) * 2 if interleaved else np.arange(half)
    j = i + 1 if interleaved else i + half
    xi, xj = out[..., i].copy(), out[..., j].copy()
    out[..., i], out[..., j] = xi * c - xj * s, xj * c + xi * s
    return out.astype(x.dtype)


def _window_mask(rows: int, first_position: int, keys: int, window: int) -> np.ndarray | None:
    """[rows, keys] bool: key j visible to row r at position p = first_position + r (j > p - w);
    w = 0 hides every key (ORT's GroupQueryAttention outputs zeros then)."""
    if window < 0:
        return None
    positions = first_position + np.arange(rows)[:, None]
    return np.arange(keys)[None, :] > positions - window


def group_query_attention(
    query: np.ndarray,
    key: np.ndarray | None,
    value: np.ndarray | None,
    past_key: np.ndarray | None,
    past_value: np.ndarray | None,
    seqlens_k: np.ndarray,
    total_sequence_length: int,
    cos_cache: np.ndarray | None = None,
    sin_cache: np.ndarray | None = None,
    shared_buffer: bool = False,
    return_density: bool = False,
    **attributes,
) -> tuple[np.ndarray, ...]:
    """Reference ai.tfsa::SparseGroupQueryAttention: (output [B,S,Hq*D], present_key,
    present_value [B,Hkv,T,D]), as ORT's GroupQueryAttention on its CPU: new rows rotated at
    their absolute positions (past + s; past = 0 on a prompt, S == total_sequence_length, else
    seqlens_k + 1 - S), present = past rows ++ new rows (zeros after, or the buffer's old rows
    when `shared_buffer`), then per batch row sparse_attention over its cache, causal, with the
    window; on a prompt, padded rows past a row's length see all its keys. Steps with one row or
    fewer than min_seq_len are dense. With return_density, also density [B, Hq]: that of each
    row's own rows (its padded rows are dense and do not count)."""
    names = GroupQueryAttentionAttributes.names()
    g = GroupQueryAttentionAttributes(**{k: v for k, v in attributes.items() if k in names})
    sparsity = {k: v for k, v in attributes.items() if k not in names}
    sparsity |= {"is_causal": 1, "softcap": g.softcap}
    b, s, hidden = query.shape
    hq, hkv = g.num_heads, g.kv_num_heads
    d = hidden // (hq + (2 * hkv if key is None else 0))
    heads = query.reshape(b, s, -1, d).transpose(0, 2, 1, 3)  # [B, heads, S, D]
    q = heads[:, :hq]
    k = heads[:, hq : hq + hkv] if key is None else key.reshape(b, s, hkv, d).transpose(0, 2, 1, 3)
    v = heads[:, hq + hkv :] if key is None else value.reshape(b, s, hkv, d).transpose(0, 2, 1, 3)
    cache = 0 if past_key is None else past_key.shape[2]
    rows = max(total_sequence_length, cache)
    present_k = past_key.copy() if shared_buffer else np.zeros((b, hkv, rows, d), query.dtype)
    present_v = past_value.copy() if shared_buffer else np.zeros((b, hkv, rows, d), query.dtype)
    output = np.zeros((b, s, hq * d), query.dtype)
    density = np.ones((b, hq), np.float32)
    prompt = s == total_sequence_length
    if s == 1 or s < SparseAttentionAttributes(**sparsity).min_seq_len:
        sparsity |= {"threshold": 1.0, "max_density": 1.0, "head_thresholds": ()}
    for row in range(b):
        total = int(seqlens_k[row]) + 1
        past = 0 if prompt else total - s
        positions = past + np.arange(s)
        qr, kr = q[row], k[row]
        if g.do_rotary:
            qr = rotary(qr, positions, cos_cache, sin_cache, bool(g.rotary_interleaved))
            kr = rotary(kr, positions, cos_cache, sin_cache, bool(g.rotary_interleaved))
        if not shared_buffer and past > 0:
            present_k[row, :, :past], present_v[row, :, :past] = (
                past_key[row, :, :past],
                past_value[row, :, :past],
            )
        present_k[row, :, past : past + s], present_v[row, :, past : past + s] = kr, v[row]
        keys, values = present_k[row : row + 1, :, :total], present_v[row : row + 1, :, :total]
        valid = min(s, total) if prompt else s
        mask = _window_mask(valid, total - valid, total, g.local_window_size)
        y, density[row] = sparse_attention(
            qr[None, :, :valid], keys, values, mask, query_offset=total - valid, **sparsity
        )
        output[row, :valid] = y[0].transpose(1, 0, 2).reshape(valid, hq * d)
        if valid < s:  # right padding of a prompt: every key of the row, the window from its position
            mask = _window_mask(s - valid, total, total, g.local_window_size)
            dense = sparsity | {"is_causal": 0, "threshold": 1.0, "max_density": 1.0, "head_thresholds": ()}
            y, _ = sparse_attention(qr[None, :, valid:], keys, values, mask, **dense)
            output[row, valid:] = y[0].transpose(1, 0, 2).reshape(s - valid, hq * d)
    return (output, present_k, present_v, density) if return_density else (output, present_k, present_v)
