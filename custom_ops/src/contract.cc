// tfsa_attribute_info, tfsa_gqa_attribute_info: the attribute tables of contract.h as data, for
// the Python mirror's test.
#include <iterator>

#include "tfsa/contract.h"

namespace {

template <class S, size_t N>
int32_t Info(const tfsa::FieldRule<S> (&rules)[N], int32_t index, TfsaAttributeInfo* info) {
  if (info != nullptr && index >= 0 && index < static_cast<int32_t>(N)) {
    const tfsa::FieldRule<S>& r = rules[index];
    *info = TfsaAttributeInfo{r.name, r.is_float, r.low_open, r.offset, r.GetAsDouble(S{}), r.low, r.high, 0};
  }
  return static_cast<int32_t>(N);
}

}  // namespace

// The scalar rows, then the list attributes' (kListAttributeRules; their default: no values).
extern "C" __attribute__((visibility("default"))) int32_t tfsa_attribute_info(int32_t index, TfsaAttributeInfo* info) {
  const int32_t scalars = Info(tfsa::kAttributeRules, index, info);
  constexpr int32_t lists = static_cast<int32_t>(std::size(tfsa::kListAttributeRules));
  if (info != nullptr && index >= scalars && index < scalars + lists) {
    const tfsa::ListRule& r = tfsa::kListAttributeRules[index - scalars];
    *info = TfsaAttributeInfo{r.name, 1, 0, r.offset, 0.0, r.low, r.high, r.max_count};
  }
  return scalars + lists;
}

extern "C" __attribute__((visibility("default"))) int32_t tfsa_gqa_attribute_info(int32_t index,
                                                                                   TfsaAttributeInfo* info) {
  return Info(tfsa::kGqaAttributeRules, index, info);
}
