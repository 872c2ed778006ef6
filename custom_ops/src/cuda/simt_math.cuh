// The plain math kind: tiles of 8 query rows (one a warp) by 32 keys (one a lane) with FMAs,
// for float32 and every head dim the tensor-core tiles do not take (value head dims <= 256).
#pragma once

#include "softmax.cuh"
#include "tile_scheduler.cuh"

namespace tfsa::cuda {

template <class T>
struct SimtMath {
  static constexpr int kRows = 8, kKeys = 32, kThreads = 256, kStages = 2;
  float* q_tile;        // [kRows][D]
  float* k_tile[2];     // per stage [kKeys][D + 1]
  float* v_tile[2];     // per stage [kKeys][Dv]
  int64_t* key_index;   // per stage [kKeys]
  const Geometry& g;
  Place at;
  int warp, lane;
  WarpRow row;

  static size_t SharedBytes(int64_t d, int64_t dv) {
    return AlignUp(sizeof(float) * kRows * d) +
           kStages * (AlignUp(sizeof(float) * kKeys * (d + 1)) + AlignUp(sizeof(float) * kKeys * dv)) +
           AlignUp(sizeof(int64_t) * kKeys * kStages);
  }

  __device__ SimtMath(unsigned char* shared, const Geometry& geometry, Place place) : g(geometry), at(place) {
    const int64_t d = g.dims.head_dim, dv = g.dims.v_head_dim;
    q_tile = reinterpret_cast<float*>(shared);
    shared += AlignUp(sizeof(float) * kRows * d);
    for (int stage = 0; stage < kStages; ++stage) {
      k_tile[stage] = reinterpret_cast<float*>(shared);
      shared += AlignUp(sizeof(float) * kKeys * (d + 1));
      v_tile[stage] = reinterpret_cast<float*>(shared);
      shared += AlignUp(sizeof(float) * kKeys * dv);
    }
    key_index = reinterpret_cast<int64_t*>(shared);
    warp = threadIdx.x / 32;
    lane = threadIdx.x % 32;
  }

  __device__ void LoadQueries(const T* query) {
    const int64_t d = g.dims.head_dim, base = at.QueryBase(g);
    for (int64_t e = threadIdx.x; e < kRows * d; e += kThreads) {
      const int64_t r = e / d, i = at.q_begin + r;
      q_tile[e] = i < at.q_end ? ToFloat(query[(base + i) * d + e % d]) : 0.0f;
    }
  }

  // Copies (converted to float) the tile at `pos` of the key stream into `stage`.
  __device__ void Load(const T* key, const T* value, const int32_t* blocks, int n_blocks, int64_t pos, int stage) {
    const int64_t d = g.dims.head_dim, dv = g.dims.v_head_dim, kv_base = at.KeyBase(g);
    for (int t = threadIdx.x; t < kKeys; t += kThreads) key_index[stage * kKeys + t] = KeyAt(g, blocks, n_blocks, pos + t);
    for (int64_t e = threadIdx.x; e < kKeys * d; e += kThreads) {
      const int64_t t = e / d, j = KeyAt(g, blocks, n_blocks, pos + t);
      k_tile[stage][t * (d + 1) + e % d] = j >= 0 ? ToFloat(key[(kv_base + j) * d + e % d]) : 0.0f;
    }
    for (int64_t e = threadIdx.x; e < kKeys * dv; e += kThreads) {
      const int64_t j = KeyAt(g, blocks, n_blocks, pos + e / dv);
      v_tile[stage][e] = j >= 0 ? ToFloat(value[(kv_base + j) * dv + e % dv]) : 0.0f;
    }
  }

  __device__ void Compute(int stage, bool) {
    __syncthreads();
    const int64_t i = at.q_begin + warp, d = g.dims.head_dim, dv = g.dims.v_head_dim;
    if (i < at.q_end) {  // a row past the block: its warp idles to the barrier
      const float* keys = k_tile[stage];
      const float* values = v_tile[stage];
      const int64_t j = key_index[stage * kKeys + lane];
      float dot = 0.0f;
      for (int64_t x = 0; x < d; ++x) dot += q_tile[warp * d + x] * keys[lane * (d + 1) + x];
      const float score = j >= 0 ? Score(g, at.b, at.h, i, j, dot) : kNegInf;
      row.Add(score, lane, dv, [&](int k) { return values + k * dv; });
    }
    __syncthreads();  // all warps are done with this stage before it is refilled
  }

  __device__ void Store(T* output) {
    const int64_t i = at.q_begin + warp, dv = g.dims.v_head_dim;
    if (i < at.q_end) row.Store(output + (at.QueryBase(g) + i) * dv, lane, dv);
  }
};

}  // namespace tfsa::cuda
