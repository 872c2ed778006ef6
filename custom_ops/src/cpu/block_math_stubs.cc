// Non-x86 builds have only the generic kernels; the x86 names fall back to them.
#include "block_math.h"

namespace tfsa::cpu {
const BlockMath& BlockMathAvx512() { return BlockMathGeneric(); }
const BlockMath& BlockMathAvx2() { return BlockMathGeneric(); }
}  // namespace tfsa::cpu
