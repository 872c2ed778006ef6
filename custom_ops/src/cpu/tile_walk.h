// The math of one query block on the CPU: its chosen key blocks (selection.h) walked in tiles
// of up to kTileBlocks blocks, each tile computed by the block kernels (block_math.h) with an
// online softmax. Dense attention is the same walk over every allowed block.
#pragma once

#include <cstdint>
#include <vector>

#include "block_math.h"
#include "packed.h"
#include "problem.h"

namespace tfsa::cpu {

constexpr size_t kTileBlocks = 4;  // key blocks one softmax step covers at most

// One query block's running softmax: per row the max m and sum l, and the unnormalised
// output o [rows, v_pad].
struct RowsState {
  std::vector<float> m, l, o;
};

// Per-thread buffers of the walk, reused between query blocks.
struct TileScratch {
  std::vector<float> s;          // [rows, kTileBlocks * key_pad] scores, then probabilities
  std::vector<uint8_t> hidden;   // [rows, tile width]: score -inf before the softmax
  std::vector<uint32_t> q2;      // compute_precision = bf16: the query rows as bf16 pairs
};

// Walks the `chosen` key blocks (ascending) of (batch b, head h, query block qb) for the
// scaled queries q [rows, head_dim]; leaves the rows' softmax state in `state`.
void WalkTiles(const Problem& p, const BlockMath& math, const PackedKeysValues& kv, int64_t b, int64_t h, int64_t qb,
               const float* q, int rows, const std::vector<int32_t>& chosen, TileScratch& scratch, RowsState& state);

}  // namespace tfsa::cpu
