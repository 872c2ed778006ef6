// Device helpers shared by the selection and attention kernels: element conversion, the
// broadcast mask, and the call's geometry as kernels see it.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "entry.h"
#include "tfsa/block_grid.h"

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

// The optional attn_mask, broadcast to [B, Hq, Sq, Sk] by strides.
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

// Per-block mask states, as on the CPU: closed (nothing attendable), partial, open (bias 0).
enum MaskState : uint8_t { kClosed = 0, kPartial = 1, kOpen = 2 };

// Everything the kernels need to know about one call.
struct Geometry {
  BlockGrid grid;
  int64_t batch = 0, q_heads = 0, kv_heads = 0, head_dim = 0, v_head_dim = 0;
  float scale = 1.0f;
  int64_t global_tokens = 0, local_window = 0;
  float threshold = 1.0f, max_density = 1.0f;
  bool uses_estimate = false;  // false: every allowed block is computed
  Mask mask;
  // Mask block states are stored per (b, mask head, mask query block, key block); the
  // mask head/query block is 0 when the mask broadcasts over heads/rows. Rows broadcast when
  // the mask's query-row stride is 0, not when there is one query block: a per-row mask is
  // read row by row however few blocks there are.
  int64_t mask_heads = 1, mask_q_blocks = 1;
  bool mask_rows_broadcast = true;

  __device__ int64_t KvHead(int64_t h) const { return h / (q_heads / kv_heads); }
  __device__ int64_t MaskBlockIndex(int64_t b, int64_t h, int64_t qb, int64_t kb) const {
    const int64_t mh = mask_heads == 1 ? 0 : h, mqb = mask_rows_broadcast ? 0 : qb;
    return ((b * mask_heads + mh) * mask_q_blocks + mqb) * grid.k_blocks + kb;
  }
};

}  // namespace tfsa::cuda
