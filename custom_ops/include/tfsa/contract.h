// The contract of ai.tfsa::SparseAttention version 1, shared by the CPU and CUDA kernels:
// attribute names and defaults, and the shape checks that turn bad input into one clear
// message. tfsa_onnx/reference.py (SparseAttentionAttributes) holds the same defaults.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

namespace tfsa {

inline constexpr const char* kDomain = "ai.tfsa";
inline constexpr const char* kOpName = "SparseAttention";

struct Attributes {
  float scale = 0.0f;  // 0: 1/sqrt(head_dim)
  int64_t is_causal = 0;
  int64_t block_size = 64;
  int64_t global_tokens = 64;
  int64_t local_window = 128;
  float threshold = 0.95f;
  float max_density = 1.0f;
  int64_t min_seq_len = 1024;
};

// The attributes' bounds (tfsa_onnx/reference.py mirrors them as BLOCK_SIZE_MAX, TOKENS_MAX).
// Inside them no index arithmetic of a call overflows int64.
inline constexpr int64_t kBlockSizeMax = 1048576;  // block_size in [1, kBlockSizeMax]
inline constexpr int64_t kTokensMax = 2147483647;  // global_tokens, local_window, min_seq_len in [0, kTokensMax]

// Whether a call ranks blocks by the estimate; else every allowed block is computed (short
// inputs, or threshold and max_density both 1: dense attention through the same code).
inline bool UsesEstimate(const Attributes& a, int64_t kv_len) {
  return !(kv_len < a.min_seq_len || (a.threshold >= 1.0f && a.max_density >= 1.0f));
}

// Empty string when the attributes are within their bounds, else the first one that is not:
// its name, its value and the allowed range.
inline std::string CheckAttributes(const Attributes& a) {
  std::ostringstream err;
  const auto integer = [&](const char* name, int64_t value, int64_t low, int64_t high) {
    if (err.tellp() == 0 && (value < low || value > high))
      err << name << " must be an integer in [" << low << ", " << high << "], got " << value;
  };
  integer("block_size", a.block_size, 1, kBlockSizeMax);
  integer("global_tokens", a.global_tokens, 0, kTokensMax);
  integer("local_window", a.local_window, 0, kTokensMax);
  integer("min_seq_len", a.min_seq_len, 0, kTokensMax);
  integer("is_causal", a.is_causal, 0, 1);
  if (err.tellp() != 0) return err.str();
  if (!(a.threshold >= 0.0f && a.threshold <= 1.0f)) err << "threshold must be a float in [0, 1], got " << a.threshold;
  else if (!(a.max_density > 0.0f && a.max_density <= 1.0f))
    err << "max_density must be a float in (0, 1], got " << a.max_density;
  else if (!(std::isfinite(a.scale) && a.scale >= 0.0f))
    err << "scale must be a finite float in [0, inf) (0 means 1/sqrt(head_dim)), got " << a.scale;
  return err.str();
}

// The attributes a call with these lengths computes with: block_size, global_tokens and
// local_window cut to what the sequences can use, which changes no result. A block_size of at
// least both lengths is one query block and one key block however large it is; global tokens
// beyond both lengths cover every query and key either way; a window of the longer length
// already reaches every key from every query position (positions lie in [kv - q, kv - 1]).
// Everything that sizes memory or indexes blocks uses these, never the raw attributes.
inline Attributes Effective(const Attributes& a, int64_t q_len, int64_t kv_len) {
  Attributes e = a;
  const int64_t longest = std::max<int64_t>({1, q_len, kv_len});
  e.block_size = std::min(a.block_size, longest);
  e.global_tokens = std::min(a.global_tokens, longest);
  e.local_window = std::min(a.local_window, longest);
  return e;
}

using Shape = std::vector<int64_t>;

inline std::string ToString(const Shape& s) {
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < s.size(); ++i) out << (i ? ", " : "") << s[i];
  out << "]";
  return out.str();
}

// The sizes of one call, after the inputs were checked.
struct Dims {
  int64_t batch = 0, q_heads = 0, kv_heads = 0, q_len = 0, kv_len = 0, head_dim = 0, v_head_dim = 0;
  // Element strides of the mask over [B, Hq, Sq, Sk]; 0 where it broadcasts.
  int64_t mask_stride[4] = {0, 0, 0, 0};
};

// Checks query/key/value/mask shapes; fills `dims` and returns "" when they fit together.
inline std::string CheckShapes(const Shape& q, const Shape& k, const Shape& v, const Shape* mask, Dims& dims) {
  std::ostringstream err;
  auto shapes = [&] {
    return " (query " + ToString(q) + ", key " + ToString(k) + ", value " + ToString(v) +
           (mask ? ", attn_mask " + ToString(*mask) : std::string()) + ")";
  };
  if (q.size() != 4 || k.size() != 4 || v.size() != 4) {
    err << "query, key and value must be 4-D [batch, heads, seq, head_dim]" << shapes();
    return err.str();
  }
  for (const Shape* s : {&q, &k, &v})
    for (int64_t d : *s)
      if (d < 0) return "negative dimension" + shapes();
  if (k[0] != q[0] || v[0] != q[0]) return "key and value batch (dim 0) must equal query's" + shapes();
  if (k[3] != q[3]) return "key head_dim (dim 3) must equal query's" + shapes();
  if (v[1] != k[1] || v[2] != k[2]) return "value heads and seq (dims 1, 2) must equal key's" + shapes();
  if (k[1] == 0 || q[1] % k[1] != 0) return "query heads must be a multiple of key/value heads" + shapes();
  dims = Dims{q[0], q[1], k[1], q[2], k[2], q[3], v[3], {0, 0, 0, 0}};
  if (mask) {
    if (mask->size() > 4) return "attn_mask must have rank <= 4" + shapes();
    const int64_t full[4] = {dims.batch, dims.q_heads, dims.q_len, dims.kv_len};
    int64_t stride = 1;
    for (int axis = 3; axis >= 0; --axis) {
      const int64_t m_axis = axis - (4 - static_cast<int64_t>(mask->size()));
      const int64_t extent = m_axis >= 0 ? (*mask)[m_axis] : 1;
      if (extent != 1 && extent != full[axis])
        return "attn_mask does not broadcast to [batch, q_heads, q_seq, kv_seq] = " +
               ToString({full[0], full[1], full[2], full[3]}) + shapes();
      dims.mask_stride[axis] = (extent == 1) ? 0 : stride;
      stride *= extent;
    }
  }
  return "";
}

}  // namespace tfsa
