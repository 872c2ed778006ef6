// Emulation: IEEE half precision with the CUDA names.
#pragma once

struct __half {
  _Float16 value;
};
inline __half __float2half_rn(float x) { return __half{static_cast<_Float16>(x)}; }
inline float __half2float(__half x) { return static_cast<float>(x.value); }
