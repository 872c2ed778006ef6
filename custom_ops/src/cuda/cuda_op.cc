// The CUDA provider's side of SparseAttentionKernel: turns the checked OpTensors into the
// CUDA entry point's TfsaCudaArgs, with ONNX Runtime's compute stream and a workspace from ORT's
// allocator for the device the inputs live on. Nothing here synchronises the device.
#include <stdexcept>
#include <string>

#include "cuda/entry.h"
#include "sparse_attention_op.h"

namespace tfsa {
namespace {

int32_t DType(ONNXTensorElementDataType type) {
  if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16) return TFSA_FLOAT16;
  if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16) return TFSA_BFLOAT16;
  return TFSA_FLOAT32;
}

TfsaCudaArgs ToCudaArgs(const OpTensors& tensors, const Attributes& attributes, bool selection_only) {
  TfsaCudaArgs c{};
  c.dtype = DType(tensors.type);
  c.mask_kind = tensors.mask == nullptr                                          ? TFSA_MASK_NONE
                : tensors.mask_type == ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL ? TFSA_MASK_BOOL
                                                                                : TFSA_MASK_T;
  c.dims = tensors.dims;
  c.attributes = attributes;
  c.selection_only = selection_only;
  c.bias_dtype = DType(tensors.bias_type);
  c.query = tensors.query, c.key = tensors.key, c.value = tensors.value, c.mask = tensors.mask, c.bias = tensors.bias;
  c.output = tensors.output, c.density = tensors.density;
  return c;
}

}  // namespace

void SparseAttentionKernel::RunCuda(Ort::KernelContext& context, const OpTensors& tensors) {
  TfsaCudaArgs c = ToCudaArgs(tensors, attributes, selection_only);
  if (c.dims.batch * c.dims.q_heads == 0) return;
  const size_t bytes = tfsa_cuda_workspace_bytes(&c);
  char error[512] = {0};
  if (bytes == 0) {  // a call the CUDA kernel refuses: its check says why, before any launch
    tfsa_cuda_sparse_attention(&c, context.GetGPUComputeStream(), error, sizeof(error));
    throw std::runtime_error(error[0] ? error : "the call's sizes are outside what the CUDA kernel supports");
  }
  // The workspace comes from ORT's allocator of the inputs' device and is freed right after the
  // launch: later users of the memory are queued on the same compute stream, after this call.
  Ort::Allocator allocator = context.GetAllocator(*tensors.memory);
  c.workspace = allocator.Alloc(bytes);
  c.workspace_size = bytes;
  const int failed = tfsa_cuda_sparse_attention(&c, context.GetGPUComputeStream(), error, sizeof(error));
  allocator.Free(c.workspace);
  if (failed) throw std::runtime_error(error);
}

}  // namespace tfsa
