// Block kernels for avx512 (16 floats a vector); flags in CMakeLists.txt.
#define TFSA_LANES 16
#define TFSA_ROWS 8
#include "block_math_impl.inc"

namespace tfsa::cpu {
const BlockMath& BlockMathAvx512() {
  static const BlockMath math{"avx512", 2 * TFSA_LANES, Scores, SoftmaxStep, Accumulate, RowScores, Axpy};
  return math;
}
}  // namespace tfsa::cpu
