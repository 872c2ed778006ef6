// The tile scheduler of the attention: which thread block computes which rows, and which keys
// it visits in which tiles. A thread block owns up to Math::kRows rows of one query block and
// walks the keys of that block's chosen key blocks (the selection) as one stream, kKeys keys
// a tile, so block sizes that are not multiples of the tile still fill tiles.
#pragma once

#include "attention.cuh"

namespace tfsa::cuda {

// Where a thread block works: batch, head and its rows [q_begin, q_end).
struct Place {
  int64_t b, h, q_begin, q_end;
  __device__ int64_t QueryBase(const Geometry& g) const { return (b * g.dims.q_heads + h) * g.grid.q_len; }
  __device__ int64_t KeyBase(const Geometry& g) const { return (b * g.dims.kv_heads + g.KvHead(h)) * g.kv_rows; }
};

// The key at position `pos` of the stream of the chosen blocks' keys (blocks back to back,
// block_size keys each), or -1 past the end.
__device__ __forceinline__ int64_t KeyAt(const Geometry& g, const int32_t* blocks, int n_blocks, int64_t pos) {
  const int64_t c = pos / g.grid.block;
  if (c >= n_blocks) return -1;
  const int64_t j = blocks[c] * g.grid.block + pos % g.grid.block;
  return j < g.grid.kv_len ? j : -1;
}

// Thread blocks of kRows rows each, kKeys keys a tile.
template <int kRows, int kKeys>
struct TileScheduler {
  // Thread blocks per query block.
  __host__ __device__ static int64_t Chunks(const Geometry& g) { return (g.grid.block + kRows - 1) / kRows; }
  // Thread blocks of the launch.
  static int64_t Tasks(const Geometry& g) { return g.dims.batch * g.dims.q_heads * g.grid.q_blocks * Chunks(g); }

  const Geometry& g;
  Place place;
  const int32_t* blocks;  // the chosen key blocks of the rows' query block, ascending
  int n_blocks;

  // Thread block `task`'s rows and blocks.
  __device__ TileScheduler(const AttentionArgs& a, int64_t task) : g(a.g) {
    const int64_t chunks = Chunks(g), chunk = task % chunks, qb = (task / chunks) % g.grid.q_blocks;
    const int64_t bh = task / chunks / g.grid.q_blocks;
    const int64_t q_begin = g.grid.QueryBegin(qb) + chunk * kRows;
    place = Place{bh / g.dims.q_heads, bh % g.dims.q_heads, q_begin, min(q_begin + kRows, g.grid.QueryEnd(qb))};
    const int64_t row = bh * g.grid.q_blocks + qb;
    n_blocks = a.counts[row];
    blocks = a.chosen + row * g.grid.k_blocks;
  }
  // Whether the thread block has rows (the last chunk of a ragged query block may not).
  __device__ bool HasRows() const { return place.q_begin < place.q_end; }
  // Tiles to visit: up to the first one that starts past the last row's causal horizon (keys
  // ascend) or past the stream's end.
  __device__ int64_t Tiles() const {
    const int64_t last_key = g.grid.LastVisibleKey(place.q_end - 1), stream_end = int64_t{n_blocks} * g.grid.block;
    int64_t tiles = 0;
    while (tiles * kKeys < stream_end && KeyAt(g, blocks, n_blocks, tiles * kKeys) <= last_key &&
           KeyAt(g, blocks, n_blocks, tiles * kKeys) >= 0)
      ++tiles;
    return tiles;
  }
};

}  // namespace tfsa::cuda
