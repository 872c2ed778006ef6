#include <mma.h>

#include "attention.cuh"

namespace tfsa::cuda {
namespace {

namespace wmma = nvcuda::wmma;

// The scaled score of (query i, key j) with causality and the mask applied. A NaN dot
// stays NaN even where the pair is hidden, as in the reference.
__device__ __forceinline__ float Score(const Geometry& g, int64_t b, int64_t h, int64_t i, int64_t j, float dot) {
  float bias = j <= g.grid.LastVisibleKey(i) ? 0.0f : kNegInf;
  if (g.mask.kind != TFSA_MASK_NONE && bias == 0.0f) bias = g.mask.Bias(g.mask.Offset(b, h, i, j));
  return dot * g.scale + bias;
}

// One online-softmax step of a row held by a warp (N values per lane): scores become
// probabilities against the new running max; returns the factor for the old output.
template <int N>
__device__ __forceinline__ float SoftmaxStep(float (&s)[N], float& m, float& l) {
  float tile_max = kNegInf;
  for (int n = 0; n < N; ++n) tile_max = fmaxf(tile_max, s[n]);
  const float m_new = fmaxf(m, WarpMax(tile_max));
  const float alpha = m == kNegInf ? 0.0f : __expf(m - m_new);
  float sum = 0.0f;
  for (int n = 0; n < N; ++n) {
    // Nothing attendable yet: masked keys give 0, NaN stays NaN.
    s[n] = (m_new == kNegInf && !isnan(s[n])) ? 0.0f : __expf(s[n] - m_new);
    sum += s[n];
  }
  l = l * alpha + WarpSum(sum);
  m = m_new;
  return alpha;
}

// Where a thread block works: batch, head and its rows [q_begin, q_end).
struct Place {
  int64_t b, h, q_begin, q_end;
  __device__ int64_t QueryBase(const Geometry& g) const { return (b * g.q_heads + h) * g.grid.q_len; }
  __device__ int64_t KeyBase(const Geometry& g) const { return (b * g.kv_heads + g.KvHead(h)) * g.grid.kv_len; }
};

// The key of slot `t` of the tile starting at `stream_pos` in the chosen blocks' keys
// (blocks back to back, block_size keys each), or -1 past the end.
__device__ __forceinline__ int64_t KeyAt(const Geometry& g, const int32_t* blocks, int n_blocks, int64_t pos) {
  const int64_t c = pos / g.grid.block;
  if (c >= n_blocks) return -1;
  const int64_t j = blocks[c] * g.grid.block + pos % g.grid.block;
  return j < g.grid.kv_len ? j : -1;
}

__host__ __device__ constexpr size_t AlignUp(size_t bytes) { return (bytes + 127) / 128 * 128; }

// ---- tensor-core tiles: 64 query rows (4 warps x 16) by 64 keys, head dim HD ----
template <class T, int HD>
struct WmmaMath {
  static constexpr int kRows = 64, kKeys = 64, kThreads = 128;
  static constexpr int kLdH = HD + 8, kLdS = kKeys + 4, kLdP = kKeys + 8, kLdO = HD + 4;
  static constexpr size_t kQ = 0, kK = kQ + AlignUp(sizeof(T) * kRows * kLdH);
  static constexpr size_t kV = kK + AlignUp(sizeof(T) * kKeys * kLdH);
  static constexpr size_t kS = kV + AlignUp(sizeof(T) * kKeys * kLdH);
  static constexpr size_t kP = kS + AlignUp(sizeof(float) * kRows * kLdS);
  static constexpr size_t kO = kP + AlignUp(sizeof(T) * kRows * kLdP);
  static constexpr size_t kIdx = kO + AlignUp(sizeof(float) * kRows * kLdO);
  static constexpr size_t kSharedBytes = kIdx + AlignUp(sizeof(int64_t) * kKeys);

  T *q_tile, *k_tile, *v_tile, *p_tile;
  float *s_tile, *o_tile;
  int64_t* key_index;
  const Geometry& g;
  Place at;
  int warp, lane;
  float m[16], l[16];
  wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> q_frag[HD / 16];

  __device__ WmmaMath(unsigned char* shared, const Geometry& geometry, Place place)
      : q_tile(reinterpret_cast<T*>(shared + kQ)), k_tile(reinterpret_cast<T*>(shared + kK)),
        v_tile(reinterpret_cast<T*>(shared + kV)), p_tile(reinterpret_cast<T*>(shared + kP)),
        s_tile(reinterpret_cast<float*>(shared + kS)), o_tile(reinterpret_cast<float*>(shared + kO)),
        key_index(reinterpret_cast<int64_t*>(shared + kIdx)), g(geometry), at(place),
        warp(threadIdx.x / 32), lane(threadIdx.x % 32) {
    #pragma unroll
    for (int r = 0; r < 16; ++r) m[r] = kNegInf, l[r] = 0.0f;
  }

  // Copies `rows` rows of HD elements (row r from src_row(r), or zeros) into a tile, 16 bytes at a time.
  template <class RowOf>
  __device__ void LoadRows(T* tile, const T* base, int rows, RowOf row_of) {
    constexpr int kVectors = HD * sizeof(T) / 16;
    for (int e = threadIdx.x; e < rows * kVectors; e += kThreads) {
      const int r = e / kVectors, v = e % kVectors;
      const int64_t src = row_of(r);
      uint4 value = make_uint4(0, 0, 0, 0);
      if (src >= 0) value = reinterpret_cast<const uint4*>(base + src * HD)[v];
      reinterpret_cast<uint4*>(tile + r * kLdH)[v] = value;
    }
  }

  __device__ void LoadQueries(const T* query) {
    const int64_t base = at.QueryBase(g), rows = at.q_end - at.q_begin;
    LoadRows(q_tile, query, kRows, [&](int r) { return r < rows ? base + at.q_begin + r : int64_t{-1}; });
    for (int e = threadIdx.x; e < kRows * kLdO; e += kThreads) o_tile[e] = 0.0f;
    __syncthreads();
    #pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk) wmma::load_matrix_sync(q_frag[kk], q_tile + warp * 16 * kLdH + kk * 16, kLdH);
  }

  __device__ void Step(const T* key, const T* value, const int32_t* blocks, int n_blocks, int64_t stream_pos) {
    __syncthreads();  // the previous tile is no longer read
    const int64_t kv_base = at.KeyBase(g);
    for (int t = threadIdx.x; t < kKeys; t += kThreads) key_index[t] = KeyAt(g, blocks, n_blocks, stream_pos + t);
    __syncthreads();
    const auto row_of = [&](int r) { return key_index[r] >= 0 ? kv_base + key_index[r] : int64_t{-1}; };
    LoadRows(k_tile, key, kKeys, row_of);
    LoadRows(v_tile, value, kKeys, row_of);
    __syncthreads();
    Scores();
    Probabilities();
    Accumulate();
  }

  // s = Q K^T for this warp's 16 rows.
  __device__ void Scores() {
    #pragma unroll
    for (int n = 0; n < kKeys / 16; ++n) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
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

  // Online softmax of the warp's rows into p_tile; the output rows are rescaled.
  __device__ void Probabilities() {
    #pragma unroll
    for (int r = 0; r < 16; ++r) {
      const int64_t i = at.q_begin + warp * 16 + r;
      float s[kKeys / 32];
      #pragma unroll
      for (int t = 0; t < kKeys / 32; ++t) {
        const int c = lane + 32 * t;
        const int64_t j = key_index[c];
        s[t] = (i < at.q_end && j >= 0) ? Score(g, at.b, at.h, i, j, s_tile[(warp * 16 + r) * kLdS + c]) : kNegInf;
      }
      const float alpha = SoftmaxStep(s, m[r], l[r]);
      for (int t = 0; t < kKeys / 32; ++t) p_tile[(warp * 16 + r) * kLdP + lane + 32 * t] = FromFloat<T>(s[t]);
      for (int c = lane; c < HD; c += 32) o_tile[(warp * 16 + r) * kLdO + c] *= alpha;
    }
    __syncwarp();
  }

  // o += P V for the warp's rows.
  __device__ void Accumulate() {
    #pragma unroll
    for (int n = 0; n < HD / 16; ++n) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      float* o = o_tile + warp * 16 * kLdO + n * 16;
      wmma::load_matrix_sync(acc, o, kLdO, wmma::mem_row_major);
      #pragma unroll
      for (int kk = 0; kk < kKeys / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> p_frag;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> v_frag;
        wmma::load_matrix_sync(p_frag, p_tile + warp * 16 * kLdP + kk * 16, kLdP);
        wmma::load_matrix_sync(v_frag, v_tile + kk * 16 * kLdH + n * 16, kLdH);
        wmma::mma_sync(acc, p_frag, v_frag, acc);
      }
      wmma::store_matrix_sync(o, acc, kLdO, wmma::mem_row_major);
    }
    __syncwarp();
  }

  __device__ void Store(T* output) {
    const int64_t base = at.QueryBase(g);
    #pragma unroll
    for (int r = 0; r < 16; ++r) {
      const int64_t i = at.q_begin + warp * 16 + r;
      if (i >= at.q_end) break;
      const float inv = l[r] == 0.0f ? 0.0f : 1.0f / l[r];  // no key at all: zeros
      for (int c = lane; c < HD; c += 32)
        output[(base + i) * HD + c] = FromFloat<T>(l[r] == 0.0f ? 0.0f : o_tile[(warp * 16 + r) * kLdO + c] * inv);
    }
  }
};

// ---- plain tiles: 8 query rows (one per warp) by 32 keys (one per lane), any head dims ----
template <class T>
struct SimtMath {
  static constexpr int kRows = 8, kKeys = 32, kThreads = 256, kMaxDv = 256;
  float *q_tile, *k_tile, *v_tile;  // [kRows][D], [kKeys][D + 1], [kKeys][Dv]
  int64_t* key_index;
  const Geometry& g;
  Place at;
  int warp, lane;
  float m = kNegInf, l = 0.0f, o[kMaxDv / 32];

  static size_t SharedBytes(int64_t d, int64_t dv) {
    return AlignUp(sizeof(float) * kRows * d) + AlignUp(sizeof(float) * kKeys * (d + 1)) +
           AlignUp(sizeof(float) * kKeys * dv) + AlignUp(sizeof(int64_t) * kKeys);
  }

  __device__ SimtMath(unsigned char* shared, const Geometry& geometry, Place place) : g(geometry), at(place) {
    const int64_t d = g.head_dim, dv = g.v_head_dim;
    q_tile = reinterpret_cast<float*>(shared);
    k_tile = reinterpret_cast<float*>(shared + AlignUp(sizeof(float) * kRows * d));
    v_tile = reinterpret_cast<float*>(reinterpret_cast<unsigned char*>(k_tile) + AlignUp(sizeof(float) * kKeys * (d + 1)));
    key_index = reinterpret_cast<int64_t*>(reinterpret_cast<unsigned char*>(v_tile) + AlignUp(sizeof(float) * kKeys * dv));
    warp = threadIdx.x / 32;
    lane = threadIdx.x % 32;
    for (float& x : o) x = 0.0f;
  }

  __device__ void LoadQueries(const T* query) {
    const int64_t d = g.head_dim, base = at.QueryBase(g);
    for (int64_t e = threadIdx.x; e < kRows * d; e += kThreads) {
      const int64_t r = e / d, i = at.q_begin + r;
      q_tile[e] = i < at.q_end ? ToFloat(query[(base + i) * d + e % d]) : 0.0f;
    }
  }

  __device__ void Step(const T* key, const T* value, const int32_t* blocks, int n_blocks, int64_t stream_pos) {
    const int64_t d = g.head_dim, dv = g.v_head_dim, kv_base = at.KeyBase(g);
    __syncthreads();
    for (int t = threadIdx.x; t < kKeys; t += kThreads) key_index[t] = KeyAt(g, blocks, n_blocks, stream_pos + t);
    __syncthreads();
    for (int64_t e = threadIdx.x; e < kKeys * d; e += kThreads) {
      const int64_t t = e / d, j = key_index[t];
      k_tile[t * (d + 1) + e % d] = j >= 0 ? ToFloat(key[(kv_base + j) * d + e % d]) : 0.0f;
    }
    for (int64_t e = threadIdx.x; e < kKeys * dv; e += kThreads) {
      const int64_t j = key_index[e / dv];
      v_tile[e] = j >= 0 ? ToFloat(value[(kv_base + j) * dv + e % dv]) : 0.0f;
    }
    __syncthreads();
    const int64_t i = at.q_begin + warp;
    if (i >= at.q_end) return;  // a row past the block: its warp idles to the next barrier
    float dot = 0.0f;
    for (int64_t x = 0; x < d; ++x) dot += q_tile[warp * d + x] * k_tile[lane * (d + 1) + x];
    float s[1] = {key_index[lane] >= 0 ? Score(g, at.b, at.h, i, key_index[lane], dot) : kNegInf};
    const float alpha = SoftmaxStep(s, m, l);
    #pragma unroll
    for (int t = 0; t < kMaxDv / 32; ++t) o[t] *= alpha;
    for (int k = 0; k < kKeys; ++k) {
      const float p = __shfl_sync(0xffffffffu, s[0], k);
      #pragma unroll
      for (int t = 0; t < kMaxDv / 32; ++t)
        if (lane + 32 * t < dv) o[t] += p * v_tile[k * dv + lane + 32 * t];
    }
  }

  __device__ void Store(T* output) {
    const int64_t i = at.q_begin + warp, dv = g.v_head_dim;
    if (i >= at.q_end) return;
    #pragma unroll
    for (int t = 0; t < kMaxDv / 32; ++t)
      if (lane + 32 * t < dv)
        output[(at.QueryBase(g) + i) * dv + lane + 32 * t] = FromFloat<T>(l == 0.0f ? 0.0f : o[t] / l);
  }
};

// The schedule: which rows this thread block owns, which keys it visits, in what order.
template <class T, class Math>
__global__ void __launch_bounds__(Math::kThreads) SparseAttentionKernel(AttentionArgs a) {
  TFSA_DYNAMIC_SHARED(shared);
  const Geometry& g = a.g;
  const int64_t chunks = (g.grid.block + Math::kRows - 1) / Math::kRows;
  const int64_t task = blockIdx.x, chunk = task % chunks, qb = (task / chunks) % g.grid.q_blocks;
  const int64_t bh = task / chunks / g.grid.q_blocks;
  const int64_t q_begin = g.grid.QueryBegin(qb) + chunk * Math::kRows;
  const int64_t q_end = min(q_begin + Math::kRows, g.grid.QueryEnd(qb));
  if (q_begin >= q_end) return;
  Math math(shared, g, Place{bh / g.q_heads, bh % g.q_heads, q_begin, q_end});
  math.LoadQueries(static_cast<const T*>(a.query));
  const int64_t row = bh * g.grid.q_blocks + qb;
  const int n_blocks = a.counts[row];
  const int32_t* blocks = a.chosen + row * g.grid.k_blocks;
  // Keys past the last row's causal horizon add nothing: stop before them.
  const int64_t last_key = g.grid.LastVisibleKey(q_end - 1);
  for (int64_t pos = 0; pos < int64_t{n_blocks} * g.grid.block; pos += Math::kKeys) {
    if (blocks[pos / g.grid.block] * g.grid.block + pos % g.grid.block > last_key) break;
    math.Step(static_cast<const T*>(a.key), static_cast<const T*>(a.value), blocks, n_blocks, pos);
  }
  math.Store(static_cast<T*>(a.output));
}

template <class T, class Math>
cudaError_t Launch(const AttentionArgs& a, size_t shared, cudaStream_t stream) {
  const Geometry& g = a.g;
  const int64_t chunks = (g.grid.block + Math::kRows - 1) / Math::kRows;
  const int64_t tasks = g.batch * g.q_heads * g.grid.q_blocks * chunks;
  if (tasks == 0) return cudaSuccess;
  if (tasks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  const auto kernel = SparseAttentionKernel<T, Math>;
  cudaError_t status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared));
  if (status != cudaSuccess) return status;
  TFSA_LAUNCH(kernel, static_cast<unsigned>(tasks), Math::kThreads, shared, stream)(a);
  return cudaGetLastError();
}

template <class T>
cudaError_t LaunchFor(const AttentionArgs& a, bool aligned16, cudaStream_t stream) {
  const Geometry& g = a.g;
  if constexpr (!std::is_same_v<T, float>) {
    if (aligned16 && g.head_dim == g.v_head_dim) {
      switch (g.head_dim) {
        case 64: return Launch<T, WmmaMath<T, 64>>(a, WmmaMath<T, 64>::kSharedBytes, stream);
        case 80: return Launch<T, WmmaMath<T, 80>>(a, WmmaMath<T, 80>::kSharedBytes, stream);
        case 96: return Launch<T, WmmaMath<T, 96>>(a, WmmaMath<T, 96>::kSharedBytes, stream);
        case 128: return Launch<T, WmmaMath<T, 128>>(a, WmmaMath<T, 128>::kSharedBytes, stream);
        default: break;
      }
    }
  }
  return Launch<T, SimtMath<T>>(a, SimtMath<T>::SharedBytes(g.head_dim, g.v_head_dim), stream);
}

}  // namespace

cudaError_t LaunchAttention(const AttentionArgs& args, int32_t dtype, bool aligned16, cudaStream_t stream) {
  if (dtype == TFSA_FLOAT16) return LaunchFor<__half>(args, aligned16, stream);
  if (dtype == TFSA_BFLOAT16) return LaunchFor<__nv_bfloat16>(args, aligned16, stream);
  return LaunchFor<float>(args, aligned16, stream);
}

}  // namespace tfsa::cuda
