// SparseGroupQueryAttention on the GPU: the CPU face's steps (gqa_op.cc, cpu/gqa_cache.cc) as
// kernels on the caller's stream. Rotary of the new key rows and the present write per batch
// row; then, per batch row and part (its rows; on a prompt, the right-padded rows past its
// length apart), the rotated query rows gathered into [Hq, rows, D], SparseAttention's engine
// (engine.cuh) over the first kv_len rows of the row's present cache (a view: kv_rows =
// present_rows), and the result scattered into output [B, S, Hq * D].
#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "common.cuh"
#include "engine.cuh"
#include "gqa_layout.h"

namespace tfsa::cuda {
namespace {

constexpr int kThreads = 64;
constexpr size_t Align(size_t bytes) { return (bytes + 255) / 256 * 256; }

GqaLayout LayoutOf(const TfsaCudaGqaArgs& c) {
  GqaLayout l;
  l.batch = c.batch, l.seq = c.seq, l.q_heads = c.q_heads, l.kv_heads = c.kv_heads, l.head_dim = c.head_dim;
  l.packed = c.packed != 0, l.past_rows = c.past_rows, l.present_rows = c.present_rows;
  l.rotary_half = c.rotary_half, l.interleaved = c.interleaved != 0;
  l.first_prompt = c.first_prompt != 0, l.shared_buffer = c.shared_buffer != 0;
  return l;
}

// The inputs as the kernels read them.
struct Tensors {
  const void *query, *key, *value, *past_key, *past_value, *cos, *sin;
  void *present_key, *present_value;
};

// Element offset of head h's D values for token (b, s) (cpu/gqa_cache.cc's TokenHead).
__device__ int64_t TokenHead(const GqaLayout& l, int64_t heads, int64_t first_head, int64_t b, int64_t s, int64_t h) {
  const int64_t token_heads = l.packed ? l.q_heads + 2 * l.kv_heads : heads;
  return ((b * l.seq + s) * token_heads + (l.packed ? first_head : 0) + h) * l.head_dim;
}

// One head row rotated at position `pos` by the thread block, rounded as the CPU face does
// (its two fused multiply-adds); columns past the rotary ones are copied.
template <class T>
__device__ void RotateRow(const GqaLayout& l, const Tensors& t, const T* x, int64_t pos, T* out) {
  const int64_t half = l.rotary_half;
  const T* cos = static_cast<const T*>(t.cos) + pos * half;
  const T* sin = static_cast<const T*>(t.sin) + pos * half;
  for (int64_t c = threadIdx.x; c < half; c += blockDim.x) {
    const int64_t i = l.interleaved ? 2 * c : c, j = l.interleaved ? 2 * c + 1 : c + half;
    const float xi = ToFloat(x[i]), xj = ToFloat(x[j]), co = ToFloat(cos[c]), si = ToFloat(sin[c]);
    out[i] = FromFloat<T>(fmaf(xi, co, -(xj * si)));
    out[j] = FromFloat<T>(fmaf(xi, si, xj * co));
  }
  for (int64_t c = 2 * half + threadIdx.x; c < l.head_dim; c += blockDim.x) out[c] = x[c];
}

// Present rows [first, first + n) of every kv head of batch row b, one thread block a row:
// a past row, a new row (keys rotated) or zeros after them, as ORT's GroupQueryAttention.
template <class T>
__global__ void PresentKernel(GqaLayout l, Tensors t, int64_t b, int64_t past, int64_t first, int64_t n) {
  const int64_t h = blockIdx.x / n, r = first + blockIdx.x % n, d = l.head_dim, head = b * l.kv_heads + h;
  T* k_out = static_cast<T*>(t.present_key) + (head * l.present_rows + r) * d;
  T* v_out = static_cast<T*>(t.present_value) + (head * l.present_rows + r) * d;
  if (r < past) {
    const T* k_in = static_cast<const T*>(t.past_key) + (head * l.past_rows + r) * d;
    const T* v_in = static_cast<const T*>(t.past_value) + (head * l.past_rows + r) * d;
    for (int64_t c = threadIdx.x; c < d; c += blockDim.x) k_out[c] = k_in[c], v_out[c] = v_in[c];
  } else if (r < past + l.seq) {
    const T* key = static_cast<const T*>(t.key ? t.key : t.query);
    const T* value = static_cast<const T*>(t.value ? t.value : t.query);
    const int64_t s = r - past;
    RotateRow(l, t, key + TokenHead(l, l.kv_heads, l.q_heads, b, s, h), r, k_out);
    const T* v_in = value + TokenHead(l, l.kv_heads, l.q_heads + l.kv_heads, b, s, h);
    for (int64_t c = threadIdx.x; c < d; c += blockDim.x) v_out[c] = v_in[c];
  } else {
    for (int64_t c = threadIdx.x; c < d; c += blockDim.x) k_out[c] = v_out[c] = FromFloat<T>(0.0f);
  }
}

// Query rows [row_begin, row_begin + rows) of batch row b, rotated, into out [Hq, rows, D].
template <class T>
__global__ void GatherQueryKernel(GqaLayout l, Tensors t, int64_t b, int64_t past, int64_t row_begin, int64_t rows,
                                  T* out) {
  const int64_t h = blockIdx.x / rows, r = blockIdx.x % rows, s = row_begin + r;
  const T* x = static_cast<const T*>(t.query) + TokenHead(l, l.q_heads, 0, b, s, h);
  RotateRow(l, t, x, past + s, out + (h * rows + r) * l.head_dim);
}

__global__ void FillKernel(float* out, int64_t n, float value) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = value;
}

// The engine's [Hq, rows, D] into output [B, S, Hq * D] at batch row b, rows from row_begin.
template <class T>
__global__ void ScatterKernel(GqaLayout l, const T* o, int64_t b, int64_t row_begin, int64_t rows, T* output) {
  const int64_t h = blockIdx.x / rows, r = blockIdx.x % rows, d = l.head_dim;
  const T* from = o + (h * rows + r) * d;
  T* to = output + ((b * l.seq + row_begin + r) * l.q_heads + h) * d;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) to[c] = from[c];
}

// One engine call: query rows [row_begin, row_begin + rows) of batch row b over the first
// kv_len rows of its present cache, the first row at key position `offset` (gqa_op.cc's RowsCall).
struct Part {
  int64_t b, row_begin, rows, kv_len, offset;
  bool dense;
};

// The calls of gqa_op.cc's Attend: on a prompt, a row's padded rows see all of its keys.
std::vector<Part> PartsOf(const TfsaCudaGqaArgs& c, const GqaLayout& l) {
  std::vector<Part> parts;
  const bool dense = l.seq == 1 || l.seq < c.attributes.min_seq_len;  // decode steps are exact
  for (int64_t b = 0; b < l.batch; ++b) {
    const int64_t total = static_cast<int64_t>(c.seqlens_k[b]) + 1;
    if (!l.first_prompt) {
      parts.push_back({b, 0, l.seq, total, total - l.seq, dense});
      continue;
    }
    parts.push_back({b, 0, total, total, 0, dense});
    if (total < l.seq) parts.push_back({b, total, l.seq - total, total, total, true});
  }
  return parts;
}

size_t ElementBytes(const TfsaCudaGqaArgs& c) { return c.dtype == TFSA_FLOAT32 ? 4 : 2; }

// The engine's arguments for one part (pointers to the row's cache view; query, output and
// workspace are set by the caller).
TfsaCudaArgs EngineArgs(const TfsaCudaGqaArgs& c, const GqaLayout& l, const Part& p) {
  TfsaCudaArgs e{};
  e.dtype = c.dtype;
  e.mask_kind = TFSA_MASK_NONE;
  e.dims = Dims{1, l.q_heads, l.kv_heads, p.rows, p.kv_len, l.head_dim, l.head_dim, {0, 0, 0, 0}, {0, 0, 0, 0}};
  e.attributes = c.attributes;
  e.attributes.is_causal = 1;
  e.attributes.sliding_window = 0;  // the window is local_window_size, set through the view
  e.attributes.window_ahead = -1;   // causal: nothing ahead to limit
  if (p.dense) e.attributes.threshold = e.attributes.max_density = 1.0f, e.attributes.head_threshold_count = 0;
  const size_t cache = ElementBytes(c) * size_t(p.b * l.kv_heads * l.present_rows * l.head_dim);
  e.key = static_cast<const char*>(c.present_key) + cache;
  e.value = static_cast<const char*>(c.present_value) + cache;
  return e;
}

KvView ViewOf(const TfsaCudaGqaArgs& c, const GqaLayout& l, const Part& p) {
  KvView v;
  v.kv_rows = l.present_rows;
  v.positioned = true;
  v.offset = v.global_query_offset = p.offset;  // global tokens count absolute positions
  v.window = c.local_window_size > 0 ? c.local_window_size - 1 : -1;  // the w keys up to the query's own
  return v;
}

// Byte offsets in the workspace: the gathered query, the engine's output, the engine's own.
struct Plan {
  size_t query = 0, output = 0, engine = 0, total = 0;
};

Plan PlanOf(const TfsaCudaGqaArgs& c, const GqaLayout& l) {
  Plan w;
  const size_t rows = ElementBytes(c) * size_t(l.q_heads * l.seq * l.head_dim);
  w.output = Align(rows);
  w.engine = w.output + Align(rows);
  size_t engine = 0;
  for (const Part& p : PartsOf(c, l)) engine = std::max(engine, WorkspaceBytes(EngineArgs(c, l, p)));
  w.total = w.engine + engine;
  return w;
}

// Empty when the call is usable, else what is wrong with it.
std::string CheckGqa(const TfsaCudaGqaArgs& c) {
  if (c.dtype != TFSA_FLOAT32 && c.dtype != TFSA_FLOAT16) return "dtype must be float32 or float16";
  if (c.batch < 0 || c.seq < 0 || c.q_heads <= 0 || c.kv_heads <= 0 || c.head_dim <= 0 || c.q_heads % c.kv_heads != 0)
    return "sizes must be >= 0 with num_heads a multiple of kv_num_heads (> 0) and head_size > 0";
  if (c.rotary_half < 0 || 2 * c.rotary_half > c.head_dim || c.past_rows < 0 || c.present_rows < 0)
    return "rotary_half must be in [0, head_size / 2] and the cache rows >= 0";
  if (c.local_window_size < -1) return "local_window_size must be >= -1";
  const std::string heads = CheckHeadThresholds(c.attributes, c.q_heads);
  if (!heads.empty()) return heads;
  if (!c.query || (c.batch > 0 && !c.seqlens_k) || (!c.key) != (!c.value) || (c.packed != 0) != (!c.key) ||
      (!c.past_key) != (!c.past_value) || (c.rotary_half > 0 && (!c.cos || !c.sin)) || !c.present_key ||
      !c.present_value || !c.output)
    return "a pointer the call needs is missing";
  const GqaLayout l = LayoutOf(c);
  std::string error = CheckRows(l, c.seqlens_k, c.rotary_positions);
  for (const Part& p : PartsOf(c, l))
    if (error.empty()) error = CheckCall(EngineArgs(c, l, p));
  return error;
}

template <class T>
std::string Run(const TfsaCudaGqaArgs& c, const Plan& w, cudaStream_t stream) {
  const GqaLayout l = LayoutOf(c);
  const Tensors t{c.query, c.key, c.value, c.past_key, c.past_value, c.cos, c.sin, c.present_key, c.present_value};
  for (int64_t b = 0; b < l.batch; ++b) {
    const int64_t past = PastLength(l, c.seqlens_k[b]);
    // with a shared buffer the past rows are in place, and the rows after the new ones are kept
    const int64_t first = l.shared_buffer ? past : 0, n = l.shared_buffer ? l.seq : l.present_rows;
    if (n * l.kv_heads > 0) TFSA_LAUNCH(PresentKernel<T>, l.kv_heads * n, kThreads, 0, stream)(l, t, b, past, first, n);
  }
  const size_t out_bytes = sizeof(T) * size_t(l.batch * l.seq * l.q_heads * l.head_dim);
  if (c.local_window_size == 0) {  // a window of no key: every row attends nothing (zeros, as ORT)
    const cudaError_t status = out_bytes ? cudaMemsetAsync(c.output, 0, out_bytes, stream) : cudaSuccess;
    const int64_t heads = l.batch * l.q_heads;  // nothing allowed: density 1, as SparseAttention's
    if (c.density && heads > 0) TFSA_LAUNCH(FillKernel, (heads + 255) / 256, 256, 0, stream)(c.density, heads, 1.0f);
    return status == cudaSuccess ? "" : std::string("CUDA error: ") + cudaGetErrorString(status);
  }
  T* query = reinterpret_cast<T*>(static_cast<char*>(c.workspace) + w.query);
  T* output = reinterpret_cast<T*>(static_cast<char*>(c.workspace) + w.output);
  for (const Part& p : PartsOf(c, l)) {
    if (p.rows == 0) continue;
    const int64_t items = l.q_heads * p.rows, past = PastLength(l, c.seqlens_k[p.b]);
    TFSA_LAUNCH(GatherQueryKernel<T>, items, kThreads, 0, stream)(l, t, p.b, past, p.row_begin, p.rows, query);
    TfsaCudaArgs e = EngineArgs(c, l, p);
    e.query = query, e.output = output;
    e.density = c.density && p.row_begin == 0 ? c.density + p.b * l.q_heads : nullptr;  // the row's own rows
    e.workspace = static_cast<char*>(c.workspace) + w.engine, e.workspace_size = c.workspace_size - w.engine;
    const std::string error = RunEngine(e, ViewOf(c, l, p), stream);
    if (!error.empty()) return error;
    TFSA_LAUNCH(ScatterKernel<T>, items, kThreads, 0, stream)(l, output, p.b, p.row_begin, p.rows, static_cast<T*>(c.output));
  }
  const cudaError_t status = cudaGetLastError();
  return status == cudaSuccess ? "" : std::string("CUDA error: ") + cudaGetErrorString(status);
}

int Fail(char* error, size_t size, const std::string& message) {
  if (error && size) std::snprintf(error, size, "%s", message.c_str());
  return 1;
}

}  // namespace
}  // namespace tfsa::cuda

using namespace tfsa::cuda;

extern "C" __attribute__((visibility("default"))) size_t tfsa_cuda_gqa_workspace_bytes(const TfsaCudaGqaArgs* args) {
  if (!args || !CheckGqa(*args).empty()) return 0;
  return PlanOf(*args, LayoutOf(*args)).total;
}

extern "C" __attribute__((visibility("default"))) int tfsa_cuda_group_query_attention(const TfsaCudaGqaArgs* args,
                                                                                     void* stream_ptr, char* error,
                                                                                     size_t error_size) {
  if (!args) return Fail(error, error_size, "no call");
  const TfsaCudaGqaArgs& c = *args;
  std::string problem = CheckGqa(c);
  const Plan w = problem.empty() ? PlanOf(c, LayoutOf(c)) : Plan{};
  if (problem.empty() && (c.workspace_size < w.total || (w.total > 0 && !c.workspace)))
    problem = "the workspace has " + std::to_string(c.workspace_size) + " bytes, the call needs " + std::to_string(w.total);
  const auto stream = static_cast<cudaStream_t>(stream_ptr);
  if (problem.empty()) problem = c.dtype == TFSA_FLOAT32 ? Run<float>(c, w, stream) : Run<__half>(c, w, stream);
  return problem.empty() ? 0 : Fail(error, error_size, problem);
}
