// The rules of the selection that the CPU (cpu/selection.cc) and CUDA (cuda/selection.cu)
// kernels share, compiled for host and device: mask block states and where they are stored,
// which key blocks a query block may attend, and how many the estimate may add.
// tfsa_onnx/reference.py (select_blocks) is their specification.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "tfsa/block_grid.h"

namespace tfsa {

// What the mask leaves of a (query block, key block): nothing attendable, some pairs, or all
// pairs with bias exactly 0 (the mask add can be skipped).
enum MaskState : uint8_t { kMaskClosed = 0, kMaskPartial = 1, kMaskOpen = 2 };

// The state of a block from its pairs: `any` attendable, `all_zero` biases.
TFSA_HOST_DEVICE inline uint8_t MaskStateOf(bool any, bool all_zero) {
  return all_zero ? kMaskOpen : any ? kMaskPartial : kMaskClosed;
}

// Where mask block states live: per (batch, mask head, mask query block, key block). A mask
// shared by all heads has one mask head; one whose query-row stride is 0 (rows broadcast) has
// one mask query block, standing for all rows. Not the same as one query block: a per-row
// mask is read row by row however few blocks there are.
struct MaskBlockLayout {
  int64_t heads = 1, q_blocks = 1, k_blocks = 0;
  bool rows_broadcast = true;

  TFSA_HOST_DEVICE int64_t Index(int64_t b, int64_t h, int64_t qb, int64_t kb) const {
    const int64_t mask_h = heads == 1 ? 0 : h, mask_qb = rows_broadcast ? 0 : qb;
    return ((b * heads + mask_h) * q_blocks + mask_qb) * k_blocks + kb;
  }
  TFSA_HOST_DEVICE int64_t Size(int64_t batch) const { return batch * heads * q_blocks * k_blocks; }
};

// The layout of a mask with strides `stride` over [B, Hq, Sq, Sk].
TFSA_HOST_DEVICE inline MaskBlockLayout MaskBlockLayoutOf(const BlockGrid& g, const int64_t stride[4], int64_t q_heads) {
  MaskBlockLayout l;
  l.heads = stride[1] == 0 ? 1 : q_heads;
  l.rows_broadcast = stride[2] == 0;
  l.q_blocks = l.rows_broadcast ? 1 : g.q_blocks;
  l.k_blocks = g.k_blocks;
  return l;
}

// Whether query block qb may attend key block kb, given its mask state (kMaskOpen without a
// mask): not wholly past the horizon (causality, window_ahead), and not closed by the mask. A
// partial block on the horizon's or the window's edge is allowed only when a pair it lets some
// row see is attendable: allows(i, j) reads the mask.
// The window works like the horizon from the other side: a block before every row's window is
// not allowed, and the rows' visible keys form one run (both edges move by at most one key a
// row), so any other block holds a visible key.
template <class Allows>
TFSA_HOST_DEVICE bool BlockAllowed(const BlockGrid& g, int64_t qb, int64_t kb, uint8_t state, Allows allows) {
  if (g.InFuture(qb, kb) || g.BeforeWindow(qb, kb) || state == kMaskClosed) return false;
  if (state == kMaskOpen || (!g.CrossesHorizon(qb, kb) && !g.CrossesWindowEdge(qb, kb))) return true;
  const int64_t k_begin = g.KeyBegin(kb), k_end = g.KeyEnd(kb);
  for (int64_t i = g.QueryBegin(qb); i < g.QueryEnd(qb); ++i) {
    const int64_t last = g.LastVisibleKey(i) < k_end - 1 ? g.LastVisibleKey(i) : k_end - 1;
    for (int64_t j = k_begin > g.FirstVisibleKey(i) ? k_begin : g.FirstVisibleKey(i); j <= last; ++j)
      if (allows(i, j)) return true;
  }
  return false;
}

// How many candidates the estimate may add: ceil(max_density * allowed) blocks in all (at
// least 1), less the forced ones, at most the candidates. The small tolerance keeps float
// attribute rounding from adding a block (0.1f * 30).
TFSA_HOST_DEVICE inline int64_t EstimateBudget(float max_density, int64_t n_allowed, int64_t n_forced,
                                               int64_t n_candidates) {
  int64_t cap = static_cast<int64_t>(ceil(static_cast<double>(max_density) * n_allowed - 1e-4));
  cap = cap > 1 ? cap : 1;
  const int64_t budget = cap - n_forced < n_candidates ? cap - n_forced : n_candidates;
  return budget > 0 ? budget : 0;
}

// The estimate of candidate kb from its pooled score mean(Q block) . mean(K block): plus
// log(keys in kb), shifted by log(block_size) so full blocks add nothing. NaN ranks last.
TFSA_HOST_DEVICE inline double Estimate(const BlockGrid& g, int64_t kb, double pooled_score) {
  const int64_t keys = g.KeyEnd(kb) - g.KeyBegin(kb);
  if (keys != g.block) pooled_score += log(static_cast<double>(keys) / static_cast<double>(g.block));
  return isnan(pooled_score) ? -INFINITY : pooled_score;
}

// A candidate's unnormalised softmax weight against the best estimate; all weigh the same
// when the best is not finite.
TFSA_HOST_DEVICE inline double CandidateWeight(double estimate, double best) {
  return isfinite(best) ? exp(estimate - best) : 1.0;
}

// A score (scale * q . k, or the estimate's pooled or sampled one) under the softcap
// attribute: cap * tanh(score / cap) when cap > 0 (Gemma 2), else the score itself. NaN stays
// NaN; +-inf becomes +-cap.
TFSA_HOST_DEVICE inline float Capped(float score, float cap) { return cap > 0.0f ? cap * tanhf(score / cap) : score; }

// x rounded to bfloat16 (to nearest, ties to even), as a float; NaN stays NaN (reference.py
// to_bf16). The antidiagonal estimate's sampled scores take bf16-rounded query and key
// elements (products exact in float32, sums in float32): it only ranks blocks, and so it may
// run on bf16 matrix units (AMX) where the CPU has them.
TFSA_HOST_DEVICE inline float RoundedToBf16(float x) {
  uint32_t bits;
  memcpy(&bits, &x, sizeof bits);
  const bool nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;  // integer tests only: loops vectorise
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u;
  bits = nan ? bits : rounded;
  memcpy(&x, &bits, sizeof x);
  return x;
}

// Two floats already rounded to bf16 as one word of a bf16 pair (low half the even one).
TFSA_HOST_DEVICE inline uint32_t RoundedPair(float even, float odd) {
  uint32_t low, high;
  memcpy(&low, &even, sizeof low);
  memcpy(&high, &odd, sizeof high);
  return (low >> 16) | (high & 0xFFFF0000u);
}

// The ranking: heavier first, ties by the lower block index (the reference's stable argsort).
TFSA_HOST_DEVICE inline bool Heavier(double mass_x, int64_t x, double mass_y, int64_t y) {
  return mass_x > mass_y || (mass_x == mass_y && x < y);
}

}  // namespace tfsa
