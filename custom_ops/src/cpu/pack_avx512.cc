// Packing for the AVX-512 kernels: a float32 key block transposed in 16 x 16 squares in
// registers (16-lane gathers, kt[x, j0 .. j0 + 15] = k[j0 .. j0 + 15, x], for the rest),
// instead of one scalar move per element; the float32 query rows scaled and averaged 16
// columns at a time.
// Compiled with -mavx512f (CMakeLists.txt); attention_cpu.cc calls it only when the AVX-512
// kernels were chosen.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "pack.h"
#include "tfsa/block_rules.h"

namespace tfsa::cpu {

namespace {

// The masked forms with every lane set: GCC 12's unmasked unpack and lane-shuffle intrinsics
// warn (-Wuninitialized) inside its own headers. The same instructions.
constexpr __mmask16 kAll = 0xFFFF;
inline __m512 UnpackLow(__m512 a, __m512 b) { return _mm512_mask_unpacklo_ps(a, kAll, a, b); }
inline __m512 UnpackHigh(__m512 a, __m512 b) { return _mm512_mask_unpackhi_ps(a, kAll, a, b); }
template <int kImm>
inline __m512 Lanes(__m512 a, __m512 b) { return _mm512_mask_shuffle_f32x4(a, kAll, a, b, kImm); }

// dst[c * dst_stride + r] = src[r * src_stride + c] for a 16 x 16 square, in registers: pairs of
// rows interleaved, then quads within each 128-bit lane, then the lanes of four row quads.
void Transpose16x16(const void* src_bits, int64_t src_stride, void* dst_bits, int64_t dst_stride) {
  const float* src = static_cast<const float*>(src_bits);
  float* dst = static_cast<float*>(dst_bits);
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * src_stride);
  for (int i = 0; i < 16; i += 2) {
    t[i] = UnpackLow(r[i], r[i + 1]);  // per lane: a0 b0 a1 b1
    t[i + 1] = UnpackHigh(r[i], r[i + 1]);  // a2 b2 a3 b3
  }
  for (int i = 0; i < 16; i += 4) {  // r[i + c], lane L: column 4L + c of rows i .. i + 3
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int c = 0; c < 4; ++c) {
    const __m512 even_low = Lanes<_MM_SHUFFLE(2, 0, 2, 0)>(r[c], r[4 + c]);
    const __m512 odd_low = Lanes<_MM_SHUFFLE(3, 1, 3, 1)>(r[c], r[4 + c]);
    const __m512 even_high = Lanes<_MM_SHUFFLE(2, 0, 2, 0)>(r[8 + c], r[12 + c]);
    const __m512 odd_high = Lanes<_MM_SHUFFLE(3, 1, 3, 1)>(r[8 + c], r[12 + c]);
    _mm512_storeu_ps(dst + (0 + c) * dst_stride, Lanes<_MM_SHUFFLE(2, 0, 2, 0)>(even_low, even_high));
    _mm512_storeu_ps(dst + (8 + c) * dst_stride, Lanes<_MM_SHUFFLE(3, 1, 3, 1)>(even_low, even_high));
    _mm512_storeu_ps(dst + (4 + c) * dst_stride, Lanes<_MM_SHUFFLE(2, 0, 2, 0)>(odd_low, odd_high));
    _mm512_storeu_ps(dst + (12 + c) * dst_stride, Lanes<_MM_SHUFFLE(3, 1, 3, 1)>(odd_low, odd_high));
  }
}

}  // namespace

void Transpose16x16Avx512(const void* src, int64_t src_stride, void* dst, int64_t dst_stride) {
  Transpose16x16(src, src_stride, dst, dst_stride);
}

void TransposeKeysAvx512(const float* k, int64_t keys, int64_t dim, int64_t key_pad, float* kt) {
  const __m512i lanes = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                           _mm512_set1_epi32(static_cast<int>(dim)));
  for (int64_t j0 = 0; j0 < keys; j0 += 16) {
    const int64_t n = keys - j0 < 16 ? keys - j0 : 16;
    const __mmask16 live = static_cast<__mmask16>((1u << n) - 1u);
    const float* rows = k + j0 * dim;
    int64_t x = 0;
    for (; n == 16 && x + 16 <= dim; x += 16) Transpose16x16(rows + x, dim, kt + x * key_pad + j0, key_pad);
    for (; x < dim; ++x) {  // the rest: 16-lane gathers
      const __m512 column = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live, lanes, rows + x, 4);
      _mm512_mask_storeu_ps(kt + x * key_pad + j0, live, column);
    }
  }
}

namespace {

// GCC vector extensions for the integer steps (its shift intrinsics warn in their headers).
typedef float Floats __attribute__((vector_size(64)));
typedef uint32_t Words __attribute__((vector_size(64)));
typedef uint16_t Halves __attribute__((vector_size(32)));

// scale * in[e .. e + 15] rounded to bf16, 0 where not finite, as float bits.
inline Words FiniteRounded16(const float* in, float scale) {
  Floats x;
  std::memcpy(&x, in, sizeof x);
  x = x * scale;
  const Words bits = (Words)x;
  const Words finite = (Words)((bits & 0x7F800000u) != 0x7F800000u);  // all ones where finite
  return ((bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u) & finite;
}

inline float FiniteRounded(float x, float scale) {
  const float value = scale * x;
  return (value - value == 0.0f) ? tfsa::RoundedToBf16(value) : 0.0f;
}

}  // namespace

void FiniteRoundedAvx512(const float* in, int64_t n, float scale, float* out) {
  int64_t e = 0;
  for (; e + 16 <= n; e += 16) {
    const Words rounded = FiniteRounded16(in + e, scale);
    std::memcpy(out + e, &rounded, sizeof rounded);
  }
  for (; e < n; ++e) out[e] = FiniteRounded(in[e], scale);
}

void FiniteRoundedPairsAvx512(const float* in, int64_t n, float scale, uint32_t* out) {
  int64_t e = 0;
  for (; e + 16 <= n; e += 16) {
    const Halves high = __builtin_convertvector(FiniteRounded16(in + e, scale) >> 16, Halves);
    std::memcpy(out + e / 2, &high, sizeof high);
  }
  for (; e + 2 <= n; e += 2) out[e / 2] = tfsa::RoundedPair(FiniteRounded(in[e], scale), FiniteRounded(in[e + 1], scale));
}

bool ScaleRowsAvx512(const float* rows_in, int rows, int head_dim, float scale, float* q, float* mean) {
  const __m512 scale_v = _mm512_set1_ps(scale), rows_v = _mm512_set1_ps(static_cast<float>(rows));
  const __m512 inf = _mm512_set1_ps(__builtin_inff());
  __mmask16 nonfinite = 0;
  for (int x0 = 0; x0 < head_dim; x0 += 16) {
    const __mmask16 live = static_cast<__mmask16>(head_dim - x0 >= 16 ? 0xFFFFu : (1u << (head_dim - x0)) - 1u);
    __m512 sum = _mm512_setzero_ps();
    for (int r = 0; r < rows; ++r) {
      const size_t at = static_cast<size_t>(r) * head_dim + x0;
      const __m512 value = _mm512_mul_ps(scale_v, _mm512_maskz_loadu_ps(live, rows_in + at));
      _mm512_mask_storeu_ps(q + at, live, value);
      // finite: |value| < inf (false for NaN); the others add nothing to the mean
      const __mmask16 finite = _mm512_mask_cmp_ps_mask(live, _mm512_abs_ps(value), inf, _CMP_LT_OQ);
      nonfinite |= static_cast<__mmask16>(live & ~finite);
      sum = _mm512_mask_add_ps(sum, finite, sum, value);
    }
    // one division per column, not per element (a vector division is slow)
    _mm512_mask_storeu_ps(mean + x0, live, _mm512_div_ps(sum, rows_v));
  }
  return nonfinite != 0;
}

}  // namespace tfsa::cpu
