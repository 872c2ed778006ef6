// Packing for the AVX-512 kernels: a float32 key block transposed with 16-lane gathers
// (kt[x, j0 .. j0 + 15] = k[j0 .. j0 + 15, x]), instead of one scalar move per element; the
// float32 query rows scaled and averaged 16 columns at a time.
// Compiled with -mavx512f (CMakeLists.txt); attention_cpu.cc calls it only when the AVX-512
// kernels were chosen.
#include <immintrin.h>

#include <cstdint>

#include "pack.h"

namespace tfsa::cpu {

void TransposeKeysAvx512(const float* k, int64_t keys, int64_t dim, int64_t key_pad, float* kt) {
  const __m512i lanes = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                           _mm512_set1_epi32(static_cast<int>(dim)));
  for (int64_t j0 = 0; j0 < keys; j0 += 16) {
    const int64_t n = keys - j0 < 16 ? keys - j0 : 16;
    const __mmask16 live = static_cast<__mmask16>((1u << n) - 1u);
    const float* rows = k + j0 * dim;
    for (int64_t x = 0; x < dim; ++x) {
      const __m512 column = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live, lanes, rows + x, 4);
      _mm512_mask_storeu_ps(kt + x * key_pad + j0, live, column);
    }
  }
}

bool ScaleRowsAvx512(const float* rows_in, int rows, int head_dim, float scale, float* q, float* mean) {
  const __m512 scale_v = _mm512_set1_ps(scale), rows_v = _mm512_set1_ps(static_cast<float>(rows));
  const __m512 inf = _mm512_set1_ps(__builtin_inff());
  __mmask16 nonfinite = 0;
  for (int x0 = 0; x0 < head_dim; x0 += 16) {
    const __mmask16 live = static_cast<__mmask16>(head_dim - x0 >= 16 ? 0xFFFFu : (1u << (head_dim - x0)) - 1u);
    __m512 sum = _mm512_maskz_loadu_ps(live, mean + x0);
    for (int r = 0; r < rows; ++r) {
      const size_t at = static_cast<size_t>(r) * head_dim + x0;
      const __m512 value = _mm512_mul_ps(scale_v, _mm512_maskz_loadu_ps(live, rows_in + at));
      _mm512_mask_storeu_ps(q + at, live, value);
      // finite: |value| < inf (false for NaN); the others add nothing to the mean
      const __mmask16 finite = _mm512_mask_cmp_ps_mask(live, _mm512_abs_ps(value), inf, _CMP_LT_OQ);
      nonfinite |= static_cast<__mmask16>(live & ~finite);
      sum = _mm512_mask_add_ps(sum, finite, sum, _mm512_div_ps(value, rows_v));
    }
    _mm512_mask_storeu_ps(mean + x0, live, sum);
  }
  return nonfinite != 0;
}

}  // namespace tfsa::cpu
