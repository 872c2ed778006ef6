// The contract of ai.tfsa::SparseAttention version 1, shared by the CPU and CUDA kernels:
// attribute names and defaults, and the shape checks that turn bad input into one clear
// message. tfsa_onnx/reference.py (SparseAttentionAttributes) holds the same defaults.
#pragma once

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

// Whether a call ranks blocks by the estimate; else every allowed block is computed (short
// inputs, or threshold and max_density both 1: dense attention through the same code).
inline bool UsesEstimate(const Attributes& a, int64_t kv_len) {
  return !(kv_len < a.min_seq_len || (a.threshold >= 1.0f && a.max_density >= 1.0f));
}

// Empty string when the attributes are usable, else what is wrong with them.
inline std::string CheckAttributes(const Attributes& a) {
  std::ostringstream err;
  if (a.block_size <= 0) err << "block_size must be > 0, got " << a.block_size;
  else if (!(a.threshold > 0.0f && a.threshold <= 1.0f)) err << "threshold must be in (0, 1], got " << a.threshold;
  else if (!(a.max_density > 0.0f && a.max_density <= 1.0f))
    err << "max_density must be in (0, 1], got " << a.max_density;
  else if (a.is_causal != 0 && a.is_causal != 1) err << "is_causal must be 0 or 1, got " << a.is_causal;
  else if (a.global_tokens < 0 || a.local_window < 0 || a.min_seq_len < 0)
    err << "global_tokens, local_window and min_seq_len must be >= 0";
  else if (!(a.scale >= 0.0f)) err << "scale must be >= 0 (0 means 1/sqrt(head_dim)), got " << a.scale;
  return err.str();
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
