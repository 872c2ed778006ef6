// Device helpers shared by the selection and attention kernels: element conversion, the
// broadcast mask, and the call's geometry as kernels see it.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "entry.h"
#include "tfsa/block_grid.h"
#include "tfsa/block_rules.h"
#include "tfsa/contract.h"

// Kernel launches and dynamic shared memory go through these two macros so that the same
// sources also build for the CPU emulation the tests use (custom_ops/emulation/).
#ifndef TFSA_CUDA_EMULATION
#define TFSA_LAUNCH(kernel, grid, block, shared, stream) kernel<<<grid, block, shared, stream>>>
#define TFSA_DYNAMIC_SHARED(name) extern __shared__ __align__(128) unsigned char name[]
#endif

namespace tfsa::cuda {

constexpr float kNegInf = -INFINITY;

__device__ __forceinline__ float ToFloat(float x) { return x; }
__device__ __forceinline__ float ToFloat(__half x) { return __half2float(x); }
__device__ __forceinline__ float ToFloat(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class T> __device__ __forceinline__ T FromFloat(float x);
template <> __device__ __forceinline__ float FromFloat<float>(float x) { return x; }
template <> __device__ __forceinline__ __half FromFloat<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 FromFloat<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// The optional attn_mask or attn_bias (kind TFSA_MASK_T), broadcast to [B, Hq, Sq, Sk] by strides.
struct Mask {
  int32_t kind = TFSA_MASK_NONE;
  int32_t dtype = TFSA_FLOAT32;  // element type when kind is TFSA_MASK_T
  const void* data = nullptr;
  int64_t stride[4] = {0, 0, 0, 0};

  __device__ int64_t Offset(int64_t b, int64_t h, int64_t i, int64_t j) const {
    return b * stride[0] + h * stride[1] + i * stride[2] + j * stride[3];
  }
  // The additive value: bool true -> 0, false -> -inf.
  __device__ float Bias(int64_t offset) const {
    if (kind == TFSA_MASK_BOOL) return static_cast<const bool*>(data)[offset] ? 0.0f : kNegInf;
    if (kind == TFSA_MASK_NONE) return 0.0f;
    if (dtype == TFSA_FLOAT16) return ToFloat(static_cast<const __half*>(data)[offset]);
    if (dtype == TFSA_BFLOAT16) return ToFloat(static_cast<const __nv_bfloat16*>(data)[offset]);
    return static_cast<const float*>(data)[offset];
  }
};

// Everything the kernels need to know about one call.
struct Geometry {
  Dims dims;
  Attributes attrs;  // effective (contract.h): scale resolved, sizes cut to the sequences
  BlockGrid grid;
  bool uses_estimate = false;  // false: every allowed block is computed
  Mask mask;
  Mask bias;  // attn_bias: read inside the computed blocks, and at block centres for the estimate
  MaskBlockLayout mask_blocks;  // where the mask block states live (block_rules.h)
  // Rows between one key/value head and the next: kv_len for SparseAttention's contiguous
  // inputs, the cache's row count when SparseGroupQueryAttention attends a view of its cache.
  int64_t kv_rows = 0;

  __device__ int64_t KvHead(int64_t h) const { return h / (dims.q_heads / dims.kv_heads); }
};

// Shared memory carve-outs start on 128-byte boundaries.
__host__ __device__ constexpr size_t AlignUp(size_t bytes) { return (bytes + 127) / 128 * 128; }

}  // namespace tfsa::cuda
