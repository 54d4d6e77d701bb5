// The real model the llama2c tests run on (../shared/models/stories260K), and how they skip without it.
#pragma once

#include "catch.hpp"

#include "llama2c/engine/engine.hpp"
#include "llama2c/tools/tokens.hpp"

#include <Eigen/Core>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

/// A temporary file, removed at the end of the test, whose name ends in `name` (a random prefix keeps
/// concurrent test runs apart).
struct TemporaryFile {
  std::string path;
  explicit TemporaryFile(const std::string& name)
      : path((std::filesystem::temp_directory_path() /
              ("toptheta_test_" + std::to_string(std::random_device{}()) + "_" + name))
                 .string()) {}
  TemporaryFile(const TemporaryFile&) = delete;
  TemporaryFile& operator=(const TemporaryFile&) = delete;
  ~TemporaryFile() { std::remove(path.c_str()); }
  void write(const std::vector<char>& bytes) const {
    std::ofstream out(path, std::ios::binary);
    out.write(bytes.data(), std::streamsize(bytes.size()));
  }
};

/// ../shared/models/stories260K, or "" when the build did not say where ../shared is.
inline std::string model_directory() {
#ifdef TOPTHETA_SHARED_DIR
  return std::string(TOPTHETA_SHARED_DIR) + "/models/stories260K";
#else
  return "";
#endif
}

inline bool model_present() {
  const std::string directory = model_directory();
  return !directory.empty() && std::filesystem::exists(directory + "/stories260K.bin") &&
         std::filesystem::exists(directory + "/reference-logits.json") &&
         std::filesystem::exists(directory + "/calib.tokens") && std::filesystem::exists(directory + "/eval.tokens");
}

#define LLAMA2C_REQUIRE_MODEL()                                                             \
  if (!model_present())                                                                     \
  TOPTHETA_SKIP("llama2c model test skipped: " +                                            \
                (model_directory().empty() ? std::string("TOPTHETA_SHARED_DIR not defined") \
                                           : model_directory() + "/stories260K.bin") +      \
                " not found (the shared models directory is absent, e.g. in a fresh clone)")

inline const llama2c::Model& stories260k() {
  static const llama2c::Model model = llama2c::load_model(model_directory() + "/stories260K.bin");
  return model;
}

/// The sequences of `name` (calib.tokens, eval.tokens) in the model directory.
inline std::vector<std::vector<int>> model_tokens(const std::string& name) {
  return llama2c::read_token_file(model_directory() + "/" + name, stories260k().config.vocab_size);
}

inline std::vector<int> first_eval_line() { return model_tokens("eval.tokens").at(0); }

/// Engines in these tests use one thread for attention (`one_thread`) and for Eigen's products
/// (`SerialEigen`, restored at the end of a test): the work per call is tiny, and OpenMP workers spinning on
/// a loaded machine (ctest -j) made the prefill-equals-decode test take 30 s instead of 2 s.
struct SerialEigen {
  int previous = Eigen::nbThreads();
  SerialEigen() { Eigen::setNbThreads(1); }
  ~SerialEigen() { Eigen::setNbThreads(previous); }
  SerialEigen(const SerialEigen&) = delete;
  SerialEigen& operator=(const SerialEigen&) = delete;
};

inline llama2c::EngineOptions one_thread() {
  llama2c::EngineOptions options;
  options.threads = 1;
  return options;
}
