// The few-rows path of the CPU kernel: dense attention of a handful of query rows (a decode
// step over a KV cache) straight from the unpacked key/value rows. The tile walk would first
// pack every key and value of the call into blocks, which for one row costs as much as the
// attention itself. Exact over each row's visible keys (causality and the window).
#pragma once

#include <cstdint>

#include "attention_cpu.h"

namespace tfsa::cpu {

constexpr int64_t kExactRowsMax = 4;  // query rows per call up to which the path is taken

// Whether a call takes the path: few rows, dense (no estimate), no mask or bias, computing.
bool UsesExactRows(const Problem& p);

// Runs the call; its density is 1 (every allowed block computed).
void RunExactRows(const Problem& p, const Tensors& t, const ParallelFor& parallel_for);

}  // namespace tfsa::cpu
