#include "exact_rows.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "block_math.h"
#include "convert.h"
#include "selection.h"

namespace tfsa::cpu {
namespace {

// Rows [first, first + n) of a [rows, width] tensor as float32: the rows themselves for float,
// else converted into `buffer`.
template <class T>
const float* AsFloat(const T* rows, int64_t first, int64_t n, int64_t width, std::vector<float>& buffer) {
  if constexpr (std::is_same_v<T, float>) {
    return rows + first * width;
  } else {
    buffer.resize(n * width);
    for (int64_t e = 0; e < n * width; ++e) buffer[e] = ToFloat(rows[first * width + e]);
    return buffer.data();
  }
}

struct RowScratch {
  std::vector<float> q, scores, o, k, v;
};

// Row i of (b, h): one softmax over its visible keys [first, last] (the block kernels' row
// scores, online softmax step and axpy), then the weighted values. NaN and infinity as
// reference.py says: a NaN score makes the row NaN, +inf makes it NaN through inf - inf, a
// -inf score weighs nothing and its value is not read.
template <class T>
void Row(const Problem& p, const BlockMath& math, const T* q_row, const T* k_head, const T* v_head, int64_t i, T* out,
         RowScratch& sc) {
  const Dims& d = p.dims;
  const int64_t first = p.grid.FirstVisibleKey(i), n = std::max<int64_t>(0, p.grid.LastVisibleKey(i) - first + 1);
  const int head_dim = static_cast<int>(d.head_dim), v_dim = static_cast<int>(d.v_head_dim);
  sc.q.resize(d.head_dim);
  for (int64_t x = 0; x < d.head_dim; ++x) sc.q[x] = p.attrs.scale * ToFloat(q_row[x]);
  const int width = static_cast<int>(RoundUp(std::max<int64_t>(n, 1), math.pad));
  sc.scores.resize(width);
  math.row_scores(sc.q.data(), head_dim, AsFloat(k_head, first, n, d.head_dim, sc.k), static_cast<int>(n),
                  sc.scores.data());
  CapScores(p.attrs.softcap, 1, n, width, sc.scores.data());
  bool any_nan = false, any_hidden = false;
  for (int64_t j = 0; j < n; ++j) {
    any_nan = any_nan || std::isnan(sc.scores[j]);
    any_hidden = any_hidden || sc.scores[j] == -INFINITY;
  }
  if (any_nan) {
    std::fill(out, out + d.v_head_dim, T(NAN));
    return;
  }
  // -inf scores (infinite keys) must not read their values: 0 * inf would be NaN.
  std::vector<uint8_t> hidden;
  if (any_hidden)
    for (int64_t j = 0; j < n; ++j) hidden.push_back(sc.scores[j] == -INFINITY);
  sc.o.assign(RoundUp(std::max(v_dim, 1), math.pad), 0.0f);
  float m = -INFINITY, l = 0.0f;
  const int v_pad = static_cast<int>(sc.o.size());
  math.softmax_step(sc.scores.data(), 1, static_cast<int>(n), width, &m, &l, sc.o.data(), v_pad);
  const float* v = AsFloat(v_head, first, n, d.v_head_dim, sc.v);
  for (int64_t j = 0; j < n; ++j)
    if (!any_hidden || !hidden[j]) math.axpy(sc.scores[j], v + j * d.v_head_dim, v_dim, sc.o.data());
  const float inv = m == -INFINITY ? 0.0f : 1.0f / l;  // nothing attendable: zeros
  for (int64_t x = 0; x < d.v_head_dim; ++x) out[x] = T(m == -INFINITY ? 0.0f : sc.o[x] * inv);
}

template <class T>
void Run(const Problem& p, const Tensors& t, const ParallelFor& parallel_for) {
  const Dims& d = p.dims;
  const int64_t kv_rows = t.kv_rows > 0 ? t.kv_rows : d.kv_len, group = d.q_heads / d.kv_heads;
  const BlockMath& math = SelectBlockMath();
  parallel_for(static_cast<size_t>(d.batch * d.q_heads), [&](size_t task) {
    const int64_t bh = static_cast<int64_t>(task), b = bh / d.q_heads, bk = b * d.kv_heads + (bh % d.q_heads) / group;
    thread_local RowScratch sc;
    const T* k_head = static_cast<const T*>(t.key) + bk * kv_rows * d.head_dim;
    const T* v_head = static_cast<const T*>(t.value) + bk * kv_rows * d.v_head_dim;
    for (int64_t i = 0; i < d.q_len; ++i)
      Row(p, math, static_cast<const T*>(t.query) + (bh * d.q_len + i) * d.head_dim, k_head, v_head, i,
          static_cast<T*>(t.output) + (bh * d.q_len + i) * d.v_head_dim, sc);
  });
}

}  // namespace

bool UsesExactRows(const Problem& p) {
  return p.dims.q_len <= kExactRowsMax && AllDense(p) && !p.mask.present() && !p.bias.present() &&
         !p.selection_only;
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
