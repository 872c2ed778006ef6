#include "selection.h"

#include <algorithm>
#include <cmath>

#include "tfsa/ort_api.h"

namespace tfsa::cpu {

void ClassifyMaskBlocks(const Problem& p, MaskBlocks& out, const std::function<void(size_t, const std::function<void(size_t)>&)>& parallel_for) {
  const BlockGrid& g = p.grid;
  const MaskView& mask = p.mask;
  out.layout = MaskBlockLayoutOf(g, mask.stride, p.dims.q_heads);
  const MaskBlockLayout& l = out.layout;
  out.state.assign(l.Size(p.dims.batch), kMaskClosed);
  parallel_for(p.dims.batch * l.heads * l.q_blocks, [&](size_t task) {
    const int64_t qb = task % l.q_blocks, bh = task / l.q_blocks;
    const int64_t b = bh / l.heads, h = bh % l.heads;
    const int64_t q_begin = g.QueryBegin(qb), q_end = l.rows_broadcast ? q_begin + 1 : g.QueryEnd(qb);
    for (int64_t kb = 0; kb < g.k_blocks; ++kb) {
      bool any = false, all_zero = true;
      for (int64_t i = q_begin; i < q_end; ++i)
        for (int64_t j = g.KeyBegin(kb); j < g.KeyEnd(kb); ++j) {
          const float bias = mask.Bias(mask.Offset(b, h, i, j));
          any = any || bias != kNegInf;
          all_zero = all_zero && bias == 0.0f;
        }
      out.state[task * l.k_blocks + kb] = MaskStateOf(any, all_zero);
    }
  });
}

int64_t AllowedKeyBlocks(const Problem& p, int64_t b, int64_t h, int64_t qb, std::vector<uint8_t>& allowed) {
  int64_t count = 0;
  allowed.assign(p.grid.k_blocks, 0);
  const auto allows = [&](int64_t i, int64_t j) { return p.mask.Allows(p.mask.Offset(b, h, i, j)); };
  for (int64_t kb = 0; kb < p.grid.k_blocks; ++kb) {
    const uint8_t state = p.mask_blocks ? p.mask_blocks->At(b, h, qb, kb) : uint8_t{kMaskOpen};
    allowed[kb] = BlockAllowed(p.grid, qb, kb, state, allows);
    count += allowed[kb];
  }
  return count;
}

namespace {

// Global-token and local-window blocks (only among the allowed ones).
int64_t ForcedKeyBlocks(const Problem& p, int64_t qb, const std::vector<uint8_t>& allowed,
                        std::vector<uint8_t>& forced) {
  int64_t count = 0;
  forced.assign(p.grid.k_blocks, 0);
  for (int64_t kb = 0; kb < p.grid.k_blocks; ++kb) {
    forced[kb] = allowed[kb] && p.grid.Forced(qb, kb, p.attrs.global_tokens, p.attrs.local_window);
    count += forced[kb];
  }
  return count;
}

// The mean estimate: the candidates' scores, as softmax mass when `normalise` (the threshold
// needs it; the ranking alone does not). NaN scores count as the least likely.
void PooledMass(const Problem& p, const float* pooled_scores, bool normalise, SelectionScratch& s) {
  s.mass.resize(s.candidates.size());
  double best = -INFINITY;
  for (size_t c = 0; c < s.candidates.size(); ++c) {
    s.mass[c] = Estimate(p.grid, s.candidates[c], pooled_scores[s.candidates[c]]);
    best = std::max(best, s.mass[c]);
  }
  if (!normalise) return;
  double total = 0.0;
  for (double& m : s.mass) total += (m = CandidateWeight(m, best));
  for (double& m : s.mass) m /= total;
}

// The token estimate: each row's softmax over the candidates, averaged over the rows. The
// rows are rewritten to the softmax's input (non-candidates -inf; a row whose best score is
// not finite all 0: equal weights) and handed to the kernels' vectorised softmax step.
void TokenMass(const Problem& p, const BlockMath& math, float* scores, int rows, int stride, SelectionScratch& s) {
  const int64_t nk = p.grid.k_blocks;
  for (int r = 0; r < rows; ++r) {
    float* row = scores + static_cast<size_t>(r) * stride;
    double best = -INFINITY;
    size_t c = 0;
    for (int64_t kb = 0; kb < stride; ++kb) {
      const bool candidate = c < s.candidates.size() && s.candidates[c] == kb;
      row[kb] = candidate ? static_cast<float>(Estimate(p.grid, kb, row[kb])) : kNegInf;
      best = std::max(best, static_cast<double>(row[kb]));
      c += candidate;
    }
    if (!std::isfinite(best))
      for (int32_t kb : s.candidates) row[kb] = 0.0f;
  }
  s.row_max.assign(rows, kNegInf);
  s.row_sum.assign(rows, 0.0f);
  float unused = 0.0f;
  math.softmax_step(scores, rows, static_cast<int>(nk), stride, s.row_max.data(), s.row_sum.data(), &unused, 0);
  s.mass.assign(s.candidates.size(), 0.0);
  for (int r = 0; r < rows; ++r) {
    const float* row = scores + static_cast<size_t>(r) * stride;
    const double inv = 1.0 / (static_cast<double>(s.row_sum[r]) * rows);
    for (size_t c = 0; c < s.candidates.size(); ++c) s.mass[c] += row[s.candidates[c]] * inv;
  }
}

// The antidiagonal estimate: each candidate's share of the candidates' block mass (equal
// shares when they have none).
void CandidateShares(SelectionScratch& s) {
  s.mass.resize(s.candidates.size());
  double total = 0.0;
  for (size_t c = 0; c < s.candidates.size(); ++c) total += (s.mass[c] = s.block_mass[s.candidates[c]]);
  for (double& m : s.mass) m = total > 0.0 ? m / total : 1.0 / static_cast<double>(s.mass.size());
}

// A row of sampled scores holding NaN or +inf: NaN weighs nothing (-inf), and a best of +inf
// gives every other sampled key the same weight (all 0 before the softmax).
void NanOrInfinityRow(float* row, int visible) {
  float best = kNegInf;
  for (int m = 0; m < visible; ++m) {
    row[m] = std::isnan(row[m]) ? kNegInf : row[m];
    best = std::max(best, row[m]);
  }
  if (best == INFINITY)
    for (int m = 0; m < visible; ++m) row[m] = row[m] == kNegInf ? kNegInf : 0.0f;
}

// One residue's rows (they sample the same keys): scores of the sampled keys up to the last
// one any of them may see, in s.group_scores [n, width]; returns width (0: none).
int ResidueScores(const Problem& p, const BlockMath& math, const PackedKeysValues& kv, int64_t bk, int64_t r,
                  int64_t last_key, int n, SelectionScratch& s) {
  if (r >= kv.residues || last_key < r) return 0;
  const int64_t stride = p.attrs.estimate_stride, needed = (last_key - r) / stride / kv.chunk + 1;
  const int width = static_cast<int>(needed * kv.chunk), dim = static_cast<int>(p.dims.head_dim);
  s.group_scores.resize(static_cast<size_t>(n) * width);
  for (int64_t c = 0; c < needed; ++c)
    math.scores(s.group_q.data(), n, dim, kv.SampledKt(bk, r, c), static_cast<int>(kv.chunk),
                s.group_scores.data() + c * kv.chunk, width);
  CapScores(p.attrs.softcap, n, width, width, s.group_scores.data());
  return width;
}

}  // namespace

void AntidiagonalMass(const Problem& p, const BlockMath& math, const PackedKeysValues& kv, int64_t bk, int64_t qb,
                      const float* q, int rows, SelectionScratch& s) {
  const BlockGrid& g = p.grid;
  const int64_t stride = p.attrs.estimate_stride, dim = p.dims.head_dim, q_begin = g.QueryBegin(qb);
  s.block_mass.assign(g.k_blocks, 0.0);
  int64_t last_key = -1;  // the end of the last allowed block
  for (int64_t kb = 0; kb < g.k_blocks; ++kb)
    if (s.allowed[kb]) last_key = g.KeyEnd(kb) - 1;
  for (int64_t first = 0; first < std::min<int64_t>(stride, rows); ++first) {
    // Rows first, first + stride, ...: i % stride is the same, so they sample the same keys.
    const int n = static_cast<int>((rows - first + stride - 1) / stride);
    const int64_t r = (stride - 1 - (q_begin + first) % stride) % stride;
    const int64_t group_last = std::min(last_key, g.LastVisibleKey(q_begin + first + (n - 1) * stride));
    s.group_q.resize(static_cast<size_t>(n) * dim);
    for (int t = 0; t < n; ++t) std::copy_n(q + (first + t * stride) * dim, dim, s.group_q.data() + t * dim);
    const int width = ResidueScores(p, math, kv, bk, r, group_last, n, s);
    if (width == 0) continue;
    // Sample m (key r + m * stride) of key block kb: m in [start(kb), start(kb + 1)).
    const int* starts = kv.SampleStarts(r);
    const auto start = [&](int64_t kb) { return std::min(starts[kb], width); };
    for (int t = 0; t < n; ++t) {  // unsampled or hidden: -inf
      const int64_t row_last = std::min(last_key, g.LastVisibleKey(q_begin + first + t * stride));
      const int visible = row_last < r ? 0 : static_cast<int>(std::min<int64_t>((row_last - r) / stride + 1, width));
      float* row = s.group_scores.data() + static_cast<size_t>(t) * width;
      for (int64_t kb = 0; kb < g.k_blocks; ++kb)
        if (!s.allowed[kb]) std::fill(row + start(kb), row + start(kb + 1), kNegInf);
      std::fill(row + visible, row + width, kNegInf);
      int unusual = 0;  // a NaN or +inf score (overflowing products): the reference's rule below
      for (int m = 0; m < visible; ++m) unusual |= !(row[m] < INFINITY);
      if (unusual) NanOrInfinityRow(row, visible);
    }
    s.row_max.assign(n, kNegInf);
    s.row_sum.assign(n, 0.0f);
    float unused = 0.0f;
    math.softmax_step(s.group_scores.data(), n, width, width, s.row_max.data(), s.row_sum.data(), &unused, 0);
    s.column_mass.assign(width, 0.0f);  // the rows' probabilities, summed per sample
    for (int t = 0; t < n; ++t) {
      if (!(s.row_sum[t] > 0.0f)) continue;  // a row with no sampled key weighs nothing
      const float* row = s.group_scores.data() + static_cast<size_t>(t) * width;
      const float inv = 1.0f / s.row_sum[t];
      for (int m = 0; m < width; ++m) s.column_mass[m] += row[m] * inv;
    }
    for (int64_t kb = 0; kb < g.k_blocks; ++kb) {
      double sum = 0.0;
      for (int m = start(kb); m < start(kb + 1); ++m) sum += s.column_mass[m];
      s.block_mass[kb] += sum;
    }
  }
}

bool UsesEstimate(const Problem& p) { return tfsa::UsesEstimate(p.attrs, p.grid.kv_len); }

bool ScoresEveryRow(const Problem& p) { return p.attrs.estimate == TFSA_ESTIMATE_TOKEN; }

void ChooseKeyBlocks(const Problem& p, const BlockMath& math, int64_t qb, float* scores, int rows, int stride,
                     SelectionScratch& s, std::vector<int32_t>& chosen) {
  const Attributes& a = p.attrs;
  const std::vector<uint8_t>& allowed = s.allowed;
  chosen.clear();
  if (!UsesEstimate(p)) {
    for (int64_t kb = 0; kb < p.grid.k_blocks; ++kb)
      if (allowed[kb]) chosen.push_back(static_cast<int32_t>(kb));
    return;
  }
  const int64_t n_allowed = std::count(allowed.begin(), allowed.end(), 1);
  const int64_t n_forced = ForcedKeyBlocks(p, qb, allowed, s.forced);
  s.candidates.clear();
  for (int64_t kb = 0; kb < p.grid.k_blocks; ++kb)
    if (allowed[kb] && !s.forced[kb]) s.candidates.push_back(static_cast<int32_t>(kb));
  std::vector<uint8_t>& take = s.forced;  // forced blocks, then the estimate's picks
  if (!s.candidates.empty()) {
    const bool use_threshold = a.threshold < 1.0f;
    if (a.estimate == TFSA_ESTIMATE_ANTIDIAGONAL) CandidateShares(s);
    else if (ScoresEveryRow(p)) TokenMass(p, math, scores, rows, stride, s);
    else PooledMass(p, scores, use_threshold, s);
    const int64_t budget = EstimateBudget(a.max_density, n_allowed, n_forced, s.candidates.size());
    s.order.resize(s.candidates.size());
    for (size_t c = 0; c < s.order.size(); ++c) s.order[c] = static_cast<int32_t>(c);
    // The `budget` heaviest first.
    const auto heavier = [&](int32_t x, int32_t y) { return Heavier(s.mass[x], x, s.mass[y], y); };
    std::nth_element(s.order.begin(), s.order.begin() + budget, s.order.end(), heavier);
    std::sort(s.order.begin(), s.order.begin() + budget, heavier);
    double cumulative = 0.0;
    for (int64_t r = 0; r < budget && (!use_threshold || cumulative < a.threshold); ++r) {
      take[s.candidates[s.order[r]]] = 1;
      cumulative += s.mass[s.order[r]];
    }
  }
  for (int64_t kb = 0; kb < p.grid.k_blocks; ++kb)
    if (take[kb]) chosen.push_back(static_cast<int32_t>(kb));
}

}  // namespace tfsa::cpu
