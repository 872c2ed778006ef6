#include "sparse_attention_op.h"

#include <atomic>
#include <cstdlib>
#include <new>
#include <stdexcept>
#include <string>

#include "cpu/attention_cpu.h"
#include "op_common.h"

namespace tfsa {
namespace {

OrtStatusPtr Error(const std::string& message) {
  return Ort::GetApi().CreateStatus(ORT_INVALID_ARGUMENT, ("SparseAttention: " + message).c_str());
}

}  // namespace

SparseAttentionKernel::SparseAttentionKernel(const OrtApi& api, const OrtKernelInfo* info, Provider where)
    : provider(where) {
  std::string type_error;
  ReadFields(api, info, kAttributeRules, attributes, type_error);
  ReadLists(api, info, attributes, type_error);
  attribute_error = type_error.empty() ? CheckAttributes(attributes) : type_error;
  const char* selection_only_env = std::getenv("TFSA_SELECTION_ONLY");
  selection_only = selection_only_env != nullptr && std::string(selection_only_env) == "1";
}

namespace {

// An optional input (attn_mask, attn_bias) when present: its shape, its element type (`other`
// or query's `type`) and its data; returns the problem with its type, "" when usable.
std::string ReadOptional(const Ort::ConstValue& input, const char* name, ONNXTensorElementDataType other,
                         ONNXTensorElementDataType type, Shape& shape, ONNXTensorElementDataType& input_type,
                         const void*& data) {
  if (!input) return "";
  const auto info = input.GetTensorTypeAndShapeInfo();
  shape = info.GetShape();
  input_type = info.GetElementType();
  if (input_type != other && input_type != type)
    return std::string(name) + " must be " + TypeName(other) + " or " + TypeName(type) + " like query, got " +
           TypeName(input_type);
  data = InputData(input);
  return "";
}

// Reads and checks the inputs of one call; returns the problem with them, "" when usable.
std::string ReadInputs(Ort::KernelContext& context, OpTensors& call) {
  const size_t n_inputs = context.GetInputCount();
  auto query = context.GetInput(0), key = context.GetInput(1), value = context.GetInput(2);
  Ort::ConstValue mask{nullptr}, bias{nullptr};
  if (n_inputs > 3) mask = context.GetInput(3);
  if (n_inputs > 4) bias = context.GetInput(4);

  const auto q_info = query.GetTensorTypeAndShapeInfo(), k_info = key.GetTensorTypeAndShapeInfo();
  const auto v_info = value.GetTensorTypeAndShapeInfo();
  const auto type = call.type = q_info.GetElementType();
  if (type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 &&
      type != ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16)
    return std::string("query must be float32, float16 or bfloat16, got ") + TypeName(type);
  if (k_info.GetElementType() != type || v_info.GetElementType() != type)
    return std::string("key and value must have query's type ") + TypeName(type) + ", got " +
           TypeName(k_info.GetElementType()) + " and " + TypeName(v_info.GetElementType());
  Shape mask_shape, bias_shape;
  const std::string mask_error =
      ReadOptional(mask, "attn_mask", ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL, type, mask_shape, call.mask_type, call.mask);
  if (!mask_error.empty()) return mask_error;
  const std::string bias_error =
      ReadOptional(bias, "attn_bias", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, type, bias_shape, call.bias_type, call.bias);
  if (!bias_error.empty()) return bias_error;
  const std::string shape_error = CheckShapes(q_info.GetShape(), k_info.GetShape(), v_info.GetShape(),
                                              mask ? &mask_shape : nullptr, call.dims, bias ? &bias_shape : nullptr);
  if (!shape_error.empty()) return shape_error;
  call.query = InputData(query);
  call.key = InputData(key);
  call.value = InputData(value);
  Ort::ThrowOnError(Ort::GetApi().GetTensorMemoryInfo(query, &call.memory));
  return "";
}

}  // namespace

OrtStatusPtr SparseAttentionKernel::ComputeV2(OrtKernelContext* raw_context) {
  try {
    Ort::KernelContext context(raw_context);
    if (!attribute_error.empty()) return Error(attribute_error);
    OpTensors call;
    std::string input_error = ReadInputs(context, call);
    if (input_error.empty()) input_error = CheckHeadThresholds(attributes, call.dims.q_heads);
    if (!input_error.empty()) return Error(input_error);
    const Dims& d = call.dims;
    call.output = context.GetOutput(0, {d.batch, d.q_heads, d.q_len, d.v_head_dim}).GetTensorMutableRawData();
    if (context.GetOutputCount() > 1) {
      auto density = context.GetOutput(1, {d.batch, d.q_heads});
      if (density) call.density = density.GetTensorMutableData<float>();
    }
    if (provider == Provider::kCuda) RunCuda(context, call);
    else RunCpu(context, call);
    return nullptr;
  } catch (...) {
    return ComputeErrorStatus("SparseAttention");
  }
}

namespace {

// The CPU kernel's view of an optional additive input (attn_mask or attn_bias).
cpu::MaskView ViewOf(const void* data, ONNXTensorElementDataType type, const int64_t stride[4]) {
  using Kind = cpu::MaskView::Kind;
  cpu::MaskView view;
  view.data = data;
  if (data == nullptr) view.kind = Kind::kNone;
  else if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL) view.kind = Kind::kBool;
  else if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) view.kind = Kind::kFloat;
  else if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16) view.kind = Kind::kHalf;
  else if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16) view.kind = Kind::kBFloat16;
  for (int i = 0; i < 4; ++i) view.stride[i] = stride[i];
  return view;
}

}  // namespace

void SparseAttentionKernel::RunCpu(Ort::KernelContext& context, const OpTensors& call) {
  cpu::Problem problem;
  problem.dims = call.dims;
  problem.mask = ViewOf(call.mask, call.mask_type, call.dims.mask_stride);
  problem.bias = ViewOf(call.bias, call.bias_type, call.dims.bias_stride);
  problem.attrs = Effective(attributes, call.dims);
  problem.selection_only = selection_only;
  problem.grid = GridOf(problem.attrs, call.dims);

  cpu::Tensors tensors;
  tensors.query = call.query;
  tensors.key = call.key;
  tensors.value = call.value;
  tensors.type = call.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT     ? cpu::Tensors::Type::kFloat
                 : call.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 ? cpu::Tensors::Type::kHalf
                                                                      : cpu::Tensors::Type::kBFloat16;
  tensors.output = call.output;
  tensors.density = call.density;

  cpu::RunSparseAttention(problem, tensors, workspaces_, [&](size_t n, const std::function<void(size_t)>& fn) {
    context.ParallelFor([](void* data, size_t i) { (*static_cast<const std::function<void(size_t)>*>(data))(i); },
                        n, 0, const_cast<std::function<void(size_t)>*>(&fn));
  });
}

namespace {

// Graph-level type/shape inference: Y takes query's type and [B, Hq, Sq] with value's Dv;
// density is float [B, Hq]. Inputs of unknown or wrong rank only get the type: Compute
// reports the shape error with the shapes it sees.
OrtStatusPtr InferOutputs(const OrtCustomOp*, OrtShapeInferContext* ctx) {
  const OrtApi& api = Ort::GetApi();
  OrtTensorTypeAndShapeInfo *q_info = nullptr, *v_info = nullptr, *y_info = nullptr, *d_info = nullptr;
  OrtStatusPtr status = nullptr;
  auto check = [&](OrtStatusPtr s) { return (status = s) == nullptr; };
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  size_t q_rank = 0, v_rank = 0;
  if (check(api.ShapeInferContext_GetInputTypeShape(ctx, 0, &q_info)) &&
      check(api.ShapeInferContext_GetInputTypeShape(ctx, 2, &v_info)) &&
      check(api.GetTensorElementType(q_info, &type)) && check(api.GetDimensionsCount(q_info, &q_rank)) &&
      check(api.GetDimensionsCount(v_info, &v_rank)) && check(api.CreateTensorTypeAndShapeInfo(&y_info)) &&
      check(api.SetTensorElementType(y_info, type)) && check(api.CreateTensorTypeAndShapeInfo(&d_info)) &&
      check(api.SetTensorElementType(d_info, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT))) {
    // Unknown dims stay -1 (a rank-0 shape would claim a scalar).
    int64_t q_dims[4] = {-1, -1, -1, -1}, v_dims[4] = {-1, -1, -1, -1};
    const char *q_syms[4] = {"", "", "", ""}, *v_syms[4] = {"", "", "", ""};
    if (q_rank == 4 && v_rank == 4) {
      check(api.GetDimensions(q_info, q_dims, 4)) && check(api.GetDimensions(v_info, v_dims, 4)) &&
          check(api.GetSymbolicDimensions(q_info, q_syms, 4)) && check(api.GetSymbolicDimensions(v_info, v_syms, 4));
    }
    // An unknown dim without a name must get one: ORT reads an unnamed -1 as a literal -1.
    // Each gets its own name, so ORT assumes no equality between them.
    static std::atomic<uint64_t> unknown_dims{0};
    std::string names[4];
    int64_t y_dims[4] = {q_dims[0], q_dims[1], q_dims[2], v_dims[3]};
    const char* y_syms[4] = {q_syms[0], q_syms[1], q_syms[2], v_syms[3]};
    for (int i = 0; i < 4; ++i) {
      if (y_dims[i] < 0 && (y_syms[i] == nullptr || y_syms[i][0] == '\0')) {
        names[i] = "tfsa_unknown_" + std::to_string(unknown_dims++);
        y_syms[i] = names[i].c_str();
      }
    }
    if (status == nullptr && check(api.SetDimensions(y_info, y_dims, 4)) &&
        check(api.SetSymbolicDimensions(y_info, y_syms, 4)) && check(api.SetDimensions(d_info, y_dims, 2)))
      check(api.SetSymbolicDimensions(d_info, y_syms, 2));
    if (status == nullptr && check(api.ShapeInferContext_SetOutputTypeShape(ctx, 0, y_info)))
      check(api.ShapeInferContext_SetOutputTypeShape(ctx, 1, d_info));
  }
  // The inputs' infos belong to the context; only the ones created here are released.
  for (OrtTensorTypeAndShapeInfo* info : {y_info, d_info})
    if (info) api.ReleaseTensorTypeAndShapeInfo(info);
  return status;
}

}  // namespace

#ifndef TFSA_WITH_CUDA
// The CPU library registers no CUDA kernels, so this is never reached there.
void SparseAttentionKernel::RunCuda(Ort::KernelContext&, const OpTensors&) {
  throw std::runtime_error("this build of the library has no CUDA kernel");
}
#endif

SparseAttentionOp::SparseAttentionOp(ONNXTensorElementDataType type, Provider provider)
    : type_(type), provider_(provider) {
  // Announce the oldest API we use, not the headers' newest, so older runtimes accept the op.
  OrtCustomOp::version = kMinOrtApiVersion;
  OrtCustomOp::InferOutputShapeFn = InferOutputs;
}

OrtStatusPtr SparseAttentionOp::CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
  return NewKernel(api, kernel, [&] { return new SparseAttentionKernel(api, info, provider_); });
}

OrtCustomOpInputOutputCharacteristic SparseAttentionOp::GetInputCharacteristic(size_t index) const {
  return index >= 3 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
}

ONNXTensorElementDataType SparseAttentionOp::GetOutputType(size_t index) const {
  return index == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : type_;
}

OrtCustomOpInputOutputCharacteristic SparseAttentionOp::GetOutputCharacteristic(size_t index) const {
  return index == 1 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
}

}  // namespace tfsa
