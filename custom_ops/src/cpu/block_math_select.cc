#include <cstdlib>
#include <cstring>

#include "block_math.h"

namespace tfsa::cpu {

const BlockMath& SelectBlockMath() {
  static const BlockMath& chosen = [] () -> const BlockMath& {
    const char* forced = std::getenv("TFSA_ISA");
    if (forced && std::strcmp(forced, "wide") == 0) return BlockMathWide();
    // avx512, and avx512-fp32 / avx512bf16, which choose the bf16 kernels (bf16_select.cc)
    const bool allow_avx512 = !forced || std::strncmp(forced, "avx512", 6) == 0;
    const bool allow_avx2 = allow_avx512 || std::strcmp(forced, "avx2") == 0;
#if defined(TFSA_X86_KERNELS)
    __builtin_cpu_init();
    if (allow_avx512 && __builtin_cpu_supports("avx512f")) return BlockMathAvx512();
    if (allow_avx2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return BlockMathAvx2();
#else
    (void)allow_avx2;
#endif
    return BlockMathGeneric();
  }();
  return chosen;
}

}  // namespace tfsa::cpu
