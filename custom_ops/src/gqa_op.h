// ai.tfsa::SparseGroupQueryAttention as an ONNX Runtime custom op: a drop-in for
// com.microsoft.GroupQueryAttention (same inputs, outputs and attributes, plus the sparsity
// attributes of SparseAttention). The rotary and KV-cache step is cpu/gqa_cache.h; attention is
// SparseAttention's CPU engine (cpu/attention_cpu.h), run per batch row on views of the present
// cache with the row's own length. CPU only.
#pragma once

#include <string>

#include "cpu/attention_cpu.h"
#include "tfsa/contract.h"
#include "tfsa/ort_api.h"

namespace tfsa {

// The kernel ONNX Runtime creates per node: its attributes, read and checked once, and Compute.
struct GqaKernel {
  GqaKernel(const OrtApi& api, const OrtKernelInfo* info);
  OrtStatusPtr ComputeV2(OrtKernelContext* context);

  Attributes sparsity;  // is_causal is always 1
  GqaAttributes gqa;
  std::string attribute_error;  // non-empty: the node's attributes break the contract
  cpu::WorkspacePool workspaces;
};

// One registration per element type T (float32, float16). Inputs: 0 query, 1 key, 2 value,
// 3 past_key, 4 past_value (T, 1-4 optional), 5 seqlens_k, 6 total_sequence_length (int32),
// 7 cos_cache, 8 sin_cache (T, optional). Outputs: output, present_key, present_value (T).
struct GqaOp : Ort::CustomOpBase<GqaOp, GqaKernel, true> {
  explicit GqaOp(ONNXTensorElementDataType type);
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const;
  const char* GetName() const { return kGqaOpName; }
  const char* GetExecutionProviderType() const { return nullptr; }  // CPU
  size_t GetInputTypeCount() const { return 9; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    return index == 5 || index == 6 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32 : type_;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index == 0 || index == 5 || index == 6 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
  size_t GetOutputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return type_; }
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t) const { return INPUT_OUTPUT_REQUIRED; }

 private:
  ONNXTensorElementDataType type_;
};

}  // namespace tfsa
