#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "bf16_math.h"
#include "block_math.h"

namespace tfsa::cpu {
namespace {

// The bf16 kernels, or null with the reason in `why`.
const Bf16Math* Available(const char** why) {
  const char* forced = std::getenv("TFSA_ISA");
  if (forced && std::strcmp(forced, "avx512-fp32") == 0) {
    *why = "TFSA_ISA=avx512-fp32";
    return nullptr;
  }
  if (std::strcmp(SelectBlockMath().isa, "avx512") != 0) {
    *why = "the float32 kernels are not the AVX-512 ones (CPU or TFSA_ISA)";
    return nullptr;
  }
#if defined(TFSA_X86_KERNELS)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512bf16")) return &Bf16MathAvx512();
#endif
  *why = "this CPU has no AVX512_BF16";
  return nullptr;
}

// Whether AMX tiles may run: the CPU has them and Linux grants this process their state
// (arch_prctl ARCH_REQ_XCOMP_PERM, Linux 5.16 and later).
bool AmxAllowed() {
  const char* forced = std::getenv("TFSA_ISA");
  if (forced && std::strcmp(forced, "avx512bf16") == 0) return false;
#if defined(TFSA_X86_KERNELS) && defined(__linux__)
  if (!__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-bf16")) return false;
  constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
#else
  return false;
#endif
}

}  // namespace

const Bf16Math* SelectBf16Math(int64_t head_dim) {
  static const char* why = "";
  static const Bf16Math* chosen = Available(&why);
  static const bool amx = chosen != nullptr && AmxAllowed();
  static std::once_flag said;
  if (chosen == nullptr)
    std::call_once(said, [] {
      std::fprintf(stderr, "tfsa-onnx: compute_precision=bf16 computes in float32 here: %s\n", why);
    });
#if defined(TFSA_X86_KERNELS)
  if (amx && head_dim % 32 == 0) return &Bf16MathAmx();
#else
  (void)head_dim;
#endif
  return chosen;
}

bool EstimateOnAmx(int64_t head_dim) {
  static const bool amx = [] {
    const char* why = "";
    return Available(&why) != nullptr && AmxAllowed();
  }();
  return amx && head_dim % 32 == 0;
}

}  // namespace tfsa::cpu

// How compute_precision = bf16 computes in this process at head dims that are multiples of 32,
// for tools and tests: 2 AMX tiles, 1 AVX512_BF16 only, 0 float32 (the fallback).
extern "C" __attribute__((visibility("default"))) int32_t tfsa_cpu_bf16() {
  const tfsa::cpu::Bf16Math* math = tfsa::cpu::SelectBf16Math(64);
  if (math == nullptr) return 0;
  return std::strcmp(math->isa, "amx") == 0 ? 2 : 1;
}
