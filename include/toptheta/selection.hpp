// Which elements of a score row survive: dense, Top-θ (a static threshold) or top-k (a per-row search).
#pragma once

#include <toptheta/compensation.hpp>
#include <toptheta/detail/require.hpp>
#include <toptheta/online_softmax.hpp>
#include <toptheta/scalar_traits.hpp>
#include <toptheta/threshold_space.hpp>
#include <toptheta/threshold_table.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <utility>
#include <vector>

namespace toptheta {
namespace detail {

inline void require_head(Index head, Index heads, const std::string& argument) {
  require(head >= 0 && head < heads, argument,
          "a query head of the threshold table, in [0, " + std::to_string(heads) + ")", head);
}

}  // namespace detail

/// What a selection may know about query row `i` of query head `h` before testing its elements.
template <class Acc>
struct RowFacts {
  Index query_head = 0;
  Index length = 0;    ///< L_i
  Acc query_norm = 0;  ///< ||q_i||
  Acc max = 0;         ///< m_i, when `scores` is given
  Acc sum = 0;         ///< Z_i = Σ_j exp(a_ij - m_i), when `scores` is given
  /// The L_i visible scores when they are known before selecting (two passes, thresholded_softmax); null in a
  /// one-pass kernel, where a row-relative space selects with a running threshold (`RowSelection::running`).
  const Acc* scores = nullptr;
};

/// The rule that decides `S_i`, in score units: keep `j` when `a_ij > τ_i`, or `a_ij = τ_i` and `j >= tie_from`;
/// at most `keep_limit` elements, those with the largest positions.
template <class Acc>
struct RowSelection {
  static constexpr Acc no_threshold = -std::numeric_limits<Acc>::infinity();
  static constexpr Index unlimited = std::numeric_limits<Index>::max();

  Acc score_threshold = no_threshold;  ///< τ_i
  Index tie_from = unlimited;
  Index keep_limit = unlimited;
  Acc pruned_bound = no_threshold;  ///< score bounding each pruned term, for exp-threshold compensation
  Acc calibrated_term = 0;          ///< c_h(L_i), for calibrated compensation
  bool dense = false;               ///< L_i <= k: every visible key kept
  bool extrapolated = false;        ///< the threshold lookup extrapolated beyond the calibrated lengths
  /// One pass in a row-relative space (design.md §6): `τ` grows with the row's running max and sum, so keys
  /// are kept as candidates and `τ_i = running_threshold(m_i, Z_i)` decides once the row has seen every key.
  bool running = false;
  ThresholdSpace space = ThresholdSpace::raw_score;  ///< of a running threshold
  Acc offset = 0;  ///< of a running threshold: `τ` at max 0 and sum 1, `log θ` (probability) or `θ`

  /// `τ_t` after keys with running max `max` and `sum = Σ exp(a - max)`: `max + log θ + log sum` or `max + θ`,
  /// the same operations as `score_threshold`.
  Acc running_threshold(Acc max, Acc sum) const {
    return space == ThresholdSpace::probability ? max + offset + std::log(sum) : max + offset;
  }

  /// True when `a > τ` alone decides (no tie rule, no cap), so elements may be tested in any order.
  bool threshold_only() const { return tie_from == unlimited && keep_limit == unlimited; }

  bool keeps(Acc score, Index position) const {
    return score > score_threshold || (score == score_threshold && position >= tie_from);
  }
};

/// A row during selection: its rule, its masses, and its max-score key.
template <class Acc>
struct RowState {
  RowSelection<Acc> selection;
  RowMass<Acc> mass;
  Acc best_score = -std::numeric_limits<Acc>::infinity();  ///< score of the max-score key
  Index best_position = -1;                                ///< its position (ties: the larger)
  bool capped = false;                                     ///< a survivor was dropped by the cap
  bool non_finite = false;                                 ///< some visible score is NaN or +inf

  /// Notes the max of some of the row's scores (NaN when one of them is NaN).
  void note_scores_max(Acc max) { non_finite = non_finite || !(max < std::numeric_limits<Acc>::infinity()); }

  /// Whether the row has a softmax once every visible score was seen (`has_softmax`).
  bool has_softmax() const { return !non_finite && mass.max > -std::numeric_limits<Acc>::infinity(); }

  /// The rule of a row without a softmax: nothing is kept and no V row is read.
  static RowSelection<Acc> keep_nothing() {
    RowSelection<Acc> selection;
    selection.score_threshold = std::numeric_limits<Acc>::infinity();
    return selection;
  }

  /// Tests `a_ij` and counts it when `j` joins `S_i`. Elements arrive in decreasing position `j`, so a cap
  /// keeps the largest positions.
  bool admit(Acc score, Index position) {
    const bool survives = selection.keeps(score, position);
    if (survives && mass.kept < selection.keep_limit) {
      ++mass.kept;
      return true;
    }
    capped = capped || survives;
    return false;
  }

  /// Online softmax over all visible keys (`RowMass::raise_max`).
  void raise_max(Acc candidate) { mass.raise_max(candidate); }

  /// Online softmax over the kept keys (`RowMass::raise_kept_max`): the factor for the accumulated output.
  Acc raise_kept_max(Acc candidate) { return mass.raise_kept_max(candidate); }

  /// Joins this row's state with the same row's state over another key range (the online-softmax merge of
  /// split-KV). Returns the factors by which this range's and the other range's accumulated outputs must be
  /// multiplied before they are added.
  std::pair<Acc, Acc> merge(const RowState& other) {
    const std::pair<Acc, Acc> factors = mass.merge(other.mass);
    if (other.best_score > best_score || (other.best_score == best_score && other.best_position > best_position)) {
      best_score = other.best_score;
      best_position = other.best_position;
    }
    capped = capped || other.capped;
    non_finite = non_finite || other.non_finite;
    return factors;
  }

  /// Steps 4–6 of design.md §1 on `output` = the row's kept numerator `Σ_{j∈S_i} exp(a_ij - m_S) v_j`: divides
  /// it by the compensated softmax denominator and adds V-mean compensation. `mean()` gives vbar(L_i) and
  /// `kept_value_sum()` Σ_{j∈S_i} v_j; each is asked for only when the compensation uses it.
  template <class Output, class Mean, class KeptValueSum>
  void normalise(Output&& output, const Compensation& compensation, bool post_softmax, const Mean& mean,
                 const KeptValueSum& kept_value_sum) const {
    const Acc denominator =
        softmax_denominator(mass, compensation, post_softmax, selection.pruned_bound, selection.calibrated_term);
    output /= denominator;
    if (!compensation.v_mean) return;
    const Acc weight = v_mean_weight(mass, denominator);
    if (weight == Acc(0)) return;
    if (!compensation.v_mean_of_pruned)
      output += weight * mean();
    else if (const Index pruned = mass.length - mass.kept; pruned > 0)  // (Σ_{j<L} v_j - Σ_{S_i} v_j) / pruned
      output += (weight / Acc(pruned)) * (Acc(mass.length) * mean() - kept_value_sum());
  }

  /// A row is never empty: when nothing survived, its max-score key joins `S_i` with weight
  /// `exp(a - m_S) = 1`. Returns whether it did.
  bool keep_best_if_empty() {
    if (mass.kept > 0) return false;
    mass.kept = 1;
    mass.kept_max = best_score;
    mass.kept_mass = 1;
    mass.pruned_mass = std::max(Acc(0), mass.pruned_mass - std::exp(best_score - mass.max));
    return true;
  }
};

/// Keeps every visible key: dense attention.
struct DenseSelection {
  bool needs_row_scores() const { return false; }
  bool has_running_threshold() const { return false; }
  bool caps_rows() const { return false; }
  void require_query_head(Index, const std::string&) const {}
  bool post_softmax() const { return false; }
  const Compensation& compensation() const { return none_; }
  template <class Acc>
  RowSelection<Acc> select(const RowFacts<Acc>&, std::vector<Acc>&) const {
    RowSelection<Acc> row;
    row.dense = true;
    return row;
  }

 private:
  Compensation none_{};
};

/// How many passes a Top-θ kernel makes over the keys.
enum class Passes {
  automatic,  ///< one (the faster in every space, see top_theta_attention)
  one,        ///< one pass over K: the threshold test as keys arrive (raw_score, score_over_query_norm), or
              ///< candidates above the running threshold until the row's max and sum are known (probability,
              ///< score_minus_max; design.md §6)
  two,        ///< row max and log-sum-exp first, then the threshold test (every space)
};

/// Top-θ: keep `a_ij` whose value in the table's threshold space exceeds θ_h(L_i) (design.md §1).
class TopThetaSelection {
 public:
  TopThetaSelection(const LayerThresholds& thresholds, const Compensation& compensation, bool cap_k, Passes passes)
      : thresholds_(thresholds), compensation_(compensation), cap_k_(cap_k) {
    const ThresholdSpace space = thresholds.space();
    compensation.validate("options.compensation");
    two_pass_ = passes == Passes::two;
    detail::require(space != ThresholdSpace::probability || compensation.denominator == DenominatorCompensation::none,
                    "options.compensation.denominator",
                    "none for the probability space (post-softmax keeps the full softmax denominator)",
                    to_string(compensation.denominator));
    detail::require(
        compensation.denominator != DenominatorCompensation::calibrated || thresholds.has_denominator_terms(),
        "thresholds", "calibrated denominator terms for calibrated compensation", "none");
  }

  bool needs_row_scores() const { return two_pass_; }
  /// One pass in a space whose threshold depends on the row's max and sum (design.md §6).
  bool has_running_threshold() const { return !two_pass_ && needs_row_statistics(thresholds_.space()); }
  /// Whether survivors beyond k are dropped: the kept set then depends on the order of the keys.
  bool caps_rows() const { return cap_k_; }
  void require_query_head(Index head, const std::string& argument) const {
    detail::require_head(head, thresholds_.heads(), argument);
  }
  bool post_softmax() const { return thresholds_.space() == ThresholdSpace::probability; }
  const Compensation& compensation() const { return compensation_; }
  const LayerThresholds& thresholds() const { return thresholds_; }

  template <class Acc>
  RowSelection<Acc> select(const RowFacts<Acc>& row, std::vector<Acc>&) const {
    RowSelection<Acc> selection;
    if (row.length <= thresholds_.k()) {
      selection.dense = true;
      return selection;
    }
    const ThresholdLookup lookup = thresholds_.lookup(row.query_head, row.length);
    if (needs_row_statistics(thresholds_.space()) && row.scores == nullptr) {  // one pass: τ_i comes at the end
      selection.running = true;
      selection.space = thresholds_.space();
      selection.offset = score_threshold(selection.space, lookup.theta, Acc(0), Acc(1), Acc(0));
    } else {
      selection.score_threshold = score_threshold(thresholds_.space(), lookup.theta, row.max, row.sum, row.query_norm);
      selection.pruned_bound = selection.score_threshold;
    }
    selection.calibrated_term = Acc(lookup.denominator_term);
    selection.extrapolated = lookup.extrapolated;
    if (cap_k_) selection.keep_limit = thresholds_.k();
    return selection;
  }

 private:
  const LayerThresholds& thresholds_;
  Compensation compensation_;
  bool cap_k_;
  bool two_pass_ = false;
};

/// Top-k, the baseline: keep the `k` largest scores of each row (ties: the larger position wins).
/// Exp-threshold compensation bounds pruned terms by the (k+1)-th largest score.
class TopKSelection {
 public:
  /// \param thresholds the calibrated terms c_h(L) for calibrated compensation, else may be null.
  TopKSelection(Index k, const Compensation& compensation, const LayerThresholds* thresholds = nullptr)
      : k_(k), compensation_(compensation), thresholds_(thresholds) {
    detail::require(k >= 1, "k", "k >= 1", k);
    compensation.validate("options.compensation");
    detail::require(compensation.denominator != DenominatorCompensation::calibrated ||
                        (thresholds && thresholds->has_denominator_terms()),
                    "options.thresholds", "a table with calibrated denominator terms for calibrated compensation",
                    "none");
  }

  bool needs_row_scores() const { return true; }
  bool has_running_threshold() const { return false; }
  bool caps_rows() const { return false; }
  Index k() const { return k_; }
  void require_query_head(Index head, const std::string& argument) const {
    if (thresholds_) detail::require_head(head, thresholds_->heads(), argument);
  }
  bool post_softmax() const { return false; }
  const Compensation& compensation() const { return compensation_; }
  const LayerThresholds* thresholds() const { return thresholds_; }

  template <class Acc>
  RowSelection<Acc> select(const RowFacts<Acc>& row, std::vector<Acc>& scratch) const {
    RowSelection<Acc> selection;
    if (row.length <= k_) {
      selection.dense = true;
      return selection;
    }
    scratch.assign(row.scores, row.scores + row.length);
    std::nth_element(scratch.begin(), scratch.begin() + k_, scratch.end(), std::greater<Acc>());
    const Acc largest_pruned = scratch[k_];  // the (k+1)-th largest
    const Acc kth = *std::min_element(scratch.begin(), scratch.begin() + k_);
    const Index above = Index(std::count_if(scratch.begin(), scratch.begin() + k_, [&](Acc a) { return a > kth; }));
    // Of the scores equal to the k-th largest, the k - above with the largest positions survive.
    Index ties_left = k_ - above;
    Index tie_from = row.length;
    for (Index j = row.length - 1; j >= 0 && ties_left > 0; --j)
      if (row.scores[j] == kth) {
        tie_from = j;
        --ties_left;
      }
    selection.score_threshold = kth;
    selection.tie_from = tie_from;
    selection.pruned_bound = largest_pruned;
    if (thresholds_ && thresholds_->has_denominator_terms())
      selection.calibrated_term = Acc(thresholds_->lookup(row.query_head, row.length).denominator_term);
    return selection;
  }

 private:
  Index k_;
  Compensation compensation_;
  const LayerThresholds* thresholds_;
};

}  // namespace toptheta
