// The block grid of one call: query and key blocks of edge `block_size`, and which keys a
// query row may see. Shared by the CPU and CUDA kernels (host and device code).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define TFSA_HOST_DEVICE __host__ __device__
#else
#define TFSA_HOST_DEVICE
#endif

namespace tfsa {

// Query and key blocks of edge `block`; query i sits at key position i + offset (kv - q unless
// set: GroupQueryAttention's padded prompt rows sit past their row's last key).
struct BlockGrid {
  int64_t block = 64, q_len = 0, kv_len = 0, offset = 0, q_blocks = 0, k_blocks = 0;
  bool causal = false;
  // A sliding window: query i sees no key before position i + offset - window; -1: none.
  int64_t window = -1;
  // The window's other side (window_ahead): query i sees no key after i + offset + ahead; -1: none.
  int64_t ahead = -1;
  // Added to a query's index before the global-token rule (queries at positions below
  // global_tokens take every block): 0 where the rule counts query indices (SparseAttention
  // with query_positions 0), kv - q or the past length where it counts absolute positions.
  int64_t global_query_offset = 0;

  BlockGrid() = default;
  TFSA_HOST_DEVICE BlockGrid(int64_t block_size, int64_t q, int64_t kv, bool is_causal)
      : block(block_size), q_len(q), kv_len(kv), offset(kv - q),
        q_blocks((q + block_size - 1) / block_size), k_blocks((kv + block_size - 1) / block_size),
        causal(is_causal) {}
  TFSA_HOST_DEVICE int64_t QueryBegin(int64_t qb) const { return qb * block; }
  TFSA_HOST_DEVICE int64_t QueryEnd(int64_t qb) const { return Min(q_len, qb * block + block); }
  TFSA_HOST_DEVICE int64_t KeyBegin(int64_t kb) const { return kb * block; }
  TFSA_HOST_DEVICE int64_t KeyEnd(int64_t kb) const { return Min(kv_len, kb * block + block); }
  // Last key query row i may see: its horizon, from causality and the window's ahead side, or
  // the last key.
  TFSA_HOST_DEVICE int64_t LastVisibleKey(int64_t i) const {
    int64_t last = kv_len - 1;
    if (causal) last = Min(last, i + offset);
    if (ahead >= 0) last = Min(last, i + offset + ahead);
    return last;
  }
  // First key query row i may see (the window), or 0.
  TFSA_HOST_DEVICE int64_t FirstVisibleKey(int64_t i) const { return window < 0 ? 0 : Max(0, i + offset - window); }
  // Whether key block kb lies wholly past the horizon of query block qb's last row: no row
  // of the block may see any of its keys.
  TFSA_HOST_DEVICE bool InFuture(int64_t qb, int64_t kb) const { return KeyBegin(kb) > LastVisibleKey(QueryEnd(qb) - 1); }
  // Whether key block kb lies wholly before the window of query block qb's first row.
  TFSA_HOST_DEVICE bool BeforeWindow(int64_t qb, int64_t kb) const {
    return KeyEnd(kb) - 1 < FirstVisibleKey(QueryBegin(qb));
  }
  // Whether key block kb reaches past the horizon of query block qb's first row: the block
  // sits on the horizon's edge (causal or ahead), and its rows see different keys (never
  // without either).
  TFSA_HOST_DEVICE bool CrossesHorizon(int64_t qb, int64_t kb) const {
    return KeyEnd(kb) - 1 > LastVisibleKey(QueryBegin(qb));
  }
  // Whether key block kb starts before the window of query block qb's last row: some of its
  // rows do not see all of its keys (never without a window).
  TFSA_HOST_DEVICE bool CrossesWindowEdge(int64_t qb, int64_t kb) const {
    return KeyBegin(kb) < FirstVisibleKey(QueryEnd(qb) - 1);
  }
  // Whether key block kb touches the global tokens or query block qb's local window.
  TFSA_HOST_DEVICE bool Forced(int64_t qb, int64_t kb, int64_t global_tokens, int64_t local_window) const {
    if (QueryBegin(qb) + global_query_offset < global_tokens || KeyBegin(kb) < global_tokens) return true;
    const int64_t first = QueryBegin(qb) + offset, last = QueryEnd(qb) - 1 + offset;
    return local_window > 0 && KeyEnd(kb) - 1 >= first - local_window && KeyBegin(kb) <= last + local_window;
  }

 private:
  TFSA_HOST_DEVICE static int64_t Min(int64_t a, int64_t b) { return a < b ? a : b; }
  TFSA_HOST_DEVICE static int64_t Max(int64_t a, int64_t b) { return a > b ? a : b; }
};

}  // namespace tfsa
