// Block-sparse attention on the GPU: each thread block takes a run of query rows of one
// query block and walks the keys of that block's chosen key blocks (the selection) in tiles
// (tile_scheduler.cuh), with an online softmax (softmax.cuh). The math of a tile is a class of
// its own: tensor cores (wmma_math.cuh) for float16/bfloat16 at head dims 64/80/96/128, plain
// FMAs (simt_math.cuh) for the rest, exact rows (exact_rows.cuh) where values are not finite.
// attention.cu launches them.
#pragma once

#include <cuda_runtime.h>

#include "common.cuh"

namespace tfsa::cuda {

struct AttentionArgs {
  Geometry g;
  const void *query, *key, *value;
  void* output;
  const int32_t* chosen;  // [rows, nK], per Selection
  const int32_t* counts;  // [rows]
  const uint8_t* value_flags;  // [B * Hkv, nK], per Selection: a value of the block is NaN or inf
};

// Enqueues the attention kernel for the call's dtype and head dims.
cudaError_t LaunchAttention(const AttentionArgs& args, int32_t dtype, bool aligned16, cudaStream_t stream);

}  // namespace tfsa::cuda
