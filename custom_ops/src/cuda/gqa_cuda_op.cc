// The CUDA provider's side of GqaKernel: turns the checked call into the CUDA entry point's
// TfsaCudaGqaArgs (cuda/gqa.cu), with ONNX Runtime's compute stream and a workspace from ORT's
// allocator for the device the inputs live on. Nothing here synchronises the device.
#include <stdexcept>
#include <string>

#include "cuda/entry.h"
#include "gqa_op.h"

namespace tfsa {
namespace {

TfsaCudaGqaArgs ToCudaArgs(const GqaKernel& k, const GqaKernel::DeviceCall& d) {
  const GqaLayout& l = d.layout;
  TfsaCudaGqaArgs c{};
  c.dtype = d.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 ? TFSA_FLOAT16 : TFSA_FLOAT32;
  c.packed = l.packed, c.interleaved = l.interleaved, c.first_prompt = l.first_prompt, c.shared_buffer = l.shared_buffer;
  c.batch = l.batch, c.seq = l.seq, c.q_heads = l.q_heads, c.kv_heads = l.kv_heads, c.head_dim = l.head_dim;
  c.past_rows = l.past_rows, c.present_rows = l.present_rows, c.rotary_half = l.rotary_half;
  c.rotary_positions = d.positions;
  c.local_window_size = k.gqa.local_window_size;
  c.attributes = k.sparsity;
  c.seqlens_k = d.seqlens_k;
  c.query = d.query, c.key = d.key, c.value = d.value, c.past_key = d.past_key, c.past_value = d.past_value;
  c.cos = d.cos, c.sin = d.sin;
  c.present_key = d.present_key, c.present_value = d.present_value, c.output = d.output, c.density = d.density;
  return c;
}

}  // namespace

void GqaKernel::RunCuda(Ort::KernelContext& context, const DeviceCall& call) const {
  TfsaCudaGqaArgs c = ToCudaArgs(*this, call);
  const size_t bytes = tfsa_cuda_gqa_workspace_bytes(&c);
  char error[512] = {0};
  void* stream = context.GetGPUComputeStream();
  if (bytes == 0) {  // a call the entry point refuses says why before any launch, or needs no workspace
    if (tfsa_cuda_group_query_attention(&c, stream, error, sizeof(error)) != 0) throw std::runtime_error(error);
    return;
  }
  // Freed right after the launches: later users of the memory are queued on the same stream.
  Ort::Allocator allocator = context.GetAllocator(*call.memory);
  c.workspace = allocator.Alloc(bytes);
  c.workspace_size = bytes;
  const int failed = tfsa_cuda_group_query_attention(&c, stream, error, sizeof(error));
  allocator.Free(c.workspace);
  if (failed) throw std::runtime_error(error);
}

}  // namespace tfsa
