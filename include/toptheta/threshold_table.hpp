// Per-head, per-row-length thresholds θ_h(L) and calibrated denominator terms c_h(L) of one layer.
#pragma once

#include <toptheta/detail/require.hpp>
#include <toptheta/scalar_traits.hpp>
#include <toptheta/threshold_space.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
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
/// length answers and the lookup says it extrapolated. A length-independent table answers every length.
class LayerThresholds {
 public:
  /// \param theta `heads x lengths.size()`, finite.
  /// \param denominator_terms empty, or the same shape as `theta`, finite and >= 0.
  LayerThresholds(Index k, ThresholdSpace space, std::vector<Index> lengths, Eigen::MatrixXd theta,
                  Eigen::MatrixXd denominator_terms = {})
      : k_(k), space_(space), lengths_(std::move(lengths)), theta_(std::move(theta)),
        denominator_terms_(std::move(denominator_terms)) {
    validate();
  }

  /// The same θ_h (and c_h) for every row length.
  static LayerThresholds uniform(Index k, ThresholdSpace space, const std::vector<double>& theta_per_head,
                                 const std::vector<double>& denominator_term_per_head = {}) {
    Eigen::MatrixXd theta = Eigen::Map<const Eigen::VectorXd>(theta_per_head.data(), Index(theta_per_head.size()));
    Eigen::MatrixXd terms;
    if (!denominator_term_per_head.empty())
      terms = Eigen::Map<const Eigen::VectorXd>(denominator_term_per_head.data(),
                                                Index(denominator_term_per_head.size()));
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

  /// θ_h(L) and c_h(L) for query head `head` and row length `length`. Cost: O(log lengths).
  ThresholdLookup lookup(Index head, Index length) const {
    if (length_independent_) return at(head, 0, false);
    const Index last = Index(lengths_.size()) - 1;
    if (length <= lengths_.front()) return at(head, 0, length < lengths_.front());
    if (length >= lengths_.back()) return at(head, last, length > lengths_.back());
    const Index right = Index(std::upper_bound(lengths_.begin(), lengths_.end(), length) - lengths_.begin());
    const Index left = right - 1;  // lengths_[left] <= L < lengths_[right]
    const double weight = double(length - lengths_[left]) / double(lengths_[right] - lengths_[left]);
    const ThresholdLookup a = at(head, left, false), b = at(head, right, false);
    return {(1 - weight) * a.theta + weight * b.theta,
            (1 - weight) * a.denominator_term + weight * b.denominator_term, false};
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
};

}  // namespace toptheta
