// The bf16 block kernels (bf16_math.h): AVX512_BF16's VDPBF16PS, which multiplies bf16 pairs and
// adds them to float32 accumulators (twice a float32 FMA's multiply-adds per instruction; on
// Zen 4 at the FMA's rate, on the Intel CPUs measured here at a quarter of it), with register
// tiles as the float32 kernels' (8 query rows x 2 vectors of 16 columns); and AMX's TDPBF16PS
// (16 x 16 x 32 per instruction) for full groups of 16 query rows where the CPU has AMX-BF16.
// Compiled with -mavx512f -mavx512bw -mavx512bf16 -mamx-tile -mamx-bf16 (CMakeLists.txt);
// SelectBf16Math calls them only where the CPU has those.
#include <immintrin.h>

#include <cstring>
#include <vector>

#include "bf16_math.h"

namespace tfsa::cpu {
namespace {

constexpr int kRows = 8;

inline __m512bh Pairs(const uint32_t* p) { return (__m512bh)_mm512_loadu_si512(p); }
inline __m512bh Broadcast(uint32_t pair) { return (__m512bh)_mm512_set1_epi32(static_cast<int>(pair)); }

template <int R>
void ScoresRows(const uint32_t* q2, int pairs, const uint32_t* kt2, int key_pad, float* s, int s_stride) {
  for (int c = 0; c < key_pad; c += 32) {
    __m512 acc0[R], acc1[R];
    for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
    for (int p = 0; p < pairs; ++p) {
      const uint32_t* k_row = kt2 + static_cast<size_t>(p) * key_pad + c;
      const __m512bh k0 = Pairs(k_row), k1 = Pairs(k_row + 16);
      for (int r = 0; r < R; ++r) {
        const __m512bh qv = Broadcast(q2[r * pairs + p]);
        acc0[r] = _mm512_dpbf16_ps(acc0[r], qv, k0);
        acc1[r] = _mm512_dpbf16_ps(acc1[r], qv, k1);
      }
    }
    for (int r = 0; r < R; ++r) {
      _mm512_storeu_ps(s + static_cast<size_t>(r) * s_stride + c, acc0[r]);
      _mm512_storeu_ps(s + static_cast<size_t>(r) * s_stride + c + 16, acc1[r]);
    }
  }
}

template <int R>
void AccumulateRows(const uint32_t* p2, int key_pairs, int p_stride, const uint32_t* v2, int v_pad, float* o) {
  for (int c = 0; c < v_pad; c += 32) {
    __m512 acc0[R], acc1[R];
    for (int r = 0; r < R; ++r) {
      acc0[r] = _mm512_loadu_ps(o + static_cast<size_t>(r) * v_pad + c);
      acc1[r] = _mm512_loadu_ps(o + static_cast<size_t>(r) * v_pad + c + 16);
    }
    for (int jp = 0; jp < key_pairs; ++jp) {
      const uint32_t* v_row = v2 + static_cast<size_t>(jp) * v_pad + c;
      const __m512bh v0 = Pairs(v_row), v1 = Pairs(v_row + 16);
      for (int r = 0; r < R; ++r) {
        const __m512bh pv = Broadcast(p2[static_cast<size_t>(r) * p_stride + jp]);
        acc0[r] = _mm512_dpbf16_ps(acc0[r], pv, v0);
        acc1[r] = _mm512_dpbf16_ps(acc1[r], pv, v1);
      }
    }
    for (int r = 0; r < R; ++r) {
      _mm512_storeu_ps(o + static_cast<size_t>(r) * v_pad + c, acc0[r]);
      _mm512_storeu_ps(o + static_cast<size_t>(r) * v_pad + c + 16, acc1[r]);
    }
  }
}

// Runs Rows<kRows> over full row groups, then Rows<rest> once.
template <template <int> class Tile, class... Args>
void ForRows(int rows, Args... args) {
  int r = 0;
  for (; r + kRows <= rows; r += kRows) Tile<kRows>::Run(r, args...);
  switch (rows - r) {
    case 1: return Tile<1>::Run(r, args...);
    case 2: return Tile<2>::Run(r, args...);
    case 3: return Tile<3>::Run(r, args...);
    case 4: return Tile<4>::Run(r, args...);
    case 5: return Tile<5>::Run(r, args...);
    case 6: return Tile<6>::Run(r, args...);
    case 7: return Tile<7>::Run(r, args...);
    default: return;
  }
}

template <int R>
struct ScoresTile {
  static void Run(int r, const uint32_t* q2, int pairs, const uint32_t* kt2, int key_pad, float* s, int s_stride) {
    ScoresRows<R>(q2 + static_cast<size_t>(r) * pairs, pairs, kt2, key_pad, s + static_cast<size_t>(r) * s_stride,
                  s_stride);
  }
};

template <int R>
struct AccumulateTile {
  static void Run(int r, const uint32_t* p2, int key_pairs, int p_stride, const uint32_t* v2, int v_pad, float* o) {
    AccumulateRows<R>(p2 + static_cast<size_t>(r) * p_stride, key_pairs, p_stride, v2, v_pad,
                      o + static_cast<size_t>(r) * v_pad);
  }
};

void Scores(const uint32_t* q2, int rows, int pairs, const uint32_t* kt2, int key_pad, float* s, int s_stride) {
  ForRows<ScoresTile>(rows, q2, pairs, kt2, key_pad, s, s_stride);
}

// 16 floats to bf16 bits, as Bf16Bits rounds them. Vector extensions rather than intrinsics:
// GCC 12's shift intrinsics warn (-Wmaybe-uninitialized) inside their own headers.
typedef uint32_t U32x16 __attribute__((vector_size(64)));
typedef uint16_t U16x16 __attribute__((vector_size(32)));
inline U16x16 RoundToBf16(__m512 x) {
  const U32x16 bits = (U32x16)x;
  const U32x16 rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const U32x16 quiet_nan = (bits >> 16) | 0x40u;
  const U32x16 nan = (U32x16)(x != x);  // all ones where NaN
  return __builtin_convertvector((rounded & ~nan) | (quiet_nan & nan), U16x16);
}

// The probabilities s[:, :width] rounded to bf16, row by row, into p [rows, width]. Past `keys`
// they are 0 (softmax_step) and v2's rows are zero, so the last pair or chunk may straddle the
// end; width (a multiple of 16) stays within the block's key_pad columns.
const uint16_t* RoundRows(const float* s, int rows, int width, int s_stride) {
  thread_local std::vector<uint16_t> p;
  p.resize(static_cast<size_t>(rows) * width);
  for (int r = 0; r < rows; ++r)
    for (int j = 0; j < width; j += 16) {
      const U16x16 bits = RoundToBf16(_mm512_loadu_ps(s + static_cast<size_t>(r) * s_stride + j));
      std::memcpy(p.data() + static_cast<size_t>(r) * width + j, &bits, sizeof bits);
    }
  return p.data();
}

void Accumulate(const float* s, int rows, int keys, int s_stride, const uint32_t* v2, int v_pad, float* o) {
  const int width = (keys + 15) / 16 * 16;
  const uint16_t* p = RoundRows(s, rows, width, s_stride);
  ForRows<AccumulateTile>(rows, reinterpret_cast<const uint32_t*>(p), (keys + 1) / 2, width / 2, v2, v_pad, o);
}

// AMX (TDPBF16PS: a 16 x 16 float tile += 16 x 32 bf16 times 32 x 16 bf16, in pairs as above)
// for each full group of 16 query rows; the rows after the last group take the kernels above.
// Tiles: 0, 1 two 16 x 16 results side by side; 2 the left operand; 3, 4 the right operands.
constexpr int kTileRows = 16;

struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

// Every call loads the configuration: another library on this thread (oneDNN, MLAS) may have
// loaded its own since the last call.
inline void ConfigureTiles() {
  TileConfig config;
  for (int t = 0; t < 5; ++t) {
    config.bytes_per_row[t] = 64;
    config.rows[t] = kTileRows;
  }
  _tile_loadconfig(&config);
}

void ScoresAmx(const uint32_t* q2, int rows, int pairs, const uint32_t* kt2, int key_pad, float* s, int s_stride) {
  const int full = rows / kTileRows * kTileRows;
  if (full > 0) ConfigureTiles();
  for (int r = 0; r < full; r += kTileRows)
    for (int c = 0; c < key_pad; c += 32) {
      _tile_zero(0);
      _tile_zero(1);
      for (int chunk = 0; chunk < pairs; chunk += 16) {  // 16 pairs: 32 elements of the head dim
        _tile_loadd(2, q2 + static_cast<size_t>(r) * pairs + chunk, pairs * 4);
        _tile_loadd(3, kt2 + static_cast<size_t>(chunk) * key_pad + c, key_pad * 4);
        _tile_loadd(4, kt2 + static_cast<size_t>(chunk) * key_pad + c + 16, key_pad * 4);
        _tile_dpbf16ps(0, 2, 3);
        _tile_dpbf16ps(1, 2, 4);
      }
      _tile_stored(0, s + static_cast<size_t>(r) * s_stride + c, s_stride * 4);
      _tile_stored(1, s + static_cast<size_t>(r) * s_stride + c + 16, s_stride * 4);
    }
  if (full < rows) Scores(q2 + static_cast<size_t>(full) * pairs, rows - full, pairs, kt2, key_pad,
                          s + static_cast<size_t>(full) * s_stride, s_stride);
}

void AccumulateAmx(const float* s, int rows, int keys, int s_stride, const uint32_t* v2, int v_pad, float* o) {
  const int width = (keys + 31) / 32 * 32, full = rows / kTileRows * kTileRows;
  const uint16_t* p = RoundRows(s, rows, width, s_stride);
  if (full > 0) ConfigureTiles();
  for (int r = 0; r < full; r += kTileRows)
    for (int c = 0; c < v_pad; c += 32) {
      float* o_tile = o + static_cast<size_t>(r) * v_pad + c;
      _tile_loadd(0, o_tile, v_pad * 4);
      _tile_loadd(1, o_tile + 16, v_pad * 4);
      for (int chunk = 0; chunk < width; chunk += 32) {  // 32 keys: 16 pair rows of v2
        _tile_loadd(2, p + static_cast<size_t>(r) * width + chunk, width * 2);
        _tile_loadd(3, v2 + static_cast<size_t>(chunk / 2) * v_pad + c, v_pad * 4);
        _tile_loadd(4, v2 + static_cast<size_t>(chunk / 2) * v_pad + c + 16, v_pad * 4);
        _tile_dpbf16ps(0, 2, 3);
        _tile_dpbf16ps(1, 2, 4);
      }
      _tile_stored(0, o_tile, v_pad * 4);
      _tile_stored(1, o_tile + 16, v_pad * 4);
    }
  if (full < rows)
    ForRows<AccumulateTile>(rows - full, reinterpret_cast<const uint32_t*>(p + static_cast<size_t>(full) * width),
                            (keys + 1) / 2, width / 2, v2, v_pad, o + static_cast<size_t>(full) * v_pad);
}

}  // namespace

void PairsOfRounded(const float* x, int64_t n, uint32_t* out) {
  int64_t e = 0;
  for (; e + 16 <= n; e += 16) {
    U32x16 bits;
    std::memcpy(&bits, x + e, sizeof bits);
    const U16x16 high = __builtin_convertvector(bits >> 16, U16x16);
    std::memcpy(out + e / 2, &high, sizeof high);
  }
  for (; e + 2 <= n; e += 2) out[e / 2] = RoundedPair(x[e], x[e + 1]);
}

void SampledScoresAmx(const uint32_t* q2, int rows, int pairs, const uint32_t* kt2, int kt2_stride, int width,
                      float* s, int s_stride) {
  // Tiles 0-3: four 16 x 16 results side by side (four independent sums, which the 2-result
  // loop above leaves the tile unit waiting on); 4: the left operand; 5-7: right operands.
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.bytes_per_row[t] = 64;
    config.rows[t] = kTileRows;
  }
  _tile_loadconfig(&config);
  const auto b = [&](int chunk, int c) { return kt2 + static_cast<size_t>(chunk) * kt2_stride + c; };
  for (int r = 0; r < rows; r += kTileRows) {
    const uint32_t* a = q2 + static_cast<size_t>(r) * pairs;
    float* out = s + static_cast<size_t>(r) * s_stride;
    int c = 0;
    for (; c + 64 <= width; c += 64) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int chunk = 0; chunk < pairs; chunk += 16) {  // 16 pairs: 32 elements of the head dim
        _tile_loadd(4, a + chunk, pairs * 4);
        _tile_loadd(5, b(chunk, c), kt2_stride * 4);
        _tile_loadd(6, b(chunk, c + 16), kt2_stride * 4);
        _tile_loadd(7, b(chunk, c + 32), kt2_stride * 4);
        _tile_dpbf16ps(0, 4, 5);
        _tile_dpbf16ps(1, 4, 6);
        _tile_loadd(5, b(chunk, c + 48), kt2_stride * 4);
        _tile_dpbf16ps(2, 4, 7);
        _tile_dpbf16ps(3, 4, 5);
      }
      _tile_stored(0, out + c, s_stride * 4);
      _tile_stored(1, out + c + 16, s_stride * 4);
      _tile_stored(2, out + c + 32, s_stride * 4);
      _tile_stored(3, out + c + 48, s_stride * 4);
    }
    for (; c < width; c += 32) {
      _tile_zero(0);
      _tile_zero(1);
      for (int chunk = 0; chunk < pairs; chunk += 16) {
        _tile_loadd(4, a + chunk, pairs * 4);
        _tile_loadd(5, b(chunk, c), kt2_stride * 4);
        _tile_loadd(6, b(chunk, c + 16), kt2_stride * 4);
        _tile_dpbf16ps(0, 4, 5);
        _tile_dpbf16ps(1, 4, 6);
      }
      _tile_stored(0, out + c, s_stride * 4);
      _tile_stored(1, out + c + 16, s_stride * 4);
    }
  }
}

const Bf16Math& Bf16MathAvx512() {
  static const Bf16Math math{"avx512bf16", Scores, Accumulate};
  return math;
}

const Bf16Math& Bf16MathAmx() {
  static const Bf16Math math{"amx", ScoresAmx, AccumulateAmx};
  return math;
}

}  // namespace tfsa::cpu
