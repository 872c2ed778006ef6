// Keys and values of one call as the tile walk reads them: packed once per call and kv head
// (attention_cpu.cc), in float32 whatever the input type.
#pragma once

#include <cstdint>
#include <vector>

namespace tfsa::cpu {

struct Bf16Math;

// Keys transposed and values padded, block by block, for every (batch, kv head).
struct PackedKeysValues {
  int64_t key_pad = 0, v_pad = 0, kt_block = 0, v_block = 0, k_blocks = 0, head_dim = 0, means_pad = 0;
  std::vector<float>& kt;
  std::vector<float>& v;
  std::vector<float>& k_means;
  std::vector<uint8_t>& v_nonfinite;

  const float* Kt(int64_t bk, int64_t kb) const { return kt.data() + (bk * k_blocks + kb) * kt_block; }
  const float* V(int64_t bk, int64_t kb) const {
    return v_input ? v_input + bk * v_input_head + kb * v_input_block : v.data() + (bk * k_blocks + kb) * v_block;
  }
  // Key block means transposed, [head_dim, means_pad], so the estimate is one Scores call.
  const float* KMeansT(int64_t bk) const { return k_means.data() + bk * head_dim * means_pad; }
  bool ValueNonFinite(int64_t bk, int64_t kb) const { return v_nonfinite[bk * k_blocks + kb] != 0; }

  // The antidiagonal estimate's keys: for each residue r < residues, the keys r, r + stride,
  // r + 2 stride, ... (non-finite elements as 0, zeros past the last key, rounded to bf16),
  // transposed in chunks of `chunk` keys, [head_dim, chunk] each, so that a prefix of them is
  // Scores calls; or, when the estimate runs on AMX (sampled2 set), as bf16 pairs, one
  // [head_dim / 2, chunks * chunk] matrix per residue (SampledKt2).
  int64_t residues = 0, chunk = 0, chunks = 0;
  std::vector<float>* sampled = nullptr;
  const float* SampledKt(int64_t bk, int64_t r, int64_t c) const {
    return sampled->data() + ((bk * residues + r) * chunks + c) * head_dim * chunk;
  }
  std::vector<uint32_t>* sampled2 = nullptr;
  const uint32_t* SampledKt2(int64_t bk, int64_t r) const {
    return sampled2->data() + (bk * residues + r) * (head_dim / 2) * chunks * chunk;
  }
  // sample_starts[r * (k_blocks + 1) + kb]: the first sample of residue r in key block kb
  // (k_blocks: past the last key), so that samples are walked block by block.
  std::vector<int> sample_starts = {};
  const int* SampleStarts(int64_t r) const { return sample_starts.data() + r * (k_blocks + 1); }

  // compute_precision = bf16 with the kernels to run it (bf16_math.h): keys and values packed
  // as bf16 pairs instead of kt and v, kt2 [pairs, key_pad] and v2 [key_pad / 2, v_pad] per block.
  bool gather_keys = false;  // float32 inputs, AVX-512 kernels: keys and queries packed by pack.h
  const Bf16Math* bf16 = nullptr;
  int64_t pairs = 0, kt2_block = 0, v2_block = 0;
  std::vector<uint32_t>* kt2 = nullptr;
  std::vector<uint32_t>* v2 = nullptr;
  const uint32_t* Kt2(int64_t bk, int64_t kb) const { return kt2->data() + (bk * k_blocks + kb) * kt2_block; }
  const uint32_t* V2(int64_t bk, int64_t kb) const { return v2->data() + (bk * k_blocks + kb) * v2_block; }

  // float32 values whose rows are already v_pad floats: V reads the input itself (the
  // accumulate kernels read only a block's `keys` rows, so no padding is needed), not a copy.
  const float* v_input = nullptr;
  int64_t v_input_head = 0, v_input_block = 0;  // floats per (batch, kv head) and per key block
};

}  // namespace tfsa::cpu
