// The kernels called from C++ on arrays read from files: what the Python module's calls must equal bit for bit
// (tests/python/test_toptheta.py runs it). Reads DIR/shape.txt ("n_q n_kv q_heads kv_heads head_dim past
// parameter") and DIR/q.f32, k.f32, v.f32 (float32, little-endian, [tokens, heads, head_dim]); writes DIR/out.f32.
//   toptheta_kernel_reference dense|top_theta|top_k DIR
// top_theta: probability thresholds θ = parameter for every head (k = 16), V-mean compensation; top_k: k =
// parameter, V-mean compensation. One thread.
#include <toptheta/toptheta.hpp>

#include <cstdio>
#include <fstream>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

using namespace toptheta;

namespace {

std::vector<float> read_floats(const std::string& path, Index count) {
  std::ifstream file(path, std::ios::binary);
  std::vector<float> values(static_cast<std::size_t>(count));
  file.read(reinterpret_cast<char*>(values.data()), std::streamsize(values.size() * sizeof(float)));
  if (!file || file.peek() != std::ifstream::traits_type::eof())
    throw invalid_argument("toptheta: " + path + ": expected " + std::to_string(count) + " float32 values");
  return values;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    if (argc != 3) throw invalid_argument("usage: toptheta_kernel_reference dense|top_theta|top_k DIR");
    const std::string kind = argv[1], dir = argv[2];
    Index n_q = 0, n_kv = 0, q_heads = 0, kv_heads = 0, d = 0, past = 0;
    double parameter = 0;
    std::ifstream shape(dir + "/shape.txt");
    if (!(shape >> n_q >> n_kv >> q_heads >> kv_heads >> d >> past >> parameter))
      throw invalid_argument("toptheta: " + dir +
                             "/shape.txt: expected n_q n_kv q_heads kv_heads head_dim past parameter");
    const std::vector<float> q = read_floats(dir + "/q.f32", n_q * q_heads * d),
                             k = read_floats(dir + "/k.f32", n_kv * kv_heads * d),
                             v = read_floats(dir + "/v.f32", n_kv * kv_heads * d);
    std::vector<float> out(q.size());
    const TensorView<const float> queries(q.data(), n_q, q_heads, d), keys(k.data(), n_kv, kv_heads, d),
        values(v.data(), n_kv, kv_heads, d);
    const TensorView<float> output(out.data(), n_q, q_heads, d);
    const OpenMPExecutor one_thread{1};
    AttentionOptions attention;
    attention.past = past;
    if (kind == "dense") {
      dense_attention(queries, keys, values, output, attention, nullptr, one_thread);
    } else if (kind == "top_theta") {
      const auto table = LayerThresholds::uniform(16, ThresholdSpace::probability,
                                                  std::vector<double>(static_cast<std::size_t>(q_heads), parameter));
      TopThetaOptions options;
      options.attention = attention;
      options.compensation.v_mean = true;
      top_theta_attention(queries, keys, values, output, table, options, nullptr, one_thread);
    } else if (kind == "top_k") {
      TopKOptions options;
      options.attention = attention;
      options.k = Index(parameter);
      options.compensation.v_mean = true;
      top_k_attention(queries, keys, values, output, options, nullptr, one_thread);
    } else {
      throw invalid_argument("toptheta: kind: expected dense, top_theta or top_k, got " + kind);
    }
    std::ofstream file(dir + "/out.f32", std::ios::binary);
    file.write(reinterpret_cast<const char*>(out.data()), std::streamsize(out.size() * sizeof(float)));
    return file ? 0 : 1;
  } catch (const std::exception& error) {
    std::cerr << error.what() << "\n";
    return 2;
  }
}
