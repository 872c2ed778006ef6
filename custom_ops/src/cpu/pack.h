// Packing helpers compiled per instruction set (pack_avx512.cc), chosen with the block kernels.
#pragma once

#include <cstdint>

namespace tfsa::cpu {

// kt[x * key_pad + j] = k[j * dim + x] for j < keys, x < dim (float32 rows of `dim` elements;
// keys * dim < 2^31). x86 builds with AVX-512 kernels only.
void TransposeKeysAvx512(const float* k, int64_t keys, int64_t dim, int64_t key_pad, float* kt);

// attention_cpu.cc ScaleRows for float32 rows: q = scale * rows, mean[x] = (sum of the finite
// q[r, x], r ascending) / rows (the same bits), whether any is not finite.
bool ScaleRowsAvx512(const float* rows_in, int rows, int head_dim, float scale, float* q, float* mean);

}  // namespace tfsa::cpu
