// Emulation of the asynchronous copy primitives. A copy may land any time between its issue
// and the wait that covers it; the emulation takes one of the two extremes, chosen by
// TFSA_EMULATION_COPIES at each launch:
//   late (default)  at the wait: a kernel that reads a stage before waiting for it reads stale
//                   shared memory;
//   early           at the issue: a kernel that refills a stage while other warps still read it
//                   overwrites their data.
// Either way the race shows up as a wrong result.
#pragma once

#include <cstddef>
#include <cstdlib>
#include <cstring>

#include "cuda_emulation.h"

namespace tfsa_emu {
inline void Copy(const Pipeline::Copy& copy) {
  std::memcpy(copy.dst, copy.src, copy.bytes);
  std::memset(static_cast<char*>(copy.dst) + copy.bytes, 0, copy.zero_fill);
}
inline bool EarlyCopies() {
  const char* mode = std::getenv("TFSA_EMULATION_COPIES");
  return mode != nullptr && std::strcmp(mode, "early") == 0;
}
}  // namespace tfsa_emu

inline void __pipeline_memcpy_async(void* dst, const void* src, size_t size, size_t zero_fill = 0) {
  const tfsa_emu::Pipeline::Copy copy{dst, src, size - zero_fill, zero_fill};
  if (tfsa_emu::EarlyCopies()) tfsa_emu::Copy(copy);
  else tfsa_emu::block->pipelines[tfsa_emu::ThreadIndex()].open.push_back(copy);
}

inline void __pipeline_commit() {
  tfsa_emu::Pipeline& pipeline = tfsa_emu::block->pipelines[tfsa_emu::ThreadIndex()];
  pipeline.committed.push_back(std::move(pipeline.open));
  pipeline.open.clear();
}

inline void __pipeline_wait_prior(size_t prior) {
  tfsa_emu::Pipeline& pipeline = tfsa_emu::block->pipelines[tfsa_emu::ThreadIndex()];
  while (pipeline.committed.size() > prior) {
    for (const tfsa_emu::Pipeline::Copy& copy : pipeline.committed.front()) tfsa_emu::Copy(copy);
    pipeline.committed.pop_front();
  }
}
