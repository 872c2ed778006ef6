// Packing keys for the AVX-512 kernels: a float32 key block transposed with 16-lane gathers
// (kt[x, j0 .. j0 + 15] = k[j0 .. j0 + 15, x]), instead of one scalar move per element.
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

}  // namespace tfsa::cpu
