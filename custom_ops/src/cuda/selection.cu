#include "selection.cuh"

namespace tfsa::cuda {
namespace {

constexpr int kChooseThreads = 256;
enum BlockFlag : uint8_t { kAllowed = 1, kForced = 2, kCandidate = 4, kTake = 8 };

// Mean over each block's rows of x [heads, rows, dim] (its first `seq` rows), times `scale`:
// out [heads, n_blocks, dim].
// Non-finite elements count as 0, so that NaN does not steer the selection (reference.py).
template <class T>
__global__ void BlockMeansKernel(const T* x, int64_t seq, int64_t rows, int64_t dim, int64_t block,
                                 int64_t n_blocks, float scale, float* out) {
  const int64_t item = blockIdx.x, head = item / n_blocks, begin = (item % n_blocks) * block;
  const int64_t end = begin + block < seq ? begin + block : seq;
  for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
    float sum = 0.0f;
    for (int64_t r = begin; r < end; ++r) {
      const float value = ToFloat(x[(head * rows + r) * dim + d]) * scale;
      sum += isfinite(value) ? value : 0.0f;
    }
    out[item * dim + d] = sum / static_cast<float>(end - begin);
  }
}

// One warp per (batch, mask head, mask query block, key block): closed, partial or open.
__global__ void ClassifyMaskKernel(Geometry g, uint8_t* states) {
  const int64_t warps = blockDim.x / 32, lane = threadIdx.x % 32;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * warps + threadIdx.x / 32;
  const int64_t n_items = g.mask_blocks.Size(g.dims.batch);
  if (item >= n_items) return;
  const int64_t kb = item % g.grid.k_blocks, rest = item / g.grid.k_blocks;
  const int64_t mqb = rest % g.mask_blocks.q_blocks, bh = rest / g.mask_blocks.q_blocks;
  const int64_t b = bh / g.mask_blocks.heads, mh = bh % g.mask_blocks.heads;
  const int64_t q_begin = g.grid.QueryBegin(mqb);
  const int64_t q_end = g.mask_blocks.rows_broadcast ? q_begin + 1 : g.grid.QueryEnd(mqb);  // rows broadcast: one row
  const int64_t k_begin = g.grid.KeyBegin(kb), keys = g.grid.KeyEnd(kb) - k_begin;
  bool any = false, all_zero = true;
  for (int64_t e = lane; e < (q_end - q_begin) * keys; e += 32) {
    const float bias = g.mask.Bias(g.mask.Offset(b, mh, q_begin + e / keys, k_begin + e % keys));
    any = any || bias != kNegInf;
    all_zero = all_zero && bias == 0.0f;
  }
  any = __any_sync(0xffffffffu, any);
  all_zero = __all_sync(0xffffffffu, all_zero);
  if (lane == 0) states[item] = MaskStateOf(any, all_zero);
}

// One warp per (batch, kv head, key block): whether a value of the block is NaN or inf (the
// attention then keeps such values away from rows that do not attend them).
template <class T>
__global__ void ValueFlagsKernel(const T* value, int64_t kv_rows, int64_t v_head_dim, BlockGrid grid, int64_t n_items,
                                 uint8_t* flags) {
  const int64_t warps = blockDim.x / 32, lane = threadIdx.x % 32;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * warps + threadIdx.x / 32;
  if (item >= n_items) return;
  const int64_t kb = item % grid.k_blocks, head = item / grid.k_blocks;
  const int64_t begin = (head * kv_rows + grid.KeyBegin(kb)) * v_head_dim;
  const int64_t n = (grid.KeyEnd(kb) - grid.KeyBegin(kb)) * v_head_dim;
  bool bad = false;
  for (int64_t e = lane; e < n; e += 32) bad = bad || !isfinite(ToFloat(value[begin + e]));
  bad = __any_sync(0xffffffffu, bad);
  if (lane == 0) flags[item] = bad;
}

// Key blocks holding a key that causality, the window (both sides) and the mask let some query
// of the block see.
__global__ void AllowedBlocksKernel(Geometry g, const uint8_t* states, uint8_t* allowed) {
  const BlockGrid& grid = g.grid;
  const int64_t row = blockIdx.x, qb = row % grid.q_blocks, bh = row / grid.q_blocks;
  const int64_t b = bh / g.dims.q_heads, h = bh % g.dims.q_heads;
  const auto allows = [&](int64_t i, int64_t j) { return g.mask.Bias(g.mask.Offset(b, h, i, j)) != kNegInf; };
  for (int64_t kb = threadIdx.x; kb < grid.k_blocks; kb += blockDim.x) {
    const uint8_t state = states ? states[g.mask_blocks.Index(b, h, qb, kb)] : uint8_t{kMaskOpen};
    allowed[row * grid.k_blocks + kb] = BlockAllowed(grid, qb, kb, state, allows);
  }
}

template <class T, class Op>
__device__ T BlockReduce(T x, Op op, T* scratch) {
  for (int offset = 16; offset > 0; offset >>= 1) x = op(x, __shfl_xor_sync(0xffffffffu, x, offset));
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = x;
  __syncthreads();
  T total = scratch[0];
  for (int w = 1; w < static_cast<int>(blockDim.x / 32); ++w) total = op(total, scratch[w]);
  __syncthreads();
  return total;
}

// Writes the indices whose flags have `bit`, ascending, to `out`; returns how many.
__device__ int CompactAscending(const uint8_t* flags, int n, uint8_t bit, int32_t* out, int* warp_totals) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  int written = 0;
  for (int base = 0; base < n; base += blockDim.x) {
    const int index = base + threadIdx.x;
    const bool take = index < n && (flags[index] & bit);
    const unsigned ballot = __ballot_sync(0xffffffffu, take);
    if (lane == 0) warp_totals[warp] = __popc(ballot);
    __syncthreads();
    int before = 0, total = 0;
    for (int w = 0; w < warps; ++w) {
      before += w < warp ? warp_totals[w] : 0;
      total += warp_totals[w];
    }
    if (take) out[written + before + __popc(ballot & ((1u << lane) - 1u))] = index;
    written += total;
    __syncthreads();
  }
  return written;
}

__device__ double Max(double a, double b) { return a > b ? a : b; }
__device__ double Sum(double a, double b) { return a + b; }
__device__ int SumInt(int a, int b) { return a + b; }
__device__ float MaxFloat(float a, float b) { return a > b ? a : b; }
__device__ float SumFloat(float a, float b) { return a + b; }
__device__ long long MaxLongLong(long long a, long long b) { return a > b ? a : b; }

// The token estimate of one row (batch, q head, query block), one thread block: each query
// row's softmax over the candidates of scale * q_i . mean(K block) (block_rules.h Estimate;
// non-finite query elements as 0; equal weights when the row's best is not finite), averaged
// over the rows into block_mass. Shared: the query row [D] and the row's scores [nK].
template <class T>
__global__ void __launch_bounds__(kChooseThreads) TokenMassKernel(Geometry g, const T* query, Selection s) {
  TFSA_DYNAMIC_SHARED(shared);
  __shared__ float scratch[32];
  const BlockGrid& grid = g.grid;
  const int64_t nk = grid.k_blocks, row = blockIdx.x, qb = row % grid.q_blocks, bh = row / grid.q_blocks;
  const int64_t b = bh / g.dims.q_heads, h = bh % g.dims.q_heads, dim = g.dims.head_dim;
  if (SelectionOf(g.attrs, grid.kv_len, h) != HeadSelection::kEstimate) return;  // its mass is never read
  float* q_row = reinterpret_cast<float*>(shared);
  float* score = q_row + dim;
  const float* k_means = s.k_means + (b * g.dims.kv_heads + g.KvHead(h)) * nk * dim;
  const uint8_t* allowed = s.allowed + row * nk;
  double* mass = s.block_mass + row * nk;
  const auto candidate = [&](int64_t kb) {
    return allowed[kb] && !grid.Forced(qb, kb, g.attrs.global_tokens, g.attrs.local_window);
  };
  for (int64_t kb = threadIdx.x; kb < nk; kb += blockDim.x) mass[kb] = 0.0;
  const int64_t q_begin = grid.QueryBegin(qb), rows = grid.QueryEnd(qb) - q_begin;
  for (int64_t i = q_begin; i < q_begin + rows; ++i) {
    for (int64_t x = threadIdx.x; x < dim; x += blockDim.x) {
      const float value = ToFloat(query[(bh * grid.q_len + i) * dim + x]) * g.attrs.scale;
      q_row[x] = isfinite(value) ? value : 0.0f;
    }
    __syncthreads();
    float best = -INFINITY;
    for (int64_t kb = threadIdx.x; kb < nk; kb += blockDim.x) {
      if (!candidate(kb)) continue;
      float dot = 0.0f;
      for (int64_t x = 0; x < dim; ++x) dot += q_row[x] * k_means[kb * dim + x];
      score[kb] = static_cast<float>(Estimate(grid, kb, Capped(dot, g.attrs.softcap)));
      best = fmaxf(best, score[kb]);
    }
    best = BlockReduce(best, MaxFloat, scratch);
    float total = 0.0f;
    for (int64_t kb = threadIdx.x; kb < nk; kb += blockDim.x)
      if (candidate(kb)) total += (score[kb] = isfinite(best) ? expf(score[kb] - best) : 1.0f);
    total = BlockReduce(total, SumFloat, scratch);
    for (int64_t kb = threadIdx.x; kb < nk; kb += blockDim.x)
      if (candidate(kb)) mass[kb] += static_cast<double>(score[kb]) / (static_cast<double>(total) * rows);
  }
}

// The antidiagonal estimate of one row (batch, q head, query block), one thread block
// (reference.py): query row i samples the keys j with (i + j + 1) % stride == 0 in allowed
// blocks and visible to it; its softmax over them (equal weights when the best is not
// finite), summed per key block into block_mass. Threads own key blocks; the dots are
// computed twice (max, then sum) rather than kept. Shared: the query row [D], sums [nK].
template <class T>
__global__ void __launch_bounds__(kChooseThreads)
    AntidiagonalMassKernel(Geometry g, const T* query, const T* key, Selection s) {
  TFSA_DYNAMIC_SHARED(shared);
  __shared__ float scratch[32];
  __shared__ long long last_scratch[32];
  const BlockGrid& grid = g.grid;
  const int64_t nk = grid.k_blocks, row = blockIdx.x, qb = row % grid.q_blocks, bh = row / grid.q_blocks;
  const int64_t b = bh / g.dims.q_heads, h = bh % g.dims.q_heads, dim = g.dims.head_dim;
  const int64_t stride = g.attrs.estimate_stride;
  if (SelectionOf(g.attrs, grid.kv_len, h) != HeadSelection::kEstimate) return;  // its mass is never read
  float* q_row = reinterpret_cast<float*>(shared);
  float* sums = q_row + dim;
  const T* k_head = key + (b * g.dims.kv_heads + g.KvHead(h)) * g.kv_rows * dim;
  const uint8_t* allowed = s.allowed + row * nk;
  double* mass = s.block_mass + row * nk;
  long long last = -1;  // the last key of the last allowed block
  for (int64_t kb = threadIdx.x; kb < nk; kb += blockDim.x) {
    mass[kb] = 0.0;
    if (allowed[kb]) last = grid.KeyEnd(kb) - 1 > last ? grid.KeyEnd(kb) - 1 : last;
  }
  last = BlockReduce(last, MaxLongLong, last_scratch);
  const auto dot = [&](int64_t j) {
    float sum = 0.0f;
    for (int64_t x = 0; x < dim; ++x) {
      const float k = ToFloat(k_head[j * dim + x]);
      sum += q_row[x] * (isfinite(k) ? RoundedToBf16(k) : 0.0f);  // bf16 operands, as the CPU's
    }
    return Capped(sum, g.attrs.softcap);
  };
  for (int64_t i = grid.QueryBegin(qb); i < grid.QueryEnd(qb); ++i) {
    for (int64_t x = threadIdx.x; x < dim; x += blockDim.x) {
      const float value = ToFloat(query[(bh * grid.q_len + i) * dim + x]) * g.attrs.scale;
      q_row[x] = isfinite(value) ? RoundedToBf16(value) : 0.0f;
    }
    __syncthreads();
    const int64_t r = (stride - 1 - i % stride) % stride;
    const int64_t row_last = last < grid.LastVisibleKey(i) ? last : grid.LastVisibleKey(i);
    // The sampled keys of block kb: from its first key congruent to r, every stride, to its end.
    const auto first = [&](int64_t kb) { return grid.KeyBegin(kb) + ((r - grid.KeyBegin(kb) % stride) % stride + stride) % stride; };
    const auto end = [&](int64_t kb) { return grid.KeyEnd(kb) - 1 < row_last ? grid.KeyEnd(kb) - 1 : row_last; };
    float best = -INFINITY;
    for (int64_t kb = threadIdx.x; kb < nk; kb += blockDim.x)
      if (allowed[kb])
        for (int64_t j = first(kb); j <= end(kb); j += stride) {
          const float d = dot(j);
          if (!isnan(d)) best = fmaxf(best, d);
        }
    best = BlockReduce(best, MaxFloat, scratch);
    float total = 0.0f;
    for (int64_t kb = threadIdx.x; kb < nk; kb += blockDim.x) {
      float sum = 0.0f;
      if (allowed[kb])
        for (int64_t j = first(kb); j <= end(kb); j += stride) {
          const float d = dot(j);
          if (!isnan(d)) sum += isfinite(best) ? expf(d - best) : 1.0f;
        }
      sums[kb] = sum;
      total += sum;
    }
    total = BlockReduce(total, SumFloat, scratch);
    if (total > 0.0f)
      for (int64_t kb = threadIdx.x; kb < nk; kb += blockDim.x) mass[kb] += static_cast<double>(sums[kb]) / total;
  }
}

// The estimate of candidate kb of (b, h, qb) (block_rules.h) from the block means, plus the
// bias at the block pair's centre element (non-finite: 0), as in the reference.
__device__ double EstimateOf(const Geometry& g, const float* q_mean, const float* k_mean, int64_t b, int64_t h,
                             int64_t qb, int64_t kb) {
  float dot = 0.0f;
  for (int64_t x = 0; x < g.dims.head_dim; ++x) dot += q_mean[x] * k_mean[kb * g.dims.head_dim + x];
  dot = Capped(dot, g.attrs.softcap);  // before the bias, as in the attention
  if (g.bias.kind != TFSA_MASK_NONE) {
    const int64_t i = (g.grid.QueryBegin(qb) + g.grid.QueryEnd(qb) - 1) / 2;
    const int64_t j = (g.grid.KeyBegin(kb) + g.grid.KeyEnd(kb) - 1) / 2;
    const float bias = g.bias.Bias(g.bias.Offset(b, h, i, j));
    if (isfinite(bias)) dot += bias;
  }
  return Estimate(g.grid, kb, dot);
}

// Marks the candidates the estimate takes: the `budget` heaviest (ties by block index),
// in that order while the cumulative mass stays below the head's threshold.
__device__ void TakeByEstimate(const Geometry& g, float threshold, int n_allowed, int n_forced, int n_candidates,
                               double* mass, double* ranked, int32_t* rank, uint8_t* flags, double* scratch) {
  const int64_t nk = g.grid.k_blocks;
  const bool use_threshold = threshold < 1.0f;
  double best = -INFINITY;
  for (int64_t kb = threadIdx.x; kb < nk; kb += blockDim.x)
    if (flags[kb] & kCandidate) best = Max(best, mass[kb]);
  best = BlockReduce(best, Max, scratch);
  if (g.attrs.estimate == TFSA_ESTIMATE_ANTIDIAGONAL) {  // each candidate's share (equal when none has mass)
    double total = 0.0;
    for (int64_t kb = threadIdx.x; kb < nk; kb += blockDim.x)
      if (flags[kb] & kCandidate) total += mass[kb];
    total = BlockReduce(total, Sum, scratch);
    for (int64_t kb = threadIdx.x; kb < nk; kb += blockDim.x)
      if (flags[kb] & kCandidate) mass[kb] = total > 0.0 ? mass[kb] / total : 1.0 / n_candidates;
  } else if (use_threshold && g.attrs.estimate == TFSA_ESTIMATE_MEAN) {  // softmax over the candidates (token: done)
    double total = 0.0;
    for (int64_t kb = threadIdx.x; kb < nk; kb += blockDim.x)
      if (flags[kb] & kCandidate) total += (mass[kb] = CandidateWeight(mass[kb], best));
    total = BlockReduce(total, Sum, scratch);
    for (int64_t kb = threadIdx.x; kb < nk; kb += blockDim.x)
      if (flags[kb] & kCandidate) mass[kb] /= total;
  }
  __syncthreads();
  const int64_t budget = EstimateBudget(g.attrs.max_density, n_allowed, n_forced, n_candidates);
  for (int64_t kb = threadIdx.x; kb < nk; kb += blockDim.x) {
    if (!(flags[kb] & kCandidate)) continue;
    int32_t r = 0;
    for (int64_t other = 0; other < nk; ++other)
      r += (flags[other] & kCandidate) && Heavier(mass[other], other, mass[kb], kb);
    rank[kb] = r;
    if (r < budget) ranked[r] = mass[kb];
  }
  __syncthreads();
  if (threadIdx.x == 0) {  // mass before each rank, summed in rank order as on the CPU
    double cumulative = 0.0;
    for (int64_t r = 0; r < budget; ++r) {
      const double m = ranked[r];
      ranked[r] = cumulative;
      cumulative += m;
    }
  }
  __syncthreads();
  for (int64_t kb = threadIdx.x; kb < nk; kb += blockDim.x)
    if ((flags[kb] & kCandidate) && rank[kb] < budget && (!use_threshold || ranked[rank[kb]] < threshold))
      flags[kb] |= kTake;
  __syncthreads();
}

// One thread block per row: global and local blocks, then the estimate's picks.
__global__ void __launch_bounds__(kChooseThreads)
    ChooseBlocksKernel(Geometry g, Selection s, uint8_t* selected) {
  TFSA_DYNAMIC_SHARED(shared);
  __shared__ double scratch[32];
  __shared__ int int_scratch[32];
  const BlockGrid& grid = g.grid;
  const int64_t nk = grid.k_blocks, row = blockIdx.x, qb = row % grid.q_blocks, bh = row / grid.q_blocks;
  const int64_t b = bh / g.dims.q_heads, h = bh % g.dims.q_heads;
  double* mass = reinterpret_cast<double*>(shared);
  double* ranked = mass + nk;
  int32_t* rank = reinterpret_cast<int32_t*>(ranked + nk);
  uint8_t* flags = reinterpret_cast<uint8_t*>(rank + nk);
  const float* q_mean = g.uses_estimate && !s.block_mass ? s.q_means + row * g.dims.head_dim : nullptr;
  const float* k_means = g.uses_estimate ? s.k_means + (b * g.dims.kv_heads + g.KvHead(h)) * nk * g.dims.head_dim : nullptr;

  // per head: dense (every allowed block), streaming (the forced ones alone) or the estimate's picks
  const HeadSelection mode = SelectionOf(g.attrs, grid.kv_len, h);
  int n_allowed = 0, n_forced = 0, n_candidates = 0;
  for (int64_t kb = threadIdx.x; kb < nk; kb += blockDim.x) {
    uint8_t f = s.allowed[row * nk + kb] ? kAllowed : 0;
    if (f && mode == HeadSelection::kDense) f |= kTake;
    else if (f && grid.Forced(qb, kb, g.attrs.global_tokens, g.attrs.local_window)) f |= kForced | kTake;
    else if (f && mode == HeadSelection::kEstimate) {
      f |= kCandidate;
      mass[kb] = s.block_mass ? s.block_mass[row * nk + kb] : EstimateOf(g, q_mean, k_means, b, h, qb, kb);
    }
    flags[kb] = f;
    n_allowed += (f & kAllowed) != 0;
    n_forced += (f & kForced) != 0;
    n_candidates += (f & kCandidate) != 0;
  }
  n_allowed = BlockReduce(n_allowed, SumInt, int_scratch);
  n_forced = BlockReduce(n_forced, SumInt, int_scratch);
  n_candidates = BlockReduce(n_candidates, SumInt, int_scratch);
  if (n_candidates > 0)
    TakeByEstimate(g, HeadThreshold(g.attrs, h), n_allowed, n_forced, n_candidates, mass, ranked, rank, flags, scratch);

  const int n_chosen = CompactAscending(flags, static_cast<int>(nk), kTake, s.chosen + row * nk, int_scratch);
  if (selected)
    for (int64_t kb = threadIdx.x; kb < nk; kb += blockDim.x) selected[row * nk + kb] = (flags[kb] & kTake) != 0;
  if (threadIdx.x == 0) {
    s.counts[row] = n_chosen;
    atomicAdd(&s.pairs[bh * 2], static_cast<unsigned long long>(n_chosen));
    atomicAdd(&s.pairs[bh * 2 + 1], static_cast<unsigned long long>(n_allowed));
  }
}

// density = chosen pairs / allowed pairs (1.0 when nothing is allowed).
__global__ void DensityKernel(const unsigned long long* pairs, int64_t n, float* density) {
  const int64_t bh = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (bh < n) density[bh] = pairs[bh * 2 + 1] ? static_cast<float>(double(pairs[bh * 2]) / double(pairs[bh * 2 + 1])) : 1.0f;
}

template <class T>
void LaunchValueFlags(const Geometry& g, const void* value, uint8_t* flags, cudaStream_t stream) {
  const int64_t items = g.dims.batch * g.dims.kv_heads * g.grid.k_blocks;
  if (items > 0)
    TFSA_LAUNCH(ValueFlagsKernel<T>, (items + 7) / 8, 256, 0, stream)(static_cast<const T*>(value), g.kv_rows,
                                                                     g.dims.v_head_dim, g.grid, items, flags);
}

template <class T>
void LaunchMeans(const Geometry& g, const void* query, const void* key, const Selection& s, cudaStream_t stream) {
  const int threads = g.dims.head_dim < 128 ? 64 : 128;
  const BlockGrid& grid = g.grid;
  const int64_t q_items = g.dims.batch * g.dims.q_heads * grid.q_blocks, k_items = g.dims.batch * g.dims.kv_heads * grid.k_blocks;
  if (q_items > 0 && !s.block_mass)
    TFSA_LAUNCH(BlockMeansKernel<T>, q_items, threads, 0, stream)(static_cast<const T*>(query), grid.q_len, grid.q_len, g.dims.head_dim,
                                                         grid.block, grid.q_blocks, g.attrs.scale, s.q_means);
  if (k_items > 0)
    TFSA_LAUNCH(BlockMeansKernel<T>, k_items, threads, 0, stream)(static_cast<const T*>(key), grid.kv_len, g.kv_rows, g.dims.head_dim,
                                                         grid.block, grid.k_blocks, 1.0f, s.k_means);
}

// The token or antidiagonal estimate's block mass (block_mass), one thread block per row.
template <class T>
cudaError_t LaunchBlockMassOf(const Geometry& g, const void* query, const void* key, const Selection& s,
                              cudaStream_t stream) {
  const size_t shared = TokenSharedBytes(g.grid.k_blocks, g.dims.head_dim);
  const int64_t rows = g.dims.batch * g.dims.q_heads * g.grid.q_blocks;
  const T* q = static_cast<const T*>(query);
  if (g.attrs.estimate == TFSA_ESTIMATE_ANTIDIAGONAL) {
    cudaError_t status = cudaFuncSetAttribute(AntidiagonalMassKernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                              static_cast<int>(shared));
    if (status != cudaSuccess) return status;
    TFSA_LAUNCH(AntidiagonalMassKernel<T>, rows, kChooseThreads, shared, stream)(g, q, static_cast<const T*>(key), s);
    return cudaSuccess;
  }
  cudaError_t status =
      cudaFuncSetAttribute(TokenMassKernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared));
  if (status != cudaSuccess) return status;
  TFSA_LAUNCH(TokenMassKernel<T>, rows, kChooseThreads, shared, stream)(g, q, s);
  return cudaSuccess;
}

cudaError_t LaunchBlockMass(const Geometry& g, int32_t dtype, const void* query, const void* key, const Selection& s,
                            cudaStream_t stream) {
  if (dtype == TFSA_FLOAT16) return LaunchBlockMassOf<__half>(g, query, key, s, stream);
  if (dtype == TFSA_BFLOAT16) return LaunchBlockMassOf<__nv_bfloat16>(g, query, key, s, stream);
  return LaunchBlockMassOf<float>(g, query, key, s, stream);
}

}  // namespace

size_t TokenSharedBytes(int64_t k_blocks, int64_t head_dim) {
  return static_cast<size_t>(k_blocks + head_dim) * sizeof(float);
}

size_t ChooseSharedBytes(int64_t k_blocks) {
  return static_cast<size_t>(k_blocks) * (2 * sizeof(double) + sizeof(int32_t) + sizeof(uint8_t));
}

cudaError_t SelectBlocks(const Geometry& g, int32_t dtype, const void* query, const void* key, const void* value,
                         const Selection& s, uint8_t* selected, float* density, cudaStream_t stream) {
  const BlockGrid& grid = g.grid;
  const int64_t rows = g.dims.batch * g.dims.q_heads * grid.q_blocks;
  if (dtype == TFSA_FLOAT16) LaunchValueFlags<__half>(g, value, s.value_flags, stream);
  else if (dtype == TFSA_BFLOAT16) LaunchValueFlags<__nv_bfloat16>(g, value, s.value_flags, stream);
  else LaunchValueFlags<float>(g, value, s.value_flags, stream);
  if (g.uses_estimate) {
    if (dtype == TFSA_FLOAT16) LaunchMeans<__half>(g, query, key, s, stream);
    else if (dtype == TFSA_BFLOAT16) LaunchMeans<__nv_bfloat16>(g, query, key, s, stream);
    else LaunchMeans<float>(g, query, key, s, stream);
  }
  if (s.mask_states) {
    const int64_t items = g.mask_blocks.Size(g.dims.batch);
    if (items > 0) TFSA_LAUNCH(ClassifyMaskKernel, (items + 7) / 8, 256, 0, stream)(g, s.mask_states);
  }
  if (rows > 0) {
    TFSA_LAUNCH(AllowedBlocksKernel, rows, 128, 0, stream)(g, s.mask_states, s.allowed);
    if (g.uses_estimate && s.block_mass) {
      cudaError_t status = LaunchBlockMass(g, dtype, query, key, s, stream);
      if (status != cudaSuccess) return status;
    }
    const size_t shared = ChooseSharedBytes(grid.k_blocks);
    cudaError_t status = cudaFuncSetAttribute(ChooseBlocksKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                              static_cast<int>(shared));
    if (status != cudaSuccess) return status;
    cudaMemsetAsync(s.pairs, 0, sizeof(unsigned long long) * 2 * g.dims.batch * g.dims.q_heads, stream);
    TFSA_LAUNCH(ChooseBlocksKernel, rows, kChooseThreads, shared, stream)(g, s, selected);
  }
  const int64_t heads = g.dims.batch * g.dims.q_heads;
  if (density && heads > 0) {
    if (rows == 0) cudaMemsetAsync(s.pairs, 0, sizeof(unsigned long long) * 2 * heads, stream);
    TFSA_LAUNCH(DensityKernel, (heads + 255) / 256, 256, 0, stream)(s.pairs, heads, density);
  }
  return cudaGetLastError();
}

}  // namespace tfsa::cuda
