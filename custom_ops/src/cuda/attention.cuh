// Block-sparse attention on the GPU: each thread block takes a run of query rows of one
// query block and walks the keys of that block's chosen key blocks (the schedule) in tiles,
// with an online softmax. The math of a tile is a class of its own: tensor cores (WMMA) for
// float16/bfloat16 at head dims 64/80/96/128, plain FMAs for the rest.
#pragma once

#include <cuda_runtime.h>

#include "common.cuh"

namespace tfsa::cuda {

struct AttentionArgs {
  Geometry g;
  const void *query, *key, *value;
  void* output;
  const int32_t* chosen;  // [rows, nK], per Schedule
  const int32_t* counts;  // [rows]
  const uint8_t* value_flags;  // [B * Hkv, nK], per Schedule: a value of the block is NaN or inf
};

// Enqueues the attention kernel for the call's dtype and head dims.
cudaError_t LaunchAttention(const AttentionArgs& args, int32_t dtype, bool aligned16, cudaStream_t stream);

}  // namespace tfsa::cuda
