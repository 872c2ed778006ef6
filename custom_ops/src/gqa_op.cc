#include "gqa_op.h"

#include <algorithm>
#include <atomic>
#include <new>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/gqa_cache.h"
#include "op_common.h"

namespace tfsa {
namespace {

OrtStatusPtr Error(const std::string& message) {
  return Ort::GetApi().CreateStatus(ORT_INVALID_ARGUMENT, ("SparseGroupQueryAttention: " + message).c_str());
}

// Input `index`, or a null value when the node leaves it out.
Ort::ConstValue OptionalInput(Ort::KernelContext& context, size_t index) {
  if (index >= context.GetInputCount()) return Ort::ConstValue{nullptr};
  return context.GetInput(index);
}

Shape ShapeOf(const Ort::ConstValue& value) { return value.GetTensorTypeAndShapeInfo().GetShape(); }

// One call's inputs as read and checked: the layout, the data, total_sequence_length.
struct GqaCall {
  GqaLayout layout;
  cpu::GqaInputs in;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  int64_t total_sequence_length = 0;
};

// The types of every present T input must be query's.
std::string CheckTypes(Ort::KernelContext& context, GqaCall& call) {
  call.type = context.GetInput(0).GetTensorTypeAndShapeInfo().GetElementType();
  if (call.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && call.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16)
    return std::string("query must be float32 or float16, got ") + TypeName(call.type);
  const char* names[] = {"query", "key", "value", "past_key", "past_value", "", "", "cos_cache", "sin_cache"};
  for (size_t i : {1, 2, 3, 4, 7, 8}) {
    auto input = OptionalInput(context, i);
    if (input && input.GetTensorTypeAndShapeInfo().GetElementType() != call.type)
      return std::string(names[i]) + " must have query's type " + TypeName(call.type) + ", got " +
             TypeName(input.GetTensorTypeAndShapeInfo().GetElementType());
  }
  return "";
}

// query (packed or not), key and value: batch, sequence, heads and head size.
std::string CheckQkv(Ort::KernelContext& context, const GqaAttributes& a, GqaCall& call) {
  GqaLayout& l = call.layout;
  auto query = context.GetInput(0), key = OptionalInput(context, 1), value = OptionalInput(context, 2);
  const Shape q = ShapeOf(query);
  if (q.size() != 3) return "query must be 3-D [batch, sequence, hidden], got " + ToString(q);
  if (static_cast<bool>(key) != static_cast<bool>(value))
    return "key and value must be both given, or both absent (query is then packed QKV)";
  l.batch = q[0];
  l.seq = q[1];
  l.q_heads = a.num_heads;
  l.kv_heads = a.kv_num_heads;
  l.packed = !key;
  const int64_t token_heads = l.packed ? l.q_heads + 2 * l.kv_heads : l.q_heads;
  if (q[2] % token_heads != 0 || q[2] == 0)
    return "query hidden size " + std::to_string(q[2]) + " is not a positive multiple of " +
           (l.packed ? "num_heads + 2 * kv_num_heads = " : "num_heads = ") + std::to_string(token_heads);
  l.head_dim = q[2] / token_heads;
  call.in.query = InputData(query);
  if (l.packed) return "";
  const Shape expected = {l.batch, l.seq, l.kv_heads * l.head_dim};
  if (ShapeOf(key) != expected || ShapeOf(value) != expected)
    return "key and value must be [batch, sequence, kv_num_heads * head_size] = " + ToString(expected) +
           ", got key " + ToString(ShapeOf(key)) + " and value " + ToString(ShapeOf(value));
  call.in.key = InputData(key);
  call.in.value = InputData(value);
  return "";
}

// past_key/past_value, seqlens_k, total_sequence_length, cos_cache/sin_cache.
std::string CheckCacheInputs(Ort::KernelContext& context, const GqaAttributes& a, GqaCall& call) {
  GqaLayout& l = call.layout;
  auto past_key = OptionalInput(context, 3), past_value = OptionalInput(context, 4);
  if (static_cast<bool>(past_key) != static_cast<bool>(past_value))
    return "past_key and past_value must be both given or both absent";
  if (past_key) {
    const Shape pk = ShapeOf(past_key), pv = ShapeOf(past_value);
    if (pk.size() != 4 || pk != pv || pk[0] != l.batch || pk[1] != l.kv_heads || pk[3] != l.head_dim)
      return "past_key and past_value must be [batch, kv_num_heads, past_length, head_size] = [" +
             std::to_string(l.batch) + ", " + std::to_string(l.kv_heads) + ", P, " + std::to_string(l.head_dim) +
             "], got " + ToString(pk) + " and " + ToString(pv);
    l.past_rows = pk[2];
    call.in.past_key = InputData(past_key);
    call.in.past_value = InputData(past_value);
  }
  auto seqlens = context.GetInput(5), total = context.GetInput(6);
  if (ShapeOf(seqlens) != Shape{l.batch})
    return "seqlens_k must be [batch] = [" + std::to_string(l.batch) + "], got " + ToString(ShapeOf(seqlens));
  if (total.GetTensorTypeAndShapeInfo().GetElementCount() != 1)
    return "total_sequence_length must hold one value, got shape " + ToString(ShapeOf(total));
  call.in.seqlens_k = static_cast<const int32_t*>(InputData(seqlens));
  call.total_sequence_length = *static_cast<const int32_t*>(InputData(total));
  if (call.total_sequence_length < 0)
    return "total_sequence_length must be >= 0, got " + std::to_string(call.total_sequence_length);
  l.present_rows = std::max(call.total_sequence_length, l.past_rows);
  l.first_prompt = l.seq == call.total_sequence_length;
  if (a.do_rotary == 0) return "";
  auto cos = OptionalInput(context, 7), sin = OptionalInput(context, 8);
  if (!cos || !sin) return "do_rotary=1 needs cos_cache and sin_cache";
  const Shape c = ShapeOf(cos), s = ShapeOf(sin);
  if (c.size() != 2 || c != s || c[1] < 1 || 2 * c[1] > l.head_dim)
    return "cos_cache and sin_cache must be one shape [positions, rotary_dim / 2] with 1 <= rotary_dim <= "
           "head_size = " + std::to_string(l.head_dim) + ", got " + ToString(c) + " and " + ToString(s);
  l.rotary_half = c[1];
  l.interleaved = a.rotary_interleaved != 0;
  call.in.cos = InputData(cos);
  call.in.sin = InputData(sin);
  return "";
}

cpu::ParallelFor OrtParallelFor(Ort::KernelContext& context) {
  return [&context](size_t n, const std::function<void(size_t)>& fn) {
    context.ParallelFor([](void* data, size_t i) { (*static_cast<const std::function<void(size_t)>*>(data))(i); },
                        n, 0, const_cast<std::function<void(size_t)>*>(&fn));
  };
}

// Attention of query rows [row_begin, row_begin + rows) of batch row b over the first kv_len
// rows of its present cache, the first row at key position `offset`, written to `output`.
struct RowsCall {
  int64_t b, row_begin, rows, kv_len, offset;
  bool dense;
};

template <class T>
void AttendRows(const GqaKernel& k, const GqaCall& call, const RowsCall& r, void* output, float* density,
                cpu::WorkspacePool& pool, const cpu::ParallelFor& parallel_for) {
  const GqaLayout& l = call.layout;
  const int64_t D = l.head_dim, Hq = l.q_heads;
  std::vector<T> q(static_cast<size_t>(Hq * r.rows * D)), o(q.size());
  cpu::GatherQuery<T>(l, call.in, r.b, r.row_begin, r.rows, q.data(), parallel_for);

  cpu::Problem p;
  p.dims = Dims{1, Hq, l.kv_heads, r.rows, r.kv_len, D, D, {0, 0, 0, 0}};
  Attributes a = k.sparsity;
  a.is_causal = 1;
  if (r.dense) a.threshold = a.max_density = 1.0f, a.head_threshold_count = 0;  // exact over the cache
  p.attrs = Effective(a, p.dims);
  p.grid = GridOf(p.attrs, p.dims);
  p.grid.offset = r.offset;
  p.grid.global_query_offset = r.offset;  // global tokens count absolute positions
  // local_window_size w: the w keys up to the query's own, as in ORT 1.32.
  p.grid.window = k.gqa.local_window_size > 0 ? k.gqa.local_window_size - 1 : -1;

  cpu::Tensors t;
  t.query = q.data();
  const int64_t cache_offset = r.b * l.kv_heads * l.present_rows * D;
  t.key = static_cast<const T*>(call.in.present_key) + cache_offset;
  t.value = static_cast<const T*>(call.in.present_value) + cache_offset;
  t.kv_rows = l.present_rows;
  t.output = o.data();
  t.density = density;
  t.type = std::is_same_v<T, float> ? cpu::Tensors::Type::kFloat : cpu::Tensors::Type::kHalf;
  cpu::RunSparseAttention(p, t, pool, parallel_for);

  T* out = static_cast<T*>(output);  // [B, S, Hq * D] from [Hq, rows, D]
  for (int64_t row = 0; row < r.rows; ++row)
    for (int64_t h = 0; h < Hq; ++h)
      std::copy_n(o.data() + (h * r.rows + row) * D, D, out + ((r.b * l.seq + r.row_begin + row) * Hq + h) * D);
}

// Per batch row: its new rows over its cache. On a prompt, rows past the row's length (right
// padding) see all of its keys, as in ORT's GroupQueryAttention. density [B, Hq] (or null) is
// that of each row's own rows; padded rows are computed densely and do not count.
template <class T>
void Attend(GqaKernel& k, const GqaCall& call, void* output, float* density, const cpu::ParallelFor& parallel_for) {
  const GqaLayout& l = call.layout;
  if (k.gqa.local_window_size == 0) {  // a window of no key: every row attends nothing (zeros, as ORT)
    std::fill_n(static_cast<T*>(output), l.batch * l.seq * l.q_heads * l.head_dim, T(0.0f));
    if (density) std::fill_n(density, l.batch * l.q_heads, 1.0f);  // nothing allowed: 1, as SparseAttention
    return;
  }
  const bool dense = l.seq == 1 || l.seq < k.sparsity.min_seq_len;  // decode steps are exact
  for (int64_t b = 0; b < l.batch; ++b) {
    const int64_t total = static_cast<int64_t>(call.in.seqlens_k[b]) + 1;
    float* row_density = density ? density + b * l.q_heads : nullptr;
    if (l.first_prompt) {
      AttendRows<T>(k, call, {b, 0, total, total, 0, dense}, output, row_density, k.workspaces, parallel_for);
      if (total < l.seq)
        AttendRows<T>(k, call, {b, total, l.seq - total, total, total, true}, output, nullptr, k.workspaces,
                      parallel_for);
    } else {
      AttendRows<T>(k, call, {b, 0, l.seq, total, total - l.seq, dense}, output, row_density, k.workspaces,
                    parallel_for);
    }
  }
}

// ---------------------------------------------------------------- graph-level shape inference

// One dim as ORT's shape inference holds it: a value, or -1 with a name ("" when unknown).
struct Dim {
  int64_t value = -1;
  std::string name;
};

// Whether an OrtStatus is success (releasing it otherwise).
bool Ok(const OrtApi& api, OrtStatus* status) { return Readable(api, status); }

// The dims of input `index`, or false when it is absent or has no shape.
bool InputDims(const OrtApi& api, OrtShapeInferContext* ctx, size_t index, std::vector<Dim>& dims) {
  size_t count = 0, rank = 0;
  OrtTensorTypeAndShapeInfo* info = nullptr;
  if (!Ok(api, api.ShapeInferContext_GetInputCount(ctx, &count)) || index >= count ||
      !Ok(api, api.ShapeInferContext_GetInputTypeShape(ctx, index, &info)) || info == nullptr ||
      !Ok(api, api.GetDimensionsCount(info, &rank)) || rank == 0)
    return false;
  std::vector<int64_t> values(rank);
  std::vector<const char*> names(rank, nullptr);
  if (!Ok(api, api.GetDimensions(info, values.data(), rank)) ||
      !Ok(api, api.GetSymbolicDimensions(info, names.data(), rank)))
    return false;
  dims.clear();
  for (size_t i = 0; i < rank; ++i) dims.push_back({values[i], values[i] >= 0 || !names[i] ? "" : names[i]});
  return true;
}

// Whether optional input `index` is given (with or without a known shape): an absent one has no
// element type.
bool InputGiven(const OrtApi& api, OrtShapeInferContext* ctx, size_t index) {
  size_t count = 0;
  OrtTensorTypeAndShapeInfo* info = nullptr;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  return Ok(api, api.ShapeInferContext_GetInputCount(ctx, &count)) && index < count &&
         Ok(api, api.ShapeInferContext_GetInputTypeShape(ctx, index, &info)) && info != nullptr &&
         Ok(api, api.GetTensorElementType(info, &type)) && type != ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
}

int64_t IntAttribute(const OrtApi& api, OrtShapeInferContext* ctx, const char* name) {
  const OrtOpAttr* attr = nullptr;
  int64_t value = 0;
  size_t size = 0;
  if (!Ok(api, api.ShapeInferContext_GetAttribute(ctx, name, &attr)) || attr == nullptr ||
      !Ok(api, api.ReadOpAttr(attr, ORT_OP_ATTR_INT, &value, sizeof value, &size)))
    return 0;
  return value;
}

// An unknown dim without a name gets its own (ORT reads an unnamed -1 as a literal -1), so ORT
// assumes no equality between them.
std::vector<Dim> Named(std::vector<Dim> dims) {
  static std::atomic<uint64_t> unknown_dims{0};
  for (Dim& d : dims)
    if (d.value < 0 && d.name.empty()) d.name = "tfsa_unknown_" + std::to_string(unknown_dims++);
  return dims;
}

// Sets output `index` to type `type` and `dims` (named).
OrtStatusPtr SetOutput(const OrtApi& api, OrtShapeInferContext* ctx, size_t index, ONNXTensorElementDataType type,
                       const std::vector<Dim>& dims) {
  std::vector<int64_t> values;
  std::vector<const char*> names;
  for (const Dim& d : dims) {
    values.push_back(d.value < 0 ? -1 : d.value);
    names.push_back(d.value < 0 ? d.name.c_str() : "");
  }
  OrtTensorTypeAndShapeInfo* info = nullptr;
  OrtStatusPtr status = api.CreateTensorTypeAndShapeInfo(&info);
  if (!status) status = api.SetTensorElementType(info, type);
  if (!status) status = api.SetDimensions(info, values.data(), values.size());
  if (!status) status = api.SetSymbolicDimensions(info, names.data(), names.size());
  if (!status) status = api.ShapeInferContext_SetOutputTypeShape(ctx, index, info);
  if (info) api.ReleaseTensorTypeAndShapeInfo(info);
  return status;
}

// The shapes ORT's GroupQueryAttention infers (onnxruntime 1.32): output [B, S, Hq * D] (query's
// shape when key is given), present [B, Hkv, ?, D] from past_key, or [B, Hkv, S, D] on a
// prompt without past; density [B, Hq]. A dim ORT leaves unknown stays unknown; where the query's rank or hidden
// size does not fit, only the type is set and Compute reports the shapes it sees.
OrtStatusPtr InferGqaOutputs(const OrtCustomOp*, OrtShapeInferContext* ctx) {
  const OrtApi& api = Ort::GetApi();
  OrtTensorTypeAndShapeInfo* q_info = nullptr;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  OrtStatusPtr status = api.ShapeInferContext_GetInputTypeShape(ctx, 0, &q_info);
  if (!status) status = api.GetTensorElementType(q_info, &type);
  if (status) return status;
  const int64_t heads = IntAttribute(api, ctx, "num_heads"), kv_heads = IntAttribute(api, ctx, "kv_num_heads");
  std::vector<Dim> q, past, unknown3(3), unknown4(4);
  const bool has_q = InputDims(api, ctx, 0, q) && q.size() == 3, packed = !InputGiven(api, ctx, 1);
  const int64_t parts = packed ? heads + 2 * kv_heads : heads;
  const int64_t hidden = has_q ? q[2].value : -1;
  const int64_t head_dim = hidden > 0 && parts > 0 && hidden % parts == 0 ? hidden / parts : -1;
  std::vector<Dim> out = unknown3;
  if (has_q) out = {q[0], q[1], packed ? Dim{head_dim > 0 ? heads * head_dim : -1, ""} : q[2]};
  std::vector<Dim> present = unknown4;
  if (InputDims(api, ctx, 3, past) && past.size() == 4) present = {past[0], past[1], Dim{}, past[3]};
  else if (has_q && head_dim > 0 && !InputGiven(api, ctx, 3)) present = {q[0], Dim{kv_heads, ""}, q[1], Dim{head_dim, ""}};
  present = Named(present);  // present_key and present_value: one length
  if (!status) status = SetOutput(api, ctx, 0, type, Named(out));
  if (!status) status = SetOutput(api, ctx, 1, type, present);
  if (!status) status = SetOutput(api, ctx, 2, type, present);
  if (!status) status = SetOutput(api, ctx, 3, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, Named({out[0], Dim{heads, ""}}));
  return status;
}

GqaKernel::DeviceCall DeviceCallOf(Ort::KernelContext& context, const GqaCall& call, int64_t positions, void* output,
                                   float* density) {
  GqaKernel::DeviceCall d{call.layout, call.type, call.in.seqlens_k, positions, call.in.query, call.in.key,
                          call.in.value, call.in.past_key, call.in.past_value, call.in.cos, call.in.sin,
                          call.in.present_key, call.in.present_value, output, density, nullptr};
  Ort::ThrowOnError(Ort::GetApi().GetTensorMemoryInfo(context.GetInput(0), &d.memory));
  return d;
}

}  // namespace

GqaKernel::GqaKernel(const OrtApi& api, const OrtKernelInfo* info, Provider provider_) : provider(provider_) {
  std::string type_error;
  ReadFields(api, info, kGqaAttributeRules, gqa, type_error);
  // always causal (so nothing ahead to limit); its window is local_window_size; softcap is
  // GroupQueryAttention's own
  ReadFields(api, info, kAttributeRules, sparsity, type_error, {"is_causal", "sliding_window", "softcap", "window_ahead"});
  ReadLists(api, info, sparsity, type_error);
  sparsity.is_causal = 1;
  sparsity.softcap = gqa.softcap;
  if (!type_error.empty()) attribute_error = type_error;
  else if (gqa.num_heads == 0 || gqa.kv_num_heads == 0) attribute_error = "num_heads and kv_num_heads are required";
  else attribute_error = CheckGqaAttributes(gqa);
  if (attribute_error.empty()) attribute_error = CheckAttributes(sparsity);
  // GroupQueryAttention settings this op does not implement: refused, not silently ignored.
  for (const char* name : {"smooth_softmax", "qk_output"})
    if (attribute_error.empty() && ReadAttribute<int64_t>(api, info, name, 0, attribute_error) != 0)
      attribute_error = std::string(name) + " is not supported (only 0)";
  if (attribute_error.empty() && gqa.num_heads % gqa.kv_num_heads != 0)
    attribute_error = "num_heads = " + std::to_string(gqa.num_heads) + " must be a multiple of kv_num_heads = " +
                      std::to_string(gqa.kv_num_heads);
  if (attribute_error.empty()) attribute_error = CheckHeadThresholds(sparsity, gqa.num_heads);
}

OrtStatusPtr GqaKernel::ComputeV2(OrtKernelContext* raw_context) {
  try {
    Ort::KernelContext context(raw_context);
    if (!attribute_error.empty()) return Error(attribute_error);
    GqaCall call;
    std::string error = CheckTypes(context, call);
    if (error.empty()) error = CheckQkv(context, gqa, call);
    if (error.empty()) error = CheckCacheInputs(context, gqa, call);
    const int64_t positions = call.layout.rotary_half > 0 ? ShapeOf(OptionalInput(context, 7))[0] : 0;
    if (error.empty()) error = CheckRows(call.layout, call.in.seqlens_k, positions);
    if (!error.empty()) return Error(error);

    const GqaLayout& l = call.layout;
    void* output = context.GetOutput(0, {l.batch, l.seq, l.q_heads * l.head_dim}).GetTensorMutableRawData();
    const Shape present = {l.batch, l.kv_heads, l.present_rows, l.head_dim};
    call.in.present_key = context.GetOutput(1, present).GetTensorMutableRawData();
    call.in.present_value = context.GetOutput(2, present).GetTensorMutableRawData();
    float* density = nullptr;
    if (context.GetOutputCount() > 3) {
      auto value = context.GetOutput(3, {l.batch, l.q_heads});
      if (value) density = value.GetTensorMutableData<float>();
    }
    // genai binds one buffer as past and present: then the past rows are already in place.
    const bool key_shared = call.in.past_key != nullptr && call.in.past_key == call.in.present_key;
    const bool value_shared = call.in.past_value != nullptr && call.in.past_value == call.in.present_value;
    if (key_shared != value_shared) return Error("past and present must share both buffers (key and value) or neither");
    call.layout.shared_buffer = key_shared;

    if (provider == Provider::kCuda) {
      RunCuda(context, DeviceCallOf(context, call, positions, output, density));
      return nullptr;
    }
    const cpu::ParallelFor parallel_for = OrtParallelFor(context);
    if (call.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
      cpu::WritePresent<float>(call.layout, call.in, parallel_for);
      Attend<float>(*this, call, output, density, parallel_for);
    } else {
      cpu::WritePresent<Ort::Float16_t>(call.layout, call.in, parallel_for);
      Attend<Ort::Float16_t>(*this, call, output, density, parallel_for);
    }
    return nullptr;
  } catch (...) {
    return ComputeErrorStatus("SparseGroupQueryAttention");
  }
}

#ifndef TFSA_WITH_CUDA
// The CPU library registers no CUDA kernels, so this is never reached there.
void GqaKernel::RunCuda(Ort::KernelContext&, const DeviceCall&) const {
  throw std::runtime_error("this build of the library has no CUDA kernel");
}
#endif

GqaOp::GqaOp(ONNXTensorElementDataType type, Provider provider) : type_(type), provider_(provider) {
  // Announce the oldest API we use, not the headers' newest, so older runtimes accept the op.
  OrtCustomOp::version = kMinOrtApiVersion;
  OrtCustomOp::InferOutputShapeFn = InferGqaOutputs;
}

OrtStatusPtr GqaOp::CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
  return NewKernel(api, kernel, [&] { return new GqaKernel(api, info, provider_); });
}

}  // namespace tfsa
