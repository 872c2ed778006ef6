// The contract of ai.tfsa::SparseAttention and SparseGroupQueryAttention version 1, shared by
// the ONNX Runtime glue, the CPU kernel, the CUDA entry point and its ctypes mirror
// (tfsa_onnx/cuda.py): the attributes (one struct per op face, one table of names and bounds,
// one function for what a call derives from them), the sizes of a call, and the shape checks
// that turn bad input into one clear message. tfsa_onnx/reference.py (SparseAttentionAttributes,
// ATTRIBUTE_BOUNDS; GroupQueryAttentionAttributes, GQA_ATTRIBUTE_BOUNDS) mirrors the attributes;
// tests/test_kernel.py and tests/test_gqa_op.py check that they agree through
// tfsa_attribute_info and tfsa_gqa_attribute_info.
//
// Adding an attribute: a field of TfsaAttributes, a row of kAttributeRules, the same field in
// SparseAttentionAttributes (and ATTRIBUTE_BOUNDS), and the kernels that use it.
#pragma once

#include <stddef.h>
#include <stdint.h>

/* The plain C part: what crosses the C entry points (the CUDA library's, tfsa_attribute_info). */
#ifdef __cplusplus
#define TFSA_DEFAULT(...) = __VA_ARGS__
extern "C" {
#else
#define TFSA_DEFAULT(...)
#endif

/* The most query heads head_thresholds can hold (a call with more heads gives none, or is refused). */
#define TFSA_HEAD_THRESHOLDS_MAX 256

/* The operator's attributes with their defaults (C++ only; C sees the bare fields). The order
 * is the order of tfsa_onnx/reference.py SparseAttentionAttributes' fields. */
typedef struct TfsaAttributes {
  float scale TFSA_DEFAULT(0.0f); /* 0: 1/sqrt(head_dim) */
  int64_t is_causal TFSA_DEFAULT(0);
  int64_t block_size TFSA_DEFAULT(64);
  int64_t global_tokens TFSA_DEFAULT(64);
  int64_t local_window TFSA_DEFAULT(128);
  float threshold TFSA_DEFAULT(0.95f);
  float max_density TFSA_DEFAULT(1.0f);
  int64_t min_seq_len TFSA_DEFAULT(1024);
  /* W > 0: a query at position p attends no key before p - W + 1 (the W keys up to its own
   * when causal), as a sliding-window mask would; 0: no window. Unlike local_window, a rule
   * of the math, not of the selection. */
  int64_t sliding_window TFSA_DEFAULT(0);
  int64_t estimate TFSA_DEFAULT(0);         /* a TfsaEstimate: how candidate blocks are ranked */
  int64_t estimate_stride TFSA_DEFAULT(16); /* the antidiagonal estimate samples 1 pair in this many */
  /* 1: the queries are the last q_len of the kv_len positions (a call with a KV cache), and the
   * global-token rule counts those absolute positions; 0: query i counts as position i. */
  int64_t query_positions TFSA_DEFAULT(0);
  /* c > 0: every score scale * q . k becomes c * tanh(score / c) before the mask and the bias
   * are added (Gemma 2's logit softcapping), in the attention and in the estimate; 0: none. */
  float softcap TFSA_DEFAULT(0.0f);
  /* compute precision of the computed blocks' products (a TfsaComputePrecision): 1 rounds the
   * scaled Q, K, V and the probabilities to bf16 before Q.K^T and P.V, float32 accumulation and
   * softmax (the CPU's AVX512_BF16; a CPU without it computes as 0 and says so once). */
  int64_t compute_precision TFSA_DEFAULT(0);
  /* Per-head budgets: head_threshold_count values, one per query head of the call (checked at
   * call time), each in [0, 1], used by that head instead of threshold; a count of 0: every head
   * uses threshold. A head whose threshold is 0 is a streaming head: it computes its forced
   * blocks (global tokens, local window) and its estimate is not computed at all. The count is
   * the int64 right after the values (kListAttributeRules reports the values' offset). */
  float head_thresholds[TFSA_HEAD_THRESHOLDS_MAX] TFSA_DEFAULT({});
  int64_t head_threshold_count TFSA_DEFAULT(0);
  /* Grouped-query attention (a TfsaGroupSelection): 0 each query head selects its own blocks; 1
   * each head computes the union of its KV group's picks; 2 one shared estimate per group, from
   * the group's mean query at the group's largest threshold. The kernels compute a group's heads
   * back to back on the same blocks. */
  int64_t group_selection TFSA_DEFAULT(0);
  /* A >= 0: a query at position p attends no key after p + A (the other side of
   * sliding_window: together a two-sided band, as ModernBERT's local layers attend); -1: no
   * limit. Like sliding_window a rule of the math; with is_causal it changes nothing. */
  int64_t window_ahead TFSA_DEFAULT(-1);
} TfsaAttributes;

/* compute_precision's values; tfsa_onnx/reference.py COMPUTE_PRECISIONS names them in order. */
enum TfsaComputePrecision { TFSA_PRECISION_FLOAT32 = 0, TFSA_PRECISION_BF16 = 1, TFSA_PRECISION_COUNT = 2 };

/* group_selection's values; tfsa_onnx/reference.py GROUP_SELECTIONS names them in order. */
enum TfsaGroupSelection {
  TFSA_GROUP_PER_HEAD = 0,
  TFSA_GROUP_UNION = 1,
  TFSA_GROUP_SHARED = 2,
  TFSA_GROUP_SELECTION_COUNT = 3
};

/* The block-mass estimates (attribute `estimate`); tfsa_onnx/reference.py ESTIMATES names them
 * in this order. */
enum TfsaEstimate {
  TFSA_ESTIMATE_MEAN = 0,
  TFSA_ESTIMATE_ANTIDIAGONAL = 1,
  TFSA_ESTIMATE_TOKEN = 2,
  TFSA_ESTIMATE_COUNT = 3
};

/* The sizes of one call: query [B, Hq, Sq, D], key [B, Hkv, Sk, D], value [B, Hkv, Sk, Dv]. */
typedef struct TfsaDims {
  int64_t batch TFSA_DEFAULT(0), q_heads TFSA_DEFAULT(0), kv_heads TFSA_DEFAULT(0), q_len TFSA_DEFAULT(0),
      kv_len TFSA_DEFAULT(0), head_dim TFSA_DEFAULT(0), v_head_dim TFSA_DEFAULT(0);
  /* element strides of the mask and of the bias over [B, Hq, Sq, Sk]; 0 where they broadcast */
  int64_t mask_stride[4] TFSA_DEFAULT({0, 0, 0, 0});
  int64_t bias_stride[4] TFSA_DEFAULT({0, 0, 0, 0});
} TfsaDims;

/* The attributes of ai.tfsa::SparseGroupQueryAttention that com.microsoft.GroupQueryAttention
 * defines (its sparsity attributes are a TfsaAttributes; scale is there too). The order is the
 * order of tfsa_onnx/reference.py GroupQueryAttentionAttributes' fields. num_heads and
 * kv_num_heads have no default: 0 stands for absent. */
typedef struct TfsaGqaAttributes {
  int64_t num_heads TFSA_DEFAULT(0);
  int64_t kv_num_heads TFSA_DEFAULT(0);
  int64_t local_window_size TFSA_DEFAULT(-1); /* query at p sees the w keys (p - w, p]; -1: all */
  int64_t do_rotary TFSA_DEFAULT(0);
  int64_t rotary_interleaved TFSA_DEFAULT(0);
  float softcap TFSA_DEFAULT(0.0f); /* c > 0: scores capped to c * tanh(score / c); 0: none */
} TfsaGqaAttributes;

/* One attribute as the library checks it: a value v is allowed when low <= v <= high (low < v
 * when low_open) and, for floats, finite. */
typedef struct TfsaAttributeInfo {
  const char* name;
  int32_t is_float; /* float, else int64 */
  int32_t low_open;
  size_t offset; /* of the field in its struct: TfsaAttributes, or TfsaGqaAttributes */
  double default_value, low, high;
  /* > 0: a list attribute of up to this many values (each within low, high), its count the
   * int64 right after them; 0: one value. */
  int64_t max_count;
} TfsaAttributeInfo;

/* Fills `info` with attribute `index` (in the order the checks run) when `info` is not NULL;
 * returns how many attributes there are. Exported by every library of this project. */
int32_t tfsa_attribute_info(int32_t index, TfsaAttributeInfo* info);
/* The same for the TfsaGqaAttributes of SparseGroupQueryAttention. */
int32_t tfsa_gqa_attribute_info(int32_t index, TfsaAttributeInfo* info);

#ifdef __cplusplus
}  // extern "C"
#endif
#undef TFSA_DEFAULT

#ifdef __cplusplus
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "tfsa/block_grid.h"

namespace tfsa {

inline constexpr const char* kDomain = "ai.tfsa";
inline constexpr const char* kOpName = "SparseAttention";
inline constexpr const char* kGqaOpName = "SparseGroupQueryAttention";

using Attributes = TfsaAttributes;
using GqaAttributes = TfsaGqaAttributes;
using Dims = TfsaDims;

// The attributes' bounds. Inside them no index arithmetic of a call overflows int64.
inline constexpr int64_t kBlockSizeMax = 1048576;  // block_size in [1, kBlockSizeMax]
// global_tokens, local_window, min_seq_len, sliding_window in [0, kTokensMax]; window_ahead in
// [-1, kTokensMax]
inline constexpr int64_t kTokensMax = 2147483647;
inline constexpr int64_t kHeadsMax = 65536;        // num_heads, kv_num_heads in [1, kHeadsMax]
// estimate_stride in [1, kEstimateStrideMax]: the antidiagonal estimate packs up to this many
// residues of the keys, so its workspace stays about the size of the keys.
inline constexpr int64_t kEstimateStrideMax = 1024;

// One attribute: its name, where it lives in its struct S (Attributes or GqaAttributes), its
// bounds, and what its error adds.
template <class S>
struct FieldRule {
  const char* name;
  bool is_float;
  size_t offset;
  double low, high;
  bool low_open;     // (low, high] rather than [low, high]
  const char* note;  // appended to the range in the error message

  template <class V>  // float for float attributes, int64_t for integers
  V Get(const S& a) const {
    V value;
    std::memcpy(&value, reinterpret_cast<const unsigned char*>(&a) + offset, sizeof value);
    return value;
  }
  double GetAsDouble(const S& a) const {
    return is_float ? Get<float>(a) : static_cast<double>(Get<int64_t>(a));
  }
  template <class V>
  void Set(S& a, V value) const {
    unsigned char* field = reinterpret_cast<unsigned char*>(&a) + offset;
    if (is_float) {
      const float as_float = static_cast<float>(value);
      std::memcpy(field, &as_float, sizeof as_float);
    } else {
      const int64_t as_int = static_cast<int64_t>(value);
      std::memcpy(field, &as_int, sizeof as_int);
    }
  }
};

using AttributeRule = FieldRule<Attributes>;
using GqaAttributeRule = FieldRule<GqaAttributes>;

// Every attribute, integers first: the order CheckAttributes reports the first bad one in.
inline constexpr double kUnbounded = std::numeric_limits<double>::infinity();
inline constexpr AttributeRule kAttributeRules[] = {
    {"block_size", false, offsetof(Attributes, block_size), 1, kBlockSizeMax, false, ""},
    {"global_tokens", false, offsetof(Attributes, global_tokens), 0, kTokensMax, false, ""},
    {"local_window", false, offsetof(Attributes, local_window), 0, kTokensMax, false, ""},
    {"min_seq_len", false, offsetof(Attributes, min_seq_len), 0, kTokensMax, false, ""},
    {"sliding_window", false, offsetof(Attributes, sliding_window), 0, kTokensMax, false, " (0: none)"},
    {"is_causal", false, offsetof(Attributes, is_causal), 0, 1, false, ""},
    {"estimate", false, offsetof(Attributes, estimate), 0, TFSA_ESTIMATE_COUNT - 1, false,
     " (0 mean-pooled, 1 antidiagonal, 2 token-level queries)"},
    {"estimate_stride", false, offsetof(Attributes, estimate_stride), 1, kEstimateStrideMax, false, ""},
    {"query_positions", false, offsetof(Attributes, query_positions), 0, 1, false,
     " (0 from the first key, 1 the last keys)"},
    {"threshold", true, offsetof(Attributes, threshold), 0, 1, false, ""},
    {"max_density", true, offsetof(Attributes, max_density), 0, 1, true, ""},
    {"scale", true, offsetof(Attributes, scale), 0, kUnbounded, false, " (0 means 1/sqrt(head_dim))"},
    {"softcap", true, offsetof(Attributes, softcap), 0, kUnbounded, false, " (0: none)"},
    {"compute_precision", false, offsetof(Attributes, compute_precision), 0, TFSA_PRECISION_COUNT - 1, false,
     " (0 float32, 1 bf16)"},
    {"group_selection", false, offsetof(Attributes, group_selection), 0, TFSA_GROUP_SELECTION_COUNT - 1, false,
     " (0 per head, 1 union of the group's picks, 2 one estimate per group)"},
    {"window_ahead", false, offsetof(Attributes, window_ahead), -1, kTokensMax, false, " (-1: none)"},
};

// SparseGroupQueryAttention's own attributes; the sparsity ones are kAttributeRules' (all but
// is_causal: the op is always causal).
inline constexpr GqaAttributeRule kGqaAttributeRules[] = {
    {"num_heads", false, offsetof(GqaAttributes, num_heads), 1, kHeadsMax, false, ""},
    {"kv_num_heads", false, offsetof(GqaAttributes, kv_num_heads), 1, kHeadsMax, false, ""},
    {"local_window_size", false, offsetof(GqaAttributes, local_window_size), -1, kTokensMax, false,
     " (-1: no window)"},
    {"do_rotary", false, offsetof(GqaAttributes, do_rotary), 0, 1, false, ""},
    {"rotary_interleaved", false, offsetof(GqaAttributes, rotary_interleaved), 0, 1, false, ""},
    {"softcap", true, offsetof(GqaAttributes, softcap), 0, kUnbounded, false, " (0: none)"},
};

// Empty string when the fields are within their rules' bounds, else the first one that is
// not: its name, its value and the allowed range.
template <class S, size_t N>
std::string CheckFields(const S& a, const FieldRule<S> (&rules)[N]) {
  std::ostringstream err;
  for (const FieldRule<S>& r : rules) {
    if (!r.is_float) {
      const int64_t value = r.template Get<int64_t>(a), low = static_cast<int64_t>(r.low), high = static_cast<int64_t>(r.high);
      if (value >= low && value <= high) continue;
      err << r.name << " must be an integer in [" << low << ", " << high << "]" << r.note << ", got " << value;
    } else {
      const float value = r.template Get<float>(a);
      if ((r.low_open ? value > r.low : value >= r.low) && value <= r.high && std::isfinite(value)) continue;
      const bool unbounded = std::isinf(r.high);
      err << r.name << " must be a " << (unbounded ? "finite " : "") << "float in " << (r.low_open ? "(" : "[")
          << r.low << ", " << r.high << (unbounded ? ")" : "]") << r.note << ", got " << value;
    }
    return err.str();
  }
  return "";
}

// A list attribute of Attributes: up to max_count floats at `offset`, how many are given in
// the int64 right after them, each value within [low, high] and finite.
struct ListRule {
  const char* name;
  size_t offset;
  int64_t max_count;
  double low, high;
  const char* note;  // appended to the range in the error message

  const float* Values(const Attributes& a) const {
    return reinterpret_cast<const float*>(reinterpret_cast<const unsigned char*>(&a) + offset);
  }
  float* Values(Attributes& a) const { return reinterpret_cast<float*>(reinterpret_cast<unsigned char*>(&a) + offset); }
  int64_t Count(const Attributes& a) const {
    int64_t count;
    std::memcpy(&count, reinterpret_cast<const unsigned char*>(&a) + offset + sizeof(float) * max_count, sizeof count);
    return count;
  }
  void SetCount(Attributes& a, int64_t count) const {
    std::memcpy(reinterpret_cast<unsigned char*>(&a) + offset + sizeof(float) * max_count, &count, sizeof count);
  }
};

inline constexpr ListRule kListAttributeRules[] = {
    {"head_thresholds", offsetof(Attributes, head_thresholds), TFSA_HEAD_THRESHOLDS_MAX, 0, 1,
     " (one per query head, or none)"},
};
static_assert(offsetof(Attributes, head_threshold_count) ==
                  offsetof(Attributes, head_thresholds) + sizeof(float) * TFSA_HEAD_THRESHOLDS_MAX,
              "a list's count is the int64 right after its values");

// Empty string when every list holds at most max_count values within bounds, else the first
// that does not.
inline std::string CheckLists(const Attributes& a) {
  std::ostringstream err;
  for (const ListRule& r : kListAttributeRules) {
    const int64_t count = r.Count(a);
    if (count < 0 || count > r.max_count) {
      err << r.name << " may hold at most " << r.max_count << " values" << r.note << ", got " << count;
      return err.str();
    }
    for (int64_t i = 0; i < count; ++i) {
      const float value = r.Values(a)[i];
      if (value >= r.low && value <= r.high && std::isfinite(value)) continue;
      err << r.name << " values must be floats in [" << r.low << ", " << r.high << "]" << r.note << ", got "
          << value << " at index " << i;
      return err.str();
    }
  }
  return "";
}

inline std::string CheckAttributes(const Attributes& a) {
  const std::string scalars = CheckFields(a, kAttributeRules);
  return scalars.empty() ? CheckLists(a) : scalars;
}
inline std::string CheckGqaAttributes(const GqaAttributes& a) { return CheckFields(a, kGqaAttributeRules); }

// "" when head_thresholds fits a call with q_heads query heads: none, or exactly one per head.
inline std::string CheckHeadThresholds(const Attributes& a, int64_t q_heads) {
  if (a.head_threshold_count == 0 || a.head_threshold_count == q_heads) return "";
  return "head_thresholds gives " + std::to_string(a.head_threshold_count) + " thresholds for " +
         std::to_string(q_heads) + " query heads (give one per query head, or none)";
}

// The threshold query head h selects with: its head_thresholds value when the node gives them.
TFSA_HOST_DEVICE inline float HeadThreshold(const Attributes& a, int64_t h) {
  return a.head_threshold_count > 0 ? a.head_thresholds[h] : a.threshold;
}

// How a query head picks its key blocks: every allowed block (short inputs, or its threshold
// and max_density both 1: dense attention through the same code); the forced blocks alone (a
// streaming head: threshold 0 adds no candidate, so its estimate is never computed); or the
// forced blocks and the estimate's picks.
enum class HeadSelection { kDense, kStreaming, kEstimate };

// The same for a selection at `threshold` (a head's, or a group's largest).
TFSA_HOST_DEVICE inline HeadSelection SelectionAt(const Attributes& a, int64_t kv_len, float threshold) {
  if (kv_len < a.min_seq_len || (threshold >= 1.0f && a.max_density >= 1.0f)) return HeadSelection::kDense;
  return threshold > 0.0f ? HeadSelection::kEstimate : HeadSelection::kStreaming;
}

TFSA_HOST_DEVICE inline HeadSelection SelectionOf(const Attributes& a, int64_t kv_len, int64_t h) {
  return SelectionAt(a, kv_len, HeadThreshold(a, h));
}

// The threshold a shared group selection (group_selection 2) uses: the largest of its heads'
// [first, first + heads).
TFSA_HOST_DEVICE inline float GroupThreshold(const Attributes& a, int64_t first, int64_t heads) {
  float threshold = HeadThreshold(a, first);
  for (int64_t h = first + 1; h < first + heads; ++h) threshold = fmaxf(threshold, HeadThreshold(a, h));
  return threshold;
}

// Whether a call's query heads select per KV group (group_selection 1 or 2 with more than one
// query head per kv head); with one head per group every mode is per-head selection.
TFSA_HOST_DEVICE inline bool SelectsPerGroup(const Attributes& a, int64_t q_heads, int64_t kv_heads) {
  return a.group_selection != TFSA_GROUP_PER_HEAD && kv_heads > 0 && q_heads > kv_heads;
}

// Whether some head of a call with q_heads query heads selects `mode`.
inline bool AnyHead(const Attributes& a, int64_t kv_len, int64_t q_heads, HeadSelection mode) {
  const int64_t heads = a.head_threshold_count > 0 ? std::min(q_heads, a.head_threshold_count) : 1;
  for (int64_t h = 0; h < heads; ++h)
    if (SelectionOf(a, kv_len, h) == mode) return true;
  return false;
}

// Whether some head of the call ranks blocks by the estimate (what the estimate's packing and
// workspace are for).
inline bool UsesEstimate(const Attributes& a, int64_t kv_len, int64_t q_heads) {
  return AnyHead(a, kv_len, q_heads, HeadSelection::kEstimate);
}

// Whether every head of the call computes every allowed block.
inline bool AllDense(const Attributes& a, int64_t kv_len, int64_t q_heads) {
  return !AnyHead(a, kv_len, q_heads, HeadSelection::kEstimate) &&
         !AnyHead(a, kv_len, q_heads, HeadSelection::kStreaming);
}

// The attributes a call with these sizes computes with; everything that sizes memory, indexes
// blocks or scales scores uses these, never the raw attributes:
//  - scale: 0 becomes 1/sqrt(head_dim) (1 without a head dim);
//  - block_size, global_tokens, local_window, sliding_window and window_ahead (when not -1) cut
//    to what the sequences can use, which changes no result. A block_size of at least both lengths is one query block and
//    one key block however large it is; global tokens beyond both lengths cover every query and
//    key either way; a window of the longer length already reaches every key from every query
//    position (positions lie in [kv - q, kv - 1]).
inline Attributes Effective(const Attributes& a, const Dims& d) {
  Attributes e = a;
  if (!(e.scale > 0.0f)) e.scale = d.head_dim > 0 ? 1.0f / std::sqrt(static_cast<float>(d.head_dim)) : 1.0f;
  const int64_t longest = std::max<int64_t>({1, d.q_len, d.kv_len});
  e.block_size = std::min(a.block_size, longest);
  e.global_tokens = std::min(a.global_tokens, longest);
  e.local_window = std::min(a.local_window, longest);
  e.sliding_window = std::min(a.sliding_window, longest);
  if (a.window_ahead >= 0) e.window_ahead = std::min(a.window_ahead, longest);
  return e;
}

// The block grid of a call, from its effective attributes.
inline BlockGrid GridOf(const Attributes& effective, const Dims& d) {
  BlockGrid grid(effective.block_size, d.q_len, d.kv_len, effective.is_causal != 0);
  grid.window = effective.sliding_window > 0 ? effective.sliding_window - 1 : -1;
  grid.ahead = effective.window_ahead;
  if (effective.query_positions != 0) grid.global_query_offset = d.kv_len - d.q_len;
  return grid;
}

using Shape = std::vector<int64_t>;

inline std::string ToString(const Shape& s) {
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < s.size(); ++i) out << (i ? ", " : "") << s[i];
  out << "]";
  return out.str();
}

// The element strides over [B, Hq, Sq, Sk] of a tensor of shape `s` broadcast to it (0 on
// broadcast axes), or false when it does not broadcast.
inline bool BroadcastStrides(const Shape& s, const Dims& d, int64_t stride_out[4]) {
  if (s.size() > 4) return false;
  const int64_t full[4] = {d.batch, d.q_heads, d.q_len, d.kv_len};
  int64_t stride = 1;
  for (int axis = 3; axis >= 0; --axis) {
    const int64_t s_axis = axis - (4 - static_cast<int64_t>(s.size()));
    const int64_t extent = s_axis >= 0 ? s[s_axis] : 1;
    if (extent != 1 && extent != full[axis]) return false;
    stride_out[axis] = (extent == 1) ? 0 : stride;
    stride *= extent;
  }
  return true;
}

// Checks query/key/value/mask/bias shapes; fills `dims` and returns "" when they fit together.
inline std::string CheckShapes(const Shape& q, const Shape& k, const Shape& v, const Shape* mask, Dims& dims,
                               const Shape* bias = nullptr) {
  std::ostringstream err;
  auto shapes = [&] {
    return " (query " + ToString(q) + ", key " + ToString(k) + ", value " + ToString(v) +
           (mask ? ", attn_mask " + ToString(*mask) : std::string()) +
           (bias ? ", attn_bias " + ToString(*bias) : std::string()) + ")";
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
  dims = Dims{q[0], q[1], k[1], q[2], k[2], q[3], v[3], {0, 0, 0, 0}, {0, 0, 0, 0}};
  const std::string full = ToString({dims.batch, dims.q_heads, dims.q_len, dims.kv_len});
  if (mask) {
    if (mask->size() > 4) return "attn_mask must have rank <= 4" + shapes();
    if (!BroadcastStrides(*mask, dims, dims.mask_stride))
      return "attn_mask does not broadcast to [batch, q_heads, q_seq, kv_seq] = " + full + shapes();
  }
  if (bias) {
    if (bias->size() > 4) return "attn_bias must have rank <= 4" + shapes();
    if (!BroadcastStrides(*bias, dims, dims.bias_stride))
      return "attn_bias does not broadcast to [batch, q_heads, q_seq, kv_seq] = " + full + shapes();
  }
  return "";
}

}  // namespace tfsa
#endif  // __cplusplus
