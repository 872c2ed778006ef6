#include <cuda_pipeline.h>
#include <mma.h>

#include <type_traits>

#include "attention.cuh"

namespace tfsa::cuda {
namespace {

namespace wmma = nvcuda::wmma;

// The scaled score of (query i, key j) with causality and the mask applied. A hidden pair
// is -inf whatever its dot, so a NaN key it does not see stays out, as in the reference.
__device__ __forceinline__ float Score(const Geometry& g, int64_t b, int64_t h, int64_t i, int64_t j, float dot) {
  float bias = j <= g.grid.LastVisibleKey(i) ? 0.0f : kNegInf;
  if (g.mask.kind != TFSA_MASK_NONE && bias == 0.0f) bias = g.mask.Bias(g.mask.Offset(b, h, i, j));
  return bias == kNegInf ? kNegInf : dot * g.scale + bias;
}

// Online softmax, per row. Reductions over the `width` consecutive lanes holding a row:
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

// ---- plain tiles: 8 query rows (one per warp) by 32 keys (one per lane), any head dims ----
template <class T>
struct SimtMath {
  static constexpr int kRows = 8, kKeys = 32, kThreads = 256, kMaxDv = 256, kStages = 2;
  float* q_tile;        // [kRows][D]
  float* k_tile[2];     // per stage [kKeys][D + 1]
  float* v_tile[2];     // per stage [kKeys][Dv]
  int64_t* key_index;   // per stage [kKeys]
  const Geometry& g;
  Place at;
  int warp, lane;
  float m = kNegInf, l = 0.0f, o[kMaxDv / 32];

  static size_t SharedBytes(int64_t d, int64_t dv) {
    return AlignUp(sizeof(float) * kRows * d) +
           kStages * (AlignUp(sizeof(float) * kKeys * (d + 1)) + AlignUp(sizeof(float) * kKeys * dv)) +
           AlignUp(sizeof(int64_t) * kKeys * kStages);
  }

  __device__ SimtMath(unsigned char* shared, const Geometry& geometry, Place place) : g(geometry), at(place) {
    const int64_t d = g.head_dim, dv = g.v_head_dim;
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
    for (float& x : o) x = 0.0f;
  }

  __device__ void LoadQueries(const T* query) {
    const int64_t d = g.head_dim, base = at.QueryBase(g);
    for (int64_t e = threadIdx.x; e < kRows * d; e += kThreads) {
      const int64_t r = e / d, i = at.q_begin + r;
      q_tile[e] = i < at.q_end ? ToFloat(query[(base + i) * d + e % d]) : 0.0f;
    }
  }

  // Copies (converted to float) the tile at `pos` of the key stream into `stage`.
  __device__ void Load(const T* key, const T* value, const int32_t* blocks, int n_blocks, int64_t pos, int stage) {
    const int64_t d = g.head_dim, dv = g.v_head_dim, kv_base = at.KeyBase(g);
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
    const int64_t i = at.q_begin + warp, d = g.head_dim, dv = g.v_head_dim;
    if (i < at.q_end) {  // a row past the block: its warp idles to the barrier
      const float* keys = k_tile[stage];
      const float* values = v_tile[stage];
      const int64_t j = key_index[stage * kKeys + lane];
      float dot = 0.0f;
      for (int64_t x = 0; x < d; ++x) dot += q_tile[warp * d + x] * keys[lane * (d + 1) + x];
      const float score = j >= 0 ? Score(g, at.b, at.h, i, j, dot) : kNegInf;
      const float m_new = fmaxf(m, GroupMax<32>(score));
      const float weight = Weight(score, m_new), factor = Rescale(m, m_new);
      l = l * factor + GroupSum<32>(weight);
      m = m_new;
#pragma unroll
      for (int t = 0; t < kMaxDv / 32; ++t) o[t] *= factor;
      for (int k = 0; k < kKeys; ++k) {
        const float p = __shfl_sync(0xffffffffu, weight, k);
        if (__shfl_sync(0xffffffffu, score, k) == kNegInf) continue;  // not attended: its value is not read
#pragma unroll
        for (int t = 0; t < kMaxDv / 32; ++t)
          if (lane + 32 * t < dv) o[t] += p * values[k * dv + lane + 32 * t];
      }
    }
    __syncthreads();  // all warps are done with this stage before it is refilled
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

// One warp per row, one key per lane, straight from global memory: what the tensor-core tiles
// hand over to when a chosen value block holds NaN or inf, where their block product would let
// 0 * NaN reach rows that do not attend that key. Rare, so simple.
template <class T>
__device__ void ExactRows(const AttentionArgs& a, const Place& at, const int32_t* blocks, int n_blocks) {
  constexpr int kMaxDv = 256;
  const Geometry& g = a.g;
  const T *query = static_cast<const T*>(a.query), *key = static_cast<const T*>(a.key);
  const T* value = static_cast<const T*>(a.value);
  const int64_t d = g.head_dim, dv = g.v_head_dim, kv_base = at.KeyBase(g);
  const int lane = threadIdx.x % 32, warps = blockDim.x / 32;
  for (int64_t i = at.q_begin + threadIdx.x / 32; i < at.q_end; i += warps) {
    float m = kNegInf, l = 0.0f, o[kMaxDv / 32];
    for (float& x : o) x = 0.0f;
    const T* q_row = query + (at.QueryBase(g) + i) * d;
    for (int64_t pos = 0; pos < int64_t{n_blocks} * g.grid.block; pos += 32) {
      const int64_t j = KeyAt(g, blocks, n_blocks, pos + lane);
      float score = kNegInf;
      if (j >= 0) {
        float dot = 0.0f;
        for (int64_t x = 0; x < d; ++x) dot += ToFloat(q_row[x]) * ToFloat(key[(kv_base + j) * d + x]);
        score = Score(g, at.b, at.h, i, j, dot);
      }
      const float m_new = fmaxf(m, GroupMax<32>(score));
      const float weight = Weight(score, m_new), factor = Rescale(m, m_new);
      l = l * factor + GroupSum<32>(weight);
      m = m_new;
      for (int t = 0; t < kMaxDv / 32; ++t) o[t] *= factor;
      for (int k = 0; k < 32; ++k) {
        const float p = __shfl_sync(0xffffffffu, weight, k);
        const int64_t jk = __shfl_sync(0xffffffffu, j, k);
        if (__shfl_sync(0xffffffffu, score, k) == kNegInf) continue;  // not attended: its value is not read
        for (int t = 0; t < kMaxDv / 32; ++t)
          if (lane + 32 * t < dv) o[t] += p * ToFloat(value[(kv_base + jk) * dv + lane + 32 * t]);
      }
    }
    for (int t = 0; t < kMaxDv / 32; ++t)
      if (lane + 32 * t < dv)
        static_cast<T*>(a.output)[(at.QueryBase(g) + i) * dv + lane + 32 * t] = FromFloat<T>(l == 0.0f ? 0.0f : o[t] / l);
  }
}

// Whether any of the chosen key blocks holds a NaN or inf value (the same answer for all threads).
__device__ bool ReadsNonFiniteValues(const AttentionArgs& a, const Place& at, const int32_t* blocks, int n_blocks) {
  __shared__ int found;
  if (threadIdx.x == 0) found = 0;
  __syncthreads();
  const uint8_t* flags = a.value_flags + (at.b * a.g.kv_heads + a.g.KvHead(at.h)) * a.g.grid.k_blocks;
  for (int c = threadIdx.x; c < n_blocks; c += blockDim.x)
    if (flags[blocks[c]]) found = 1;
  __syncthreads();
  return found != 0;
}

template <class Math>
struct IsWmma : std::false_type {};
template <class T, int HD>
struct IsWmma<WmmaMath<T, HD>> : std::true_type {};

// The schedule: which rows this thread block owns and which keys it visits, tile by tile,
// the next tile's loads issued before the current one is computed.
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
  const Place place{bh / g.q_heads, bh % g.q_heads, q_begin, q_end};
  const int64_t row = bh * g.grid.q_blocks + qb;
  const int n_blocks = a.counts[row];
  const int32_t* blocks = a.chosen + row * g.grid.k_blocks;
  if constexpr (IsWmma<Math>::value) {
    if (ReadsNonFiniteValues(a, place, blocks, n_blocks)) return ExactRows<T>(a, place, blocks, n_blocks);
  }
  Math math(shared, g, place);
  math.LoadQueries(static_cast<const T*>(a.query));
  // Tiles up to the first one that starts past the last row's causal horizon (keys ascend).
  const int64_t last_key = g.grid.LastVisibleKey(q_end - 1), stream_end = int64_t{n_blocks} * g.grid.block;
  int64_t tiles = 0;
  while (tiles * Math::kKeys < stream_end && KeyAt(g, blocks, n_blocks, tiles * Math::kKeys) <= last_key &&
         KeyAt(g, blocks, n_blocks, tiles * Math::kKeys) >= 0)
    ++tiles;
  const T *key = static_cast<const T*>(a.key), *value = static_cast<const T*>(a.value);
  if (tiles > 0) math.Load(key, value, blocks, n_blocks, 0, 0);
  for (int64_t t = 0; t < tiles; ++t) {
    const bool more = t + 1 < tiles;
    if (more) math.Load(key, value, blocks, n_blocks, (t + 1) * Math::kKeys, static_cast<int>((t + 1) % 2));
    math.Compute(static_cast<int>(t % 2), more);
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
