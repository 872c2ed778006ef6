#include "exact_rows.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "selection.h"

namespace tfsa::cpu {
namespace {

inline float ToFloat(float x) { return x; }
inline float ToFloat(Ort::Float16_t x) { return x.ToFloat(); }
inline float ToFloat(Ort::BFloat16_t x) { return x.ToFloat(); }

// A row of n elements as float32: the row itself for float, else converted into `buffer`.
template <class T>
const float* AsFloat(const T* row, int64_t n, std::vector<float>& buffer) {
  if constexpr (std::is_same_v<T, float>) {
    return row;
  } else {
    buffer.resize(n);
    for (int64_t x = 0; x < n; ++x) buffer[x] = ToFloat(row[x]);
    return buffer.data();
  }
}

// q . k over n elements in 8 independent partial sums, so that the compiler vectorises it.
float Dot(const float* q, const float* k, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t x = 0;
  for (; x + 8 <= n; x += 8)
    for (int u = 0; u < 8; ++u) acc[u] += q[x + u] * k[x + u];
  for (; x < n; ++x) acc[0] += q[x] * k[x];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

struct RowScratch {
  std::vector<float> q, scores, o, k_row, v_row;
};

// Row i of (b, h): softmax over its visible keys [first, last], then the weighted values.
// NaN and infinity as reference.py says: a NaN score makes the row NaN, +inf makes it NaN
// through inf - inf, a -inf score weighs nothing and its value is not read.
template <class T>
void Row(const Problem& p, const T* q_row, const T* k_head, const T* v_head, int64_t i, T* out, RowScratch& sc) {
  const Dims& d = p.dims;
  const int64_t first = p.grid.FirstVisibleKey(i), last = p.grid.LastVisibleKey(i);
  sc.q.resize(d.head_dim);
  for (int64_t x = 0; x < d.head_dim; ++x) sc.q[x] = p.attrs.scale * ToFloat(q_row[x]);
  sc.scores.resize(std::max<int64_t>(0, last - first + 1));
  float m = -INFINITY;
  bool any_nan = false;
  for (int64_t j = first; j <= last; ++j) {
    const float s = Dot(sc.q.data(), AsFloat(k_head + j * d.head_dim, d.head_dim, sc.k_row), d.head_dim);
    sc.scores[j - first] = s;
    any_nan = any_nan || std::isnan(s);
    m = std::max(m, s);
  }
  if (any_nan || m == -INFINITY) {  // NaN: the row is NaN; nothing attendable: zeros
    std::fill(out, out + d.v_head_dim, T(any_nan ? NAN : 0.0f));
    return;
  }
  sc.o.assign(d.v_head_dim, 0.0f);
  float l = 0.0f;
  for (int64_t j = first; j <= last; ++j) {
    const float s = sc.scores[j - first];
    if (s == -INFINITY) continue;
    const float w = std::exp(s - m);
    l += w;
    const float* v = AsFloat(v_head + j * d.v_head_dim, d.v_head_dim, sc.v_row);
    for (int64_t x = 0; x < d.v_head_dim; ++x) sc.o[x] += w * v[x];
  }
  for (int64_t x = 0; x < d.v_head_dim; ++x) out[x] = T(sc.o[x] / l);
}

template <class T>
void Run(const Problem& p, const Tensors& t, const ParallelFor& parallel_for) {
  const Dims& d = p.dims;
  const int64_t kv_rows = t.kv_rows > 0 ? t.kv_rows : d.kv_len, group = d.q_heads / d.kv_heads;
  parallel_for(static_cast<size_t>(d.batch * d.q_heads), [&](size_t task) {
    const int64_t bh = static_cast<int64_t>(task), b = bh / d.q_heads, bk = b * d.kv_heads + (bh % d.q_heads) / group;
    thread_local RowScratch sc;
    const T* k_head = static_cast<const T*>(t.key) + bk * kv_rows * d.head_dim;
    const T* v_head = static_cast<const T*>(t.value) + bk * kv_rows * d.v_head_dim;
    for (int64_t i = 0; i < d.q_len; ++i)
      Row(p, static_cast<const T*>(t.query) + (bh * d.q_len + i) * d.head_dim, k_head, v_head, i,
          static_cast<T*>(t.output) + (bh * d.q_len + i) * d.v_head_dim, sc);
  });
}

}  // namespace

bool UsesExactRows(const Problem& p) {
  return p.dims.q_len <= kExactRowsMax && !UsesEstimate(p) && !p.mask.present() && !p.selection_only;
}

void RunExactRows(const Problem& p, const Tensors& t, const ParallelFor& parallel_for) {
  switch (t.type) {
    case Tensors::Type::kFloat: Run<float>(p, t, parallel_for); break;
    case Tensors::Type::kHalf: Run<Ort::Float16_t>(p, t, parallel_for); break;
    case Tensors::Type::kBFloat16: Run<Ort::BFloat16_t>(p, t, parallel_for); break;
  }
  if (t.density) std::fill(t.density, t.density + p.dims.batch * p.dims.q_heads, 1.0f);
}

}  // namespace tfsa::cpu
