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
  std::vector<double> block_mass;            // the antidiagonal estimate's mass per key block
  std::vector<float> column_mass;            // one residue's probabilities summed over its rows
};

// Fills `out` from the mask (p.mask must be present); parallel over (batch, head, query block).
void ClassifyMaskBlocks(const Problem& p, MaskBlocks& out,
                        const std::function<void(size_t, const std::function<void(size_t)>&)>& parallel_for);

// Key blocks of (batch b, head h, query block qb) that hold at least one key some query of
// the block may see, by causality and the mask (p.mask_blocks). Returns how many.
int64_t AllowedKeyBlocks(const Problem& p, int64_t b, int64_t h, int64_t qb, std::vector<uint8_t>& allowed);

// Whether ChooseKeyBlocks reads the estimate (else every allowed block is computed).
bool UsesEstimate(const Problem& p);

// The antidiagonal estimate of query block qb (reference.py): each row's softmax over its
// sampled keys (packed.h SampledKt) in allowed blocks and, when causal, visible, summed per
// key block into scratch.block_mass. q: the block's scaled query rows, non-finite as 0.
void AntidiagonalMass(const Problem& p, const BlockMath& math, const PackedKeysValues& kv, int64_t bk, int64_t qb,
                      const float* q, int rows, SelectionScratch& scratch);

// Whether the estimate scores every query row (the token estimate) or the block's mean query.
bool ScoresEveryRow(const Problem& p);

// The key blocks to compute, ascending, from the allowed ones (scratch.allowed): global and
// local blocks, then the rest by estimated mass until `threshold` or the max_density cap.
// scores[r * stride + kb] = scaled query . mean(key block kb), for the block's mean query
// (rows = 1, the mean estimate) or each of its rows (the token estimate; overwritten). The
// estimate adds log(keys in kb) and takes a softmax over the candidates (per row for token).
void ChooseKeyBlocks(const Problem& p, const BlockMath& math, int64_t qb, float* scores, int rows, int stride,
                     SelectionScratch& scratch, std::vector<int32_t>& chosen);

}  // namespace tfsa::cpu
