// The selection on the GPU: which key blocks each query block computes. It follows
// tfsa_onnx/reference.py (select_blocks) and the CPU's selection.cc rule for rule; the rules
// both share are in tfsa/block_rules.h.
#pragma once

#include <cuda_runtime.h>

#include "common.cuh"

namespace tfsa::cuda {

// Device arrays the selection fills; rows are (batch, q head, query block).
struct Selection {
  float* q_means = nullptr;          // [B * Hq * nQ, D], scaled (the mean estimate)
  double* block_mass = nullptr;      // [rows, nK]: the token or antidiagonal estimate's block mass
  float* k_means = nullptr;          // [B * Hkv * nK, D]
  uint8_t* mask_states = nullptr;    // per Geometry::mask_blocks; null without a mask
  uint8_t* allowed = nullptr;        // [rows, nK]
  int32_t* chosen = nullptr;         // [rows, nK]: the first counts[row] entries, ascending
  int32_t* counts = nullptr;         // [rows]
  unsigned long long* pairs = nullptr;  // [B * Hq, 2]: chosen and allowed block pairs
  uint8_t* value_flags = nullptr;    // [B * Hkv, nK]: 1 where a value of the key block is NaN or inf
};

// Bytes of dynamic shared memory the block choice needs per row; at most kMaxChooseShared.
size_t ChooseSharedBytes(int64_t k_blocks);
constexpr size_t kMaxChooseShared = 160 * 1024;
// The same for the token and antidiagonal estimates' kernels: within kMaxChooseShared
// wherever ChooseSharedBytes is, for head dims up to 1024 (CheckCall's limit).
size_t TokenSharedBytes(int64_t k_blocks, int64_t head_dim);

// Enqueues the selection's kernels; `selected` ([rows, nK] 0/1) and `density` are optional.
cudaError_t SelectBlocks(const Geometry& g, int32_t dtype, const void* query, const void* key, const void* value,
                         const Selection& s, uint8_t* selected, float* density, cudaStream_t stream);

}  // namespace tfsa::cuda
