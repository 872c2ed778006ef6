// The attention's launch: the kernel that walks one thread block's tiles (tile_scheduler.cuh)
// with one math kind — tensor-core tiles (wmma_math.cuh), plain tiles (simt_math.cuh), or the
// exact rows (exact_rows.cuh) — and the choice of kind for a call's dtype and head dims.
#include <type_traits>

#include "attention.cuh"
#include "exact_rows.cuh"
#include "simt_math.cuh"
#include "tile_scheduler.cuh"
#include "wmma_math.cuh"

namespace tfsa::cuda {
namespace {

template <class Math>
struct IsWmma : std::false_type {};
template <class T, int HD>
struct IsWmma<WmmaMath<T, HD>> : std::true_type {};

// One thread block: its rows and chosen blocks from the tile scheduler, then its tiles, the
// next tile's loads issued before the current one is computed (two stages).
template <class T, class Math>
__global__ void __launch_bounds__(Math::kThreads) AttentionKernel(AttentionArgs a) {
  TFSA_DYNAMIC_SHARED(shared);
  const TileScheduler<Math::kRows, Math::kKeys> tiles_of(a, blockIdx.x);
  if (!tiles_of.HasRows()) return;
  const Place& place = tiles_of.place;
  const int32_t* blocks = tiles_of.blocks;
  const int n_blocks = tiles_of.n_blocks;
  if constexpr (IsWmma<Math>::value) {
    if (ReadsNonFiniteValues(a, place, blocks, n_blocks)) return ExactRows<T>(a, place, blocks, n_blocks);
  }
  Math math(shared, a.g, place);
  math.LoadQueries(static_cast<const T*>(a.query));
  const int64_t tiles = tiles_of.Tiles();
  const T *key = static_cast<const T*>(a.key), *value = static_cast<const T*>(a.value);
  if (tiles > 0) math.Load(key, value, blocks, n_blocks, 0, 0);
  for (int64_t t = 0; t < tiles; ++t) {
    const bool more = t + 1 < tiles;
    if (more) math.Load(key, value, blocks, n_blocks, (t + 1) * Math::kKeys, static_cast<int>((t + 1) % 2));
    math.Compute(static_cast<int>(t % 2), more);
  }
  math.Store(static_cast<T*>(a.output));
}

template <class T, class Math>
cudaError_t Launch(const AttentionArgs& a, size_t shared, cudaStream_t stream) {
  const int64_t tasks = TileScheduler<Math::kRows, Math::kKeys>::Tasks(a.g);
  if (tasks == 0) return cudaSuccess;
  if (tasks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  const auto kernel = AttentionKernel<T, Math>;
  cudaError_t status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared));
  if (status != cudaSuccess) return status;
  TFSA_LAUNCH(kernel, static_cast<unsigned>(tasks), Math::kThreads, shared, stream)(a);
  return cudaGetLastError();
}

template <class T>
cudaError_t LaunchFor(const AttentionArgs& a, bool aligned16, cudaStream_t stream) {
  const Geometry& g = a.g;
  if constexpr (!std::is_same_v<T, float>) {
    if (aligned16 && g.dims.head_dim == g.dims.v_head_dim) {
      switch (g.dims.head_dim) {
        case 64: return Launch<T, WmmaMath<T, 64>>(a, WmmaMath<T, 64>::kSharedBytes, stream);
        case 80: return Launch<T, WmmaMath<T, 80>>(a, WmmaMath<T, 80>::kSharedBytes, stream);
        case 96: return Launch<T, WmmaMath<T, 96>>(a, WmmaMath<T, 96>::kSharedBytes, stream);
        case 128: return Launch<T, WmmaMath<T, 128>>(a, WmmaMath<T, 128>::kSharedBytes, stream);
        default: break;
      }
    }
  }
  return Launch<T, SimtMath<T>>(a, SimtMath<T>::SharedBytes(g.dims.head_dim, g.dims.v_head_dim), stream);
}

}  // namespace

cudaError_t LaunchAttention(const AttentionArgs& args, int32_t dtype, bool aligned16, cudaStream_t stream) {
  if (dtype == TFSA_FLOAT16) return LaunchFor<__half>(args, aligned16, stream);
  if (dtype == TFSA_BFLOAT16) return LaunchFor<__nv_bfloat16>(args, aligned16, stream);
  return LaunchFor<float>(args, aligned16, stream);
}

}  // namespace tfsa::cuda
