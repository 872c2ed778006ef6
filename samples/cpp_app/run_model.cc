// A plain ONNX Runtime C++ application that runs a tfsa-optimized model: the only
// tfsa-specific line is RegisterCustomOpsLibrary.
//
//   run_model [--vocab N] [--dump DIR] MODEL.onnx LIBRARY.so DIM[,DIM...] [DIM[,DIM...] ...]
//
// One shape per model input, in the model's order. The inputs are filled with a fixed pattern
// (j: element index, i: input index), so that another runtime can rebuild them:
//   float                  sin(0.1 j + i)
//   int64 input_ids        (7 j + 1) mod N       token ids below --vocab N (default 1000)
//   int64 attention_mask   1                     no padding
//   other int64            0                     e.g. token_type_ids
// For every float output it prints "NAME COUNT SUM"; --dump DIR also writes the output to
// DIR/NAME.f32 (raw float32, row-major; '/' and ':' in NAME become '_').
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "onnxruntime_cxx_api.h"

namespace {

struct Args {
  long long vocab = 1000;
  std::string dump_dir;
  std::string model, library;
  std::vector<std::string> shapes;
};

bool ParseArgs(int argc, char** argv, Args& args) {
  std::vector<std::string> positional;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if ((arg == "--vocab" || arg == "--dump") && i + 1 < argc) {
      if (arg == "--vocab") args.vocab = std::atoll(argv[++i]);
      else args.dump_dir = argv[++i];
    } else {
      positional.push_back(arg);
    }
  }
  if (positional.size() < 3 || args.vocab <= 0) return false;
  args.model = positional[0];
  args.library = positional[1];
  args.shapes.assign(positional.begin() + 2, positional.end());
  return true;
}

std::vector<int64_t> ParseShape(const std::string& text) {
  std::vector<int64_t> shape;
  std::stringstream in(text);
  for (std::string item; std::getline(in, item, ',');) shape.push_back(std::stoll(item));
  return shape;
}

// Owns an input's data: Ort::Value::CreateTensor only borrows the buffer.
struct Input {
  std::string name;
  std::vector<int64_t> shape;
  std::vector<float> floats;
  std::vector<int64_t> ints;
};

Ort::Value FillInput(Input& input, ONNXTensorElementDataType type, size_t index, long long vocab,
                     const Ort::MemoryInfo& memory) {
  size_t count = 1;
  for (int64_t d : input.shape) count *= static_cast<size_t>(d);
  const int64_t* dims = input.shape.data();
  if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
    input.floats.resize(count);
    for (size_t j = 0; j < count; ++j)
      input.floats[j] = std::sin(0.1f * static_cast<float>(j) + static_cast<float>(index));
    return Ort::Value::CreateTensor<float>(memory, input.floats.data(), count, dims, input.shape.size());
  }
  if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64) {
    input.ints.assign(count, input.name == "attention_mask" ? 1 : 0);
    if (input.name == "input_ids")
      for (size_t j = 0; j < count; ++j) input.ints[j] = static_cast<int64_t>((7 * j + 1) % vocab);
    return Ort::Value::CreateTensor<int64_t>(memory, input.ints.data(), count, dims, input.shape.size());
  }
  throw std::runtime_error("input " + input.name + ": this sample fills float and int64 inputs only");
}

std::string FileName(std::string name) {
  for (char& c : name)
    if (c == '/' || c == ':') c = '_';
  return name + ".f32";
}

void Report(const std::string& name, const Ort::Value& output, const std::string& dump_dir) {
  const auto info = output.GetTensorTypeAndShapeInfo();
  if (info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
    std::printf("%s (not float32, not shown)\n", name.c_str());
    return;
  }
  const float* data = output.GetTensorData<float>();
  const size_t count = info.GetElementCount();
  double sum = 0.0;
  for (size_t j = 0; j < count; ++j) sum += data[j];
  std::printf("%s %zu %.6f\n", name.c_str(), count, sum);
  if (dump_dir.empty()) return;
  std::ofstream file(dump_dir + "/" + FileName(name), std::ios::binary);
  file.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(count * sizeof(float)));
  if (!file) throw std::runtime_error("cannot write " + dump_dir + "/" + FileName(name));
}

int Run(const Args& args) {
  Ort::Env env(ORT_LOGGING_LEVEL_WARNING, "tfsa-cpp-app");
  Ort::SessionOptions options;
  options.SetIntraOpNumThreads(2);
  options.RegisterCustomOpsLibrary(args.library.c_str());  // the tfsa-onnx operator library
  Ort::Session session(env, args.model.c_str(), options);

  const size_t n_inputs = session.GetInputCount();
  if (args.shapes.size() != n_inputs) {
    std::fprintf(stderr, "error: the model has %zu inputs; give one shape each\n", n_inputs);
    return 2;
  }
  Ort::AllocatorWithDefaultOptions allocator;
  const Ort::MemoryInfo memory = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  std::vector<Input> inputs(n_inputs);
  std::vector<Ort::Value> values;
  for (size_t i = 0; i < n_inputs; ++i) {
    inputs[i].name = session.GetInputNameAllocated(i, allocator).get();
    inputs[i].shape = ParseShape(args.shapes[i]);
    const auto type = session.GetInputTypeInfo(i).GetTensorTypeAndShapeInfo().GetElementType();
    values.push_back(FillInput(inputs[i], type, i, args.vocab, memory));
  }
  std::vector<std::string> output_names;
  for (size_t i = 0; i < session.GetOutputCount(); ++i)
    output_names.push_back(session.GetOutputNameAllocated(i, allocator).get());

  std::vector<const char*> in_ptrs, out_ptrs;
  for (const auto& input : inputs) in_ptrs.push_back(input.name.c_str());
  for (const auto& name : output_names) out_ptrs.push_back(name.c_str());
  auto outputs = session.Run(Ort::RunOptions{nullptr}, in_ptrs.data(), values.data(), values.size(),
                             out_ptrs.data(), out_ptrs.size());
  for (size_t i = 0; i < outputs.size(); ++i) Report(output_names[i], outputs[i], args.dump_dir);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Args args;
  if (!ParseArgs(argc, argv, args)) {
    std::fprintf(stderr, "usage: %s [--vocab N] [--dump DIR] MODEL.onnx LIBRARY.so SHAPE [SHAPE ...]\n",
                 argv[0]);
    return 2;
  }
  try {
    return Run(args);
  } catch (const std::exception& e) {  // Ort::Exception included
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
