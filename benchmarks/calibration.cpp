// Calibration cost against the cost of computing the scores it observes: `calibrate/<method>/<space>/L:4096`.
//
// Each iteration scores 256 query rows of every head of a synthetic layer against 4096 keys (one Eigen float
// GEMM per head) and hands the rows to a `Calibrator`. Both parts run on the calling thread and are timed
// separately in that thread's CPU time (so other load on a shared machine does not tilt the ratio):
// `calib/score` is the ratio of calibration time to scoring time measured in the same run.
#include "suite.hpp"

#include <toptheta/calibrator.hpp>
#include <toptheta/synthetic_attention.hpp>

#include <Eigen/Core>

#include <cmath>
#include <ctime>
#include <string>

namespace toptheta::bench {
namespace {

constexpr Index calibration_length = 4096, rows_per_head = 256;

/// The synthetic layer calibration observes (LayerShape's head_dim; 8 query heads over 2 KV heads).
const SyntheticAttention<float>& calibration_layer() {
  static const SyntheticAttention<float> layer = [] {
    SyntheticAttentionOptions options;
    options.tokens = calibration_length;
    options.q_heads = 8;
    options.kv_heads = 2;
    options.head_dim = LayerShape::head_dim;
    options.seed = 3;
    return SyntheticAttention<float>(options);
  }();
  return layer;
}

void calibrate_case(benchmark::State& state, CalibrationMethod method, ThresholdSpace space) {
  using Matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const SyntheticAttention<float>& layer = calibration_layer();
  const Index heads = layer.shape.q_heads, group = heads / layer.shape.kv_heads, d = layer.shape.head_dim;
  const float scale = 1.0f / std::sqrt(float(d));
  std::vector<Matrix> queries, keys;
  for (Index h = 0; h < heads; ++h)
    queries.push_back(layer.queries().head(h).bottomRows(rows_per_head).template cast<float>());
  for (Index kv = 0; kv < layer.shape.kv_heads; ++kv) keys.push_back(layer.keys().head(kv).template cast<float>());
  std::vector<double> query_norms(static_cast<std::size_t>(rows_per_head));

  CalibratorOptions options;
  options.shape = {1, heads, layer.shape.kv_heads, d};
  options.space = space;
  options.k = {kept_per_row};
  options.count_summary = method == CalibrationMethod::count_matched;
  Calibrator calibrator(options);
  Matrix scores(rows_per_head, calibration_length);

  const auto thread_seconds = [] {
    timespec now{};
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &now);
    return double(now.tv_sec) + 1e-9 * double(now.tv_nsec);
  };
  double scoring = 0, calibrating = 0;
  for (auto _ : state) {
    for (Index h = 0; h < heads; ++h) {
      const double start = thread_seconds();
      scores.noalias() = scale * (queries[std::size_t(h)] * keys[std::size_t(h / group)].transpose());
      for (Index r = 0; r < rows_per_head; ++r) query_norms[std::size_t(r)] = queries[std::size_t(h)].row(r).norm();
      benchmark::ClobberMemory();
      const double scored = thread_seconds();
      calibrator.observe_rows(0, h, scores, {}, query_norms);
      const double done = thread_seconds();
      scoring += scored - start;
      calibrating += done - scored;
    }
  }
  TableOptions table_options;
  table_options.method = method;
  benchmark::DoNotOptimize(calibrator.table(table_options));
  const double rows = double(state.iterations()) * double(heads * rows_per_head);
  state.counters["rows"] = rows;
  state.counters["score_ns/row"] = 1e9 * scoring / rows;
  state.counters["calib_ns/row"] = 1e9 * calibrating / rows;
  state.counters["calib/score"] = calibrating / scoring;
  state.counters["threads"] = 1;
}

}  // namespace

void register_calibration_benchmarks() {
  for (const auto method : {CalibrationMethod::mean_of_thresholds, CalibrationMethod::count_matched})
    for (const auto space : {ThresholdSpace::raw_score, ThresholdSpace::probability, ThresholdSpace::score_minus_max,
                             ThresholdSpace::score_over_query_norm}) {
      const std::string name = std::string("calibrate/") + to_string(method) + "/" + to_string(space) +
                               "/L:" + std::to_string(calibration_length);
      const bool quick = space == ThresholdSpace::raw_score || space == ThresholdSpace::probability;
      register_case(name, quick, [=](benchmark::State& state) { calibrate_case(state, method, space); });
    }
}

}  // namespace toptheta::bench
