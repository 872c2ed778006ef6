// The library's one entry point: SessionOptions.register_custom_ops_library() calls it.
#include "gqa_op.h"
#include "sparse_attention_op.h"

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(tfsa::kMinOrtApiVersion);
  if (api == nullptr) {
    const OrtApi* oldest = api_base->GetApi(1);
    return oldest->CreateStatus(ORT_FAIL, "the tfsa-onnx operator library needs onnxruntime >= 1.17");
  }
  Ort::InitApi(api);
  using tfsa::Provider;
  using tfsa::SparseAttentionOp;
  static SparseAttentionOp ops[] = {
      SparseAttentionOp(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, Provider::kCpu),
      SparseAttentionOp(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, Provider::kCpu),
      SparseAttentionOp(ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16, Provider::kCpu),
#ifdef TFSA_WITH_CUDA  // the CUDA library: the same op for CUDAExecutionProvider as well
      SparseAttentionOp(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, Provider::kCuda),
      SparseAttentionOp(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, Provider::kCuda),
      SparseAttentionOp(ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16, Provider::kCuda),
#endif
  };
  // SparseGroupQueryAttention: float32 and float16, on the CPU (and CUDA in the CUDA library).
  static tfsa::GqaOp gqa_ops[] = {
      tfsa::GqaOp(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, Provider::kCpu),
      tfsa::GqaOp(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, Provider::kCpu),
#ifdef TFSA_WITH_CUDA
      tfsa::GqaOp(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, Provider::kCuda),
      tfsa::GqaOp(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, Provider::kCuda),
#endif
  };
  OrtCustomOpDomain* domain = nullptr;
  if (OrtStatus* status = api->CreateCustomOpDomain(tfsa::kDomain, &domain)) return status;
  for (tfsa::SparseAttentionOp& op : ops)
    if (OrtStatus* status = api->CustomOpDomain_Add(domain, &op)) return status;
  for (tfsa::GqaOp& op : gqa_ops)
    if (OrtStatus* status = api->CustomOpDomain_Add(domain, &op)) return status;
  // ORT keeps using the domain for the sessions' lifetime; it is intentionally never released.
  return api->AddCustomOpDomain(options, domain);
}
