// How one tile of key blocks is computed: the math, apart from the selection (which blocks)
// and the tile walk (tile_walk.h, which blocks form a tile).
//
// Three register-blocked kernels and two few-rows helpers, written once with GCC vector
// extensions (block_math_impl.inc) and compiled per instruction set: block_math_avx512.cc,
// block_math_avx2.cc (x86 only), block_math_generic.cc, and block_math_wide.cc (the AVX-512
// layout for any CPU, for tests); block_math_stubs.cc stands in for the x86 ones elsewhere.
// SelectBlockMath picks the widest the CPU runs.
//
// Layouts (all float32, row-major):
//   q    [rows, head_dim]          the query block, already multiplied by scale
//   kt   [head_dim, key_pad]       a key block transposed; key_pad = block_size rounded up to `pad`
//   v    [key_pad, v_pad]          a value block; v_pad = v_head_dim rounded up to `pad`
//   s    [rows, s_stride]          scores, then probabilities (several key blocks side by side)
//   o    [rows, v_pad]             running (unnormalised) output
#pragma once

#include <cstdint>

namespace tfsa::cpu {

struct BlockMath {
  const char* isa;  // "avx512", "avx2", "generic" or "wide"
  int pad;          // key_pad and v_pad are multiples of this

  // s[:, :key_pad] = q . kt for `rows` query rows and key_pad keys.
  void (*scores)(const float* q, int rows, int head_dim, const float* kt, int key_pad, float* s, int s_stride);
  // Online softmax step over the first `keys` of `width` columns of s (width = s's row
  // stride): updates the running max m and sum l, rescales o by exp(m_old - m_new), leaves
  // exp(s - m_new) in s (zero past `keys`).
  void (*softmax_step)(float* s, int rows, int keys, int width, float* m, float* l, float* o, int v_pad);
  // o += s[:, :keys] . v[:keys, :], s with row stride s_stride
  void (*accumulate)(const float* s, int rows, int keys, int s_stride, const float* v, int v_pad, float* o);
  // The few-rows path (exact_rows.h), on rows as a KV cache holds them, unpacked:
  // s[j] = q . k[j] for n key rows k[j] = k + j * head_dim;
  void (*row_scores)(const float* q, int head_dim, const float* k, int n, float* s);
  // o[:n] += w * v[:n].
  void (*axpy)(float w, const float* v, int n, float* o);
};

const BlockMath& BlockMathAvx512();
const BlockMath& BlockMathAvx2();
const BlockMath& BlockMathGeneric();
const BlockMath& BlockMathWide();  // the AVX-512 layout for any CPU, for tests

// The fastest variant this CPU supports (TFSA_ISA=avx2|generic forces a narrower one;
// TFSA_ISA=wide runs the AVX-512 layout on any CPU, slowly, to test it).
const BlockMath& SelectBlockMath();

inline int64_t RoundUp(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

}  // namespace tfsa::cpu
