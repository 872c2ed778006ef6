// The sparse attention engine behind both op faces: SparseAttention's C entry point (entry.cu)
// runs it on contiguous query/key/value, SparseGroupQueryAttention's (gqa.cu) on views of the
// present cache, with the positions GroupQueryAttention gives its rows.
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "entry.h"

namespace tfsa::cuda {

// How the keys and values of a call are laid out and where its queries sit. The defaults are
// SparseAttention's: contiguous [B, Hkv, kv_len, D], query i at key position i + kv_len - q_len.
struct KvView {
  int64_t kv_rows = 0;      // rows between one kv head and the next; 0: kv_len
  bool positioned = false;  // the next three replace the grid's (the attributes' window is unused)
  int64_t offset = 0;       // query i sits at key position i + offset
  int64_t global_query_offset = 0;  // added to a query's index before the global-token rule
  int64_t window = -1;      // query i sees no key before i + offset - window; -1: none
};

// Empty when the call is usable, else what is wrong with it.
std::string CheckCall(const TfsaCudaArgs& c);
// Device workspace the call needs, in bytes; the call must pass CheckCall.
size_t WorkspaceBytes(const TfsaCudaArgs& c);
// Enqueues the selection and the attention on `stream`; "" or what failed.
std::string RunEngine(const TfsaCudaArgs& c, const KvView& view, cudaStream_t stream);

}  // namespace tfsa::cuda
