// compute_precision = bf16: the computed blocks' products Q.K^T and P.V with bf16 operands and
// float32 accumulation (AVX512_BF16's VDPBF16PS), the softmax in float32 (block_math.h).
//
// Operands travel as pairs of bf16 in one 32-bit word (low half the even element), the layout
// VDPBF16PS multiplies and adds pairwise:
//   q2   [rows, pairs]          the scaled query rows, pairs = ceil(head_dim / 2) (a zero pads)
//   kt2  [pairs, key_pad]       a key block transposed: word (p, j) = k[j][2p], k[j][2p + 1]
//   v2   [key_pad / 2, v_pad]   a value block: word (r, x) = v[2r][x], v[2r + 1][x]
// Rounding is Bf16Bits' (round to nearest even, NaN kept), reference.py to_bf16's.
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#include "tfsa/block_rules.h"

namespace tfsa::cpu {

// float -> bf16 bits, rounded as RoundedToBf16 (block_rules.h) rounds; NaN stays a quiet NaN
// (its payload may lie in the low half, which the bits drop).
inline uint16_t Bf16Bits(float x) {
  uint32_t bits;
  const float rounded = RoundedToBf16(x);
  std::memcpy(&bits, &rounded, sizeof bits);
  return static_cast<uint16_t>((bits >> 16) | (x != x ? 0x40u : 0u));
}

inline uint32_t Bf16Pair(float even, float odd) {
  return static_cast<uint32_t>(Bf16Bits(even)) | (static_cast<uint32_t>(Bf16Bits(odd)) << 16);
}

inline float Bf16ToFloat(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float x;
  std::memcpy(&x, &wide, sizeof x);
  return x;
}

struct Bf16Math {
  const char* isa;
  // s[:, :key_pad] = q2 . kt2 for `rows` query rows (key_pad a multiple of 32).
  void (*scores)(const uint32_t* q2, int rows, int pairs, const uint32_t* kt2, int key_pad, float* s, int s_stride);
  // o += bf16(s[:, :keys]) . v2 (v_pad a multiple of 32; v2's rows past `keys` are zero).
  void (*accumulate)(const float* s, int rows, int keys, int s_stride, const uint32_t* v2, int v_pad, float* o);
};

// The bf16 kernels when this CPU runs them and the float32 kernels chosen are the AVX-512 ones
// (TFSA_ISA unset or avx512; TFSA_ISA=avx512-fp32 keeps AVX-512 and turns bf16 off); null
// otherwise, and the first call that asks says once on stderr that it computes in float32.
// AMX where the CPU and the OS allow it (TFSA_ISA=avx512bf16: VDPBF16PS only); AMX needs
// head_dim % 32 == 0, so SelectBf16Math(head_dim) gives VDPBF16PS for other head dims.
const Bf16Math* SelectBf16Math(int64_t head_dim = 64);
const Bf16Math& Bf16MathAvx512();  // x86 builds only: VDPBF16PS
const Bf16Math& Bf16MathAmx();     // x86 builds only: AMX tiles, VDPBF16PS for the last rows (head_dim % 32 == 0)

// The antidiagonal estimate on AMX (selection.cc): s[r, c] = q2[r] . kt2[:, c] for `rows` rows (a
// multiple of 16; zero rows past the real ones) and `width` columns (a multiple of 32) of kt2
// [pairs, kt2_stride] (pairs a multiple of 16), into s [rows, s_stride]. x86 builds only.
void SampledScoresAmx(const uint32_t* q2, int rows, int pairs, const uint32_t* kt2, int kt2_stride, int width,
                      float* s, int s_stride);
// out[e / 2] = the bf16 pair of x[e], x[e + 1] for even e < n (n even), x already rounded to bf16
// (their high halves). x86 builds only (AVX-512).
void PairsOfRounded(const float* x, int64_t n, uint32_t* out);
// Whether the antidiagonal estimate runs on AMX at this head dim: where compute_precision = bf16
// would (SelectBf16Math), without its message (the estimate is bf16 at every precision).
bool EstimateOnAmx(int64_t head_dim);

// The rows of q [rows, head_dim] as bf16 pairs [rows, pairs].
inline void Bf16Rows(const float* q, int rows, int head_dim, std::vector<uint32_t>& out) {
  const int pairs = (head_dim + 1) / 2;
  out.resize(static_cast<size_t>(rows) * pairs);
  for (int r = 0; r < rows; ++r)
    for (int p = 0; p < pairs; ++p) {
      const float* row = q + static_cast<size_t>(r) * head_dim;
      out[static_cast<size_t>(r) * pairs + p] = Bf16Pair(row[2 * p], 2 * p + 1 < head_dim ? row[2 * p + 1] : 0.0f);
    }
}

}  // namespace tfsa::cpu
