// A plain ONNX Runtime C++ application that runs a tfsa-optimized model: the only
// tfsa-specific line is RegisterCustomOpsLibrary. Inputs are filled with a fixed pattern
// from the sizes given on the command line; the outputs' sums are printed.
//
//   run_model MODEL.onnx LIBRARY.so DIM[,DIM...] [DIM[,DIM...] ...]   (one shape per input)
#include <cmath>
#include <cstdio>
#include <sstream>
#include <string>
#include <vector>

#include "onnxruntime_cxx_api.h"

static std::vector<int64_t> ParseShape(const std::string& text) {
  std::vector<int64_t> shape;
  std::stringstream in(text);
  for (std::string item; std::getline(in, item, ',');) shape.push_back(std::stoll(item));
  return shape;
}

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: %s MODEL.onnx LIBRARY.so SHAPE [SHAPE ...]\n", argv[0]);
    return 2;
  }
  try {
    Ort::Env env(ORT_LOGGING_LEVEL_WARNING, "tfsa-sample");
    Ort::SessionOptions options;
    options.SetIntraOpNumThreads(2);
    options.RegisterCustomOpsLibrary(argv[2]);  // the tfsa-onnx operator library
    Ort::Session session(env, argv[1], options);

    Ort::AllocatorWithDefaultOptions allocator;
    Ort::MemoryInfo memory = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
    const size_t n_inputs = session.GetInputCount();
    if (static_cast<size_t>(argc - 3) != n_inputs) {
      std::fprintf(stderr, "the model has %zu inputs; give one shape each\n", n_inputs);
      return 2;
    }
    std::vector<std::string> input_names, output_names;
    std::vector<std::vector<float>> buffers(n_inputs);
    std::vector<Ort::Value> inputs;
    for (size_t i = 0; i < n_inputs; ++i) {
      input_names.push_back(session.GetInputNameAllocated(i, allocator).get());
      const std::vector<int64_t> shape = ParseShape(argv[3 + i]);
      size_t count = 1;
      for (int64_t d : shape) count *= static_cast<size_t>(d);
      buffers[i].resize(count);
      for (size_t j = 0; j < count; ++j) buffers[i][j] = std::sin(0.1f * static_cast<float>(j) + static_cast<float>(i));
      inputs.push_back(Ort::Value::CreateTensor<float>(memory, buffers[i].data(), count, shape.data(), shape.size()));
    }
    for (size_t i = 0; i < session.GetOutputCount(); ++i)
      output_names.push_back(session.GetOutputNameAllocated(i, allocator).get());

    std::vector<const char*> in_ptrs, out_ptrs;
    for (auto& n : input_names) in_ptrs.push_back(n.c_str());
    for (auto& n : output_names) out_ptrs.push_back(n.c_str());
    auto outputs = session.Run(Ort::RunOptions{nullptr}, in_ptrs.data(), inputs.data(), inputs.size(),
                               out_ptrs.data(), out_ptrs.size());
    for (size_t i = 0; i < outputs.size(); ++i) {
      const auto info = outputs[i].GetTensorTypeAndShapeInfo();
      const float* data = outputs[i].GetTensorData<float>();
      double sum = 0.0;
      for (size_t j = 0; j < info.GetElementCount(); ++j) sum += data[j];
      std::printf("%s %zu %.6f\n", output_names[i].c_str(), info.GetElementCount(), sum);
    }
  } catch (const Ort::Exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
