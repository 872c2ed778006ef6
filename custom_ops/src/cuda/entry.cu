// tfsa_cuda_sparse_attention: checks the call, lays out the workspace, and enqueues the
// selection (selection.cu) and then the attention (attention.cu) on the caller's stream.
#include <cstdio>
#include <string>

#include "attention.cuh"
#include "engine.cuh"
#include "selection.cuh"
#include "tfsa/contract.h"

namespace tfsa::cuda {
namespace {

constexpr size_t Align(size_t bytes) { return (bytes + 255) / 256 * 256; }

// Byte offsets of the selection's arrays in the workspace.
struct Layout {
  size_t q_means = 0, block_mass = 0, k_means = 0, mask_states = 0, allowed = 0, chosen = 0, counts = 0, pairs = 0, value_flags = 0,
         total = 0;
};

Geometry MakeGeometry(const TfsaCudaArgs& c, const KvView& view = {}) {
  Geometry g;
  g.dims = c.dims;
  g.attrs = Effective(c.attributes, c.dims);
  g.grid = GridOf(g.attrs, c.dims);
  g.kv_rows = view.kv_rows > 0 ? view.kv_rows : c.dims.kv_len;
  if (view.positioned) {
    g.grid.offset = view.offset;
    g.grid.global_query_offset = view.global_query_offset;
    g.grid.window = view.window;
  }
  g.uses_estimate = UsesEstimate(g.attrs, c.dims.kv_len, c.dims.q_heads);  // some head ranks by the estimate
  g.mask.kind = c.mask_kind, g.mask.dtype = c.dtype, g.mask.data = c.mask;
  for (int i = 0; i < 4; ++i) g.mask.stride[i] = c.dims.mask_stride[i];
  g.bias.kind = c.bias != nullptr ? TFSA_MASK_T : TFSA_MASK_NONE, g.bias.dtype = c.bias_dtype, g.bias.data = c.bias;
  for (int i = 0; i < 4; ++i) g.bias.stride[i] = c.dims.bias_stride[i];
  if (c.mask_kind != TFSA_MASK_NONE) g.mask_blocks = MaskBlockLayoutOf(g.grid, c.dims.mask_stride, c.dims.q_heads);
  return g;
}

Layout Plan(const Geometry& g, bool has_mask) {
  const Dims& d = g.dims;
  const size_t rows = d.batch * d.q_heads * g.grid.q_blocks, nk = g.grid.k_blocks;
  Layout l;
  size_t at = 0;
  const auto take = [&](size_t bytes) { const size_t start = at; at += Align(bytes); return start; };
  const bool by_block = g.uses_estimate && g.attrs.estimate != TFSA_ESTIMATE_MEAN;
  l.q_means = take(g.uses_estimate && !by_block ? sizeof(float) * rows * d.head_dim : 0);
  l.block_mass = take(by_block ? sizeof(double) * rows * nk : 0);
  l.k_means = take(g.uses_estimate ? sizeof(float) * d.batch * d.kv_heads * nk * d.head_dim : 0);
  l.mask_states = take(has_mask ? g.mask_blocks.Size(d.batch) : 0);
  l.allowed = take(rows * nk);
  l.chosen = take(sizeof(int32_t) * rows * nk);
  l.counts = take(sizeof(int32_t) * rows);
  l.pairs = take(sizeof(unsigned long long) * 2 * d.batch * d.q_heads);
  l.value_flags = take(d.batch * d.kv_heads * nk);
  l.total = at;
  return l;
}

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <class T>
T* At(void* workspace, size_t offset) {
  return reinterpret_cast<T*>(static_cast<unsigned char*>(workspace) + offset);
}

int Fail(char* error, size_t size, const std::string& message) {
  if (error && size) std::snprintf(error, size, "%s", message.c_str());
  return 1;
}

}  // namespace

std::string CheckCall(const TfsaCudaArgs& c) {
  std::string error = CheckAttributes(c.attributes);
  if (error.empty()) error = CheckHeadThresholds(c.attributes, c.dims.q_heads);
  if (!error.empty()) return error;
  const Dims& d = c.dims;
  if (c.dtype < TFSA_FLOAT32 || c.dtype > TFSA_BFLOAT16) return "dtype must be float32, float16 or bfloat16";
  if (c.mask_kind < TFSA_MASK_NONE || c.mask_kind > TFSA_MASK_T) return "unknown mask kind";
  if (c.bias != nullptr && c.bias_dtype != TFSA_FLOAT32 && c.bias_dtype != c.dtype)
    return "bias_dtype must be float32 or the query's dtype";
  if (d.batch < 0 || d.q_heads < 0 || d.kv_heads <= 0 || d.q_len < 0 || d.kv_len < 0 || d.head_dim < 0 ||
      d.v_head_dim < 0 || d.q_heads % d.kv_heads != 0)
    return "sizes must be >= 0 with query heads a multiple of key/value heads (> 0)";
  if (d.v_head_dim > 256) return "the CUDA kernel supports value head dims up to 256, got " + std::to_string(d.v_head_dim);
  if (d.head_dim > 1024) return "the CUDA kernel supports head dims up to 1024, got " + std::to_string(d.head_dim);
  if (SelectsPerGroup(c.attributes, d.q_heads, d.kv_heads))
    return "group_selection " + std::to_string(c.attributes.group_selection) +
           " (one selection per KV group) is not implemented in the CUDA kernel; use group_selection 0 "
           "(per head) or the CPU kernel";
  const int64_t k_blocks = MakeGeometry(c).grid.k_blocks;
  if (ChooseSharedBytes(k_blocks) > kMaxChooseShared)
    return "too many key blocks for the CUDA selection (kv_len / block_size = " + std::to_string(k_blocks) +
           "); use a larger block_size";
  return "";
}

size_t WorkspaceBytes(const TfsaCudaArgs& c) { return Plan(MakeGeometry(c), c.mask_kind != TFSA_MASK_NONE).total; }

std::string RunEngine(const TfsaCudaArgs& c, const KvView& view, cudaStream_t stream) {
  const TfsaDims& d = c.dims;
  if (d.batch * d.q_heads == 0) return "";  // empty output and density
  const Geometry g = MakeGeometry(c, view);
  const Layout l = Plan(g, c.mask_kind != TFSA_MASK_NONE);
  if (c.workspace_size < l.total || (l.total > 0 && c.workspace == nullptr))
    return "the workspace has " + std::to_string(c.workspace_size) + " bytes, the call needs " + std::to_string(l.total);
  const size_t out_bytes = (c.dtype == TFSA_FLOAT32 ? 4 : 2) * size_t(d.batch * d.q_heads * d.q_len * d.v_head_dim);

  Selection s;
  s.q_means = At<float>(c.workspace, l.q_means);
  s.k_means = At<float>(c.workspace, l.k_means);
  if (g.uses_estimate && g.attrs.estimate != TFSA_ESTIMATE_MEAN) s.block_mass = At<double>(c.workspace, l.block_mass);
  s.mask_states = c.mask_kind != TFSA_MASK_NONE ? At<uint8_t>(c.workspace, l.mask_states) : nullptr;
  s.allowed = At<uint8_t>(c.workspace, l.allowed);
  s.chosen = At<int32_t>(c.workspace, l.chosen);
  s.counts = At<int32_t>(c.workspace, l.counts);
  s.pairs = At<unsigned long long>(c.workspace, l.pairs);
  s.value_flags = At<uint8_t>(c.workspace, l.value_flags);
  cudaError_t status = SelectBlocks(g, c.dtype, c.query, c.key, c.value, s, c.selected, c.density, stream);
  if (status == cudaSuccess && out_bytes > 0) {
    if (c.selection_only || d.kv_len == 0) {
      status = cudaMemsetAsync(c.output, 0, out_bytes, stream);  // nothing to attend: zeros
    } else {
      const AttentionArgs args{g, c.query, c.key, c.value, c.output, s.chosen, s.counts, s.value_flags};
      const bool aligned = Aligned16(c.query) && Aligned16(c.key) && Aligned16(c.value) && Aligned16(c.output);
      status = LaunchAttention(args, c.dtype, aligned, stream);
    }
  }
  if (status != cudaSuccess) return std::string("CUDA error: ") + cudaGetErrorString(status);
  return "";
}

}  // namespace tfsa::cuda

using namespace tfsa::cuda;

extern "C" __attribute__((visibility("default"))) size_t tfsa_cuda_workspace_bytes(const TfsaCudaArgs* args) {
  if (!args || !CheckCall(*args).empty()) return 0;
  return WorkspaceBytes(*args);
}

extern "C" __attribute__((visibility("default"))) int tfsa_cuda_sparse_attention(const TfsaCudaArgs* args, void* stream_ptr,
                                                                                char* error, size_t error_size) {
  if (!args) return Fail(error, error_size, "no call");
  const TfsaCudaArgs& c = *args;
  std::string problem = CheckCall(c);
  if (problem.empty() && (c.mask_kind != TFSA_MASK_NONE) != (c.mask != nullptr))
    problem = "mask pointer and mask kind disagree";
  if (problem.empty()) problem = RunEngine(c, KvView{}, static_cast<cudaStream_t>(stream_ptr));
  return problem.empty() ? 0 : Fail(error, error_size, problem);
}
