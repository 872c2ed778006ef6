// Block kernels for avx2 (8 floats a vector); flags in CMakeLists.txt.
#define TFSA_LANES 8
#define TFSA_ROWS 6
#include "block_math_impl.inc"

namespace tfsa::cpu {
const BlockMath& BlockMathAvx2() {
  static const BlockMath math{"avx2", 2 * TFSA_LANES, Scores, SoftmaxStep, Accumulate, RowScores, Axpy};
  return math;
}
}  // namespace tfsa::cpu
