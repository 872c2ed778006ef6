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

/* The arguments of one tfsa_cuda_group_query_attention (SparseGroupQueryAttention's CUDA face):
 * the sizes of gqa_layout.h's GqaLayout, the attributes, seqlens_k in host memory (the op reads
 * it on the CPU) and device pointers in GroupQueryAttention's layouts. tfsa_onnx/cuda.py
 * mirrors it (GqaArgs). */
typedef struct TfsaCudaGqaArgs {
  int32_t dtype; /* TFSA_FLOAT32 or TFSA_FLOAT16 */
  int32_t packed, interleaved, first_prompt, shared_buffer;
  int64_t batch, seq, q_heads, kv_heads, head_dim, past_rows, present_rows, rotary_half;
  int64_t rotary_positions;  /* rows of cos/sin */
  int64_t local_window_size; /* -1: none */
  TfsaAttributes attributes; /* the sparsity attributes; is_causal, sliding_window and window_ahead unused */
  const int32_t* seqlens_k;  /* [batch], host memory */
  const void* query;         /* [B, S, Hq * D], or packed [B, S, (Hq + 2 Hkv) * D] */
  const void* key;           /* [B, S, Hkv * D] or NULL (packed) */
  const void* value;
  const void* past_key;      /* [B, Hkv, past_rows, D] or NULL */
  const void* past_value;
  const void* cos;           /* [rotary_positions, rotary_half] or NULL */
  const void* sin;
  void* present_key;         /* [B, Hkv, present_rows, D]; may be past_key (shared_buffer) */
  void* present_value;
  void* output;              /* [B, S, Hq * D] */
  float* density;            /* [B, Hq] or NULL: each row's own rows, as SparseAttention's */
  void* workspace;           /* device memory of at least tfsa_cuda_gqa_workspace_bytes(args) */
  size_t workspace_size;
} TfsaCudaGqaArgs;

/* Device workspace a call needs, in bytes (0 when its sizes or attributes are invalid). */
size_t tfsa_cuda_gqa_workspace_bytes(const TfsaCudaGqaArgs* args);

/* Enqueues rotary, the present write and the attention of each batch row on `stream`.
 * Returns 0, or non-zero with a message in `error`. */
int tfsa_cuda_group_query_attention(const TfsaCudaGqaArgs* args, void* stream, char* error, size_t error_size);

#ifdef __cplusplus
}
#endif
