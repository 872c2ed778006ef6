// The sizes of one SparseGroupQueryAttention call and the checks of its rows against the cache,
// shared by both faces of the op: the CPU kernel (cpu/gqa_cache.h) and the CUDA entry point
// (cuda/gqa.cu). Plain C++, no ONNX Runtime or CUDA types.
#pragma once

#include <cstdint>
#include <sstream>
#include <string>

namespace tfsa {

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

// Every batch row's seqlens_k (host memory) against the cache sizes; `positions` is cos_cache's
// row count. Empty when they fit, else the first row that does not and why.
inline std::string CheckRows(const GqaLayout& l, const int32_t* seqlens_k, int64_t positions) {
  for (int64_t b = 0; b < l.batch; ++b) {
    const int64_t seqlen_k = seqlens_k[b], past = PastLength(l, seqlens_k[b]);
    std::ostringstream err;
    err << "seqlens_k[" << b << "] = " << seqlen_k << " ";
    if (seqlen_k < 0) return err.str() + "is negative";
    if (l.first_prompt && seqlen_k >= l.seq)
      return err.str() + "exceeds sequence length - 1 = " + std::to_string(l.seq - 1) +
             " on a prompt (sequence length = total_sequence_length)";
    if (past < 0)
      return err.str() + "is less than sequence length - 1 = " + std::to_string(l.seq - 1) +
             ": the new rows need a place";
    if (past + l.seq > l.present_rows)
      return err.str() + "does not fit the present cache of " + std::to_string(l.present_rows) +
             " rows (max(total_sequence_length, past length))";
    if (past > 0 && l.past_rows == 0) return err.str() + "needs past rows, and past_key is absent";
    if (past > l.past_rows)
      return err.str() + "needs " + std::to_string(past) + " past rows, past_key has " + std::to_string(l.past_rows);
    if (l.rotary_half > 0 && past + l.seq > positions)
      return err.str() + "needs rotary positions up to " + std::to_string(past + l.seq - 1) + ", cos_cache has " +
             std::to_string(positions) + " rows";
  }
  return "";
}

}  // namespace tfsa
