// Every source includes the ONNX Runtime C++ API through this header: the library asks the
// runtime for API version kMinOrtApiVersion (not the headers' newest) so that older
// onnxruntime releases load it too.
#pragma once

#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

namespace tfsa {
// 17 = onnxruntime 1.17: KernelContext_ParallelFor (ORT's intra-op thread pool).
inline constexpr uint32_t kMinOrtApiVersion = 17;
}  // namespace tfsa
