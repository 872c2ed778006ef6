// Element conversions between the op's tensor types and the float32 the CPU kernel computes in.
#pragma once

#include "tfsa/ort_api.h"

namespace tfsa::cpu {

inline float ToFloat(float x) { return x; }
inline float ToFloat(Ort::Float16_t x) { return x.ToFloat(); }
inline float ToFloat(Ort::BFloat16_t x) { return x.ToFloat(); }

}  // namespace tfsa::cpu
