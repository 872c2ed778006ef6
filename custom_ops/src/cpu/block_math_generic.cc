// Block kernels for generic (4 floats a vector); flags in CMakeLists.txt.
#define TFSA_LANES 4
#define TFSA_ROWS 6
#include "block_math_impl.inc"

namespace tfsa::cpu {
const BlockMath& BlockMathGeneric() {
  static const BlockMath math{"generic", 2 * TFSA_LANES, Scores, SoftmaxStep, Accumulate, RowScores, Axpy};
  return math;
}
}  // namespace tfsa::cpu
