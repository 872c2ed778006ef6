// ai.tfsa::SparseAttention as an ONNX Runtime custom op: reads the attributes, checks the
// inputs against the contract (tfsa/contract.h), allocates the outputs and hands the work to
// the CPU kernel (cpu/attention_cpu.h) or, for CUDAExecutionProvider, to the CUDA entry point
// (cuda/cuda_op.cc).
#pragma once

#include <string>

#include "cpu/attention_cpu.h"
#include "tfsa/contract.h"
#include "tfsa/ort_api.h"

namespace tfsa {

// Where a registration's kernels run: ONNX Runtime's CPU or CUDA execution provider.
enum class Provider { kCpu, kCuda };

// The tensors of one Compute as read from the context: checked sizes, types and data
// pointers (host memory for the CPU provider, device memory for CUDA).
struct OpTensors {
  Dims dims;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  ONNXTensorElementDataType mask_type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;  // none, bool or `type`
  ONNXTensorElementDataType bias_type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;  // none, float32 or `type`
  const void *query = nullptr, *key = nullptr, *value = nullptr, *mask = nullptr, *bias = nullptr;
  const OrtMemoryInfo* memory = nullptr;  // where query lives
  void* output = nullptr;
  float* density = nullptr;
};

// The kernel ONNX Runtime creates per node: its attributes, read and checked once, and Compute.
struct SparseAttentionKernel {
  SparseAttentionKernel(const OrtApi& api, const OrtKernelInfo* info, Provider provider);
  OrtStatusPtr ComputeV2(OrtKernelContext* context);

  Provider provider;
  Attributes attributes;
  std::string attribute_error;  // non-empty: the node's attributes break the contract
  bool selection_only = false;  // TFSA_SELECTION_ONLY=1 at session creation: time the selection alone

 private:
  void RunCpu(Ort::KernelContext& context, const OpTensors& tensors);
  // Defined in cuda/cuda_op.cc; only the CUDA library registers kernels that call it.
  void RunCuda(Ort::KernelContext& context, const OpTensors& tensors);
  cpu::WorkspacePool workspaces_;
};

// One registration per element type T of query/key/value/Y (float32, float16, bfloat16),
// all named SparseAttention: ORT picks the kernel by the node's types. Outputs have fixed
// types, which is what lets onnxruntime 1.17+ load the op (older runtimes refuse a dynamically
// typed output unless exactly one input is dynamic). The mask (T or bool) and the bias (T or
// float32) stay dynamic.
struct SparseAttentionOp : Ort::CustomOpBase<SparseAttentionOp, SparseAttentionKernel, true> {
  SparseAttentionOp(ONNXTensorElementDataType type, Provider provider);
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const;
  const char* GetName() const { return kOpName; }
  const char* GetExecutionProviderType() const {
    return provider_ == Provider::kCuda ? "CUDAExecutionProvider" : nullptr;  // nullptr: CPU
  }
  size_t GetInputTypeCount() const { return 5; }  // query, key, value, attn_mask, attn_bias
  ONNXTensorElementDataType GetInputType(size_t index) const {
    return index >= 3 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED : type_;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const;
  size_t GetOutputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetOutputType(size_t index) const;
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t index) const;

 private:
  ONNXTensorElementDataType type_;
  Provider provider_;
};

}  // namespace tfsa
