// The GroupQueryAttention step before attention, as ORT's CPU GroupQueryAttention does it:
// rotary embedding of the new query and key rows at their absolute positions, and the present
// key/value cache = past rows ++ new rows (in place when past and present are one buffer).
// Plain data, no ONNX Runtime types; element type T is float or Ort::Float16_t.
#pragma once

#include <cstdint>
#include <functional>

namespace tfsa::cpu {

// The sizes of one call, checked by the op (gqa_op.cc).
struct GqaLayout {
  int64_t batch = 0, seq = 0, q_heads = 0, kv_heads = 0, head_dim = 0;
  bool packed = false;        // query holds [Q heads | K heads | V heads] per token; key/value absent
  int64_t past_rows = 0;      // rows per (batch, kv head) of past_key/past_value; 0: none
  int64_t present_rows = 0;   // rows per (batch, kv head) of present_key/present_value
  int64_t rotary_half = 0;    // columns of cos/sin (rotary_dim / 2); 0: no rotary
  bool interleaved = false;   // rotary pairs (2x, 2x+1) rather than (x, x + rotary_half)
  bool first_prompt = false;  // seq == total_sequence_length: every row's new rows start at 0
  bool shared_buffer = false;  // past and present are one buffer: the past rows are already there
};

// Where a batch row's new rows go: 0 on the first prompt, else total - seq (total =
// seqlens_k + 1). The position of new row s is that plus s.
inline int64_t PastLength(const GqaLayout& l, int32_t seqlen_k) {
  return l.first_prompt ? 0 : static_cast<int64_t>(seqlen_k) + 1 - l.seq;
}

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
