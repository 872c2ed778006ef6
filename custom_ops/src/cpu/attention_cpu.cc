#include "attention_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "bf16_math.h"
#include "block_math.h"
#include "convert.h"
#include "exact_rows.h"
#include "pack.h"
#include "selection.h"
#include "tile_walk.h"
#include "tfsa/ort_api.h"

namespace tfsa::cpu {
namespace {

template <class T>
inline T FromFloat(float x) {
  return T(x);  // Float16_t / BFloat16_t have explicit float constructors
}

// std::isfinite as an integer test the compiler vectorises (a float comparison in a select
// is not if-converted, as it may trap): the exponent bits are all ones only for NaN and +-inf.
inline bool Finite(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return (bits & 0x7f800000u) != 0x7f800000u;
}

// Key block kb's mean (for the estimate), transposed: means_t[x, kb]. Non-finite elements
// count as 0, so that a NaN key does not steer the selection (reference.py).
template <class T>
void KeyBlockMean(const Problem& p, const T* k_head, int64_t kb, float* means_t, int64_t means_pad) {
  const Dims& d = p.dims;
  thread_local std::vector<float> sum;  // float sums over <= block rows: ample for an estimate
  sum.assign(d.head_dim, 0.0f);
  const int64_t k_begin = p.grid.KeyBegin(kb), keys = p.grid.KeyEnd(kb) - k_begin;
  for (int64_t j = 0; j < keys; ++j)
    for (int64_t x = 0; x < d.head_dim; ++x) {
      const float value = ToFloat(k_head[(k_begin + j) * d.head_dim + x]);
      sum[x] += Finite(value) ? value : 0.0f;
    }
  for (int64_t x = 0; x < d.head_dim; ++x) means_t[x * means_pad + kb] = sum[x] / static_cast<float>(keys);
}

// The means' columns past the last key block: zeros (the Scores kernel reads them).
void ZeroMeansPadding(const Problem& p, float* means_t, int64_t means_pad) {
  for (int64_t x = 0; x < p.dims.head_dim; ++x)
    std::fill(means_t + x * means_pad + p.grid.k_blocks, means_t + (x + 1) * means_pad, 0.0f);
}

// Key j as the antidiagonal estimate samples it: non-finite elements as 0, rounded to bf16;
// zeros past the last key.
template <class T>
void SampledRow(const Problem& p, const T* k_head, int64_t j, bool avx512, float* row) {
  const int64_t dim = p.dims.head_dim;
#if defined(TFSA_X86_KERNELS)
  if constexpr (std::is_same_v<T, float>)
    if (avx512 && j < p.grid.kv_len) return FiniteRoundedAvx512(k_head + j * dim, dim, 1.0f, row);
#endif
  (void)avx512;
  for (int64_t x = 0; x < dim; ++x) {
    const float value = j < p.grid.kv_len ? ToFloat(k_head[j * dim + x]) : 0.0f;
    row[x] = Finite(value) ? RoundedToBf16(value) : 0.0f;
  }
}

// Key j as bf16 pairs (SampledRow's values), dim / 2 words.
template <class T>
void SampledPairs(const Problem& p, const T* k_head, int64_t j, bool avx512, uint32_t* words) {
  const int64_t dim = p.dims.head_dim;
#if defined(TFSA_X86_KERNELS)
  if constexpr (std::is_same_v<T, float>)
    if (avx512 && j < p.grid.kv_len) return FiniteRoundedPairsAvx512(k_head + j * dim, dim, 1.0f, words);
#endif
  thread_local std::vector<float> row;
  row.resize(dim);
  SampledRow(p, k_head, j, avx512, row.data());
  for (int64_t pair = 0; pair < dim / 2; ++pair) words[pair] = RoundedPair(row[2 * pair], row[2 * pair + 1]);
}

// Chunk c of residue r as AMX pairs (packed.h SampledKt2: its columns of the residue's matrix)
// from the chunk's rows as pairs [chunk, dim / 2], transposed in 16 x 16 squares.
void StoreSampledPairs(const PackedKeysValues& out, int64_t bk, int64_t r, int64_t c, const uint32_t* words) {
#if defined(TFSA_X86_KERNELS)
  const int64_t pairs = out.head_dim / 2, width = out.chunks * out.chunk;
  uint32_t* kt2 = out.sampled2->data() + (bk * out.residues + r) * pairs * width + c * out.chunk;
  for (int64_t m = 0; m < out.chunk; m += 16)
    for (int64_t pair = 0; pair < pairs; pair += 16)
      Transpose16x16Avx512(words + m * pairs + pair, pairs, kt2 + pair * width + m, width);
#else
  (void)out, (void)bk, (void)r, (void)c, (void)words;  // sampled2 is set on x86 builds only
#endif
}

// The antidiagonal estimate's sampled keys of one kv head (packed.h SampledKt, or SampledKt2 on
// AMX), rounded to bf16. Chunk by chunk, the rows of every residue are read in key order into
// cache and then transposed (a residue's rows alone lie a stride apart: reading them so, or
// writing them straight to their chunk-sized stride, was slower).
template <class T>
void PackSampledKeys(const Problem& p, const T* k_head, int64_t bk, PackedKeysValues& out) {
  const int64_t stride = p.attrs.estimate_stride, dim = p.dims.head_dim, block = out.chunk * dim;
  thread_local std::vector<float> rows;
  thread_local std::vector<uint32_t> words;  // AMX: the rows as pairs
  // every residue's chunk at once when that fits in cache, else one residue at a time
  const int64_t together = out.residues * block * 4 <= (1 << 19) ? out.residues : 1;
  if (out.sampled2) words.resize(together * block / 2);
  else rows.resize(together * block);
  for (int64_t c = 0; c < out.chunks; ++c)
    for (int64_t r0 = 0; r0 < out.residues; r0 += together) {
      for (int64_t m = 0; m < out.chunk; ++m)  // in key order when together: j = (c chunk + m) stride + r
        for (int64_t r = r0; r < r0 + together; ++r) {
          const int64_t j = r + (c * out.chunk + m) * stride, at = (r - r0) * block + m * dim;
          if (out.sampled2) SampledPairs(p, k_head, j, out.gather_keys, words.data() + at / 2);
          else SampledRow(p, k_head, j, out.gather_keys, rows.data() + at);
        }
      for (int64_t r = r0; r < r0 + together; ++r) {
        if (out.sampled2) {
          StoreSampledPairs(out, bk, r, c, words.data() + (r - r0) * block / 2);
          continue;
        }
        const float* chunk_rows = rows.data() + (r - r0) * block;
        float* kt = out.sampled->data() + ((bk * out.residues + r) * out.chunks + c) * dim * out.chunk;
        for (int64_t x = 0; x < dim; ++x)
          for (int64_t m = 0; m < out.chunk; ++m) kt[x * out.chunk + m] = chunk_rows[m * dim + x];
      }
    }
}

// kt[x, j] = k[j, x] for `keys` rows of `dim` elements, in squares of 8 x 8 so that reads and
// writes both stay within a few cache lines.
template <class T>
void TransposeKeys(const T* k, int64_t keys, int64_t dim, int64_t key_pad, float* kt) {
  constexpr int64_t kTile = 8;
  for (int64_t j0 = 0; j0 < keys; j0 += kTile)
    for (int64_t x0 = 0; x0 < dim; x0 += kTile) {
      const int64_t j_end = std::min(keys, j0 + kTile), x_end = std::min(dim, x0 + kTile);
      for (int64_t x = x0; x < x_end; ++x)
        for (int64_t j = j0; j < j_end; ++j) kt[x * key_pad + j] = ToFloat(k[j * dim + x]);
    }
}

// The AVX-512 gathers for float32 keys (pack.h); other types never take this path.
template <class T>
void TransposeKeysGathered(const T* k, int64_t keys, int64_t dim, int64_t key_pad, float* kt) {
#if defined(TFSA_X86_KERNELS)
  if constexpr (std::is_same_v<T, float>) return TransposeKeysAvx512(k, keys, dim, key_pad, kt);
#endif
  TransposeKeys(k, keys, dim, key_pad, kt);
}

// Value rows padded to v_pad; returns whether any element is NaN or inf (a branch-free scan:
// x - x is 0 for finite x and NaN otherwise; an integer OR, which the compiler may vectorise).
template <class T>
bool CopyValues(const T* v, int64_t keys, int64_t dim, int64_t v_pad, float* out) {
  int nonfinite = 0;
  for (int64_t j = 0; j < keys; ++j) {
    float* row = out + j * v_pad;
    for (int64_t x = 0; x < dim; ++x) {
      row[x] = ToFloat(v[j * dim + x]);
      nonfinite |= !(row[x] - row[x] == 0.0f);
    }
    std::fill(row + dim, row + v_pad, 0.0f);
  }
  return nonfinite != 0;
}

// Whether any of n float32 values is NaN or inf (CopyValues' scan, for values read in place).
bool AnyNonFinite(const float* v, int64_t n) {
  int nonfinite = 0;
  for (int64_t e = 0; e < n; ++e) nonfinite |= !(v[e] - v[e] == 0.0f);
  return nonfinite != 0;
}

// PackHead's blocks as bf16 pairs (packed.h kt2, v2), zeros past the last key and head dim.
template <class T>
void PackHeadBf16(const Problem& p, const T* k_head, const T* v_head, int64_t bk, PackedKeysValues& out) {
  const int64_t dim = p.dims.head_dim, v_dim = p.dims.v_head_dim;
  const auto key = [&](int64_t j, int64_t x) { return x < dim ? ToFloat(k_head[j * dim + x]) : 0.0f; };
  for (int64_t kb = 0; kb < out.k_blocks; ++kb) {
    const int64_t k_begin = p.grid.KeyBegin(kb), keys = p.grid.KeyEnd(kb) - k_begin;
    uint32_t* kt2 = out.kt2->data() + (bk * out.k_blocks + kb) * out.kt2_block;
    uint32_t* v2 = out.v2->data() + (bk * out.k_blocks + kb) * out.v2_block;
    std::fill(kt2, kt2 + out.kt2_block, 0u);
    for (int64_t j = 0; j < keys; ++j)
      for (int64_t pair = 0; pair < out.pairs; ++pair)
        kt2[pair * out.key_pad + j] = Bf16Pair(key(k_begin + j, 2 * pair), key(k_begin + j, 2 * pair + 1));
    std::fill(v2, v2 + out.v2_block, 0u);
    int nonfinite = 0;  // x - x: 0 for finite x, NaN otherwise
    for (int64_t j = 0; j < keys; ++j)
      for (int64_t x = 0; x < v_dim; ++x) {
        const float value = ToFloat(v_head[(k_begin + j) * v_dim + x]);
        nonfinite |= !(value - value == 0.0f);
        v2[(j / 2) * out.v_pad + x] |= static_cast<uint32_t>(Bf16Bits(value)) << (16 * (j % 2));
      }
    out.v_nonfinite[bk * out.k_blocks + kb] = nonfinite != 0;
  }
}

// Whether some query head of kv head `kv_head` ranks blocks by the estimate: the others (dense
// or streaming heads) need neither the key block means nor the sampled keys.
bool KvHeadEstimates(const Problem& p, int64_t kv_head) {
  const int64_t group = p.dims.q_heads / p.dims.kv_heads;
  for (int64_t h = kv_head * group; h < (kv_head + 1) * group; ++h)
    if (SelectionOf(p, h) == HeadSelection::kEstimate) return true;
  return false;
}

// Keys transposed and values padded into blocks, plus what the estimate reads (the key block
// means, or the antidiagonal's sampled keys), of one (b, kv head). Each block's mean is taken
// right before its transpose, so the keys are read from memory once.
template <class T>
void PackHead(const Problem& p, const T* key, const T* value, int64_t kv_rows, int64_t bk, PackedKeysValues& out) {
  const Dims& d = p.dims;
  const T* k_head = key + bk * kv_rows * d.head_dim;
  const T* v_head = value + bk * kv_rows * d.v_head_dim;
  // The mean and token estimates read the means; the antidiagonal one samples keys instead;
  // neither does a group whose heads are all dense or streaming.
  const bool estimates = KvHeadEstimates(p, bk % d.kv_heads);
  const bool means = out.residues == 0 && estimates;
  float* means_t = out.k_means.data() + bk * d.head_dim * out.means_pad;
  if (means) ZeroMeansPadding(p, means_t, out.means_pad);
  if (out.residues > 0 && estimates) PackSampledKeys(p, k_head, bk, out);
  if (p.selection_only || out.bf16) {
    for (int64_t kb = 0; kb < out.k_blocks && means; ++kb) KeyBlockMean(p, k_head, kb, means_t, out.means_pad);
    if (!p.selection_only) PackHeadBf16(p, k_head, v_head, bk, out);
    return;
  }
  for (int64_t kb = 0; kb < out.k_blocks; ++kb) {
    const int64_t k_begin = p.grid.KeyBegin(kb), keys = p.grid.KeyEnd(kb) - k_begin;
    if (means) KeyBlockMean(p, k_head, kb, means_t, out.means_pad);
    float* kt = out.kt.data() + (bk * out.k_blocks + kb) * out.kt_block;
    if (out.gather_keys) TransposeKeysGathered(k_head + k_begin * d.head_dim, keys, d.head_dim, out.key_pad, kt);
    else TransposeKeys(k_head + k_begin * d.head_dim, keys, d.head_dim, out.key_pad, kt);
    // Padding keys of a ragged last block: zero scores (masked later).
    for (int64_t x = 0; x < d.head_dim; ++x) std::fill(kt + x * out.key_pad + keys, kt + (x + 1) * out.key_pad, 0.0f);
    uint8_t& nonfinite = out.v_nonfinite[bk * out.k_blocks + kb];
    if (out.v_input) {
      nonfinite = AnyNonFinite(out.V(bk, kb), keys * d.v_head_dim);
      continue;
    }
    float* v = out.v.data() + (bk * out.k_blocks + kb) * out.v_block;
    nonfinite = CopyValues(v_head + k_begin * d.v_head_dim, keys, d.v_head_dim, out.v_pad, v);
    std::fill(v + keys * out.v_pad, v + out.key_pad * out.v_pad, 0.0f);  // and zero values
  }
}

// The scaled query rows with non-finite elements as 0 (the estimate's view, reference.py);
// the rows themselves when all are finite.
const float* FiniteRows(const std::vector<float>& q, bool nonfinite, std::vector<float>& out) {
  if (!nonfinite) return q.data();
  out.resize(q.size());
  for (size_t i = 0; i < q.size(); ++i) out[i] = std::isfinite(q[i]) ? q[i] : 0.0f;
  return out.data();
}

// The estimate's share of the bias: attn_bias at the centre element of each block pair of
// query block qb, times `weight`, added to its pooled scores (non-finite values count as 0;
// reference.py). A shared group selection adds each head's with weight 1 / group.
void AddCentreBias(const Problem& p, int64_t b, int64_t h, int64_t qb, float weight, float* pooled_scores) {
  const int64_t i = (p.grid.QueryBegin(qb) + p.grid.QueryEnd(qb) - 1) / 2;
  for (int64_t kb = 0; kb < p.grid.k_blocks; ++kb) {
    const float bias = p.bias.Bias(p.bias.Offset(b, h, i, (p.grid.KeyBegin(kb) + p.grid.KeyEnd(kb) - 1) / 2));
    if (std::isfinite(bias)) pooled_scores[kb] += bias * weight;  // x * 1 is x: per-head unchanged
  }
}

// q = scale * rows and their mean (non-finite elements count as 0 in it; mean starts at 0);
// returns whether any is non-finite. Branch-free per row so that it vectorises: adding +0
// leaves a sum that starts at +0 bit-equal, so the sum is the one the per-element form gives;
// one division per column at the end.
template <class T>
bool ScaleRows(const T* rows_in, int rows, int head_dim, float scale, float* q, float* mean, bool avx512) {
#if defined(TFSA_X86_KERNELS)
  if constexpr (std::is_same_v<T, float>)
    if (avx512) return ScaleRowsAvx512(rows_in, rows, head_dim, scale, q, mean);
#endif
  (void)avx512;
  const float rows_f = static_cast<float>(rows);
  int nonfinite = 0;
  for (size_t r = 0; r < static_cast<size_t>(rows); ++r) {
    float* q_row = q + r * head_dim;
    for (int x = 0; x < head_dim; ++x) q_row[x] = scale * ToFloat(rows_in[r * head_dim + x]);
    for (int x = 0; x < head_dim; ++x) {
      const float value = q_row[x];
      nonfinite |= !(value - value == 0.0f);
      mean[x] += std::isfinite(value) ? value : 0.0f;
    }
  }
  for (int x = 0; x < head_dim; ++x) mean[x] /= rows_f;
  return nonfinite != 0;
}

// One query block of one head as a task holds it: the scaled rows and their mean, its allowed
// key blocks (and how many), and the blocks it computes.
struct HeadBlock {
  std::vector<float> q, q_mean, q_finite;
  bool q_nonfinite = false;
  std::vector<uint8_t> allowed;
  int64_t allowed_count = 0;
  std::vector<int32_t> chosen;
};

// Per-thread buffers of a task, reused between query blocks.
struct Scratch {
  std::vector<float> scores, pooled;
  SelectionScratch selection;
  TileScratch tiles;
  RowsState rows;
  std::vector<HeadBlock> heads;  // the query heads of a group selection (one otherwise)
  std::vector<uint8_t> take;     // a group's chosen key blocks
};

// Query block qb of (batch b, head h) scaled into `out`, with its allowed key blocks.
template <class T>
void LoadHeadBlock(const Problem& p, const PackedKeysValues& kv, const Tensors& t, int64_t b, int64_t h, int64_t qb,
                   HeadBlock& out) {
  const Dims& d = p.dims;
  const int64_t q_begin = p.grid.QueryBegin(qb), bh = b * d.q_heads + h;
  const int rows = static_cast<int>(p.grid.QueryEnd(qb) - q_begin), head_dim = static_cast<int>(d.head_dim);
  const T* q_rows = static_cast<const T*>(t.query) + (bh * d.q_len + q_begin) * d.head_dim;
  out.q.resize(static_cast<size_t>(rows) * head_dim);
  out.q_mean.assign(head_dim, 0.0f);
  out.q_nonfinite = ScaleRows(q_rows, rows, head_dim, p.attrs.scale, out.q.data(), out.q_mean.data(), kv.gather_keys);
  out.allowed_count = AllowedKeyBlocks(p, b, h, qb, out.allowed);
}

// The estimate's scores of query block qb against the key-block means of kv head bk:
// estimate_q is its mean query (1 row) or its rows (the token estimate), into sc.scores.
void EstimateScores(const Problem& p, const BlockMath& math, const PackedKeysValues& kv, int64_t bk,
                    const float* estimate_q, int score_rows, Scratch& sc) {
  const int means_pad = static_cast<int>(kv.means_pad);
  sc.scores.resize(static_cast<size_t>(score_rows) * means_pad);
  math.scores(estimate_q, score_rows, static_cast<int>(p.dims.head_dim), kv.KMeansT(bk), means_pad, sc.scores.data(),
              means_pad);
  CapScores(p.attrs.softcap, score_rows, p.grid.k_blocks, means_pad, sc.scores.data());  // before the bias
}

// One head's selection of its query block (hb loaded): the estimate's scores or the
// antidiagonal mass, then ChooseKeyBlocks, into hb.chosen.
void SelectHeadBlock(const Problem& p, const BlockMath& math, const PackedKeysValues& kv, int64_t b, int64_t h,
                     int64_t qb, const double* antidiagonal_mass, HeadBlock& hb, Scratch& sc) {
  const int64_t bk = b * p.dims.kv_heads + h / (p.dims.q_heads / p.dims.kv_heads);
  const int score_rows = ScoresEveryRow(p) ? static_cast<int>(p.grid.QueryEnd(qb) - p.grid.QueryBegin(qb)) : 1;
  sc.selection.allowed = hb.allowed;
  if (antidiagonal_mass != nullptr) {
    sc.selection.block_mass.assign(antidiagonal_mass, antidiagonal_mass + p.grid.k_blocks);
  } else if (SelectionOf(p, h) == HeadSelection::kEstimate) {  // streaming and dense heads: no estimate
    const float* estimate_q = score_rows == 1 ? hb.q_mean.data() : FiniteRows(hb.q, hb.q_nonfinite, hb.q_finite);
    EstimateScores(p, math, kv, bk, estimate_q, score_rows, sc);
    // the mean estimate adds the bias at each block pair's centre (the others do not read it)
    if (p.bias.present() && p.attrs.estimate == TFSA_ESTIMATE_MEAN) AddCentreBias(p, b, h, qb, 1.0f, sc.scores.data());
  }
  ChooseKeyBlocks(p, math, HeadBudget(p, h), qb, sc.scores.data(), score_rows, static_cast<int>(kv.means_pad),
                  sc.selection, hb.chosen);
}

// Walks hb.chosen for (batch b, head h, query block qb) and writes the normalised rows.
template <class T>
void ComputeHeadBlock(const Problem& p, const BlockMath& math, const PackedKeysValues& kv, const Tensors& t, int64_t b,
                      int64_t h, int64_t qb, const HeadBlock& hb, Scratch& sc) {
  const Dims& d = p.dims;
  const int64_t q_begin = p.grid.QueryBegin(qb), bh = b * d.q_heads + h;
  const int rows = static_cast<int>(p.grid.QueryEnd(qb) - q_begin), v_pad = static_cast<int>(kv.v_pad);
  static const std::vector<int32_t> kNone;
  WalkTiles(p, math, kv, b, h, qb, hb.q.data(), rows, p.selection_only ? kNone : hb.chosen, sc.tiles, sc.rows);
  T* out = static_cast<T*>(t.output) + (bh * d.q_len + q_begin) * d.v_head_dim;
  for (size_t r = 0; r < static_cast<size_t>(rows); ++r) {
    const bool empty = sc.rows.m[r] == kNegInf;  // no key to attend: zeros, not NaN
    const float inv = empty ? 0.0f : 1.0f / sc.rows.l[r];
    for (int64_t x = 0; x < d.v_head_dim; ++x)
      out[r * d.v_head_dim + x] = FromFloat<T>(empty ? 0.0f : sc.rows.o[r * v_pad + x] * inv);
  }
}

Scratch& ThreadScratch(size_t heads) {
  thread_local Scratch sc;
  if (sc.heads.size() < heads) sc.heads.resize(heads);
  return sc;
}

// The scaled query rows of query blocks [qb_begin, qb_end) of (batch, head) bh, non-finite as
// 0 and rounded to bf16 (the antidiagonal estimate's view).
template <class T>
void FiniteScaledRows(const Problem& p, const Tensors& t, int64_t bh, int64_t qb_begin, int64_t qb_end, bool avx512,
                      std::vector<float>& out) {
  const int64_t begin = p.grid.QueryBegin(qb_begin), end = p.grid.QueryEnd(qb_end - 1), dim = p.dims.head_dim;
  const T* rows = static_cast<const T*>(t.query) + (bh * p.dims.q_len + begin) * dim;
  out.resize((end - begin) * dim);
#if defined(TFSA_X86_KERNELS)
  if constexpr (std::is_same_v<T, float>)
    if (avx512) return FiniteRoundedAvx512(rows, (end - begin) * dim, p.attrs.scale, out.data());
#endif
  (void)avx512;
  for (int64_t e = 0; e < (end - begin) * dim; ++e) {
    const float value = p.attrs.scale * ToFloat(rows[e]);
    out[e] = Finite(value) ? RoundedToBf16(value) : 0.0f;  // the estimate's bf16 operands
  }
}

// The group's mean query rows of query blocks [qb_begin, qb_end) of the query heads
// [h, h + heads) of batch b, as a shared antidiagonal estimate reads them: each head's
// scale * q (non-finite as 0) summed in head order, divided by the group, rounded to bf16.
template <class T>
void PooledScaledRows(const Problem& p, const Tensors& t, int64_t b, int64_t h, int64_t heads, int64_t qb_begin,
                      int64_t qb_end, std::vector<float>& out) {
  const int64_t begin = p.grid.QueryBegin(qb_begin), end = p.grid.QueryEnd(qb_end - 1), dim = p.dims.head_dim;
  const int64_t n = (end - begin) * dim;
  out.assign(n, 0.0f);
  for (int64_t x = h; x < h + heads; ++x) {
    const T* rows = static_cast<const T*>(t.query) + ((b * p.dims.q_heads + x) * p.dims.q_len + begin) * dim;
    for (int64_t e = 0; e < n; ++e) {
      const float value = p.attrs.scale * ToFloat(rows[e]);
      const float finite = Finite(value) ? value : 0.0f;
      out[e] = x == h ? finite : out[e] + finite;
    }
  }
  const float group = static_cast<float>(heads);
  for (int64_t e = 0; e < n; ++e) out[e] = RoundedToBf16(out[e] / group);
}

// Asks for query block qb's rows of (batch, head) bh and its output rows ahead of their use (into
// L2): a task reads its query block and writes its output once, from and
// to memory, and the hardware prefetcher starts too late on a 16 KiB block. Results unchanged.
template <class T>
void PrefetchQueryBlock(const Problem& p, const Tensors& t, int64_t bh, int64_t qb) {
  if (qb >= p.grid.q_blocks) return;
  const int64_t q_begin = p.grid.QueryBegin(qb), rows = p.grid.QueryEnd(qb) - q_begin;
  const char* q = reinterpret_cast<const char*>(static_cast<const T*>(t.query) + (bh * p.dims.q_len + q_begin) * p.dims.head_dim);
  char* out = reinterpret_cast<char*>(static_cast<T*>(t.output) + (bh * p.dims.q_len + q_begin) * p.dims.v_head_dim);
  constexpr int64_t kLine = 64;
  // an asm statement: GCC -O3 dropped __builtin_prefetch loops here as having no effect
  const auto into_l2 = [](const char* at) {
#if defined(__x86_64__)
    asm volatile("prefetcht1 %0" : : "m"(*at));
#else
    __builtin_prefetch(at, 0, 2);
#endif
  };
  for (int64_t at = 0; at < rows * p.dims.head_dim * static_cast<int64_t>(sizeof(T)); at += kLine)
    into_l2(q + at);
  for (int64_t at = 0; at < rows * p.dims.v_head_dim * static_cast<int64_t>(sizeof(T)); at += kLine)
    into_l2(out + at);
}

// One task: query block qb of one (batch, head). Scales the queries, selects the key blocks
// (antidiagonal_mass: the block's antidiagonal estimate, computed for its group), walks them
// (tile_walk.h) and writes the normalised rows.
template <class T>
void QueryBlock(const Problem& p, const BlockMath& math, const PackedKeysValues& kv, const Tensors& t,
                size_t task, int64_t* counts, const double* antidiagonal_mass) {
  const int64_t qb = task % p.grid.q_blocks, bh = task / p.grid.q_blocks;
  const int64_t b = bh / p.dims.q_heads, h = bh % p.dims.q_heads;
  Scratch& sc = ThreadScratch(1);
  HeadBlock& hb = sc.heads[0];
  LoadHeadBlock<T>(p, kv, t, b, h, qb, hb);
  counts[2 * task + 1] = hb.allowed_count;
  SelectHeadBlock(p, math, kv, b, h, qb, antidiagonal_mass, hb, sc);
  counts[2 * task] = static_cast<int64_t>(hb.chosen.size());
  ComputeHeadBlock<T>(p, math, kv, t, b, h, qb, hb, sc);
}

// The shared selection of query block qb of the group's heads [h, h + group) (loaded in
// sc.heads): one estimate from the group's mean query (antidiagonal_mass: the antidiagonal one)
// over the blocks some head may attend, at the group's largest threshold, into sc.take.
void SharedSelection(const Problem& p, const BlockMath& math, const PackedKeysValues& kv, int64_t b, int64_t h,
                     int64_t group, int64_t qb, const double* antidiagonal_mass, Scratch& sc) {
  const int64_t bk = b * p.dims.kv_heads + h / group, dim = p.dims.head_dim;
  const int rows = static_cast<int>(p.grid.QueryEnd(qb) - p.grid.QueryBegin(qb));
  const int score_rows = ScoresEveryRow(p) ? rows : 1;
  const Budget budget = GroupBudget(p, h, group);
  std::vector<uint8_t>& allowed = sc.selection.allowed;
  allowed.assign(p.grid.k_blocks, 0);
  for (int64_t x = 0; x < group; ++x)
    for (int64_t kb = 0; kb < p.grid.k_blocks; ++kb) allowed[kb] |= sc.heads[x].allowed[kb];
  if (antidiagonal_mass != nullptr) {
    sc.selection.block_mass.assign(antidiagonal_mass, antidiagonal_mass + p.grid.k_blocks);
  } else if (budget.mode == HeadSelection::kEstimate) {
    // the group's mean query: its heads' rows (or block means) summed in head order, / group
    const size_t n = static_cast<size_t>(score_rows) * dim;
    sc.pooled.assign(n, 0.0f);
    for (int64_t x = 0; x < group; ++x) {
      HeadBlock& hb = sc.heads[x];
      const float* q = score_rows == 1 ? hb.q_mean.data() : FiniteRows(hb.q, hb.q_nonfinite, hb.q_finite);
      for (size_t e = 0; e < n; ++e) sc.pooled[e] = x == 0 ? q[e] : sc.pooled[e] + q[e];
    }
    for (float& e : sc.pooled) e /= static_cast<float>(group);
    EstimateScores(p, math, kv, bk, sc.pooled.data(), score_rows, sc);
    if (p.bias.present() && p.attrs.estimate == TFSA_ESTIMATE_MEAN)
      for (int64_t x = h; x < h + group; ++x)
        AddCentreBias(p, b, x, qb, 1.0f / static_cast<float>(group), sc.scores.data());
  }
  thread_local std::vector<int32_t> chosen;
  ChooseKeyBlocks(p, math, budget, qb, sc.scores.data(), score_rows, static_cast<int>(kv.means_pad), sc.selection,
                  chosen);
  for (int32_t kb : chosen) sc.take[kb] = 1;
}

// Query block qb of the kv group (batch b, query heads [h, h + group)): one selection for the
// group (group_selection: the union of the heads' picks, or one shared estimate), then the
// heads computed back to back on the same key blocks, so that each is loaded once for all.
// antidiagonal_mass: per head (union) or once (shared) the block's antidiagonal estimate.
template <class T>
void GroupQueryBlock(const Problem& p, const BlockMath& math, const PackedKeysValues& kv, const Tensors& t, int64_t b,
                     int64_t h, int64_t group, int64_t qb, int64_t* counts,
                     const std::vector<const double*>& antidiagonal_mass) {
  Scratch& sc = ThreadScratch(group);
  sc.take.assign(p.grid.k_blocks, 0);
  for (int64_t x = 0; x < group; ++x) LoadHeadBlock<T>(p, kv, t, b, h + x, qb, sc.heads[x]);
  if (p.attrs.group_selection == TFSA_GROUP_SHARED) {
    SharedSelection(p, math, kv, b, h, group, qb, antidiagonal_mass[0], sc);
  } else {
    for (int64_t x = 0; x < group; ++x) {
      SelectHeadBlock(p, math, kv, b, h + x, qb, antidiagonal_mass[x], sc.heads[x], sc);
      for (int32_t kb : sc.heads[x].chosen) sc.take[kb] = 1;
    }
  }
  for (int64_t x = 0; x < group; ++x) {
    HeadBlock& hb = sc.heads[x];
    hb.chosen.clear();
    for (int64_t kb = 0; kb < p.grid.k_blocks; ++kb)
      if (sc.take[kb] && hb.allowed[kb]) hb.chosen.push_back(static_cast<int32_t>(kb));
    const size_t task = static_cast<size_t>((b * p.dims.q_heads + h + x) * p.grid.q_blocks + qb);
    counts[2 * task] = static_cast<int64_t>(hb.chosen.size());
    counts[2 * task + 1] = hb.allowed_count;
    ComputeHeadBlock<T>(p, math, kv, t, b, h + x, qb, hb, sc);
  }
}

// One task of a group selection: query blocks [qb_begin, qb_end) of kv group (b, kv head kh).
template <class T>
void GroupTask(const Problem& p, const BlockMath& math, const PackedKeysValues& kv, const Tensors& t, int64_t b,
               int64_t kh, int64_t qb_begin, int64_t qb_end, int64_t* counts) {
  const Dims& d = p.dims;
  const int64_t group = d.q_heads / d.kv_heads, h = kh * group, bk = b * d.kv_heads + kh;
  const bool shared = p.attrs.group_selection == TFSA_GROUP_SHARED;
  thread_local std::vector<float> rows;
  thread_local std::vector<std::vector<double>> mass;
  thread_local SelectionScratch selection;
  const int64_t selections = shared ? 1 : group;
  mass.resize(std::max<size_t>(mass.size(), selections));
  std::vector<bool> estimates(selections, false);
  if (kv.residues > 0) {  // the antidiagonal estimate, for the task's query blocks at once
    for (int64_t x = 0; x < selections; ++x) {
      estimates[x] = (shared ? GroupBudget(p, h, group) : HeadBudget(p, h + x)).mode == HeadSelection::kEstimate;
      if (!estimates[x]) continue;
      if (shared) PooledScaledRows<T>(p, t, b, h, group, qb_begin, qb_end, rows);
      else FiniteScaledRows<T>(p, t, b * d.q_heads + h + x, qb_begin, qb_end, kv.gather_keys, rows);
      AntidiagonalMass(p, math, kv, b, h + x, shared ? group : 1, bk, qb_begin, qb_end, rows.data(), selection,
                       mass[x]);
    }
  }
  std::vector<const double*> block_mass(selections);
  for (int64_t qb = qb_begin; qb < qb_end; ++qb) {
    for (int64_t x = 0; x < selections; ++x)
      block_mass[x] = estimates[x] ? mass[x].data() + (qb - qb_begin) * p.grid.k_blocks : nullptr;
    GroupQueryBlock<T>(p, math, kv, t, b, h, group, qb, counts, block_mass);
  }
}

template <class T>
void Run(const Problem& p, const Tensors& t, Workspace& workspace, const ParallelFor& parallel_for) {
  const Dims& d = p.dims;
  const BlockMath& math = SelectBlockMath();
  PackedKeysValues kv{0, 0, 0, 0, 0, 0, 0, workspace.kt, workspace.v, workspace.k_means, workspace.v_nonfinite};
  if (UsesEstimate(p) && p.attrs.estimate == TFSA_ESTIMATE_ANTIDIAGONAL) {
    // Residue r holds ceil((kv_len - r) / stride) keys; chunks of `pad` of them (the Scores
    // kernel's width: a row scores little past the keys it may see).
    const int64_t stride = p.attrs.estimate_stride, most = (p.grid.kv_len + stride - 1) / stride;
    kv.residues = std::min(stride, p.grid.kv_len);
    kv.chunk = math.pad;
    kv.chunks = (most + kv.chunk - 1) / kv.chunk;
    const int64_t sampled = d.batch * d.kv_heads * kv.residues * kv.chunks * d.head_dim * kv.chunk;
    if (EstimateOnAmx(d.head_dim) && kv.chunk % 32 == 0) {
      kv.sampled2 = &workspace.sampled2;
      workspace.sampled2.resize(sampled / 2);
    } else {
      kv.sampled = &workspace.sampled;
      workspace.sampled.resize(sampled);
    }
    kv.sample_starts.resize(kv.residues * (p.grid.k_blocks + 1));
    for (int64_t r = 0; r < kv.residues; ++r)
      for (int64_t kb = 0; kb <= p.grid.k_blocks; ++kb) {
        const int64_t key = kb < p.grid.k_blocks ? p.grid.KeyBegin(kb) : p.grid.kv_len;
        kv.sample_starts[r * (p.grid.k_blocks + 1) + kb] = static_cast<int>((key - r + stride - 1) / stride);
      }
  }
  kv.k_blocks = p.grid.k_blocks;
  kv.head_dim = d.head_dim;
  kv.key_pad = RoundUp(p.grid.block, math.pad);
  kv.v_pad = RoundUp(std::max<int64_t>(d.v_head_dim, 1), math.pad);
  kv.kt_block = d.head_dim * kv.key_pad;
  kv.gather_keys = std::is_same_v<T, float> && std::strcmp(math.isa, "avx512") == 0 && p.grid.block * d.head_dim < (1 << 30);
  kv.v_block = kv.key_pad * kv.v_pad;
  kv.means_pad = RoundUp(kv.k_blocks, math.pad);
  const int64_t heads = d.batch * d.kv_heads;
  kv.bf16 = p.attrs.compute_precision == TFSA_PRECISION_BF16 ? SelectBf16Math(d.head_dim) : nullptr;
  if (kv.bf16) {
    kv.pairs = (d.head_dim + 1) / 2;
    kv.kt2_block = kv.pairs * kv.key_pad;
    kv.v2_block = kv.key_pad / 2 * kv.v_pad;
    kv.kt2 = &workspace.kt2;
    kv.v2 = &workspace.v2;
    workspace.kt2.resize(heads * kv.k_blocks * kv.kt2_block);
    workspace.v2.resize(heads * kv.k_blocks * kv.v2_block);
  } else {
    kv.kt.resize(heads * kv.k_blocks * kv.kt_block);
    if constexpr (std::is_same_v<T, float>)
      if (kv.v_pad == d.v_head_dim) {
        kv.v_input = static_cast<const float*>(t.value);
        kv.v_input_head = (t.kv_rows > 0 ? t.kv_rows : d.kv_len) * d.v_head_dim;
        kv.v_input_block = p.grid.block * d.v_head_dim;
      }
    if (!kv.v_input) kv.v.resize(heads * kv.k_blocks * kv.v_block);
  }
  kv.k_means.resize(heads * d.head_dim * kv.means_pad);
  kv.v_nonfinite.assign(heads * kv.k_blocks, 0);
  const T* key = static_cast<const T*>(t.key);
  const T* value = static_cast<const T*>(t.value);
  const int64_t kv_rows = t.kv_rows > 0 ? t.kv_rows : d.kv_len;
  parallel_for(heads, [&](size_t bk) { PackHead<T>(p, key, value, kv_rows, static_cast<int64_t>(bk), kv); });

  MaskBlocks mask_blocks;
  Problem with_mask = p;
  if (p.mask.present()) {
    ClassifyMaskBlocks(p, mask_blocks, parallel_for);
    with_mask.mask_blocks = &mask_blocks;
  }
  const size_t tasks = static_cast<size_t>(d.batch * d.q_heads * p.grid.q_blocks);
  std::vector<int64_t> counts(2 * tasks, 0);  // per query block: computed blocks, allowed blocks
  // Tasks of `group` query blocks, so that the antidiagonal estimate scores them together.
  const int64_t group = AntidiagonalBlocks(p), groups = (p.grid.q_blocks + group - 1) / group;
  if (SelectsPerGroup(p.attrs, d.q_heads, d.kv_heads) && !AllDense(p)) {
    // one selection per kv group: a task holds the group's heads
    parallel_for(d.batch * d.kv_heads * groups, [&](size_t task) {
      const int64_t bk = task / groups, qb_begin = task % groups * group;
      const int64_t qb_end = std::min(qb_begin + group, p.grid.q_blocks);
      GroupTask<T>(with_mask, math, kv, t, bk / d.kv_heads, bk % d.kv_heads, qb_begin, qb_end, counts.data());
    });
  } else {
    const bool antidiagonal = kv.residues > 0;
    parallel_for(d.batch * d.q_heads * groups, [&](size_t task) {
      const int64_t bh = task / groups, qb_begin = task % groups * group;
      const int64_t qb_end = std::min(qb_begin + group, p.grid.q_blocks);
      thread_local std::vector<float> rows;
      thread_local std::vector<double> mass;
      thread_local SelectionScratch selection;
      const int64_t h = bh % d.q_heads;
      const bool estimates = antidiagonal && SelectionOf(p, h) == HeadSelection::kEstimate;
      if (estimates) {
        const int64_t b = bh / d.q_heads, bk = b * d.kv_heads + h / (d.q_heads / d.kv_heads);
        FiniteScaledRows<T>(p, t, bh, qb_begin, qb_end, kv.gather_keys, rows);
        AntidiagonalMass(with_mask, math, kv, b, h, 1, bk, qb_begin, qb_end, rows.data(), selection, mass);
      }
      for (int64_t qb = qb_begin; qb < qb_end; ++qb) {
        PrefetchQueryBlock<T>(p, t, bh, qb + 1);  // the next block of this task, or of the next task
        const double* block_mass = estimates ? mass.data() + (qb - qb_begin) * p.grid.k_blocks : nullptr;
        QueryBlock<T>(with_mask, math, kv, t, bh * p.grid.q_blocks + qb, counts.data(), block_mass);
      }
    });
  }

  if (t.density == nullptr) return;
  for (int64_t bh = 0; bh < d.batch * d.q_heads; ++bh) {
    int64_t computed = 0, allowed = 0;
    for (int64_t qb = 0; qb < p.grid.q_blocks; ++qb) {
      computed += counts[2 * (bh * p.grid.q_blocks + qb)];
      allowed += counts[2 * (bh * p.grid.q_blocks + qb) + 1];
    }
    t.density[bh] = allowed > 0 ? static_cast<float>(computed) / static_cast<float>(allowed) : 1.0f;
  }
}

}  // namespace

std::unique_ptr<Workspace> WorkspacePool::Take() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (pool_.empty()) return std::make_unique<Workspace>();
  std::unique_ptr<Workspace> workspace = std::move(pool_.back());
  pool_.pop_back();
  return workspace;
}

void WorkspacePool::Return(std::unique_ptr<Workspace> workspace) {
  std::lock_guard<std::mutex> lock(mutex_);
  pool_.push_back(std::move(workspace));
}

void RunSparseAttention(const Problem& problem, const Tensors& tensors, WorkspacePool& workspaces,
                        const ParallelFor& parallel_for) {
  const Dims& d = problem.dims;
  if (d.batch * d.q_heads * d.q_len == 0 || d.kv_len == 0) {  // no query, or no key to attend
    const size_t n = static_cast<size_t>(d.batch * d.q_heads * d.q_len * d.v_head_dim);
    std::memset(tensors.output, 0, n * (tensors.type == Tensors::Type::kFloat ? 4 : 2));
    if (tensors.density) std::fill(tensors.density, tensors.density + d.batch * d.q_heads, 1.0f);
    return;
  }
  // The few-rows path computes in float32: bf16 calls take the tiles (a fallback does not).
  const bool bf16 = problem.attrs.compute_precision == TFSA_PRECISION_BF16 && SelectBf16Math() != nullptr;
  if (UsesExactRows(problem) && !bf16) {
    RunExactRows(problem, tensors, parallel_for);
    return;
  }
  std::unique_ptr<Workspace> workspace = workspaces.Take();
  switch (tensors.type) {
    case Tensors::Type::kFloat: Run<float>(problem, tensors, *workspace, parallel_for); break;
    case Tensors::Type::kHalf: Run<Ort::Float16_t>(problem, tensors, *workspace, parallel_for); break;
    case Tensors::Type::kBFloat16: Run<Ort::BFloat16_t>(problem, tensors, *workspace, parallel_for); break;
  }
  workspaces.Return(std::move(workspace));
}

}  // namespace tfsa::cpu
