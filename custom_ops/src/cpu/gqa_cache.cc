#include "gqa_cache.h"

#include <cmath>
#include <cstring>

#include "convert.h"
#include "tfsa/ort_api.h"

namespace tfsa::cpu {
namespace {

// Element offset of head h's D values for token (b, s): `first_head` counts the heads before
// this tensor's in a packed query (0, Hq for keys, Hq + Hkv for values).
int64_t TokenHead(const GqaLayout& l, int64_t heads, int64_t first_head, int64_t b, int64_t s, int64_t h) {
  const int64_t token_heads = l.packed ? l.q_heads + 2 * l.kv_heads : heads;
  return ((b * l.seq + s) * token_heads + (l.packed ? first_head : 0) + h) * l.head_dim;
}

// One head row rotated at position `pos` (ORT's RotaryEmbedding: out = x cos -/+ partner sin,
// the partner of x being x + half, or its neighbour when interleaved); columns past the rotary
// ones are copied.
template <class T>
void RotateRow(const GqaLayout& l, const GqaInputs& in, const T* x, int64_t pos, T* out) {
  const int64_t half = l.rotary_half;
  if (half == 0) {
    std::memcpy(static_cast<void*>(out), x, sizeof(T) * l.head_dim);
    return;
  }
  const T* cos = static_cast<const T*>(in.cos) + pos * half;
  const T* sin = static_cast<const T*>(in.sin) + pos * half;
  for (int64_t c = 0; c < half; ++c) {
    const int64_t i = l.interleaved ? 2 * c : c, j = l.interleaved ? 2 * c + 1 : c + half;
    const float xi = ToFloat(x[i]), xj = ToFloat(x[j]), co = ToFloat(cos[c]), si = ToFloat(sin[c]);
    out[i] = T(std::fma(xi, co, -(xj * si)));  // ORT's rounding (its MLAS kernel's fused multiply-adds)
    out[j] = T(std::fma(xi, si, xj * co));
  }
  for (int64_t c = 2 * half; c < l.head_dim; ++c) out[c] = x[c];
}

}  // namespace

template <class T>
void WritePresent(const GqaLayout& l, const GqaInputs& in, const ParallelFor& parallel_for) {
  const T* key = static_cast<const T*>(in.key ? in.key : in.query);
  const T* value = static_cast<const T*>(in.value ? in.value : in.query);
  parallel_for(static_cast<size_t>(l.batch * l.kv_heads), [&](size_t task) {
    const int64_t b = static_cast<int64_t>(task) / l.kv_heads, h = static_cast<int64_t>(task) % l.kv_heads;
    const int64_t past = PastLength(l, in.seqlens_k[b]), row = l.head_dim;
    T* k_out = static_cast<T*>(in.present_key) + static_cast<int64_t>(task) * l.present_rows * row;
    T* v_out = static_cast<T*>(in.present_value) + static_cast<int64_t>(task) * l.present_rows * row;
    if (!l.shared_buffer) {  // as ORT: the past rows this row has, zeros after them
      if (past > 0) {
        const int64_t from = static_cast<int64_t>(task) * l.past_rows * row;
        std::memcpy(static_cast<void*>(k_out), static_cast<const T*>(in.past_key) + from, sizeof(T) * past * row);
        std::memcpy(static_cast<void*>(v_out), static_cast<const T*>(in.past_value) + from, sizeof(T) * past * row);
      }
      const size_t rest = sizeof(T) * (l.present_rows - past) * row;  // each byte written once
      std::memset(static_cast<void*>(k_out + past * row), 0, rest);
      std::memset(static_cast<void*>(v_out + past * row), 0, rest);
    }
    for (int64_t s = 0; s < l.seq; ++s) {
      RotateRow(l, in, key + TokenHead(l, l.kv_heads, l.q_heads, b, s, h), past + s, k_out + (past + s) * row);
      std::memcpy(static_cast<void*>(v_out + (past + s) * row),
                  value + TokenHead(l, l.kv_heads, l.q_heads + l.kv_heads, b, s, h), sizeof(T) * row);
    }
  });
}

template <class T>
void GatherQuery(const GqaLayout& l, const GqaInputs& in, int64_t b, int64_t row_begin, int64_t rows, T* out,
                 const ParallelFor& parallel_for) {
  const T* query = static_cast<const T*>(in.query);
  const int64_t past = PastLength(l, in.seqlens_k[b]);
  parallel_for(static_cast<size_t>(l.q_heads), [&](size_t task) {
    const int64_t h = static_cast<int64_t>(task);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t s = row_begin + r;
      RotateRow(l, in, query + TokenHead(l, l.q_heads, 0, b, s, h), past + s, out + (h * rows + r) * l.head_dim);
    }
  });
}

template void WritePresent<float>(const GqaLayout&, const GqaInputs&, const ParallelFor&);
template void WritePresent<Ort::Float16_t>(const GqaLayout&, const GqaInputs&, const ParallelFor&);
template void GatherQuery<float>(const GqaLayout&, const GqaInputs&, int64_t, int64_t, int64_t, float*,
                                 const ParallelFor&);
template void GatherQuery<Ort::Float16_t>(const GqaLayout&, const GqaInputs&, int64_t, int64_t, int64_t,
                                          Ort::Float16_t*, const ParallelFor&);

}  // namespace tfsa::cpu
