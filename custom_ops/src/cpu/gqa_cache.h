// The GroupQueryAttention step before attention, as ORT's CPU GroupQueryAttention does it:
// rotary embedding of the new query and key rows at their absolute positions, and the present
// key/value cache = past rows ++ new rows (in place when past and present are one buffer).
// Plain data, no ONNX Runtime types; element type T is float or Ort::Float16_t.
#pragma once

#include <cstdint>
#include <functional>

#include "gqa_layout.h"

namespace tfsa::cpu {

struct GqaInputs {
  const void *query = nullptr, *key = nullptr, *value = nullptr;  // [B, S, heads * D]
  const void *past_key = nullptr, *past_value = nullptr;         // [B, Hkv, past_rows, D]
  const void *cos = nullptr, *sin = nullptr;                     // [positions, rotary_half]
  const int32_t* seqlens_k = nullptr;                            // [B]
  void *present_key = nullptr, *present_value = nullptr;         // [B, Hkv, present_rows, D]
};

using ParallelFor = std::function<void(size_t n, const std::function<void(size_t)>& fn)>;

// Fills present_key/present_value: zeros, the row's past rows, then its new rows (keys rotated)
// at PastLength; with a shared buffer only the new rows are written.
template <class T>
void WritePresent(const GqaLayout& l, const GqaInputs& in, const ParallelFor& parallel_for);

// Query rows [row_begin, row_begin + rows) of batch row b, rotated, as [Hq, rows, D] in `out`.
template <class T>
void GatherQuery(const GqaLayout& l, const GqaInputs& in, int64_t b, int64_t row_begin, int64_t rows, T* out,
                 const ParallelFor& parallel_for);

}  // namespace tfsa::cpu
