#include "selection.h"

#include <algorithm>
#include <cmath>

#include "bf16_math.h"
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

int64_t AllowedKeyBlocksOfHeads(const Problem& p, int64_t b, int64_t h, int64_t heads, int64_t qb,
                                std::vector<uint8_t>& allowed) {
  if (heads == 1) return AllowedKeyBlocks(p, b, h, qb, allowed);
  thread_local std::vector<uint8_t> head_allowed;
  allowed.assign(p.grid.k_blocks, 0);
  for (int64_t x = h; x < h + heads; ++x) {
    AllowedKeyBlocks(p, b, x, qb, head_allowed);
    for (int64_t kb = 0; kb < p.grid.k_blocks; ++kb) allowed[kb] |= head_allowed[kb];
  }
  return std::count(allowed.begin(), allowed.end(), 1);
}

namespace {

constexpr int kTileRows = 8;  // the antidiagonal estimate's rows per product (a register tile)
constexpr int kAmxRows = 16;  // the same on AMX (a tile's rows)

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

// Scores of n rows (s.group_q) against the first `chunks` chunks of residue r's sampled keys,
// into out [n, chunks * kv.chunk].
void SampledScores(const Problem& p, const BlockMath& math, const PackedKeysValues& kv, int64_t bk, int64_t r,
                   const float* q, int n, int64_t chunks, float* out) {
  const int width = static_cast<int>(chunks * kv.chunk), dim = static_cast<int>(p.dims.head_dim);
  for (int64_t c = 0; c < chunks; ++c)
    math.scores(q, n, dim, kv.SampledKt(bk, r, c), static_cast<int>(kv.chunk), out + c * kv.chunk, width);
  CapScores(p.attrs.softcap, n, width, width, out);
}

// Per query block of the group: its allowed key blocks, the last key they hold, and whether a
// block below that key is not allowed (a mask or window: its samples must be hidden per row).
void GroupAllowed(const Problem& p, int64_t b, int64_t h, int64_t heads, int64_t qb_begin, int64_t qb_end,
                  SelectionScratch& s) {
  const BlockGrid& g = p.grid;
  const int64_t nk = g.k_blocks, blocks = qb_end - qb_begin;
  s.group_allowed.resize(blocks * nk);
  s.group_last_key.assign(blocks, -1);
  s.group_holes.assign(blocks, 0);
  for (int64_t x = 0; x < blocks; ++x) {
    AllowedKeyBlocksOfHeads(p, b, h, heads, qb_begin + x, s.allowed);
    std::copy(s.allowed.begin(), s.allowed.end(), s.group_allowed.begin() + x * nk);
    int64_t last = -1;
    for (int64_t kb = nk - 1; kb >= 0 && last < 0; --kb) last = s.allowed[kb] ? kb : -1;
    s.group_last_key[x] = last < 0 ? -1 : g.KeyEnd(last) - 1;
    for (int64_t kb = 0; kb < last; ++kb) s.group_holes[x] |= !s.allowed[kb];
  }
}

// Hides what row `row` of query block x (of the group) may not sample: keys past `visible`,
// and the samples in key blocks that are not allowed.
void HideUnsampled(const Problem& p, const PackedKeysValues& kv, int64_t r, int64_t x, int visible, int width,
                   const SelectionScratch& s, float* row) {
  std::fill(row + visible, row + width, kNegInf);
  if (!s.group_holes[x]) return;
  const int* starts = kv.SampleStarts(r);
  const uint8_t* allowed = s.group_allowed.data() + x * p.grid.k_blocks;
  for (int64_t kb = 0; kb < p.grid.k_blocks && starts[kb] < visible; ++kb)
    if (!allowed[kb]) std::fill(row + starts[kb], row + std::min(starts[kb + 1], visible), kNegInf);
}

// Adds row t's probabilities (its first `visible` samples; the row sums to row_sum) to its
// query block's sampled mass, column (s.column_mass: [blocks, columns]) x.
void AddRowMass(const float* row, float row_sum, int visible, float* column) {
  if (!(row_sum > 0.0f)) return;  // a row with no sampled key weighs nothing
  const float inv = 1.0f / row_sum;
  for (int m = 0; m < visible; ++m) column[m] += row[m] * inv;
}

// One query block's sampled mass (residue r, `width` samples) summed into its key blocks.
void AddBlockMass(const Problem& p, const PackedKeysValues& kv, int64_t r, const float* column, int width,
                  double* mass) {
  const int* starts = kv.SampleStarts(r);
  for (int64_t kb = 0; kb < p.grid.k_blocks && starts[kb] < width; ++kb) {
    double sum = 0.0;
    for (int m = starts[kb]; m < std::min(starts[kb + 1], width); ++m) sum += column[m];
    mass[kb] += sum;
  }
}

// Scores of rows [t_begin, t_begin + n) of residue r (s.group_q, or on AMX s.group_q2, whose
// kAmxRows rows from t_begin it scores, zeros past the last) against its first `chunks` chunks
// of sampled keys, into out [n rows (kAmxRows on AMX), chunks * kv.chunk].
void TileScores(const Problem& p, const BlockMath& math, const PackedKeysValues& kv, int64_t bk, int64_t r,
                const SelectionScratch& s, int t_begin, int n, int64_t chunks, float* out) {
  const int dim = static_cast<int>(p.dims.head_dim);
#if defined(TFSA_X86_KERNELS)
  if (kv.sampled2) {
    const int width = static_cast<int>(chunks * kv.chunk);
    SampledScoresAmx(s.group_q2.data() + static_cast<size_t>(t_begin) * (dim / 2), kAmxRows, dim / 2,
                     kv.SampledKt2(bk, r), static_cast<int>(kv.chunks * kv.chunk), width, out, width);
    CapScores(p.attrs.softcap, n, width, width, out);
    return;
  }
#endif
  SampledScores(p, math, kv, bk, r, s.group_q.data() + static_cast<size_t>(t_begin) * dim, n, chunks, out);
}

// Rows [t_begin, t_end) of residue r (s.visible: the samples each may see): their scores up to
// the tile's widest row, softmax per row, added to their blocks' s.column_mass.
void ResidueTile(const Problem& p, const BlockMath& math, const PackedKeysValues& kv, int64_t bk, int64_t r,
                 int t_begin, int t_end, const std::vector<int64_t>& block_of, int columns, SelectionScratch& s) {
  const int n = t_end - t_begin;
  int needed = 0;
  for (int t = t_begin; t < t_end; ++t) needed = std::max(needed, s.visible[t]);
  if (needed == 0) return;
  const int64_t chunks = (needed + kv.chunk - 1) / kv.chunk;
  const int width = static_cast<int>(chunks * kv.chunk);
  s.group_scores.resize(static_cast<size_t>(std::max(n, kAmxRows)) * width);
  TileScores(p, math, kv, bk, r, s, t_begin, n, chunks, s.group_scores.data());
  for (int t = 0; t < n; ++t)
    HideUnsampled(p, kv, r, block_of[t_begin + t], s.visible[t_begin + t], width, s,
                  s.group_scores.data() + static_cast<size_t>(t) * width);
  s.row_max.assign(n, kNegInf);
  s.row_sum.assign(n, 0.0f);
  float unused = 0.0f;
  math.softmax_step(s.group_scores.data(), n, width, width, s.row_max.data(), s.row_sum.data(), &unused, 0);
  for (int t = 0; t < n; ++t) {
    float* row = s.group_scores.data() + static_cast<size_t>(t) * width;
    const int visible = s.visible[t_begin + t];
    if (std::isnan(s.row_sum[t])) {
      // A NaN or +inf score (overflowing products) makes the row's sum NaN: that row again,
      // by the reference's rule (NaN weighs nothing; the +inf keys share the weight).
      s.redo_scores.resize(s.group_scores.size());
      TileScores(p, math, kv, bk, r, s, t_begin, n, chunks, s.redo_scores.data());
      std::copy_n(s.redo_scores.data() + static_cast<size_t>(t) * width, width, row);
      HideUnsampled(p, kv, r, block_of[t_begin + t], visible, width, s, row);
      NanOrInfinityRow(row, visible);
      s.row_max[t] = kNegInf;
      s.row_sum[t] = 0.0f;
      math.softmax_step(row, 1, width, width, &s.row_max[t], &s.row_sum[t], &unused, 0);
    }
    AddRowMass(row, s.row_sum[t], visible, s.column_mass.data() + block_of[t_begin + t] * columns);
  }
}

// a / b for a >= 0, b > 0: a 32-bit division where both fit (several times faster).
inline int64_t Quotient(int64_t a, int64_t b) {
  if (((a | b) >> 32) == 0) return static_cast<uint32_t>(a) / static_cast<uint32_t>(b);
  return a / b;
}

// Row t of a residue's rows (already rounded to bf16) into s.group_q, or as AMX pairs into
// s.group_q2.
inline void CopyRow(const PackedKeysValues& kv, const float* row, int64_t dim, int t, SelectionScratch& s) {
#if defined(TFSA_X86_KERNELS)
  if (kv.sampled2) return PairsOfRounded(row, dim, s.group_q2.data() + static_cast<size_t>(t) * (dim / 2));
#else
  (void)kv;
#endif
  std::copy_n(row, dim, s.group_q.data() + static_cast<size_t>(t) * dim);
}

}  // namespace

int64_t AntidiagonalBlocks(const Problem& p) {
  if (!UsesEstimate(p) || p.attrs.estimate != TFSA_ESTIMATE_ANTIDIAGONAL) return 1;
  // About 32 rows per residue: 4 register tiles of the widest kernel; more only adds causal
  // waste (the group's first rows score the keys its last rows see) and coarser tasks.
  const int64_t per_block = std::max<int64_t>(1, p.grid.block / p.attrs.estimate_stride);
  return std::clamp<int64_t>(32 / per_block, 1, std::max<int64_t>(p.grid.q_blocks, 1));
}

void AntidiagonalMass(const Problem& p, const BlockMath& math, const PackedKeysValues& kv, int64_t b, int64_t h,
                      int64_t heads, int64_t bk, int64_t qb_begin, int64_t qb_end, const float* q,
                      SelectionScratch& s, std::vector<double>& mass) {
  const BlockGrid& g = p.grid;
  const int64_t stride = p.attrs.estimate_stride, dim = p.dims.head_dim, nk = g.k_blocks, blocks = qb_end - qb_begin;
  const int64_t row_begin = g.QueryBegin(qb_begin), row_end = g.QueryEnd(qb_end - 1);
  mass.assign(blocks * nk, 0.0);
  GroupAllowed(p, b, h, heads, qb_begin, qb_end, s);
  thread_local std::vector<int64_t> block_of;  // each row's query block, from qb_begin
  // When stride divides the block, sample m of every residue lies in key block m / (block /
  // stride): the residues' sampled mass adds up per sample, and is summed into blocks once.
  const bool aligned = g.block % stride == 0;
  const int all_columns = static_cast<int>((g.kv_len + stride - 1) / stride);
  if (aligned) s.column_mass.assign(blocks * all_columns, 0.0f);
  for (int64_t r = 0; r < kv.residues; ++r) {
    // Rows i with (i + r + 1) % stride == 0 sample keys r, r + stride, ...: one product.
    const int64_t first = row_begin + ((stride - 1 - r) - row_begin % stride + stride) % stride;
    if (first >= row_end) continue;
    const int n = static_cast<int>((row_end - first + stride - 1) / stride);
    if (kv.sampled2) {  // zero rows up to the last AMX tile's
      s.group_q2.resize(static_cast<size_t>(RoundUp(n, kAmxRows)) * (dim / 2));
      std::fill(s.group_q2.begin() + static_cast<size_t>(n) * (dim / 2), s.group_q2.end(), 0u);
    } else {
      s.group_q.resize(static_cast<size_t>(n) * dim);
    }
    s.visible.resize(n);
    block_of.resize(n);
    int columns = 0;  // samples the widest row may see
    int64_t row_block = 0;  // row i's query block, from qb_begin (i grows by stride: no division)
    for (int t = 0; t < n; ++t) {
      const int64_t i = first + t * stride;
      while (g.QueryEnd(qb_begin + row_block) <= i) ++row_block;
      block_of[t] = row_block;
      const float* row = q + (i - row_begin) * dim;  // rounded to bf16 already
      CopyRow(kv, row, dim, t, s);
      const int64_t last = std::min(s.group_last_key[row_block], g.LastVisibleKey(i));
      s.visible[t] = last < r ? 0 : static_cast<int>(Quotient(last - r, stride) + 1);
      columns = std::max(columns, s.visible[t]);
    }
    if (columns == 0) continue;
    if (!aligned) s.column_mass.assign(blocks * columns, 0.0f);
    const int row_columns = aligned ? all_columns : columns;
    // Tiles of the Scores kernel's height: each scores the keys its own rows may see.
    const int tile_rows = kv.sampled2 ? kAmxRows : kTileRows;
    for (int t = 0; t < n; t += tile_rows)
      ResidueTile(p, math, kv, bk, r, t, std::min(n, t + tile_rows), block_of, row_columns, s);
    for (int64_t x = 0; x < blocks && !aligned; ++x)
      AddBlockMass(p, kv, r, s.column_mass.data() + x * columns, columns, mass.data() + x * nk);
  }
  for (int64_t x = 0; x < blocks && aligned; ++x)  // residue 0's sample starts: every residue's
    AddBlockMass(p, kv, 0, s.column_mass.data() + x * all_columns, all_columns, mass.data() + x * nk);
}

bool UsesEstimate(const Problem& p) { return tfsa::UsesEstimate(p.attrs, p.grid.kv_len, p.dims.q_heads); }

bool AllDense(const Problem& p) { return tfsa::AllDense(p.attrs, p.grid.kv_len, p.dims.q_heads); }

HeadSelection SelectionOf(const Problem& p, int64_t h) { return tfsa::SelectionOf(p.attrs, p.grid.kv_len, h); }

bool ScoresEveryRow(const Problem& p) { return p.attrs.estimate == TFSA_ESTIMATE_TOKEN; }

Budget HeadBudget(const Problem& p, int64_t h) { return {SelectionOf(p, h), HeadThreshold(p.attrs, h)}; }

Budget GroupBudget(const Problem& p, int64_t h, int64_t heads) {
  const float threshold = GroupThreshold(p.attrs, h, heads);
  return {SelectionAt(p.attrs, p.grid.kv_len, threshold), threshold};
}

void ChooseKeyBlocks(const Problem& p, const BlockMath& math, Budget budget_of, int64_t qb, float* scores, int rows,
                     int stride, SelectionScratch& s, std::vector<int32_t>& chosen) {
  const Attributes& a = p.attrs;
  const std::vector<uint8_t>& allowed = s.allowed;
  chosen.clear();
  const HeadSelection mode = budget_of.mode;
  if (mode == HeadSelection::kDense) {
    for (int64_t kb = 0; kb < p.grid.k_blocks; ++kb)
      if (allowed[kb]) chosen.push_back(static_cast<int32_t>(kb));
    return;
  }
  const int64_t n_allowed = std::count(allowed.begin(), allowed.end(), 1);
  const int64_t n_forced = ForcedKeyBlocks(p, qb, allowed, s.forced);
  s.candidates.clear();
  for (int64_t kb = 0; kb < p.grid.k_blocks && mode == HeadSelection::kEstimate; ++kb)
    if (allowed[kb] && !s.forced[kb]) s.candidates.push_back(static_cast<int32_t>(kb));
  std::vector<uint8_t>& take = s.forced;  // forced blocks, then the estimate's picks
  if (!s.candidates.empty()) {
    const float threshold = budget_of.threshold;
    const bool use_threshold = threshold < 1.0f;
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
    for (int64_t r = 0; r < budget && (!use_threshold || cumulative < threshold); ++r) {
      take[s.candidates[s.order[r]]] = 1;
      cumulative += s.mass[s.order[r]];
    }
  }
  for (int64_t kb = 0; kb < p.grid.k_blocks; ++kb)
    if (take[kb]) chosen.push_back(static_cast<int32_t>(kb));
}

}  // namespace tfsa::cpu
