// One key range of an attention call (a shard of the KV cache): its row statistics and partial outputs
// (partial_attention.hpp), with K read once and only the V rows of the kept keys read.
#pragma once

#include <toptheta/detail/convert.hpp>
#include <toptheta/detail/key_range_statistics.hpp>
#include <toptheta/detail/require.hpp>
#include <toptheta/partial_attention.hpp>
#include <toptheta/scalar_traits.hpp>
#include <toptheta/selection.hpp>
#include <toptheta/stats.hpp>
#include <toptheta/views.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

namespace toptheta {

/// Attention of one call's queries over one key range, for the rules of every kernel (`DenseSelection`,
/// `TopThetaSelection` in every space, with or without a cap, `TopKSelection`). The constructor reads the
/// range's K rows once; `statistics()` is round 1, `partial()` round 2 (partial_attention.hpp). A caller with
/// several ranges merges their statistics (when `statistics().needed`), hands the merged statistics to each
/// range's `partial`, merges the partials and calls `finish_partial_attention`; the result equals one kernel
/// call over all keys. Only the V rows of kept keys are read (and, for V-mean compensation without `value_sum`,
/// the range's visible V rows).
///
/// \param q `[query_rows, q_heads, head_dim]` with the placement of `attention` (past, causal, scale) in the
///        whole cache; `k`, `v` the range's `[k.tokens(), kv_heads, head_dim]` rows (contiguous or paged, of q's
///        type or int8 blocks).
/// \param value_sum null, or `kv_heads x head_dim` row-major `Σ v_j` over all of the range's V rows (a cache
///        keeps it as it appends), read for V-mean compensation of the rows that see the whole range.
/// \param stats when not null, gets the range's K rows read and V rows kept, visible and read per KV head.
/// \throws invalid_argument naming the argument for mismatched shapes, a range outside the cache, a query row
/// past the cache, a selection of another head count.
template <class Scalar, class Selection, class KvView = TensorView<const Scalar>>
class KeyRangeAttention : private detail::KeyRangeStatistics<Scalar, Selection, KvView> {
  using Base = detail::KeyRangeStatistics<Scalar, Selection, KvView>;
  using Base::is_top_k;
  using Base::k_;
  using Base::q_;
  using Base::range_;
  using Base::row_index;
  using Base::rules_;
  using Base::selection_;
  using Base::selection_k;
  using Base::statistics_;
  using Base::stats_;
  using Base::v_;
  using Base::value_sum_;
  using typename Base::Rule;

 public:
  using typename Base::Acc;
  using typename Base::KvScalar;

  KeyRangeAttention(const TensorView<const Scalar>& q, const KvView& k, const KvView& v, KeyRange range,
                    const AttentionOptions& attention, const Selection& selection, const double* value_sum = nullptr,
                    AttentionStats* stats = nullptr)
      : Base(q, k, v, range, attention, selection, value_sum, stats) {}

  /// Round 1: this range's row statistics (`needed` says whether a round 1 is needed at all).
  using Base::statistics;

  /// Round 2: this range's partial output. `merged` is the statistics of every range merged (this one's
  /// included); null when `statistics().needed` is false.
  /// \throws invalid_argument naming `merged` when it is missing although needed, or of other rows or rule.
  PartialOutput<Acc> partial(const PartialStatistics<Acc>* merged = nullptr) {
    detail::require(merged != nullptr || !statistics_.needed, "merged",
                    "the merged row statistics of every key range (this rule needs them)", "null");
    if (merged)
      detail::require(merged->query_rows == statistics_.query_rows && merged->q_heads == statistics_.q_heads &&
                          merged->list == statistics_.list && merged->list_limit == statistics_.list_limit &&
                          merged->rows.size() == statistics_.rows.size(),
                      "merged", "row statistics of this call (" + statistics_.describe() + ")", merged->describe());
    PartialOutput<Acc> output;
    output.query_rows = q_.tokens();
    output.q_heads = q_.heads();
    output.kv_heads = k_.heads();
    output.head_dim = q_.head_dim();
    output.rows.resize(rules_.size());
    std::vector<std::vector<Index>> read(std::size_t(k_.heads()));  // V rows read per KV head
    std::vector<std::vector<Index>> kept(std::size_t(k_.heads()));
    for (std::size_t r = 0; r < rules_.size(); ++r)
      output.rows[r] = partial_row(r, merged ? &merged->rows[r] : nullptr, read, kept);
    for (Index kv_head = 0; kv_head < k_.heads(); ++kv_head) {
      std::vector<Index>& kept_rows = kept[std::size_t(kv_head)];
      const std::uint64_t kept_count = distinct(kept_rows);
      kept_rows.resize(std::size_t(kept_count));
      if (stats_) {
        stats_->v_rows_read[std::size_t(kv_head)] += distinct(read[std::size_t(kv_head)]);
        stats_->v_rows_kept[std::size_t(kv_head)] += kept_count;
      }
    }
    for (std::size_t r = 0; r < rules_.size(); ++r) {
      PartialRowOutput<Acc>& row = output.rows[r];
      const std::vector<Index>& kept_rows = kept[std::size_t(rules_[r].query_head / (q_.heads() / k_.heads()))];
      row.best_kept_in_group =
          row.best_value.size() > 0 && std::binary_search(kept_rows.begin(), kept_rows.end(), row.state.best_position);
    }
    return output;
  }

 private:
  /// The row's rule once the merged statistics are known: τ_i of a running threshold, top-k's k-th score, a
  /// cap's first kept position (returned; the lowest position when nothing is cut).
  Index decide(Rule& rule, RowSelection<Acc>& selection, const PartialRowStatistics<Acc>& whole, bool& capped) const {
    Index cap_from = std::numeric_limits<Index>::min();
    if (selection.dense) return cap_from;
    if (!(whole.max > -std::numeric_limits<Acc>::infinity()) || whole.non_finite) return cap_from;  // no softmax
    if (rule.ranked) {
      const Index k = selection_k();
      detail::require(Index(whole.candidates.size()) >= k + 1, "merged",
                      "the " + std::to_string(k + 1) + " largest scores of row " + std::to_string(row_index(rule)),
                      whole.candidates.size());
      selection.score_threshold = whole.candidates[std::size_t(k - 1)].score;
      selection.tie_from = whole.candidates[std::size_t(k - 1)].position;
      selection.pruned_bound = whole.candidates[std::size_t(k)].score;
      if constexpr (is_top_k)
        if (const LayerThresholds* table = selection_.thresholds(); table && table->has_denominator_terms())
          selection.calibrated_term = Acc(table->lookup(rule.query_head, rule.length).denominator_term);
      return cap_from;
    }
    if (selection.running) {
      selection.score_threshold = selection.pruned_bound = selection.running_threshold(whole.max, whole.sum);
      selection.running = false;
    }
    if (selection.keep_limit != RowSelection<Acc>::unlimited) {  // candidates by position, decreasing
      Index survivors = 0, last_kept = cap_from;
      for (const ScoredKey<Acc>& key : whole.candidates) {
        if (!selection.keeps(key.score, key.position)) continue;
        if (++survivors > selection.keep_limit) {
          cap_from = last_kept;
          capped = true;
          break;
        }
        last_kept = key.position;
      }
    }
    return cap_from;
  }

  PartialRowOutput<Acc> partial_row(std::size_t r, const PartialRowStatistics<Acc>* whole,
                                    std::vector<std::vector<Index>>& read, std::vector<std::vector<Index>>& kept) {
    Rule& rule = rules_[r];
    const PartialRowStatistics<Acc>& own = statistics_.rows[r];
    const Index dim = q_.head_dim(), kv_head = rule.query_head / (q_.heads() / k_.heads());
    PartialRowOutput<Acc> out;
    RowState<Acc>& state = out.state;
    state.selection = rule.selection;
    const Index cap_from = rule.needs_merged_statistics() ? decide(rule, state.selection, *whole, state.capped)
                                                          : std::numeric_limits<Index>::min();
    state.selection.running = false;
    state.mass.max = own.max;
    state.mass.total_mass = own.sum;
    state.mass.length = rule.length;
    state.best_score = own.best_score;
    state.best_position = own.best_position;
    state.non_finite = own.non_finite;
    out.numerator.setZero(dim);
    if (selection_.compensation().v_mean_of_pruned) out.kept_value_sum.setZero(dim);
    Eigen::Matrix<Acc, 1, Eigen::Dynamic> value(dim);
    const auto value_row = [&](Index position) -> const Eigen::Matrix<Acc, 1, Eigen::Dynamic>& {
      detail::convert(v_.row(position - range_.first, kv_head), dim, value.data());
      read[std::size_t(kv_head)].push_back(position);
      return value;
    };
    if (state.has_softmax()) {
      for (const ScoredKey<Acc>& key : rule.candidates)
        if (key.position >= cap_from && (state.selection.dense || state.selection.keeps(key.score, key.position))) {
          ++state.mass.kept;
          state.mass.kept_max = std::max(state.mass.kept_max, key.score);
        }
      for (const ScoredKey<Acc>& key : rule.candidates)
        if (key.position >= cap_from && (state.selection.dense || state.selection.keeps(key.score, key.position))) {
          const Acc weight = std::exp(key.score - state.mass.kept_max);
          state.mass.kept_mass += weight;
          kept[std::size_t(kv_head)].push_back(key.position);
          if (weight != Acc(0)) out.numerator += weight * value_row(key.position);  // 0 · inf would be NaN
          if (out.kept_value_sum.size() > 0) out.kept_value_sum += value_row(key.position);
        }
      if (selection_.compensation().denominator == DenominatorCompensation::exact)
        state.mass.pruned_mass =
            state.mass.kept == 0
                ? state.mass.total_mass
                : std::max(Acc(0), state.mass.total_mass -
                                       state.mass.kept_mass * std::exp(state.mass.kept_max - state.mass.max));
      // The never-empty rule may need this range's max-score key: always when the range kept nothing and the
      // rule decided alone; with merged statistics only in the one range that holds the row's max-score key.
      const bool owns_best = whole ? whole->best_position == own.best_position && own.best_position >= 0 &&
                                         !state.selection.keeps(whole->best_score, whole->best_position) &&
                                         !state.selection.dense
                                   : own.best_position >= 0;
      if (state.mass.kept == 0 && owns_best) out.best_value = value_row(own.best_position);
    }
    if (selection_.compensation().v_mean) out.value_sum = range_value_sum(kv_head, rule.visible);
    return out;
  }

  /// Σ_{j<first+visible} v_j over the range: from `value_sum` when the row sees the whole range, else read.
  Eigen::Matrix<Acc, 1, Eigen::Dynamic> range_value_sum(Index kv_head, Index visible) {
    const Index dim = q_.head_dim();
    if (value_sum_ && visible == k_.tokens())
      return Eigen::Map<const Eigen::RowVectorXd>(value_sum_ + kv_head * dim, dim).template cast<Acc>();
    Eigen::RowVectorXd sum = Eigen::RowVectorXd::Zero(dim), row(dim);
    for (Index t = 0; t < visible; ++t) {
      detail::convert(v_.row(t, kv_head), dim, row.data());
      sum += row;
    }
    return sum.template cast<Acc>();
  }

  static std::uint64_t distinct(std::vector<Index>& positions) {
    std::sort(positions.begin(), positions.end());
    return std::uint64_t(std::unique(positions.begin(), positions.end()) - positions.begin());
  }
};

}  // namespace toptheta
