/* The CUDA kernels' C entry point. The ONNX Runtime op (cuda_op.cc) calls it with ORT's
 * tensors and stream; tests and benchmarks call it through ctypes with torch or CuPy
 * buffers, so the kernels can be checked on a GPU machine without onnxruntime-gpu.
 * Plain C: tfsa_onnx/cuda.py mirrors TfsaCudaArgs (CudaArgs, with TfsaDims and
 * TfsaAttributes of tfsa/contract.h as Dims and the fields of SparseAttentionAttributes). */
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "tfsa/contract.h"

#ifdef __cplusplus
extern "C" {
#endif

enum TfsaDType { TFSA_FLOAT32 = 0, TFSA_FLOAT16 = 1, TFSA_BFLOAT16 = 2 };
/* TFSA_MASK_T: the mask has the element type of query (additive). */
enum TfsaMaskKind { TFSA_MASK_NONE = 0, TFSA_MASK_BOOL = 1, TFSA_MASK_T = 2 };

/* The arguments of one tfsa_cuda_sparse_attention. */
typedef struct TfsaCudaArgs {
  int32_t dtype;             /* TfsaDType of query, key, value and output */
  int32_t mask_kind;         /* TfsaMaskKind */
  int32_t bias_dtype;        /* TfsaDType of the bias (float32 or dtype), when bias is not NULL */
  TfsaDims dims;             /* of query, key and value (contiguous) and the mask's strides */
  TfsaAttributes attributes; /* the node's, as given (scale 0 means 1/sqrt(D)) */
  int32_t selection_only;    /* profiling: choose blocks, write zeros */
  const void* query;
  const void* key;
  const void* value;
  const void* mask;      /* NULL when mask_kind is TFSA_MASK_NONE */
  const void* bias;      /* attn_bias, strides dims.bias_stride, or NULL */
  void* output;          /* [B, Hq, Sq, Dv] */
  float* density;        /* [B, Hq] or NULL */
  uint8_t* selected;     /* [B, Hq, nQ, nK] chosen blocks (1/0) or NULL: for tests */
  void* workspace;       /* device memory of at least tfsa_cuda_workspace_bytes(args) bytes */
  size_t workspace_size; /* its size in bytes */
} TfsaCudaArgs;

/* Device workspace a call needs, in bytes (0 when its sizes or attributes are invalid);
 * it depends on neither pointers nor workspace_size. */
size_t tfsa_cuda_workspace_bytes(const TfsaCudaArgs* args);

/* Enqueues the call on `stream` (a cudaStream_t; NULL: the default stream) without
 * synchronising. Returns 0, or non-zero with a message in `error` (bad sizes or
 * attributes, a launch failure). */
int tfsa_cuda_sparse_attention(const TfsaCudaArgs* args, void* stream, char* error, size_t error_size);

#ifdef __cplusplus
}
#endif
