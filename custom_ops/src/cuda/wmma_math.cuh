// The tensor-core math kind: float16/bfloat16 tiles of 64 query rows by 64 keys through WMMA
// 16x16x16 with float accumulation, for head dims 64, 80, 96 and 128 (equal Q/K and V dims).
#pragma once

#include <cuda_pipeline.h>
#include <mma.h>

#include "softmax.cuh"
#include "tile_scheduler.cuh"

namespace tfsa::cuda {

namespace wmma = nvcuda::wmma;

// 64 query rows (4 warps x 16) by 64 keys, head dim HD.
// Keys and values arrive by cp.async into one of two stages while the other is computed.
// The output stays in accumulator fragments; a probe fragment (each element's row index)
// lets rows be rescaled there without knowing the fragment layout.
template <class T, int HD>
struct WmmaMath {
  static constexpr int kRows = 64, kKeys = 64, kThreads = 128, kStages = 2;
  static constexpr int kLdH = HD + 8, kLdS = kKeys + 4, kLdP = kKeys + 8;
  static constexpr size_t kTileBytes = AlignUp(sizeof(T) * kKeys * kLdH);
  // S doubles as the staging area of Q at the start (and of O at the end): it must hold both.
  static constexpr size_t kSBytes = AlignUp(sizeof(float) * kRows * kLdS) > AlignUp(sizeof(T) * kRows * kLdH)
                                        ? AlignUp(sizeof(float) * kRows * kLdS)
                                        : AlignUp(sizeof(T) * kRows * kLdH);
  static constexpr size_t kK = 0, kV = kK + kStages * kTileBytes, kS = kV + kStages * kTileBytes;
  static constexpr size_t kP = kS + kSBytes, kAlpha = kP + AlignUp(sizeof(T) * kRows * kLdP);
  static constexpr size_t kIdx = kAlpha + AlignUp(sizeof(float) * kRows);
  static constexpr size_t kSharedBytes = kIdx + AlignUp(sizeof(int64_t) * kKeys * kStages);
  using Accumulator = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

  unsigned char* shared;
  T* p_tile;
  float *s_tile, *alpha;
  const Geometry& g;
  Place at;
  int warp, lane;
  float m = kNegInf, l = 0.0f;  // of row lane / 2 of this warp's 16
  wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> q_frag[HD / 16];
  Accumulator o_frag[HD / 16], row_of;

  __device__ WmmaMath(unsigned char* memory, const Geometry& geometry, Place place)
      : shared(memory), p_tile(reinterpret_cast<T*>(memory + kP)), s_tile(reinterpret_cast<float*>(memory + kS)),
        alpha(reinterpret_cast<float*>(memory + kAlpha)), g(geometry), at(place), warp(threadIdx.x / 32),
        lane(threadIdx.x % 32) {}

  __device__ T* KTile(int stage) { return reinterpret_cast<T*>(shared + kK + stage * kTileBytes); }
  __device__ T* VTile(int stage) { return reinterpret_cast<T*>(shared + kV + stage * kTileBytes); }
  __device__ int64_t* KeyIndex(int stage) { return reinterpret_cast<int64_t*>(shared + kIdx) + stage * kKeys; }

  // Q through the S area into registers; the row probe; zero output.
  __device__ void LoadQueries(const T* query) {
    constexpr int kVectors = HD * sizeof(T) / 16;
    T* q_tile = reinterpret_cast<T*>(s_tile);
    const int64_t base = at.QueryBase(g), rows = at.q_end - at.q_begin;
    for (int e = threadIdx.x; e < kRows * kVectors; e += kThreads) {
      const int r = e / kVectors, v = e % kVectors;
      uint4 value = make_uint4(0, 0, 0, 0);
      if (r < rows) value = reinterpret_cast<const uint4*>(query + (base + at.q_begin + r) * HD)[v];
      reinterpret_cast<uint4*>(q_tile + r * kLdH)[v] = value;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk) wmma::load_matrix_sync(q_frag[kk], q_tile + warp * 16 * kLdH + kk * 16, kLdH);
    __syncthreads();  // the S area is free again
    float* probe = s_tile + warp * 16 * kLdS;
    for (int e = lane; e < 16 * 16; e += 32) probe[(e / 16) * kLdS + e % 16] = static_cast<float>(e / 16);
    __syncwarp();
    wmma::load_matrix_sync(row_of, probe, kLdS, wmma::mem_row_major);
#pragma unroll
    for (int n = 0; n < HD / 16; ++n) wmma::fill_fragment(o_frag[n], 0.0f);
  }

  // Issues the copies of the tile at `pos` of the key stream into `stage`.
  __device__ void Load(const T* key, const T* value, const int32_t* blocks, int n_blocks, int64_t pos, int stage) {
    constexpr int kVectors = HD * sizeof(T) / 16;
    const int64_t kv_base = at.KeyBase(g);
    T *k_tile = KTile(stage), *v_tile = VTile(stage);
    for (int t = threadIdx.x; t < kKeys; t += kThreads) KeyIndex(stage)[t] = KeyAt(g, blocks, n_blocks, pos + t);
    for (int e = threadIdx.x; e < kKeys * kVectors; e += kThreads) {
      const int r = e / kVectors, v = e % kVectors;
      const int64_t j = KeyAt(g, blocks, n_blocks, pos + r);
      const size_t offset = j >= 0 ? (kv_base + j) * HD + v * (16 / sizeof(T)) : 0;
      const size_t zero_fill = j >= 0 ? 0 : 16;  // past the end: zeros, nothing read
      __pipeline_memcpy_async(k_tile + r * kLdH + v * 16 / sizeof(T), key + offset, 16, zero_fill);
      __pipeline_memcpy_async(v_tile + r * kLdH + v * 16 / sizeof(T), value + offset, 16, zero_fill);
    }
    __pipeline_commit();
  }

  // Computes the tile in `stage`; `pending`: a later tile's copies were issued after it.
  __device__ void Compute(int stage, bool pending) {
    __pipeline_wait_prior(pending ? 1 : 0);
    __syncthreads();
    Scores(KTile(stage));
    Probabilities(KeyIndex(stage));
    Accumulate(VTile(stage));
    __syncthreads();  // all warps are done with this stage before it is refilled
  }

  // s = Q K^T for this warp's 16 rows.
  __device__ void Scores(const T* k_tile) {
#pragma unroll
    for (int n = 0; n < kKeys / 16; ++n) {
      Accumulator acc;
      wmma::fill_fragment(acc, 0.0f);
#pragma unroll
      for (int kk = 0; kk < HD / 16; ++kk) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> k_frag;
        wmma::load_matrix_sync(k_frag, k_tile + n * 16 * kLdH + kk * 16, kLdH);
        wmma::mma_sync(acc, q_frag[kk], k_frag, acc);
      }
      wmma::store_matrix_sync(s_tile + warp * 16 * kLdS + n * 16, acc, kLdS, wmma::mem_row_major);
    }
    __syncwarp();
  }

  // Online softmax: two lanes per row, 32 keys each, in two passes over the S tile (masked
  // scores and their max, then weights); weights to p_tile, the rows' rescaling factors to
  // `alpha`, and the output fragments rescaled.
  __device__ void Probabilities(const int64_t* key_index) {
    const int r = warp * 16 + lane / 2, half = lane % 2;
    const int64_t i = at.q_begin + r;
    float* s_row = s_tile + r * kLdS + half * 32;
    float tile_max = kNegInf;
#pragma unroll 8
    for (int t = 0; t < 32; ++t) {
      const int c = (t + r) & 31;  // rotated: the rows of a warp hit different banks
      const int64_t j = key_index[half * 32 + c];
      const float score = (i < at.q_end && j >= 0) ? Score(g, at.b, at.h, i, j, s_row[c]) : kNegInf;
      s_row[c] = score;
      tile_max = fmaxf(tile_max, score);
    }
    const float m_new = fmaxf(m, GroupMax<2>(tile_max));
    float sum = 0.0f;
#pragma unroll 8
    for (int t = 0; t < 32; ++t) {
      const int c = (t + r) & 31;
      const float w = Weight(s_row[c], m_new);
      p_tile[r * kLdP + half * 32 + c] = FromFloat<T>(w);
      sum += w;
    }
    const float factor = Rescale(m, m_new);
    l = l * factor + GroupSum<2>(sum);
    m = m_new;
    if (half == 0) alpha[r] = factor;
    __syncwarp();
#pragma unroll
    for (int n = 0; n < HD / 16; ++n)
#pragma unroll
      for (int e = 0; e < o_frag[n].num_elements; ++e)
        o_frag[n].x[e] *= alpha[warp * 16 + static_cast<int>(row_of.x[e])];
  }

  // o += P V for the warp's rows.
  __device__ void Accumulate(const T* v_tile) {
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> p_frag;
      wmma::load_matrix_sync(p_frag, p_tile + warp * 16 * kLdP + kk * 16, kLdP);
#pragma unroll
      for (int n = 0; n < HD / 16; ++n) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> v_frag;
        wmma::load_matrix_sync(v_frag, v_tile + kk * 16 * kLdH + n * 16, kLdH);
        wmma::mma_sync(o_frag[n], p_frag, v_frag, o_frag[n]);
      }
    }
  }

  // O / l through the warp's rows of the S area, 64 columns at a time.
  __device__ void Store(T* output) {
    const int r = lane / 2;  // this lane's row; its l is the row's sum
    const float row_l = l;
    __syncwarp();
    float* staging = s_tile + warp * 16 * kLdS;
    const int64_t base = at.QueryBase(g);
#pragma unroll
    for (int first = 0; first < HD; first += kKeys) {
#pragma unroll
      for (int n = first / 16; n < (first + kKeys) / 16 && n < HD / 16; ++n)
        wmma::store_matrix_sync(staging + (n * 16 - first), o_frag[n], kLdS, wmma::mem_row_major);
      __syncwarp();
      const int64_t i = at.q_begin + warp * 16 + r;
      const int width = HD - first < kKeys ? HD - first : kKeys;
      if (i < at.q_end)
        for (int c = lane % 2; c < width; c += 2)  // no key at all: zeros
          output[(base + i) * HD + first + c] =
              FromFloat<T>(row_l == 0.0f ? 0.0f : staging[r * kLdS + c] / row_l);
      __syncwarp();
    }
  }
};

}  // namespace tfsa::cuda
