// tfsa_attribute_info, tfsa_gqa_attribute_info: the attribute tables of contract.h as data, for
// the Python mirror's test.
#include "tfsa/contract.h"

namespace {

template <class S, size_t N>
int32_t Info(const tfsa::FieldRule<S> (&rules)[N], int32_t index, TfsaAttributeInfo* info) {
  if (info != nullptr && index >= 0 && index < static_cast<int32_t>(N)) {
    const tfsa::FieldRule<S>& r = rules[index];
    *info = TfsaAttributeInfo{r.name, r.is_float, r.low_open, r.offset, r.GetAsDouble(S{}), r.low, r.high};
  }
  return static_cast<int32_t>(N);
}

}  // namespace

extern "C" __attribute__((visibility("default"))) int32_t tfsa_attribute_info(int32_t index, TfsaAttributeInfo* info) {
  return Info(tfsa::kAttributeRules, index, info);
}

extern "C" __attribute__((visibility("default"))) int32_t tfsa_gqa_attribute_info(int32_t index,
                                                                                   TfsaAttributeInfo* info) {
  return Info(tfsa::kGqaAttributeRules, index, info);
}
