#include "selection.h"

#include <algorithm>
#include <cmath>

#include "tfsa/ort_api.h"

namespace tfsa::cpu {

void ClassifyMaskBlocks(const Problem& p, MaskBlocks& out, const std::function<void(size_t, const std::function<void(size_t)>&)>& parallel_for) {
  const BlockGrid& g = p.grid;
  const MaskView& mask = p.mask;
  out.heads = mask.stride[1] == 0 ? 1 : p.dims.q_heads;
  // Rows broadcast (query-row stride 0): row 0 stands for all. Not the same as one query
  // block: a per-row mask is read row by row however few blocks there are.
  out.rows_broadcast = mask.stride[2] == 0;
  out.q_blocks = out.rows_broadcast ? 1 : g.q_blocks;
  out.k_blocks = g.k_blocks;
  out.state.assign(p.dims.batch * out.heads * out.q_blocks * out.k_blocks, MaskBlocks::kClosed);
  parallel_for(p.dims.batch * out.heads * out.q_blocks, [&](size_t task) {
    const int64_t qb = task % out.q_blocks, bh = task / out.q_blocks;
    const int64_t b = bh / out.heads, h = bh % out.heads;
    const int64_t q_begin = g.QueryBegin(qb), q_end = out.rows_broadcast ? q_begin + 1 : g.QueryEnd(qb);
    for (int64_t kb = 0; kb < g.k_blocks; ++kb) {
      bool any = false, all_zero = true;
      for (int64_t i = q_begin; i < q_end; ++i)
        for (int64_t j = g.KeyBegin(kb); j < g.KeyEnd(kb); ++j) {
          const float bias = mask.Bias(mask.Offset(b, h, i, j));
          any = any || bias != kNegInf;
          all_zero = all_zero && bias == 0.0f;
        }
      out.state[task * out.k_blocks + kb] = all_zero ? MaskBlocks::kOpen : any ? MaskBlocks::kPartial : MaskBlocks::kClosed;
    }
  });
}

int64_t AllowedKeyBlocks(const Problem& p, int64_t b, int64_t h, int64_t qb, std::vector<uint8_t>& allowed) {
  const BlockGrid& g = p.grid;
  const int64_t q_begin = g.QueryBegin(qb), q_end = g.QueryEnd(qb);
  int64_t count = 0;
  allowed.assign(g.k_blocks, 0);
  for (int64_t kb = 0; kb < g.k_blocks; ++kb) {
    const int64_t k_begin = g.KeyBegin(kb), k_end = g.KeyEnd(kb);
    if (k_begin > g.LastVisibleKey(q_end - 1)) continue;  // the future, for every row
    const uint8_t state = p.mask_blocks ? p.mask_blocks->At(b, h, qb, kb) : uint8_t{MaskBlocks::kOpen};
    bool any = state == MaskBlocks::kOpen || (state == MaskBlocks::kPartial && k_end - 1 <= g.LastVisibleKey(q_begin));
    if (state == MaskBlocks::kPartial && !any)  // on the causal edge: look at the visible pairs
      for (int64_t i = q_begin; i < q_end && !any; ++i)
        for (int64_t j = k_begin; j <= std::min(k_end - 1, g.LastVisibleKey(i)) && !any; ++j)
          any = p.mask.Allows(p.mask.Offset(b, h, i, j));
    allowed[kb] = any;
    count += any;
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

// The candidates' estimated scores, as softmax mass when `normalise` (the threshold needs
// it; the ranking alone does not). NaN scores count as the least likely.
void EstimateMass(const Problem& p, const float* pooled_scores, bool normalise, SelectionScratch& s) {
  s.mass.resize(s.candidates.size());
  double best = -INFINITY;
  for (size_t c = 0; c < s.candidates.size(); ++c) {
    const int64_t kb = s.candidates[c];
    double score = pooled_scores[kb];
    const int64_t keys = p.grid.KeyEnd(kb) - p.grid.KeyBegin(kb);
    if (keys != p.grid.block) score += std::log(static_cast<double>(keys) / p.grid.block);  // + log(keys), shifted
    s.mass[c] = std::isnan(score) ? -INFINITY : score;
    best = std::max(best, s.mass[c]);
  }
  if (!normalise) return;
  double total = 0.0;
  for (double& m : s.mass) total += (m = std::isfinite(best) ? std::exp(m - best) : 1.0);
  for (double& m : s.mass) m /= total;
}

}  // namespace

bool UsesEstimate(const Problem& p) { return tfsa::UsesEstimate(p.attrs, p.grid.kv_len); }

void ChooseKeyBlocks(const Problem& p, int64_t qb, const float* pooled_scores, SelectionScratch& s,
                     std::vector<int32_t>& chosen) {
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
    EstimateMass(p, pooled_scores, use_threshold, s);
    // The small tolerance keeps float attribute rounding from adding a block (0.1f * 30).
    const int64_t cap = std::max<int64_t>(1, static_cast<int64_t>(std::ceil(double(a.max_density) * n_allowed - 1e-4)));
    const int64_t budget = std::max<int64_t>(0, std::min<int64_t>(cap - n_forced, s.candidates.size()));
    s.order.resize(s.candidates.size());
    for (size_t c = 0; c < s.order.size(); ++c) s.order[c] = static_cast<int32_t>(c);
    // The `budget` heaviest first; ties by block index, as the reference's stable argsort.
    const auto heavier = [&](int32_t x, int32_t y) {
      return s.mass[x] > s.mass[y] || (s.mass[x] == s.mass[y] && x < y);
    };
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
