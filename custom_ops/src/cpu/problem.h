// One call of SparseAttention as the CPU kernel sees it: sizes, attributes, the mask,
// and the block grid. Plain data, no ONNX Runtime types.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "tfsa/block_grid.h"
#include "tfsa/block_rules.h"
#include "tfsa/contract.h"
#include "tfsa/ort_api.h"

namespace tfsa::cpu {

using tfsa::BlockGrid;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Read access to the optional attn_mask or attn_bias, broadcast to [B, Hq, Sq, Sk] by strides.
struct MaskView {
  enum class Kind { kNone, kBool, kFloat, kHalf, kBFloat16 } kind = Kind::kNone;
  const void* data = nullptr;
  int64_t stride[4] = {0, 0, 0, 0};

  bool present() const { return kind != Kind::kNone; }
  int64_t Offset(int64_t b, int64_t h, int64_t i, int64_t j) const {
    return b * stride[0] + h * stride[1] + i * stride[2] + j * stride[3];
  }
  // The additive value at an element: bool true -> 0, false -> -inf. Inline, so that loops
  // over a row get the switch hoisted out.
  float Bias(int64_t offset) const {
    switch (kind) {
      case Kind::kBool: return static_cast<const bool*>(data)[offset] ? 0.0f : kNegInf;
      case Kind::kFloat: return static_cast<const float*>(data)[offset];
      case Kind::kHalf: return static_cast<const Ort::Float16_t*>(data)[offset].ToFloat();
      case Kind::kBFloat16: return static_cast<const Ort::BFloat16_t*>(data)[offset].ToFloat();
      case Kind::kNone: break;
    }
    return 0.0f;
  }
  bool Allows(int64_t offset) const { return Bias(offset) != kNegInf; }
};

// What the mask leaves of each (batch, mask head, query block, key block) (a MaskState),
// found once per call so that tasks neither rescan the mask per head nor add an all-zero bias.
struct MaskBlocks {
  std::vector<uint8_t> state;
  MaskBlockLayout layout;

  uint8_t At(int64_t b, int64_t h, int64_t qb, int64_t kb) const { return state[layout.Index(b, h, qb, kb)]; }
};

struct Problem {
  Dims dims;
  Attributes attrs;  // effective (contract.h): scale resolved, sizes cut to the sequences
  BlockGrid grid;
  MaskView mask;
  MaskView bias;  // attn_bias (float kinds only): read inside the computed blocks alone
  const MaskBlocks* mask_blocks = nullptr;  // set when a mask is present
  bool selection_only = false;  // profiling: pick blocks, compute nothing (outputs zeros)
};

// The softcap attribute on `rows` rows of `keys` scores, row stride `stride` (block_rules.h
// Capped): before the mask and bias are added, in the attention and in the estimates alike.
inline void CapScores(float cap, int64_t rows, int64_t keys, int64_t stride, float* s) {
  if (!(cap > 0.0f)) return;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < keys; ++j) s[r * stride + j] = Capped(s[r * stride + j], cap);
}

}  // namespace tfsa::cpu
