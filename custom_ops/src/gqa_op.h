// ai.tfsa::SparseGroupQueryAttention as an ONNX Runtime custom op: a drop-in for
// com.microsoft.GroupQueryAttention (same inputs, outputs and attributes, plus the sparsity
// attributes of SparseAttention). The rotary and KV-cache step is cpu/gqa_cache.h; attention is
// SparseAttention's engine, run per batch row on views of the present cache with the row's own
// length: the CPU engine (cpu/attention_cpu.h) for the CPU provider, the CUDA one through
// cuda/gqa.cu (called from cuda/gqa_cuda_op.cc) for CUDAExecutionProvider.
#pragma once

#include <string>

#include "cpu/attention_cpu.h"
#include "gqa_layout.h"
#include "sparse_attention_op.h"  // Provider
#include "tfsa/contract.h"
#include "tfsa/ort_api.h"

namespace tfsa {

// The kernel ONNX Runtime creates per node: its attributes, read and checked once, and Compute.
struct GqaKernel {
  GqaKernel(const OrtApi& api, const OrtKernelInfo* info, Provider provider);
  OrtStatusPtr ComputeV2(OrtKernelContext* context);

  Provider provider;
  Attributes sparsity;  // is_causal is always 1
  GqaAttributes gqa;
  std::string attribute_error;  // non-empty: the node's attributes break the contract
  cpu::WorkspacePool workspaces;

  // The CUDA face (cuda/gqa_cuda_op.cc; only the CUDA library registers kernels that call it):
  // the checked call's device tensors, seqlens_k in host memory, `positions` rows of cos/sin.
  struct DeviceCall {
    GqaLayout layout;
    ONNXTensorElementDataType type;
    const int32_t* seqlens_k;
    int64_t positions;
    const void *query, *key, *value, *past_key, *past_value, *cos, *sin;
    void *present_key, *present_value, *output;
    float* density;               // [B, Hq] or null
    const OrtMemoryInfo* memory;  // where query lives
  };
  void RunCuda(Ort::KernelContext& context, const DeviceCall& call) const;
};

// One registration per element type T (float32, float16) and provider. Inputs: 0 query, 1 key,
// 2 value, 3 past_key, 4 past_value (T, 1-4 optional), 5 seqlens_k, 6 total_sequence_length
// (int32; in host memory on CUDA, as ORT's CUDA GroupQueryAttention reads its total length),
// 7 cos_cache, 8 sin_cache (T, optional). Outputs: output, present_key, present_value (T), and
// the optional density (float32 [B, Hq]: the share of allowed blocks each head computed over
// each batch row's own rows, as SparseAttention's; calibrate reads it).
struct GqaOp : Ort::CustomOpBase<GqaOp, GqaKernel, true> {
  GqaOp(ONNXTensorElementDataType type, Provider provider);
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const;
  const char* GetName() const { return kGqaOpName; }
  const char* GetExecutionProviderType() const {
    return provider_ == Provider::kCuda ? "CUDAExecutionProvider" : nullptr;  // nullptr: CPU
  }
  // The CUDA face reads seqlens_k and total_sequence_length on the host: they size the calls.
  OrtMemType GetInputMemoryType(size_t index) const {
    return provider_ == Provider::kCuda && (index == 5 || index == 6) ? OrtMemTypeCPUInput : OrtMemTypeDefault;
  }
  size_t GetInputTypeCount() const { return 9; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    return index == 5 || index == 6 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32 : type_;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index == 0 || index == 5 || index == 6 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
  size_t GetOutputTypeCount() const { return 4; }
  ONNXTensorElementDataType GetOutputType(size_t index) const {
    return index == 3 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : type_;
  }
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t index) const {
    return index == 3 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }

 private:
  ONNXTensorElementDataType type_;
  Provider provider_;
};

}  // namespace tfsa
