// Packing helpers compiled per instruction set (pack_avx512.cc), chosen with the block kernels.
#pragma once

#include <cstdint>

namespace tfsa::cpu {

// kt[x * key_pad + j] = k[j * dim + x] for j < keys, x < dim (float32 rows of `dim` elements;
// keys * dim < 2^31). x86 builds with AVX-512 kernels only.
void TransposeKeysAvx512(const float* k, int64_t keys, int64_t dim, int64_t key_pad, float* kt);

// dst[c * dst_stride + r] = src[r * src_stride + c] for a 16 x 16 square of 32-bit elements
// (moved, never computed on: any bits). x86 builds with AVX-512 kernels only.
void Transpose16x16Avx512(const void* src, int64_t src_stride, void* dst, int64_t dst_stride);

// out[e] = scale * in[e] rounded to bf16 (block_rules.h RoundedToBf16), 0 where not finite: the
// antidiagonal estimate's operands. x86 builds with AVX-512 kernels only.
void FiniteRoundedAvx512(const float* in, int64_t n, float scale, float* out);
// The same values as bf16 pairs (bf16_math.h): out[e / 2] holds elements e, e + 1 (n even).
void FiniteRoundedPairsAvx512(const float* in, int64_t n, float scale, uint32_t* out);

// attention_cpu.cc ScaleRows for float32 rows: q = scale * rows, mean[x] = (sum of the finite
// q[r, x], r ascending) / rows (the same bits), whether any is not finite.
bool ScaleRowsAvx512(const float* rows_in, int rows, int head_dim, float scale, float* q, float* mean);

}  // namespace tfsa::cpu
