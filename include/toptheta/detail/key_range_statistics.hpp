// Round 1 of partial attention over one key range (key_range_attention.hpp): the range's K rows scored once,
// each row's (m, Z), max-score key and the candidates its rule may keep.
#pragma once

#include <toptheta/detail/convert.hpp>
#include <toptheta/detail/exp_sum.hpp>
#include <toptheta/detail/kv_view.hpp>
#include <toptheta/detail/require.hpp>
#include <toptheta/detail/row_candidates.hpp>
#include <toptheta/detail/row_products.hpp>
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
#include <type_traits>
#include <vector>

namespace toptheta {

/// Where a view's keys lie in the whole KV cache: positions `[first, first + k.tokens())` of `total_keys`.
struct KeyRange {
  Index first = 0;
  Index total_keys = 0;  ///< n_kv of the whole cache (the row lengths of a call without a causal mask)
};

namespace detail {

/// The part of `KeyRangeAttention` that round 1 needs: the call's rows over the range, scored once by the
/// constructor, and their statistics; round 2 (`KeyRangeAttention::partial`) reads the same state.
template <class Scalar, class Selection, class KvView>
class KeyRangeStatistics {
 public:
  using Acc = accumulator_t<Scalar>;
  using KvScalar = typename KvView::value_type;

  KeyRangeStatistics(const TensorView<const Scalar>& q, const KvView& k, const KvView& v, KeyRange range,
                     const AttentionOptions& attention, const Selection& selection, const double* value_sum,
                     AttentionStats* stats)
      : q_(q), k_(k), v_(v), range_(range), selection_(selection), value_sum_(value_sum), stats_(stats) {
    validate(attention);
    if (stats_) stats_->reset(q.heads(), k.heads());
    rules_.resize(std::size_t(q.tokens() * q.heads()));
    statistics_.query_rows = q.tokens();
    statistics_.q_heads = q.heads();
    statistics_.rows.resize(rules_.size());
    choose_rules();
    for (Index kv_head = 0; kv_head < k.heads(); ++kv_head) score_keys(kv_head);
    for (std::size_t r = 0; r < rules_.size(); ++r) settle_candidates(r);
  }

  /// Round 1: this range's row statistics (`needed` says whether a round 1 is needed at all).
  const PartialStatistics<Acc>& statistics() const { return statistics_; }

 protected:
  static constexpr bool is_top_k = std::is_same_v<Selection, TopKSelection>;
  static constexpr bool is_top_theta = std::is_same_v<Selection, TopThetaSelection>;
  static constexpr Index chunk_keys = 256;  // keys scored at once per KV head

  struct Rule {
    RowSelection<Acc> selection;
    Index query_row = 0, query_head = 0, length = 0;
    Index visible = 0;                       // keys of this range the row sees: [first, first + visible)
    bool ranked = false;                     // top-k over more than k keys
    std::vector<ScoredKey<Acc>> candidates;  // kept here for round 2, a superset of S_i in the range

    /// Whether the row's kept set depends on keys of other ranges: top-k, a running threshold, a cap.
    bool needs_merged_statistics() const {
      return ranked || selection.running || (!selection.dense && selection.keep_limit != RowSelection<Acc>::unlimited);
    }
  };

  void validate(const AttentionOptions& attention) {
    using detail::require;
    require(k_.head_dim() == q_.head_dim(), "k.head_dim", "q.head_dim = " + std::to_string(q_.head_dim()),
            k_.head_dim());
    require(v_.head_dim() == q_.head_dim(), "v.head_dim", "q.head_dim = " + std::to_string(q_.head_dim()),
            v_.head_dim());
    require(v_.tokens() == k_.tokens(), "v.tokens", "k.tokens = " + std::to_string(k_.tokens()), v_.tokens());
    require(v_.heads() == k_.heads(), "v.heads", "k.heads = " + std::to_string(k_.heads()), v_.heads());
    require(q_.heads() % k_.heads() == 0, "q.heads", "a multiple of the KV heads (" + std::to_string(k_.heads()) + ")",
            q_.heads());
    require(range_.first >= 0, "range.first", "a position >= 0", range_.first);
    require(range_.total_keys >= 0 && range_.first <= range_.total_keys - k_.tokens(), "range.total_keys",
            "at least range.first + k.tokens() = " + std::to_string(range_.first) + " + " + std::to_string(k_.tokens()),
            range_.total_keys);
    require(attention.past >= 0, "options.past", "a position >= 0", attention.past);
    if (attention.causal)
      require(attention.past <= range_.total_keys - q_.tokens(), "range.total_keys",
              "at least past + query rows = " + std::to_string(attention.past) + " + " + std::to_string(q_.tokens()) +
                  " for causal attention",
              range_.total_keys);
    else
      require(q_.tokens() == 0 || range_.total_keys >= 1, "range.total_keys", "at least 1 key", range_.total_keys);
    const double scale = attention.scale ? *attention.scale : 1.0 / std::sqrt(double(q_.head_dim()));
    require(std::isfinite(scale) && scale > 0 && std::isfinite(Acc(scale)) && Acc(scale) > 0, "options.scale",
            "a finite value > 0", scale);
    scale_ = Acc(scale);
    causal_ = attention.causal;
    past_ = attention.past;
    for (Index h = 0; h < q_.heads(); ++h) selection_.require_query_head(h, "q.heads");
  }

  /// Each row's rule as far as its own facts decide it, and what round 1 must carry.
  void choose_rules() {
    std::vector<Acc> scratch;
    const Index heads = q_.heads(), count = k_.tokens();
    for (Index i = 0; i < q_.tokens(); ++i)
      for (Index h = 0; h < heads; ++h) {
        Rule& rule = rules_[std::size_t(i * heads + h)];
        rule.query_row = i;
        rule.query_head = h;
        rule.length = causal_ ? past_ + i + 1 : range_.total_keys;
        rule.visible = std::clamp<Index>(rule.length - range_.first, 0, count);
        Eigen::Matrix<Acc, 1, Eigen::Dynamic> query(q_.head_dim());
        detail::convert(q_.row(i, h), q_.head_dim(), query.data());
        if constexpr (is_top_k) {
          rule.selection.dense = rule.length <= selection_.k();
          rule.ranked = !rule.selection.dense;
        } else {
          rule.selection = selection_.select(RowFacts<Acc>{h, rule.length, query.norm(), 0, 0, nullptr}, scratch);
        }
        statistics_.needed = statistics_.needed || rule.needs_merged_statistics();
      }
    if constexpr (is_top_k) {
      statistics_.list = CandidateList::largest_scores;
      statistics_.list_limit = selection_.k() + 1;
    } else if constexpr (is_top_theta) {
      if (selection_.caps_rows()) {  // a list one longer than the cap tells whether it cut anything
        const bool running = needs_row_statistics(selection_.thresholds().space());
        statistics_.list = running ? CandidateList::above_running_threshold : CandidateList::largest_positions;
        statistics_.list_limit = running ? 0 : selection_.thresholds().k() + 1;
      }
    }
  }

  /// Scores the range's visible keys of KV head `kv_head` against each query row of its group, chunk by chunk.
  void score_keys(Index kv_head) {
    const Index group = q_.heads() / k_.heads(), rows = group * q_.tokens(), dim = q_.head_dim();
    Eigen::Matrix<Acc, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> queries(rows, dim), scores;
    Index end = 0;
    for (Index n = 0; n < rows; ++n) {
      const Rule& rule = rule_of(kv_head, n);
      detail::convert(q_.row(rule.query_row, rule.query_head), dim, queries.row(n).data());
      queries.row(n) *= scale_;
      end = std::max(end, rule.visible);
    }
    if (stats_) {
      stats_->k_rows_read[std::size_t(kv_head)] += std::uint64_t(end);
      stats_->v_rows_visible[std::size_t(kv_head)] += std::uint64_t(end);
    }
    for (Index from = 0; from < end; from += chunk_keys) {
      const Index count = std::min(chunk_keys, end - from);
      scores.resize(rows, count);
      for (Index run = from; run < from + count;) {
        const Index run_count = std::min(from + count - run, k_.contiguous_from(run));
        detail::dot_rows(detail::RowBlock<const Acc>{queries.data(), dim}, rows, k_.row(run, kv_head),
                         k_.token_stride(), run_count, dim,
                         detail::RowBlock<Acc>{scores.data() + (run - from), scores.cols()});
        run += run_count;
      }
      for (Index n = 0; n < rows; ++n) {
        Rule& rule = rule_of(kv_head, n);
        const Index visible = std::min(count, rule.visible - from);
        if (visible > 0) observe(rule, statistics_.rows[row_index(rule)], scores.row(n).data(), visible, from);
      }
    }
  }

  Index row_index(const Rule& rule) const { return rule.query_row * q_.heads() + rule.query_head; }
  /// Stacked row n of KV head `kv_head`'s group: query row n % query_rows of head n / query_rows of the group.
  Rule& rule_of(Index kv_head, Index n) {
    const Index group = q_.heads() / k_.heads();
    return rules_[std::size_t((n % q_.tokens()) * q_.heads() + kv_head * group + n / q_.tokens())];
  }

  /// Moves the row's (m, Z) and max-score key over `count` scores of keys from local position `from`, and keeps
  /// the keys its rule may keep.
  void observe(Rule& rule, PartialRowStatistics<Acc>& row, const Acc* scores, Index count, Index from) {
    Acc max = -std::numeric_limits<Acc>::infinity();
    for (Index c = 0; c < count; ++c) {
      const Acc a = scores[c];
      if (!(a < std::numeric_limits<Acc>::infinity())) row.non_finite = true;  // NaN or +inf
      if (a > max) max = a;
      if (a > row.best_score || (a == row.best_score && a > -std::numeric_limits<Acc>::infinity())) {
        row.best_score = a;
        row.best_position = range_.first + from + c;
      }
    }
    if (max > row.max) {
      row.sum *= rescale_factor(row.max, max);
      row.max = max;
    }
    if (has_softmax(row.max)) row.sum += detail::exp_sum(scores, count, row.max);
    const Index first = range_.first + from;
    const auto keep_if = [&](auto&& keeps) {
      for (Index c = 0; c < count; ++c)
        if (keeps(scores[c], first + c)) rule.candidates.push_back({first + c, scores[c]});
    };
    if (rule.selection.dense) {
      keep_if([](Acc a, Index) { return a == a; });
    } else if (rule.ranked) {
      keep_if([](Acc a, Index) { return a == a; });
      const Index limit = selection_k() + 1;
      if (Index(rule.candidates.size()) > 4 * limit + chunk_keys) keep_largest_scores(rule.candidates, limit);
    } else if (rule.selection.running) {
      const Acc floor = detail::forget_floor(rule.selection.running_threshold(row.max, row.sum));
      keep_if([&](Acc a, Index) { return a > floor; });
    } else {
      keep_if([&](Acc a, Index j) { return rule.selection.keeps(a, j); });
    }
  }

  Index selection_k() const {
    if constexpr (is_top_k) return selection_.k();
    return 0;
  }

  static void keep_largest_scores(std::vector<ScoredKey<Acc>>& keys, Index limit) {
    PartialStatistics<Acc>::sort_candidates(keys, CandidateList::largest_scores);
    if (Index(keys.size()) > limit) keys.resize(std::size_t(limit));
  }

  /// After every key: drops candidates below the final floor or beyond the list's limit, and copies those the
  /// round-1 list carries.
  void settle_candidates(std::size_t r) {
    Rule& rule = rules_[r];
    PartialRowStatistics<Acc>& row = statistics_.rows[r];
    auto& candidates = rule.candidates;
    if (rule.ranked) {
      keep_largest_scores(candidates, selection_k() + 1);
    } else if (rule.selection.running) {
      const Acc floor = detail::forget_floor(rule.selection.running_threshold(row.max, row.sum));
      candidates.erase(std::remove_if(candidates.begin(), candidates.end(),
                                      [&](const ScoredKey<Acc>& key) { return !(key.score > floor); }),
                       candidates.end());
    }
    if (statistics_.list == CandidateList::none || rule.selection.dense) return;
    if (!rule.ranked) PartialStatistics<Acc>::sort_candidates(candidates, statistics_.list);
    if (statistics_.list_limit > 0 && Index(candidates.size()) > statistics_.list_limit)
      candidates.resize(std::size_t(statistics_.list_limit));
    row.candidates = candidates;
  }

  TensorView<const Scalar> q_;
  KvView k_, v_;
  KeyRange range_;
  const Selection& selection_;
  const double* value_sum_;
  AttentionStats* stats_;
  Acc scale_ = 1;
  bool causal_ = true;
  Index past_ = 0;
  std::vector<Rule> rules_;  // row r = query row r / q_heads of query head r % q_heads
  PartialStatistics<Acc> statistics_;
};

}  // namespace detail
}  // namespace toptheta
