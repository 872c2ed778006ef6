#include "tile_walk.h"

#include <algorithm>

#include "bf16_math.h"

namespace tfsa::cpu {
namespace {

// Adds the mask and the bias and removes future keys and keys before the window inside one
// (query block, key block) score tile. A pair the mask hides, or whose mask + bias is -inf,
// becomes -inf whatever its score was (a NaN key it does not see stays out); the bias of a
// masked pair is not read.
void ApplyMaskAndCausality(const Problem& p, int64_t b, int64_t h, int64_t qb, int64_t kb, int rows, int keys,
                           int s_stride, float* s) {
  const int64_t q_begin = p.grid.QueryBegin(qb), k_begin = p.grid.KeyBegin(kb);
  const bool causal_cut = p.grid.CrossesHorizon(qb, kb), window_cut = p.grid.CrossesWindowEdge(qb, kb);
  const MaskBlocks* mb = p.mask_blocks;
  const bool add_mask = mb && mb->At(b, h, qb, kb) != kMaskOpen, add_bias = p.bias.present();
  if (!add_mask && !add_bias && !causal_cut && !window_cut) return;
  for (int r = 0; r < rows; ++r) {
    float* row = s + static_cast<size_t>(r) * s_stride;
    const int64_t i = q_begin + r;
    if (add_mask && add_bias) {
      const int64_t base = p.mask.Offset(b, h, i, k_begin), step = p.mask.stride[3];
      const int64_t bias_base = p.bias.Offset(b, h, i, k_begin), bias_step = p.bias.stride[3];
      for (int j = 0; j < keys; ++j) {
        float add = p.mask.Bias(base + j * step);
        if (add != kNegInf) add += p.bias.Bias(bias_base + j * bias_step);
        row[j] = add == kNegInf ? kNegInf : row[j] + add;
      }
    } else if (add_mask || add_bias) {
      const MaskView& view = add_mask ? p.mask : p.bias;
      const int64_t base = view.Offset(b, h, i, k_begin), step = view.stride[3];
      for (int j = 0; j < keys; ++j) {
        const float add = view.Bias(base + j * step);
        row[j] = add == kNegInf ? kNegInf : row[j] + add;
      }
    }
    if (causal_cut)
      for (int64_t j = std::max<int64_t>(0, p.grid.LastVisibleKey(i) + 1 - k_begin); j < keys; ++j)
        row[j] = kNegInf;
    if (window_cut)
      for (int64_t j = 0; j < std::min<int64_t>(keys, p.grid.FirstVisibleKey(i) - k_begin); ++j) row[j] = kNegInf;
  }
}

// o += p . v over the pairs that carry weight (not `hidden`): for value blocks holding NaN or
// inf, where the block product would let 0 * NaN reach rows that do not attend that key.
void AccumulateAttended(const float* s, const uint8_t* hidden, int rows, int keys, int stride, const float* v,
                        int v_pad, float* o) {
  for (int r = 0; r < rows; ++r)
    for (int j = 0; j < keys; ++j) {
      const size_t at = static_cast<size_t>(r) * stride + j;
      if (hidden[at]) continue;
      float* o_row = o + static_cast<size_t>(r) * v_pad;
      const float* v_row = v + static_cast<size_t>(j) * v_pad;
      for (int x = 0; x < v_pad; ++x) o_row[x] += s[at] * v_row[x];
    }
}

// AccumulateAttended on bf16 pairs (packed.h v2), the weights rounded to bf16 as the kernel's.
void AccumulateAttendedBf16(const float* s, const uint8_t* hidden, int rows, int keys, int stride,
                            const uint32_t* v2, int v_pad, float* o) {
  for (int r = 0; r < rows; ++r)
    for (int j = 0; j < keys; ++j) {
      const size_t at = static_cast<size_t>(r) * stride + j;
      if (hidden[at]) continue;
      const float weight = Bf16ToFloat(Bf16Bits(s[at]));
      float* o_row = o + static_cast<size_t>(r) * v_pad;
      const uint32_t* v_row = v2 + static_cast<size_t>(j / 2) * v_pad;
      for (int x = 0; x < v_pad; ++x)
        o_row[x] += weight * Bf16ToFloat(static_cast<uint16_t>(v_row[x] >> (16 * (j % 2))));
    }
}

}  // namespace

void WalkTiles(const Problem& p, const BlockMath& math, const PackedKeysValues& kv, int64_t b, int64_t h, int64_t qb,
               const float* q, int rows, const std::vector<int32_t>& chosen, TileScratch& sc, RowsState& state) {
  const Dims& d = p.dims;
  const int64_t bk = b * d.kv_heads + h / (d.q_heads / d.kv_heads);
  const int head_dim = static_cast<int>(d.head_dim), key_pad = static_cast<int>(kv.key_pad);
  const int v_pad = static_cast<int>(kv.v_pad);
  state.m.assign(rows, kNegInf);
  state.l.assign(rows, 0.0f);
  state.o.assign(static_cast<size_t>(rows) * v_pad, 0.0f);
  sc.s.resize(static_cast<size_t>(rows) * key_pad * kTileBlocks);
  if (kv.bf16) Bf16Rows(q, rows, head_dim, sc.q2);
  const auto keys_of = [&](int32_t kb) { return static_cast<int>(p.grid.KeyEnd(kb) - p.grid.KeyBegin(kb)); };
  for (size_t first = 0; first < chosen.size();) {
    // A tile: up to kTileBlocks chosen key blocks side by side (full blocks but the last, so
    // that no padding sits between them): the softmax's per-row work is paid once per tile.
    size_t end = first + 1;
    while (end < chosen.size() && end - first < kTileBlocks && keys_of(chosen[end - 1]) == key_pad) ++end;
    const int width = static_cast<int>(end - first) * key_pad;
    for (size_t i = first; i < end; ++i) {
      float* s = sc.s.data() + (i - first) * key_pad;
      if (kv.bf16) kv.bf16->scores(sc.q2.data(), rows, static_cast<int>(kv.pairs), kv.Kt2(bk, chosen[i]), key_pad, s, width);
      else math.scores(q, rows, head_dim, kv.Kt(bk, chosen[i]), key_pad, s, width);
      CapScores(p.attrs.softcap, rows, keys_of(chosen[i]), width, s);
      ApplyMaskAndCausality(p, b, h, qb, chosen[i], rows, keys_of(chosen[i]), width, s);
    }
    const int valid = width - key_pad + keys_of(chosen[end - 1]);
    bool exact = false;  // a value block with NaN or inf: remember which pairs are hidden
    for (size_t i = first; i < end; ++i) exact = exact || kv.ValueNonFinite(bk, chosen[i]);
    if (exact) {
      sc.hidden.resize(static_cast<size_t>(rows) * width);
      for (size_t e = 0; e < sc.hidden.size(); ++e) sc.hidden[e] = sc.s[e] == kNegInf;
    }
    math.softmax_step(sc.s.data(), rows, valid, width, state.m.data(), state.l.data(), state.o.data(), v_pad);
    for (size_t i = first; i < end; ++i) {
      const size_t column = (i - first) * key_pad;
      if (kv.bf16 && kv.ValueNonFinite(bk, chosen[i]))
        AccumulateAttendedBf16(sc.s.data() + column, sc.hidden.data() + column, rows, keys_of(chosen[i]), width,
                               kv.V2(bk, chosen[i]), v_pad, state.o.data());
      else if (kv.bf16)
        kv.bf16->accumulate(sc.s.data() + column, rows, keys_of(chosen[i]), width, kv.V2(bk, chosen[i]), v_pad,
                            state.o.data());
      else if (kv.ValueNonFinite(bk, chosen[i]))
        AccumulateAttended(sc.s.data() + column, sc.hidden.data() + column, rows, keys_of(chosen[i]), width,
                           kv.V(bk, chosen[i]), v_pad, state.o.data());
      else
        math.accumulate(sc.s.data() + column, rows, keys_of(chosen[i]), width, kv.V(bk, chosen[i]), v_pad,
                        state.o.data());
    }
    first = end;
  }
}

}  // namespace tfsa::cpu
