// Per-head, per-row-length thresholds θ_h(L) and calibrated denominator terms c_h(L): one layer's
// (`LayerThresholds`) and a whole model's with the calibration that produced them (`ThresholdTable`).
#pragma once

#include <toptheta/detail/enum_names.hpp>
#include <toptheta/detail/require.hpp>
#include <toptheta/length_buckets.hpp>
#include <toptheta/scalar_traits.hpp>
#include <toptheta/threshold_space.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace toptheta {

/// One answer of `LayerThresholds::lookup`.
struct ThresholdLookup {
  double theta = 0;             ///< θ_h(L), in the table's threshold space
  double denominator_term = 0;  ///< c_h(L), 0 when the table has none
  bool extrapolated = false;    ///< L lies outside the calibrated lengths; the nearest one answered
};

/// The thresholds of one layer: `k`, the threshold space, and for each query head `h` the values θ_h(L) and
/// optionally c_h(L) at calibrated row lengths `L_0 < L_1 < ...`.
///
/// Between calibrated lengths the values are interpolated linearly; outside them the nearest calibrated
/// length answers. The lookup says it extrapolated when `L` lies outside the *calibrated range*, by default
/// `[L_0, L_last]`; a table built from length buckets widens it to the buckets' first and last lengths
/// (`set_calibrated_range`). A length-independent table answers every length and never extrapolates.
class LayerThresholds {
 public:
  /// \param theta `heads x lengths.size()`, finite.
  /// \param denominator_terms empty, or the same shape as `theta`, finite and >= 0.
  LayerThresholds(Index k, ThresholdSpace space, std::vector<Index> lengths, Eigen::MatrixXd theta,
                  Eigen::MatrixXd denominator_terms = {})
      : k_(k),
        space_(space),
        lengths_(std::move(lengths)),
        theta_(std::move(theta)),
        denominator_terms_(std::move(denominator_terms)) {
    validate();
    range_first_ = lengths_.front();
    range_last_ = lengths_.back();
  }

  /// The same θ_h (and c_h) for every row length.
  static LayerThresholds uniform(Index k, ThresholdSpace space, const std::vector<double>& theta_per_head,
                                 const std::vector<double>& denominator_term_per_head = {}) {
    Eigen::MatrixXd theta = Eigen::Map<const Eigen::VectorXd>(theta_per_head.data(), Index(theta_per_head.size()));
    Eigen::MatrixXd terms;
    if (!denominator_term_per_head.empty())
      terms =
          Eigen::Map<const Eigen::VectorXd>(denominator_term_per_head.data(), Index(denominator_term_per_head.size()));
    LayerThresholds table(k, space, {1}, std::move(theta), std::move(terms));
    table.length_independent_ = true;
    return table;
  }

  Index k() const { return k_; }
  ThresholdSpace space() const { return space_; }
  Index heads() const { return theta_.rows(); }
  const std::vector<Index>& lengths() const { return lengths_; }
  const Eigen::MatrixXd& theta() const { return theta_; }
  const Eigen::MatrixXd& denominator_terms() const { return denominator_terms_; }
  bool has_denominator_terms() const { return denominator_terms_.size() > 0; }
  bool length_independent() const { return length_independent_; }
  /// Row lengths `[first, last]` answered without extrapolation.
  std::pair<Index, Index> calibrated_range() const { return {range_first_, range_last_}; }

  /// Widens the lengths answered without extrapolation to `[first, last]`, e.g. to the first and last length of
  /// the buckets the calibrated lengths stand for. Requires `1 ≤ first ≤ L_0` and `last ≥ L_last`.
  void set_calibrated_range(Index first, Index last) {
    detail::require(first >= 1 && first <= lengths_.front(), "calibrated_range.first",
                    "a length in [1, " + std::to_string(lengths_.front()) + "]", first);
    detail::require(last >= lengths_.back(), "calibrated_range.last", "a length >= " + std::to_string(lengths_.back()),
                    last);
    range_first_ = first;
    range_last_ = last;
  }

  /// θ_h(L) and c_h(L) for query head `head` and row length `length`. Cost: O(log lengths).
  ThresholdLookup lookup(Index head, Index length) const {
    if (length_independent_) return at(head, 0, false);
    const Index last = Index(lengths_.size()) - 1;
    const bool outside = length < range_first_ || length > range_last_;
    if (length <= lengths_.front()) return at(head, 0, outside);
    if (length >= lengths_.back()) return at(head, last, outside);
    const Index right = Index(std::upper_bound(lengths_.begin(), lengths_.end(), length) - lengths_.begin());
    const Index left = right - 1;  // lengths_[left] <= L < lengths_[right]
    const double weight = double(length - lengths_[left]) / double(lengths_[right] - lengths_[left]);
    const ThresholdLookup a = at(head, left, false), b = at(head, right, false);
    return {(1 - weight) * a.theta + weight * b.theta, (1 - weight) * a.denominator_term + weight * b.denominator_term,
            false};
  }

 private:
  ThresholdLookup at(Index head, Index column, bool extrapolated) const {
    return {theta_(head, column), has_denominator_terms() ? denominator_terms_(head, column) : 0.0, extrapolated};
  }

  void validate() const {
    using detail::require;
    require(k_ >= 1, "k", "k >= 1", k_);
    require(theta_.rows() >= 1, "theta", "at least one head (row)", theta_.rows());
    require(!lengths_.empty(), "lengths", "at least one calibrated row length", "none");
    require(theta_.cols() == Index(lengths_.size()), "theta",
            std::to_string(lengths_.size()) + " columns (one per calibrated length)", theta_.cols());
    for (std::size_t l = 0; l < lengths_.size(); ++l) {
      require(lengths_[l] >= 1, "lengths[" + std::to_string(l) + "]", "a row length >= 1", lengths_[l]);
      if (l > 0)
        require(lengths_[l] > lengths_[l - 1], "lengths[" + std::to_string(l) + "]",
                "lengths in increasing order, > " + std::to_string(lengths_[l - 1]), lengths_[l]);
    }
    for (Index h = 0; h < theta_.rows(); ++h)
      for (Index l = 0; l < theta_.cols(); ++l)
        require(std::isfinite(theta_(h, l)),
                "theta(head " + std::to_string(h) + ", length " + std::to_string(lengths_[l]) + ")",
                "a finite threshold", theta_(h, l));
    if (!has_denominator_terms()) return;
    require(denominator_terms_.rows() == theta_.rows() && denominator_terms_.cols() == theta_.cols(),
            "denominator_terms", "the shape of theta",
            std::to_string(denominator_terms_.rows()) + "x" + std::to_string(denominator_terms_.cols()));
    for (Index h = 0; h < theta_.rows(); ++h)
      for (Index l = 0; l < theta_.cols(); ++l)
        require(std::isfinite(denominator_terms_(h, l)) && denominator_terms_(h, l) >= 0,
                "denominator_terms(head " + std::to_string(h) + ", length " + std::to_string(lengths_[l]) + ")",
                "a finite value >= 0", denominator_terms_(h, l));
  }

  Index k_;
  ThresholdSpace space_;
  std::vector<Index> lengths_;
  Eigen::MatrixXd theta_;
  Eigen::MatrixXd denominator_terms_;
  bool length_independent_ = false;
  Index range_first_ = 1, range_last_ = 1;
};

/// Shape of the model a `ThresholdTable` belongs to.
struct ModelShape {
  Index layers = 1, q_heads = 1, kv_heads = 1, head_dim = 1;

  /// Throws `invalid_argument` naming `argument` unless every count is >= 1 and `kv_heads` divides `q_heads`.
  void validate(const std::string& argument = "shape") const {
    detail::require(layers >= 1, argument + ".layers", "a count >= 1", layers);
    detail::require(q_heads >= 1, argument + ".q_heads", "a count >= 1", q_heads);
    detail::require(kv_heads >= 1 && q_heads % kv_heads == 0, argument + ".kv_heads",
                    "a count >= 1 that divides q_heads (" + std::to_string(q_heads) + ")", kv_heads);
    detail::require(head_dim >= 1, argument + ".head_dim", "a count >= 1", head_dim);
  }

  friend bool operator==(const ModelShape& a, const ModelShape& b) {
    return a.layers == b.layers && a.q_heads == b.q_heads && a.kv_heads == b.kv_heads && a.head_dim == b.head_dim;
  }
  friend bool operator!=(const ModelShape& a, const ModelShape& b) { return !(a == b); }
};

/// How a calibration turns the rows of one (layer, head, length bucket) into θ.
enum class CalibrationMethod {
  /// The paper's: `θ = mean_i t_i + σ_add · std_i t_i` over the rows' sample thresholds `t_i` (each row's
  /// (k+1)-th largest value); `std` is the population standard deviation.
  mean_of_thresholds,
  /// The θ at which the mean survivor count `(1/R) Σ_i |{j : value_ij > θ}|` over the `R` calibration rows equals
  /// `k`. Rows differ (query norms, sinks, flat vs peaked rows), so the mean of thresholds does not keep `k` on
  /// average; this does, on data like the calibration data.
  count_matched,
  /// Probability thresholds only: the θ at which the mean pruned probability mass `(1/R) Σ_i Σ_{j : P_ij <= θ}
  /// P_ij` over the `R` calibration rows equals a target ε (`TableOptions::pruned_mass`). Flat heads then keep
  /// more keys and peaked heads fewer than `k`, for the same mass left out of each row on average.
  mass_matched,
  /// Probability thresholds only: one θ per layer, for all its heads and lengths, at which the survivors of the
  /// layer's `R` calibration rows, all heads and lengths pooled, number `k R`. The layer's budget of `k` kept
  /// keys per row then goes to the largest probabilities wherever they are, which leaves out the least
  /// probability mass any split of that budget over heads and lengths can: a flat head or a long row keeps
  /// fewer keys, a peaked head more. The layers' `k` split the model's budget over layers.
  budget_matched,
};

namespace detail {
inline constexpr EnumName<CalibrationMethod> calibration_method_names[] = {
    {CalibrationMethod::mean_of_thresholds, "mean_of_thresholds"},
    {CalibrationMethod::count_matched, "count_matched"},
    {CalibrationMethod::mass_matched, "mass_matched"},
    {CalibrationMethod::budget_matched, "budget_matched"},
};
}  // namespace detail

inline const char* to_string(CalibrationMethod value) {
  return detail::name_of(value, detail::calibration_method_names);
}

/// Whether `method` is defined for probability thresholds only (its θ is a probability mass's cut).
constexpr bool needs_probability_space(CalibrationMethod method) {
  return method == CalibrationMethod::mass_matched || method == CalibrationMethod::budget_matched;
}

/// Parses the names printed by `to_string`; throws naming `argument` for any other text.
inline CalibrationMethod calibration_method_from_string(const std::string& name,
                                                        const std::string& argument = "method") {
  return detail::value_named(name, detail::calibration_method_names, argument);
}

/// Calibration rows behind each table entry: `heads x lengths`, like `LayerThresholds::theta()`.
using SampleCounts = Eigen::Matrix<std::uint64_t, Eigen::Dynamic, Eigen::Dynamic>;

/// A model's thresholds: per layer a `LayerThresholds` (its `k`, θ_h(L) and c_h(L) at the representative lengths
/// of the calibrated length buckets) and the number of calibration rows behind each entry, plus how they were
/// made: model shape, threshold space, bucket scheme, calibration method and σ_add.
///
/// An entry with 0 samples was not observed and was filled from the same head's calibrated lengths (see
/// `Calibrator::table`). Lookups between calibrated lengths interpolate; a lookup extrapolates when the length
/// lies outside the first and last calibrated buckets.
class ThresholdTable {
 public:
  /// \param sigma_add σ_add of `mean_of_thresholds`; empty when unknown (imported files) and for the other
  /// methods.
  /// \param samples one `heads x lengths` matrix per layer.
  /// Every layer's lengths must be representatives of `buckets` (`buckets.representative(buckets.bucket(L)) ==
  /// L`), every layer must have `shape.q_heads` heads and all layers one threshold space.
  ThresholdTable(const ModelShape& shape, ThresholdSpace space, const LengthBuckets& buckets, CalibrationMethod method,
                 std::optional<double> sigma_add, std::vector<LayerThresholds> layers,
                 std::vector<SampleCounts> samples)
      : shape_(shape),
        space_(space),
        buckets_(buckets),
        method_(method),
        sigma_add_(sigma_add),
        layers_(std::move(layers)),
        samples_(std::move(samples)) {
    validate();
  }

  const ModelShape& shape() const { return shape_; }
  ThresholdSpace space() const { return space_; }
  const LengthBuckets& buckets() const { return buckets_; }
  CalibrationMethod method() const { return method_; }
  const std::optional<double>& sigma_add() const { return sigma_add_; }
  Index layers() const { return Index(layers_.size()); }
  /// The layer's table, ready for the kernels (`top_theta_attention(..., table.layer(l), ...)`).
  const LayerThresholds& layer(Index layer) const { return layers_[checked_layer(layer)]; }
  Index k(Index layer) const { return this->layer(layer).k(); }
  /// Calibration rows behind each entry of `layer(l).theta()`.
  const SampleCounts& samples(Index layer) const { return samples_[checked_layer(layer)]; }

  /// θ and c for (layer, query head, row length L); `extrapolated` when L lies outside the calibrated buckets.
  ThresholdLookup lookup(Index layer, Index head, Index length) const {
    const LayerThresholds& table = this->layer(layer);
    detail::require(head >= 0 && head < table.heads(), "head",
                    "a query head in [0, " + std::to_string(table.heads()) + ")", head);
    return table.lookup(head, length);
  }

 private:
  std::size_t checked_layer(Index layer) const {
    detail::require(layer >= 0 && layer < Index(layers_.size()), "layer",
                    "a layer in [0, " + std::to_string(layers_.size()) + ")", layer);
    return std::size_t(layer);
  }

  void validate() {
    using detail::require;
    shape_.validate("shape");
    buckets_.validate("buckets");
    if (sigma_add_)
      require(method_ == CalibrationMethod::mean_of_thresholds, "sigma_add",
              std::string("none for ") + to_string(method_) + " (σ_add applies to mean_of_thresholds)", *sigma_add_);
    if (sigma_add_) require(std::isfinite(*sigma_add_), "sigma_add", "a finite value", *sigma_add_);
    require(!needs_probability_space(method_) || space_ == ThresholdSpace::probability, "method",
            std::string(to_string(method_)) + " only with probability thresholds",
            to_string(space_) + std::string(" thresholds"));
    require(Index(layers_.size()) == shape_.layers, "layers", std::to_string(shape_.layers) + " layers (shape.layers)",
            layers_.size());
    require(samples_.size() == layers_.size(), "samples",
            "one matrix per layer (" + std::to_string(layers_.size()) + ")", samples_.size());
    for (std::size_t l = 0; l < layers_.size(); ++l) {
      LayerThresholds& layer = layers_[l];
      const std::string name = "layers[" + std::to_string(l) + "]";
      require(layer.heads() == shape_.q_heads, name + ".theta",
              std::to_string(shape_.q_heads) + " heads (shape.q_heads)", layer.heads());
      require(layer.space() == space_, name + ".space", to_string(space_), to_string(layer.space()));
      require(
          samples_[l].rows() == layer.theta().rows() && samples_[l].cols() == layer.theta().cols(),
          "samples[" + std::to_string(l) + "]",
          "the shape of theta, " + std::to_string(layer.theta().rows()) + "x" + std::to_string(layer.theta().cols()),
          std::to_string(samples_[l].rows()) + "x" + std::to_string(samples_[l].cols()));
      if (layer.length_independent()) continue;
      const std::vector<Index>& lengths = layer.lengths();
      for (std::size_t c = 0; c < lengths.size(); ++c) {
        const Index length = lengths[c];
        require(length <= LengthBuckets::max_length, name + ".lengths[" + std::to_string(c) + "]", "a length <= 2^50",
                length);
        const Index representative = buckets_.representative(buckets_.bucket(length));
        require(representative == length, name + ".lengths[" + std::to_string(c) + "]",
                "the representative length of its bucket (" + std::to_string(representative) + ")", length);
      }
      layer.set_calibrated_range(buckets_.first_length(buckets_.bucket(lengths.front())),
                                 buckets_.last_length(buckets_.bucket(lengths.back())));
    }
  }

  ModelShape shape_;
  ThresholdSpace space_;
  LengthBuckets buckets_;
  CalibrationMethod method_;
  std::optional<double> sigma_add_;
  std::vector<LayerThresholds> layers_;
  std::vector<SampleCounts> samples_;
};

}  // namespace toptheta
