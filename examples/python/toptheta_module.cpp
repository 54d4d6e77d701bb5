// The `toptheta` Python module (pybind11, numpy): the attention kernels on `[tokens, heads, head_dim]` arrays,
// the calibrator, threshold files and the kernels' statistics. Errors arrive as ValueError with the library's
// message ("toptheta: <argument>: expected ..., got ...").
#include <toptheta/threshold_io.hpp>
#include <toptheta/toptheta.hpp>

#include <pybind11/eigen.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <chrono>
#include <optional>
#include <string>
#include <vector>

namespace py = pybind11;
using toptheta::Index;

namespace {

std::string shape_text(const py::array& array) {
  std::string text = "(";
  for (py::ssize_t d = 0; d < array.ndim(); ++d) text += (d ? ", " : "") + std::to_string(array.shape(d));
  return text + (array.ndim() == 1 ? ",)" : ")");
}

/// Whether `array`'s strides fit a `TensorView` of T: head_dim values contiguous, the other strides whole
/// non-negative elements.
template <class T>
bool viewable(const py::array& array) {
  const auto element = py::ssize_t(sizeof(T));
  return (array.shape(2) <= 1 || array.strides(2) == element) && array.strides(0) >= 0 && array.strides(1) >= 0 &&
         array.strides(0) % element == 0 && array.strides(1) % element == 0;
}

/// `array` (`[tokens, heads, head_dim]` of T) as a `TensorView` over its own memory when `viewable`; else over a
/// C-contiguous copy kept in `keep`. Throws `toptheta::invalid_argument` naming `name` for another rank or values
/// that are not real numbers.
template <class T>
toptheta::TensorView<const T> input_view(const py::array& array, const char* name, py::array& keep) {
  toptheta::detail::require(array.ndim() == 3, name, "a [tokens, heads, head_dim] array", shape_text(array));
  const char kind = array.dtype().kind();
  toptheta::detail::require(kind == 'f' || kind == 'i' || kind == 'u' || kind == 'b', name, "an array of real numbers",
                            std::string(py::str(array.dtype())));
  const bool in_place = array.dtype().is(py::dtype::of<T>()) && viewable<T>(array);
  keep = in_place ? array : py::array_t<T, py::array::c_style | py::array::forcecast>::ensure(array);
  if (!keep)
    toptheta::detail::fail(name, "an array convertible to " + std::string(py::str(py::dtype::of<T>())),
                           std::string(py::str(array.dtype())));
  return {static_cast<const T*>(keep.data()),
          Index(keep.shape(0)),
          Index(keep.shape(1)),
          Index(keep.shape(2)),
          Index(keep.strides(0) / py::ssize_t(sizeof(T))),
          Index(keep.strides(1) / py::ssize_t(sizeof(T)))};
}

/// The output array: `out` when given (writable, of T, head_dim values contiguous), else a new C-contiguous one
/// of shape `[tokens, heads, head_dim]`.
template <class T>
py::array_t<T> output_array(const std::optional<py::array>& out, Index tokens, Index heads, Index head_dim) {
  if (!out) return py::array_t<T>({tokens, heads, head_dim});
  const py::array& given = *out;
  toptheta::detail::require(given.dtype().is(py::dtype::of<T>()), "out", "an array of the dtype of q",
                            std::string(py::str(given.dtype())));
  toptheta::detail::require(given.ndim() == 3, "out", "a [tokens, heads, head_dim] array", shape_text(given));
  toptheta::detail::require(given.writeable(), "out", "a writable array", "a read-only one");
  toptheta::detail::require(viewable<T>(given), "out", "head_dim values contiguous in memory and non-negative strides",
                            "strides that are not");
  return py::reinterpret_borrow<py::array_t<T>>(given);
}

template <class T>
toptheta::TensorView<T> output_view(py::array_t<T>& out) {
  const auto element = py::ssize_t(sizeof(T));
  return {out.mutable_data(),
          Index(out.shape(0)),
          Index(out.shape(1)),
          Index(out.shape(2)),
          Index(out.strides(0) / element),
          Index(out.strides(1) / element)};
}

toptheta::AttentionOptions attention_options(bool causal, Index past, std::optional<double> scale) {
  toptheta::AttentionOptions options;
  options.causal = causal;
  options.past = past;
  options.scale = scale;
  return options;
}

using PrefixSum = std::optional<py::array_t<double, py::array::c_style | py::array::forcecast>>;

/// The options the sparse kernels share, for K of `k`'s shape; `prefix` (`value_prefix_sum`, `[kv_heads,
/// head_dim]` float64, Σ_{j<past} v_j) is checked against it.
template <class Options>
Options sparse_options(bool causal, Index past, std::optional<double> scale, const toptheta::Compensation& compensation,
                       const PrefixSum& prefix, const py::array& k) {
  Options options;
  options.attention = attention_options(causal, past, scale);
  options.compensation = compensation;
  if (prefix) {
    toptheta::detail::require(k.ndim() == 3, "k", "a [tokens, heads, head_dim] array", shape_text(k));
    toptheta::detail::require(
        prefix->ndim() == 2 && prefix->shape(0) == k.shape(1) && prefix->shape(1) == k.shape(2), "value_prefix_sum",
        "a [kv_heads, head_dim] = (" + std::to_string(k.shape(1)) + ", " + std::to_string(k.shape(2)) + ") array",
        shape_text(*prefix));
    options.value_prefix_sum = prefix->data();
  }
  return options;
}

/// Runs `kernel(q, k, v, out, executor)` on views of the arrays, with q's dtype (float32 or float64) as the
/// stored type, without the GIL; returns `out`.
template <class Kernel>
py::array run_kernel(const py::array& q, const py::array& k, const py::array& v, const std::optional<py::array>& out,
                     int threads, const Kernel& kernel) {
  toptheta::detail::require(threads >= 0 && threads <= 1024, "threads",
                            "a thread count in [0, 1024] (0: OpenMP's default)", threads);
  const auto run = [&](auto tag) -> py::array {
    using T = decltype(tag);
    py::array keep_q, keep_k, keep_v;
    const auto qv = input_view<T>(q, "q", keep_q);
    const auto kv = input_view<T>(k, "k", keep_k);
    const auto vv = input_view<T>(v, "v", keep_v);
    py::array_t<T> result = output_array<T>(out, qv.tokens(), qv.heads(), qv.head_dim());
    const auto ov = output_view(result);
    {
      py::gil_scoped_release release;
      kernel(qv, kv, vv, ov, toptheta::OpenMPExecutor{threads});
    }
    return std::move(result);
  };
  // q's type chooses the stored type (of any byte order; inputs of another type are converted).
  if (q.dtype().kind() == 'f' && q.dtype().itemsize() == 4) return run(float{});
  if (q.dtype().kind() == 'f' && q.dtype().itemsize() == 8) return run(double{});
  toptheta::detail::fail("q", "a float32 or float64 array", std::string(py::str(q.dtype())));
}

toptheta::Compensation compensation_of(const std::string& denominator, double lambda, bool v_mean,
                                       bool v_mean_of_pruned) {
  toptheta::Compensation compensation;
  compensation.denominator = toptheta::denominator_compensation_from_string(denominator, "denominator");
  compensation.lambda = lambda;
  compensation.v_mean = v_mean;
  compensation.v_mean_of_pruned = v_mean_of_pruned;
  return compensation;
}

}  // namespace

PYBIND11_MODULE(toptheta, m) {
  m.doc() = "Top-θ attention: sparse attention by compensated static thresholds (numpy arrays, float32/float64).";
  m.attr("__version__") = std::to_string(TOPTHETA_VERSION_MAJOR) + "." + std::to_string(TOPTHETA_VERSION_MINOR) + "." +
                          std::to_string(TOPTHETA_VERSION_PATCH);

  py::class_<toptheta::AttentionStats>(m, "AttentionStats",
                                       "What a sparse kernel kept and read (design.md §1, Statistics); a call "
                                       "given one overwrites it.")
      .def(py::init<>())
      .def_readonly("elements_kept", &toptheta::AttentionStats::elements_kept, "per query head: Σ_i |S_i|")
      .def_readonly("elements_visible", &toptheta::AttentionStats::elements_visible, "per query head: Σ_i L_i")
      .def_readonly("v_rows_kept", &toptheta::AttentionStats::v_rows_kept,
                    "per KV head: distinct V rows kept by the group's heads and the call's rows")
      .def_readonly("v_rows_visible", &toptheta::AttentionStats::v_rows_visible, "per KV head: max_i L_i")
      .def_readonly("k_rows_read", &toptheta::AttentionStats::k_rows_read)
      .def_readonly("v_rows_read", &toptheta::AttentionStats::v_rows_read)
      .def_readonly("rows", &toptheta::AttentionStats::rows)
      .def_readonly("dense_rows", &toptheta::AttentionStats::dense_rows)
      .def_readonly("empty_rows", &toptheta::AttentionStats::empty_rows)
      .def_readonly("capped_rows", &toptheta::AttentionStats::capped_rows)
      .def_readonly("extrapolated_rows", &toptheta::AttentionStats::extrapolated_rows)
      .def_readonly("non_finite_rows", &toptheta::AttentionStats::non_finite_rows)
      .def("kept_fraction", &toptheta::AttentionStats::kept_fraction)
      .def("v_rows_kept_fraction", &toptheta::AttentionStats::v_rows_kept_fraction);

  py::class_<toptheta::LayerThresholds>(m, "LayerThresholds",
                                        "One layer's thresholds θ_h(L): heads x calibrated lengths, in one space.")
      .def(py::init([](Index k, const std::string& space, std::vector<Index> lengths, Eigen::MatrixXd theta,
                       Eigen::MatrixXd denominator_terms) {
             return toptheta::LayerThresholds(k, toptheta::threshold_space_from_string(space), std::move(lengths),
                                              std::move(theta), std::move(denominator_terms));
           }),
           py::arg("k"), py::arg("space"), py::arg("lengths"), py::arg("theta"),
           py::arg("denominator_terms") = Eigen::MatrixXd())
      .def_static(
          "uniform",
          [](Index k, const std::string& space, const std::vector<double>& theta, const std::vector<double>& terms) {
            return toptheta::LayerThresholds::uniform(k, toptheta::threshold_space_from_string(space), theta, terms);
          },
          py::arg("k"), py::arg("space"), py::arg("theta_per_head"),
          py::arg("denominator_term_per_head") = std::vector<double>{},
          "The same θ_h (and calibrated denominator term c_h) for every row length.")
      .def_property_readonly("k", &toptheta::LayerThresholds::k)
      .def_property_readonly("space", [](const toptheta::LayerThresholds& t) { return toptheta::to_string(t.space()); })
      .def_property_readonly("heads", &toptheta::LayerThresholds::heads)
      .def_property_readonly("lengths", &toptheta::LayerThresholds::lengths)
      .def_property_readonly("theta", &toptheta::LayerThresholds::theta)
      .def_property_readonly("denominator_terms", &toptheta::LayerThresholds::denominator_terms);

  py::class_<toptheta::ThresholdTable>(m, "ThresholdTable", "Thresholds of every layer: what C++ engines load.")
      .def_property_readonly("layers", &toptheta::ThresholdTable::layers)
      .def_property_readonly("space", [](const toptheta::ThresholdTable& t) { return toptheta::to_string(t.space()); })
      .def_property_readonly("method",
                             [](const toptheta::ThresholdTable& t) { return toptheta::to_string(t.method()); })
      .def("k", &toptheta::ThresholdTable::k, py::arg("layer"))
      .def("layer", &toptheta::ThresholdTable::layer, py::arg("layer"), py::return_value_policy::reference_internal)
      .def("to_json", [](const toptheta::ThresholdTable& t) { return toptheta::thresholds_to_json(t); })
      .def_static(
          "from_json", [](const std::string& text) { return toptheta::thresholds_from_json(text); }, py::arg("text"));
  m.def(
      "save_thresholds",
      [](const toptheta::ThresholdTable& t, const std::string& path) { toptheta::save_thresholds(t, path); },
      py::arg("table"), py::arg("path"), "Writes the threshold file (JSON) a C++ engine loads with load_thresholds.");
  m.def(
      "load_thresholds", [](const std::string& path) { return toptheta::load_thresholds(path); }, py::arg("path"));

  py::class_<toptheta::Calibrator>(m, "Calibrator",
                                   "Collects score rows of a model and tables the thresholds that keep about k per "
                                   "row (design.md §1, Calibration).")
      .def(py::init([](Index layers, Index q_heads, Index kv_heads, Index head_dim, const std::string& space,
                       std::vector<Index> k, double sample_fraction, std::uint64_t seed, bool summary_masses) {
             toptheta::CalibratorOptions options;
             options.shape = {layers, q_heads, kv_heads, head_dim};
             options.space = toptheta::threshold_space_from_string(space);
             options.k = std::move(k);
             options.sample_fraction = sample_fraction;
             options.seed = seed;
             options.summary_masses = summary_masses;
             return toptheta::Calibrator(options);
           }),
           py::arg("layers"), py::arg("q_heads"), py::arg("kv_heads"), py::arg("head_dim"),
           py::arg("space") = "probability", py::arg("k") = std::vector<Index>{32}, py::arg("sample_fraction") = 1.0,
           py::arg("seed") = 0, py::arg("summary_masses") = false)
      .def(
          "observe_row",
          [](toptheta::Calibrator& c, Index layer, Index head,
             const py::array_t<double, py::array::c_style | py::array::forcecast>& scores, double query_norm) {
            toptheta::detail::require(scores.ndim() == 1, "scores", "a 1-d array of a_ij", shape_text(scores));
            c.observe_row(layer, head, scores.data(), Index(scores.size()), query_norm);
          },
          py::arg("layer"), py::arg("head"), py::arg("scores"), py::arg("query_norm") = 0.0,
          "One score row a_ij = s<q_i, k_j> over its visible keys.")
      .def(
          "observe_rows",
          [](toptheta::Calibrator& c, Index layer, Index head,
             const py::array_t<double, py::array::c_style | py::array::forcecast>& scores,
             const std::vector<Index>& lengths, const std::vector<double>& query_norms) {
            toptheta::detail::require(scores.ndim() == 2, "scores", "a 2-d array of score rows", shape_text(scores));
            using Rows = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
            c.observe_rows(layer, head, Eigen::Map<const Rows>(scores.data(), scores.shape(0), scores.shape(1)),
                           lengths, query_norms);
          },
          py::arg("layer"), py::arg("head"), py::arg("scores"), py::arg("lengths") = std::vector<Index>{},
          py::arg("query_norms") = std::vector<double>{},
          "Rows of one (layer, head): row r holds a_rj in its first lengths[r] columns (all when lengths is empty).")
      .def("merge", &toptheta::Calibrator::merge, py::arg("other"))
      .def_property_readonly("rows_offered", &toptheta::Calibrator::rows_offered)
      .def_property_readonly("rows_used", &toptheta::Calibrator::rows_used)
      .def_property_readonly("rows_dense", &toptheta::Calibrator::rows_dense)
      .def(
          "table",
          [](const toptheta::Calibrator& c, const std::string& method, double sigma_add, double pruned_mass,
             const std::string& denominator_terms) {
            toptheta::TableOptions options;
            options.method = toptheta::calibration_method_from_string(method);
            options.sigma_add = sigma_add;
            options.pruned_mass = pruned_mass;
            options.denominator_terms = toptheta::denominator_term_source_from_string(denominator_terms);
            return c.table(options);
          },
          py::arg("method") = "count_matched", py::arg("sigma_add") = 0.0, py::arg("pruned_mass") = 0.01,
          py::arg("denominator_terms") = "row_threshold");

  m.def(
      "dense_attention",
      [](const py::array& q, const py::array& k, const py::array& v, std::optional<py::array> out, bool causal,
         Index past, std::optional<double> scale, int threads) {
        const auto options = attention_options(causal, past, scale);
        return run_kernel(q, k, v, out, threads,
                          [&](const auto& qv, const auto& kv, const auto& vv, const auto& ov, const auto& executor) {
                            toptheta::dense_attention(qv, kv, vv, ov, options, nullptr, executor);
                          });
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out") = py::none(), py::kw_only(), py::arg("causal") = true,
      py::arg("past") = 0, py::arg("scale") = py::none(), py::arg("threads") = 0,
      "softmax(s q kᵀ) v. q [n_q, q_heads, d], k and v [n_kv, kv_heads, d] (q_heads a multiple of kv_heads), "
      "float32 or float64; returns out [n_q, q_heads, d].");
  m.def(
      "top_theta_attention",
      [](const py::array& q, const py::array& k, const py::array& v, const toptheta::LayerThresholds& thresholds,
         std::optional<py::array> out, bool causal, Index past, std::optional<double> scale, bool v_mean,
         bool v_mean_of_pruned, const std::string& denominator, double lambda, bool cap_k,
         const PrefixSum& value_prefix_sum, toptheta::AttentionStats* stats, int threads) {
        auto options = sparse_options<toptheta::TopThetaOptions>(
            causal, past, scale, compensation_of(denominator, lambda, v_mean, v_mean_of_pruned), value_prefix_sum, k);
        options.cap_k = cap_k;
        return run_kernel(q, k, v, out, threads,
                          [&](const auto& qv, const auto& kv, const auto& vv, const auto& ov, const auto& executor) {
                            toptheta::top_theta_attention(qv, kv, vv, ov, thresholds, options, stats, executor);
                          });
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("thresholds"), py::arg("out") = py::none(), py::kw_only(),
      py::arg("causal") = true, py::arg("past") = 0, py::arg("scale") = py::none(), py::arg("v_mean") = true,
      py::arg("v_mean_of_pruned") = false, py::arg("denominator") = "none", py::arg("compensation_scale") = 1.0,
      py::arg("cap_k") = false, py::arg("value_prefix_sum") = py::none(), py::arg("stats") = nullptr,
      py::arg("threads") = 0,
      "Top-θ attention (design.md §1) with one layer's thresholds; V-mean compensation on by default. Shapes as "
      "dense_attention; value_prefix_sum [kv_heads, d] float64 is Σ_{j<past} v_j (else V rows before past are read).");
  m.def(
      "top_k_attention",
      [](const py::array& q, const py::array& k, const py::array& v, Index keep, std::optional<py::array> out,
         bool causal, Index past, std::optional<double> scale, bool v_mean, const std::string& denominator,
         double lambda, const toptheta::LayerThresholds* thresholds, const PrefixSum& value_prefix_sum,
         toptheta::AttentionStats* stats, int threads) {
        auto options = sparse_options<toptheta::TopKOptions>(
            causal, past, scale, compensation_of(denominator, lambda, v_mean, false), value_prefix_sum, k);
        options.k = keep;
        options.thresholds = thresholds;
        return run_kernel(q, k, v, out, threads,
                          [&](const auto& qv, const auto& kv, const auto& vv, const auto& ov, const auto& executor) {
                            toptheta::top_k_attention(qv, kv, vv, ov, options, stats, executor);
                          });
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("keep"), py::arg("out") = py::none(), py::kw_only(),
      py::arg("causal") = true, py::arg("past") = 0, py::arg("scale") = py::none(), py::arg("v_mean") = false,
      py::arg("denominator") = "none", py::arg("compensation_scale") = 1.0, py::arg("thresholds") = nullptr,
      py::arg("value_prefix_sum") = py::none(), py::arg("stats") = nullptr, py::arg("threads") = 0,
      "Top-k attention: the keep largest scores of each row (ties: the larger position). Shapes as dense_attention; "
      "thresholds (LayerThresholds) only for their calibrated denominator terms (denominator='calibrated').");

  m.def(
      "_seconds_per_cpp_call",
      [](const py::array& q, const py::array& k, const py::array& v, const toptheta::LayerThresholds& thresholds,
         const PrefixSum& value_prefix_sum, Index past, int repeats, int threads) {
        // The C++ side of the binding-overhead benchmark (benchmarks/python_overhead.py): the call
        // top_theta_attention makes, on the same arrays, `repeats` times, timed in C++.
        auto options = sparse_options<toptheta::TopThetaOptions>(
            true, past, std::nullopt, compensation_of("none", 1.0, true, false), value_prefix_sum, k);
        double seconds = 0;
        run_kernel(q, k, v, std::nullopt, threads,
                   [&](const auto& qv, const auto& kv, const auto& vv, const auto& ov, const auto& executor) {
                     const auto start = std::chrono::steady_clock::now();
                     for (int r = 0; r < repeats; ++r)
                       toptheta::top_theta_attention(qv, kv, vv, ov, thresholds, options, nullptr, executor);
                     seconds =
                         std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / repeats;
                   });
        return seconds;
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("thresholds"), py::arg("value_prefix_sum"), py::arg("past"),
      py::arg("repeats"), py::arg("threads") = 0);
}
