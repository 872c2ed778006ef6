// What the ONNX Runtime glue of both ops shares: reading attributes strictly, creating a
// kernel and the errors of a Compute, input data, type names.
#pragma once

#include <algorithm>
#include <cstring>
#include <exception>
#include <initializer_list>
#include <new>
#include <string>
#include <type_traits>

#include "tfsa/contract.h"
#include "tfsa/ort_api.h"

namespace tfsa {

// Whether the attribute can be read as float / int64 / string (releases any error status).
inline bool Readable(const OrtApi& api, OrtStatus* status) {
  if (status == nullptr) return true;
  api.ReleaseStatus(status);
  return false;
}

// The attribute's value, the contract's default when absent; an attribute of another type
// (block_size=64.0, threshold=1) is an error in `error`, not silently the default.
template <class V>
V ReadAttribute(const OrtApi& api, const OrtKernelInfo* info, const char* name, V fallback, std::string& error) {
  V value = fallback;
  float as_float = 0.0f;
  int64_t as_int = 0;
  size_t string_size = 0;
  if constexpr (std::is_same_v<V, float>) {
    if (Readable(api, api.KernelInfoGetAttribute_float(info, name, &value))) return value;
  } else {
    if (Readable(api, api.KernelInfoGetAttribute_int64(info, name, &value))) return value;
  }
  const bool other_type = (!std::is_same_v<V, float> && Readable(api, api.KernelInfoGetAttribute_float(info, name, &as_float))) ||
                          (std::is_same_v<V, float> && Readable(api, api.KernelInfoGetAttribute_int64(info, name, &as_int))) ||
                          Readable(api, api.KernelInfoGetAttribute_string(info, name, nullptr, &string_size));
  if (other_type && error.empty())
    error = std::string(name) + " must be a" + (std::is_same_v<V, float> ? " float" : "n integer") + " attribute";
  return fallback;
}

// Reads the attributes of `rules` into `fields` (absent ones keep their defaults), all but
// `skip`; the first wrongly typed one is reported in `error`.
template <class S, size_t N>
void ReadFields(const OrtApi& api, const OrtKernelInfo* info, const FieldRule<S> (&rules)[N], S& fields,
                std::string& error, std::initializer_list<const char*> skip = {}) {
  const S defaults{};
  for (const FieldRule<S>& rule : rules) {  // in the order the checks report errors
    if (std::any_of(skip.begin(), skip.end(), [&](const char* name) { return std::strcmp(rule.name, name) == 0; }))
      continue;
    if (rule.is_float)
      rule.Set(fields, ReadAttribute(api, info, rule.name, rule.template Get<float>(defaults), error));
    else
      rule.Set(fields, ReadAttribute(api, info, rule.name, rule.template Get<int64_t>(defaults), error));
  }
}

// Reads the list attributes (kListAttributeRules) into `fields` (absent ones: no values); a
// list of another type, or longer than its rule allows, is reported in `error`.
inline void ReadLists(const OrtApi& api, const OrtKernelInfo* info, Attributes& fields, std::string& error) {
  for (const ListRule& rule : kListAttributeRules) {
    size_t count = 0, int_count = 0;
    rule.SetCount(fields, 0);
    // ORT reads an INTS attribute as an empty float list (and the other way round)
    const bool ints = Readable(api, api.KernelInfoGetAttributeArray_int64(info, rule.name, nullptr, &int_count)) &&
                      int_count > 0;
    if (!ints && Readable(api, api.KernelInfoGetAttributeArray_float(info, rule.name, nullptr, &count))) {
      if (count > static_cast<size_t>(rule.max_count)) {
        if (error.empty())
          error = std::string(rule.name) + " may hold at most " + std::to_string(rule.max_count) + " values" +
                  rule.note + ", got " + std::to_string(count);
        continue;
      }
      if (count > 0 && !Readable(api, api.KernelInfoGetAttributeArray_float(info, rule.name, rule.Values(fields), &count)))
        continue;
      rule.SetCount(fields, static_cast<int64_t>(count));
      continue;
    }
    float as_float = 0.0f;
    int64_t as_int = 0;
    size_t size = 0;
    const bool other_type = ints || Readable(api, api.KernelInfoGetAttribute_float(info, rule.name, &as_float)) ||
                            Readable(api, api.KernelInfoGetAttribute_int64(info, rule.name, &as_int)) ||
                            Readable(api, api.KernelInfoGetAttribute_string(info, rule.name, nullptr, &size));
    if (other_type && error.empty()) error = std::string(rule.name) + " must be a list of floats (FLOATS attribute)";
  }
}

// Input data through GetTensorMutableData (API 1): the headers' GetTensorRawData() calls
// GetTensorData, which runtimes before 1.23 do not have.
inline const void* InputData(const Ort::ConstValue& value) {
  void* data = nullptr;
  Ort::ThrowOnError(Ort::GetApi().GetTensorMutableData(const_cast<OrtValue*>(static_cast<const OrtValue*>(value)), &data));
  return data;
}

// CreateKernelV2's body: *kernel = make(), or the exception it threw as an ORT status.
template <class Make>
OrtStatusPtr NewKernel(const OrtApi& api, void** kernel, Make make) {
  try {
    *kernel = make();
    return nullptr;
  } catch (const std::exception& e) {
    return api.CreateStatus(ORT_FAIL, e.what());
  }
}

// Inside a Compute's catch (...): the exception being handled as an ORT status that names
// the op (ORT's own errors keep their code).
inline OrtStatusPtr ComputeErrorStatus(const char* op) {
  try {
    throw;
  } catch (const Ort::Exception& e) {
    return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
  } catch (const std::bad_alloc&) {
    return Ort::GetApi().CreateStatus(ORT_FAIL, (std::string(op) + ": out of memory").c_str());
  } catch (const std::exception& e) {
    return Ort::GetApi().CreateStatus(ORT_FAIL, (std::string(op) + ": " + e.what()).c_str());
  } catch (...) {
    return Ort::GetApi().CreateStatus(ORT_FAIL, (std::string(op) + ": unknown error").c_str());
  }
}

inline const char* TypeName(ONNXTensorElementDataType type) {
  switch (type) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return "bfloat16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return "float64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL: return "bool";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    default: return "an unsupported type";
  }
}

}  // namespace tfsa
