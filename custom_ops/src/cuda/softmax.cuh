// The online softmax of the attention, per row: scores with causality and the mask applied,
// warp reductions, the running max and sum, and the rescaling of the output so far. Every
// math kind (wmma_math.cuh, simt_math.cuh, exact_rows.cuh) computes its weights with these.
#pragma once

#include "common.cuh"

namespace tfsa::cuda {

// The scaled (and softcapped) score of (query i, key j) with causality, the mask and the bias applied. A pair
// hidden by causality or the mask, or whose mask + bias is -inf, is -inf whatever its dot, so
// a NaN key it does not see stays out, as in the reference.
__device__ __forceinline__ float Score(const Geometry& g, int64_t b, int64_t h, int64_t i, int64_t j, float dot) {
  float bias = j <= g.grid.LastVisibleKey(i) && j >= g.grid.FirstVisibleKey(i) ? 0.0f : kNegInf;
  if (g.mask.kind != TFSA_MASK_NONE && bias == 0.0f) bias = g.mask.Bias(g.mask.Offset(b, h, i, j));
  if (g.bias.kind != TFSA_MASK_NONE && bias != kNegInf) bias += g.bias.Bias(g.bias.Offset(b, h, i, j));
  return bias == kNegInf ? kNegInf : Capped(dot * g.attrs.scale, g.attrs.softcap) + bias;
}

// Reductions over the `width` consecutive lanes holding a row:
template <int width>
__device__ __forceinline__ float GroupMax(float x) {
#pragma unroll
  for (int offset = width / 2; offset > 0; offset >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

template <int width>
__device__ __forceinline__ float GroupSum(float x) {
#pragma unroll
  for (int offset = width / 2; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// The factor for the output so far when the running max moves from m to m_new.
__device__ __forceinline__ float Rescale(float m, float m_new) { return m == kNegInf ? 0.0f : __expf(m - m_new); }

// A score's weight against the running max; with nothing attendable yet, masked keys weigh 0
// and NaN stays NaN.
__device__ __forceinline__ float Weight(float s, float m_new) {
  return (m_new == kNegInf && !isnan(s)) ? 0.0f : __expf(s - m_new);
}

// One query row held by a warp, 32 keys at a time (one a lane): the running max m and sum l,
// and the unnormalised output of this lane's value columns (lane + 32 t).
struct WarpRow {
  static constexpr int kMaxDv = 256;
  float m = kNegInf, l = 0.0f, o[kMaxDv / 32];

  __device__ WarpRow() {
    for (float& x : o) x = 0.0f;
  }

  // Adds one key a lane, with this lane's `score` (-inf: not attended). value_row(k) points
  // to the value row of lane k's key; it is read only for attended keys.
  template <class ValueRow>
  __device__ __forceinline__ void Add(float score, int lane, int64_t dv, ValueRow value_row) {
    const float m_new = fmaxf(m, GroupMax<32>(score));
    const float weight = Weight(score, m_new), factor = Rescale(m, m_new);
    l = l * factor + GroupSum<32>(weight);
    m = m_new;
#pragma unroll
    for (int t = 0; t < kMaxDv / 32; ++t) o[t] *= factor;
    for (int k = 0; k < 32; ++k) {
      const float p = __shfl_sync(0xffffffffu, weight, k);
      if (__shfl_sync(0xffffffffu, score, k) == kNegInf) continue;  // not attended: its value is not read
      const auto* values = value_row(k);
#pragma unroll
      for (int t = 0; t < kMaxDv / 32; ++t)
        if (lane + 32 * t < dv) o[t] += p * ToFloat(values[lane + 32 * t]);
    }
  }

  // O / l into the row `out` (zeros when no key was attended).
  template <class T>
  __device__ void Store(T* out, int lane, int64_t dv) const {
#pragma unroll
    for (int t = 0; t < kMaxDv / 32; ++t)
      if (lane + 32 * t < dv) out[lane + 32 * t] = FromFloat<T>(l == 0.0f ? 0.0f : o[t] / l);
  }
};

}  // namespace tfsa::cuda
