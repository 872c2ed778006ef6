// The selection: which key blocks each query block computes. See tfsa_onnx/reference.py
// (select_blocks) for the specification this follows; the rules it shares with the CUDA
// selection are in tfsa/block_rules.h.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "block_math.h"
#include "packed.h"
#include "problem.h"

namespace tfsa::cpu {

struct SelectionScratch {
  std::vector<uint8_t> allowed, forced;
  std::vector<int32_t> candidates, order;
  std::vector<double> mass;
  std::vector<float> row_max, row_sum;  // per query row, for the token estimate's softmax
  std::vector<float> group_q, group_scores;  // the antidiagonal estimate's rows of one residue
  std::vector<uint32_t> group_q2;            // the same rows as bf16 pairs, for AMX (packed.h sampled2)
  std::vector<float> redo_scores;            // a tile's scores again, for a row holding NaN or +inf
  std::vector<double> block_mass;            // the antidiagonal estimate's mass per key block
  std::vector<float> column_mass;            // one residue's probabilities summed over its rows
  // The antidiagonal estimate over several query blocks: per block its allowed key blocks
  // (k_blocks each), the last key they hold (-1: none) and whether one below it is not allowed.
  std::vector<uint8_t> group_allowed, group_holes;
  std::vector<int64_t> group_last_key;
  std::vector<int> visible;  // the antidiagonal estimate: samples each row of a residue may see
};

// Fills `out` from the mask (p.mask must be present); parallel over (batch, head, query block).
void ClassifyMaskBlocks(const Problem& p, MaskBlocks& out,
                        const std::function<void(size_t, const std::function<void(size_t)>&)>& parallel_for);

// Key blocks of (batch b, head h, query block qb) that hold at least one key some query of
// the block may see, by causality and the mask (p.mask_blocks). Returns how many.
int64_t AllowedKeyBlocks(const Problem& p, int64_t b, int64_t h, int64_t qb, std::vector<uint8_t>& allowed);
// The same for the query heads [h, h + heads): the blocks some of them may attend (a shared
// group selection's).
int64_t AllowedKeyBlocksOfHeads(const Problem& p, int64_t b, int64_t h, int64_t heads, int64_t qb,
                                std::vector<uint8_t>& allowed);

// Whether some head of the call ranks blocks by the estimate (what its packing is for).
bool UsesEstimate(const Problem& p);
// Whether every head of the call computes every allowed block.
bool AllDense(const Problem& p);
// How query head h picks its blocks (contract.h SelectionOf): dense, streaming (forced blocks
// only, no estimate computed) or by the estimate.
HeadSelection SelectionOf(const Problem& p, int64_t h);

// The antidiagonal estimate is computed for AntidiagonalBlocks(p) query blocks at once (1 for
// the other estimates): their rows of one residue sample the same keys, so they make one
// product of that many more rows, which the register-blocked Scores kernel runs faster.
int64_t AntidiagonalBlocks(const Problem& p);

// The antidiagonal estimate (reference.py) of query blocks [qb_begin, qb_end) of (b, q heads
// [h, h + heads), kv head bk): each row's softmax over its sampled keys (packed.h SampledKt) in
// blocks some of the heads may attend and, when causal, visible, summed per key block into
// mass[(qb - qb_begin) * k_blocks + kb]. q: the blocks' scaled query rows (one head's, or the
// group's mean), from QueryBegin(qb_begin), non-finite as 0, rounded to bf16.
void AntidiagonalMass(const Problem& p, const BlockMath& math, const PackedKeysValues& kv, int64_t b, int64_t h,
                      int64_t heads, int64_t bk, int64_t qb_begin, int64_t qb_end, const float* q,
                      SelectionScratch& scratch, std::vector<double>& mass);

// Whether the estimate scores every query row (the token estimate) or the block's mean query.
bool ScoresEveryRow(const Problem& p);

// How one selection picks its blocks: a head's (SelectionOf, HeadThreshold) or a shared
// group's (SelectionAt its GroupThreshold).
struct Budget {
  HeadSelection mode;
  float threshold;
};
Budget HeadBudget(const Problem& p, int64_t h);
// The shared selection of the query heads [h, h + heads).
Budget GroupBudget(const Problem& p, int64_t h, int64_t heads);

// The key blocks of query block qb to compute, ascending, from the allowed ones
// (scratch.allowed): global and local blocks, then the rest by estimated mass until the
// budget's threshold or the max_density cap (a streaming budget: none; scores are not read).
// scores[r * stride + kb] = scaled query . mean(key block kb), for the block's mean query
// (rows = 1, the mean estimate) or each of its rows (the token estimate; overwritten). The
// estimate adds log(keys in kb) and takes a softmax over the candidates (per row for token).
void ChooseKeyBlocks(const Problem& p, const BlockMath& math, Budget budget, int64_t qb, float* scores, int rows,
                     int stride, SelectionScratch& scratch, std::vector<int32_t>& chosen);

}  // namespace tfsa::cpu
