// The AVX-512 kernels' shape (16-float vectors, 8-row tiles) compiled for any CPU: the
// compiler splits each vector into what the machine has. Slow; it exists so that machines
// without AVX-512 can test the 16-lane code path (TFSA_ISA=wide).
#define TFSA_LANES 16
#define TFSA_ROWS 8
#include "block_math_impl.inc"

namespace tfsa::cpu {
const BlockMath& BlockMathWide() {
  static const BlockMath math{"wide", 2 * TFSA_LANES, Scores, SoftmaxStep, Accumulate, RowScores, Axpy};
  return math;
}
}  // namespace tfsa::cpu
