// The CUDA provider's side of SparseAttentionKernel: turns a checked Call into the CUDA
// entry point's TfsaCudaCall, with ONNX Runtime's compute stream and a workspace from ORT's
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

TfsaCudaCall ToCudaCall(const Call& call, const Attributes& a, bool selection_only) {
  const Dims& d = call.dims;
  TfsaCudaCall c{};
  c.dtype = DType(call.type);
  c.mask_kind = call.mask == nullptr                                          ? TFSA_MASK_NONE
                : call.mask_type == ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL ? TFSA_MASK_BOOL
                                                                             : TFSA_MASK_T;
  c.batch = d.batch, c.q_heads = d.q_heads, c.kv_heads = d.kv_heads, c.q_len = d.q_len, c.kv_len = d.kv_len;
  c.head_dim = d.head_dim, c.v_head_dim = d.v_head_dim;
  for (int i = 0; i < 4; ++i) c.mask_stride[i] = d.mask_stride[i];
  c.scale = call.scale, c.is_causal = a.is_causal, c.block_size = a.block_size, c.global_tokens = a.global_tokens;
  c.local_window = a.local_window, c.threshold = a.threshold, c.max_density = a.max_density;
  c.min_seq_len = a.min_seq_len, c.selection_only = selection_only;
  c.query = call.query, c.key = call.key, c.value = call.value, c.mask = call.mask;
  c.output = call.output, c.density = call.density;
  return c;
}

}  // namespace

void SparseAttentionKernel::RunCuda(Ort::KernelContext& context, const Call& call) {
  TfsaCudaCall c = ToCudaCall(call, attributes, selection_only);
  if (c.batch * c.q_heads == 0) return;
  const size_t bytes = tfsa_cuda_workspace_bytes(&c);
  if (bytes == 0) throw std::runtime_error("the call's sizes are outside what the CUDA kernel supports");
  // The workspace comes from ORT's allocator of the inputs' device and is freed right after the
  // launch: later users of the memory are queued on the same compute stream, after this call.
  Ort::Allocator allocator = context.GetAllocator(*call.memory);
  c.workspace = allocator.Alloc(bytes);
  c.workspace_size = bytes;
  char error[512] = {0};
  const int failed = tfsa_cuda_sparse_attention(&c, context.GetGPUComputeStream(), error, sizeof(error));
  allocator.Free(c.workspace);
  if (failed) throw std::runtime_error(error);
}

}  // namespace tfsa
