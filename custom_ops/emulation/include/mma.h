// Emulation of the WMMA API for 16x16x16 tiles: every lane holds the whole tile (row-major
// floats), and loads/stores are warp-collective with a barrier, as the real calls are.
#pragma once

#include "cuda_bf16.h"
#include "cuda_emulation.h"
#include "cuda_fp16.h"

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

// Every lane holds the whole tile, so element e is (row e / 16, column e % 16) in every lane;
// code that finds an element's row through a probe fragment works unchanged.
template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static constexpr int num_elements = 16 * 16;
  float x[16 * 16];
};

inline float AsFloat(float x) { return x; }
inline float AsFloat(__half x) { return __half2float(x); }
inline float AsFloat(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class Use, class T, class Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c)
      f.x[r * 16 + c] = AsFloat(std::is_same_v<Layout, col_major> ? p[c * ldm + r] : p[r * ldm + c]);
  __syncwarp();
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p, unsigned ldm, layout_t) {
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.x[r * 16 + c] = p[r * ldm + c];
  __syncwarp();
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm, layout_t) {
  __syncwarp();
  if (tfsa_emu::Lane() == 0)
    for (int r = 0; r < 16; ++r)
      for (int c = 0; c < 16; ++c) p[r * ldm + c] = f.x[r * 16 + c];
  __syncwarp();
}

inline void fill_fragment(fragment<accumulator, 16, 16, 16, float>& f, float value) {
  for (float& e : f.x) e = value;
}

template <class T, class LayoutA, class LayoutB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LayoutA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LayoutB>& b,
              const fragment<accumulator, 16, 16, 16, float>& c) {
  fragment<accumulator, 16, 16, 16, float> out;
  for (int r = 0; r < 16; ++r)
    for (int n = 0; n < 16; ++n) {
      float sum = c.x[r * 16 + n];
      for (int k = 0; k < 16; ++k) sum += a.x[r * 16 + k] * b.x[k * 16 + n];
      out.x[r * 16 + n] = sum;
    }
  d = out;
}

}  // namespace nvcuda::wmma
