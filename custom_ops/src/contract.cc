// tfsa_attribute_info: the attribute table of contract.h as data, for the Python mirror's test.
#include "tfsa/contract.h"

extern "C" __attribute__((visibility("default"))) int32_t tfsa_attribute_info(int32_t index, TfsaAttributeInfo* info) {
  constexpr int32_t count = sizeof(tfsa::kAttributeRules) / sizeof(tfsa::kAttributeRules[0]);
  if (info != nullptr && index >= 0 && index < count) {
    const tfsa::AttributeRule& r = tfsa::kAttributeRules[index];
    *info = TfsaAttributeInfo{r.name, r.is_float, r.low_open, r.offset, r.GetAsDouble(tfsa::Attributes{}), r.low, r.high};
  }
  return count;
}
