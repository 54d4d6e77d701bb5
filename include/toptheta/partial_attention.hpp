// Partial attention of a key range (design.md §3, §6): what each range of a split or sharded KV cache hands on,
// how the ranges' partials merge, and how the merged partial finishes into o_i.
//
// A call over keys split into ranges (processes, machines) runs in at most two rounds:
//  1. row statistics (only when `PartialStatistics::needed` says so): each range's online-softmax state (m, Z),
//     its max-score key and, for the rules that need them, a short list of scored keys; merged over the ranges,
//     they decide S_i of every row exactly as one call over all keys would (τ_i of a row-relative space, the k-th
//     largest score of top-k, the position a cap cuts at);
//  2. partial outputs: each range's kept numerator Σ_{j∈S_i} exp(a_ij - m_S) v_j with its masses; merged by the
//     online-softmax merge, then finished (never-empty rule, compensations) by `finish_partial_attention`.
// No K or V row crosses ranges. `KeyRangeAttention` (key_range_attention.hpp) computes both rounds on one range;
// partial_encoding.hpp writes them as bytes.
#pragma once

#include <toptheta/compensation.hpp>
#include <toptheta/detail/require.hpp>
#include <toptheta/online_softmax.hpp>
#include <toptheta/scalar_traits.hpp>
#include <toptheta/selection.hpp>
#include <toptheta/stats.hpp>
#include <toptheta/views.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <utility>
#include <vector>

namespace toptheta {

/// A key of a row and its score `a_ij`.
template <class Acc>
struct ScoredKey {
  Index position = 0;  ///< j, in the whole cache
  Acc score = 0;       ///< a_ij
};

/// Which scored keys a range's row statistics carry: those a row's kept set may need from other ranges.
enum class CandidateList : std::uint8_t {
  none,                     ///< each key is decided alone, or by (m_i, Z_i) only
  largest_scores,           ///< top-k: the range's `limit` = k + 1 largest scores (ties: the larger position first)
  largest_positions,        ///< a cap of k on a fixed threshold: the range's `limit` = k survivors of largest position
  above_running_threshold,  ///< a cap in a row-relative space: the keys above the range's running threshold
};

/// Round 1 of one row over one key range: the online-softmax state over the range's visible keys (design.md §6:
/// merged over the ranges it is the row's (m_i, Z_i)), its max-score key, and the keys `CandidateList` names.
template <class Acc>
struct PartialRowStatistics {
  Acc max = -std::numeric_limits<Acc>::infinity();         ///< m over the range's visible keys, NaN scores left out
  Acc sum = 0;                                             ///< Z = Σ exp(a_ij - m)
  Acc best_score = -std::numeric_limits<Acc>::infinity();  ///< the max-score key's a_ij
  Index best_position = -1;                                ///< its j (ties: the larger); -1 for none
  bool non_finite = false;                                 ///< some visible score is NaN or +inf
  /// Sorted: by score then position, decreasing (`largest_scores`), else by position, decreasing.
  std::vector<ScoredKey<Acc>> candidates;
};

/// Round 1 of every row of a call over one key range, or merged over several. Row `r` is query row
/// `r / q_heads` of query head `r % q_heads`.
template <class Acc>
struct PartialStatistics {
  Index query_rows = 0, q_heads = 0;
  CandidateList list = CandidateList::none;
  Index list_limit = 0;  ///< the most candidates a row keeps (`largest_scores`, `largest_positions`), else 0
  /// Whether the rule needs this round before the partial outputs: any row-relative space, a cap, or top-k.
  bool needed = false;
  std::vector<PartialRowStatistics<Acc>> rows;

  /// Joins the same call's statistics over another key range (disjoint from this one's keys).
  /// \throws invalid_argument naming `other` when the two do not describe the same rows and rule.
  void merge(const PartialStatistics& other) {
    detail::require(other.query_rows == query_rows && other.q_heads == q_heads && other.list == list &&
                        other.list_limit == list_limit && other.needed == needed && other.rows.size() == rows.size(),
                    "other", "row statistics of the same rows and rule (" + describe() + ")", other.describe());
    for (std::size_t r = 0; r < rows.size(); ++r) merge_row(rows[r], other.rows[r]);
  }

  std::string describe() const {
    return std::to_string(query_rows) + " query rows x " + std::to_string(q_heads) + " heads, list " +
           std::to_string(int(list)) + " of " + std::to_string(list_limit);
  }

 private:
  void merge_row(PartialRowStatistics<Acc>& row, const PartialRowStatistics<Acc>& other) const {
    const Acc max = std::max(row.max, other.max);
    row.sum = row.sum * rescale_factor(row.max, max) + other.sum * rescale_factor(other.max, max);
    row.max = max;
    if (other.best_score > row.best_score ||
        (other.best_score == row.best_score && other.best_position > row.best_position)) {
      row.best_score = other.best_score;
      row.best_position = other.best_position;
    }
    row.non_finite = row.non_finite || other.non_finite;
    if (list == CandidateList::none) return;
    row.candidates.insert(row.candidates.end(), other.candidates.begin(), other.candidates.end());
    sort_candidates(row.candidates, list);
    if (list_limit > 0 && Index(row.candidates.size()) > list_limit) row.candidates.resize(std::size_t(list_limit));
  }

 public:
  /// Sorts a row's candidates in the order `list` keeps them (NaN scores are never candidates).
  static void sort_candidates(std::vector<ScoredKey<Acc>>& candidates, CandidateList list) {
    if (list == CandidateList::largest_scores)
      std::sort(candidates.begin(), candidates.end(), [](const ScoredKey<Acc>& a, const ScoredKey<Acc>& b) {
        return a.score > b.score || (a.score == b.score && a.position > b.position);
      });
    else
      std::sort(candidates.begin(), candidates.end(),
                [](const ScoredKey<Acc>& a, const ScoredKey<Acc>& b) { return a.position > b.position; });
  }
};

/// Round 2 of one row over one key range: the row's rule (decided), its masses over the range (`RowState`, as a
/// kernel keeps them per key range) and the range's sums of V rows.
template <class Acc>
struct PartialRowOutput {
  using Vector = Eigen::Matrix<Acc, 1, Eigen::Dynamic>;
  RowState<Acc> state;    ///< selection: the decided rule; mass: over the range's visible keys (length L_i)
  Vector numerator;       ///< Σ_{j∈S_i in the range} exp(a_ij - m_S) v_j
  Vector kept_value_sum;  ///< Σ_{j∈S_i in the range} v_j (V mean of the pruned rows), else empty
  Vector value_sum;       ///< Σ_{j<L_i in the range} v_j (V-mean compensation), else empty
  /// v of the range's max-score key, when the row may need it for the never-empty rule (the range kept
  /// nothing), else empty.
  Vector best_value;
  /// Whether some other row of the range's KV head kept the max-score key (with `best_value`): a row that
  /// takes it for the never-empty rule does not count it among the V rows kept again.
  bool best_kept_in_group = false;
};

/// Round 2 of every row of a call over one key range, or merged over several (rows as `PartialStatistics`).
template <class Acc>
struct PartialOutput {
  Index query_rows = 0, q_heads = 0, kv_heads = 0, head_dim = 0;
  std::vector<PartialRowOutput<Acc>> rows;

  /// Joins the same call's partial over another key range (disjoint from this one's keys): the online-softmax
  /// merge of the masses and numerators, sums of the V sums, and the V row of the max-score key of the two.
  /// \throws invalid_argument naming `other` when the two do not describe the same rows and decided rules.
  void merge(const PartialOutput& other) {
    detail::require(other.query_rows == query_rows && other.q_heads == q_heads && other.kv_heads == kv_heads &&
                        other.head_dim == head_dim && other.rows.size() == rows.size(),
                    "other", "a partial output of the same shape (" + describe() + ")", other.describe());
    for (std::size_t r = 0; r < rows.size(); ++r) {
      PartialRowOutput<Acc>& row = rows[r];
      const PartialRowOutput<Acc>& theirs = other.rows[r];
      detail::require(same_rule(row.state, theirs.state), "other",
                      "row " + std::to_string(r) +
                          " decided by the same rule (L_i = " + std::to_string(row.state.mass.length) +
                          ", τ_i = " + std::to_string(double(row.state.selection.score_threshold)) + ")",
                      "L_i = " + std::to_string(theirs.state.mass.length) +
                          ", τ_i = " + std::to_string(double(theirs.state.selection.score_threshold)));
      detail::require(theirs.state.mass.kept <= row.state.mass.length - row.state.mass.kept, "other",
                      "row " + std::to_string(r) +
                          " over other keys: at most L_i = " + std::to_string(row.state.mass.length) + " kept in all",
                      std::to_string(row.state.mass.kept) + " + " + std::to_string(theirs.state.mass.kept));
      const bool their_best =
          theirs.state.best_score > row.state.best_score ||
          (theirs.state.best_score == row.state.best_score && theirs.state.best_position > row.state.best_position);
      if (their_best) {
        row.best_value = theirs.best_value;
        row.best_kept_in_group = theirs.best_kept_in_group;
      }
      const auto [own_factor, their_factor] = row.state.merge(theirs.state);
      row.numerator = own_factor * row.numerator + their_factor * theirs.numerator;
      add_sum(row.kept_value_sum, theirs.kept_value_sum);
      add_sum(row.value_sum, theirs.value_sum);
    }
  }

  std::string describe() const {
    return std::to_string(query_rows) + " query rows x " + std::to_string(q_heads) + " heads (" +
           std::to_string(kv_heads) + " KV heads) x head_dim " + std::to_string(head_dim);
  }

 private:
  static bool same_bits(Acc a, Acc b) { return a == b || (a != a && b != b); }
  static bool same_rule(const RowState<Acc>& a, const RowState<Acc>& b) {
    return a.mass.length == b.mass.length && a.selection.dense == b.selection.dense &&
           same_bits(a.selection.score_threshold, b.selection.score_threshold) &&
           a.selection.tie_from == b.selection.tie_from &&
           same_bits(a.selection.pruned_bound, b.selection.pruned_bound);
  }
  static void add_sum(typename PartialRowOutput<Acc>::Vector& into,
                      const typename PartialRowOutput<Acc>::Vector& from) {
    detail::require(into.size() == from.size(), "other", "V sums of " + std::to_string(into.size()) + " values",
                    from.size());
    into += from;
  }
};

/// Writes o_i of every row of `merged` (the partials of every key range of one call, merged) into `out`
/// `[query_rows, q_heads, head_dim]`: the never-empty rule, the softmax denominator with its compensation and
/// V-mean compensation, as `selection` says (design.md §1 steps 3–6). The result equals one call of the kernel
/// over all keys (to the rounding of its sums). Adds the per-row counters to `stats` (rows, elements kept and
/// visible, dense, empty, capped, extrapolated and non-finite rows, and as V rows kept the max-score rows of the
/// rows that kept nothing and that no other row kept); each range's `KeyRangeAttention` counted its K and V rows
/// read and the V rows its rows kept.
/// \throws invalid_argument naming `out` for a shape other than the partial's, `merged` for a row that needs a
/// V sum or a max-score V row no range sent.
template <class Scalar, class Acc, class Selection>
void finish_partial_attention(const PartialOutput<Acc>& merged, const Selection& selection,
                              const TensorView<Scalar>& out, AttentionStats* stats = nullptr) {
  detail::require(
      out.tokens() == merged.query_rows && out.heads() == merged.q_heads && out.head_dim() == merged.head_dim, "out",
      "shape [" + std::to_string(merged.query_rows) + ", " + std::to_string(merged.q_heads) + ", " +
          std::to_string(merged.head_dim) + "] of the partial",
      "[" + std::to_string(out.tokens()) + ", " + std::to_string(out.heads()) + ", " + std::to_string(out.head_dim()) +
          "]");
  const Compensation& compensation = selection.compensation();
  if (stats && stats->elements_kept.empty()) stats->reset(merged.q_heads, merged.kv_heads);
  std::vector<std::pair<Index, Index>> best_rows;  // (KV head, position) of the rows that kept nothing
  for (std::size_t r = 0; r < merged.rows.size(); ++r) {
    const Index query_row = Index(r) / merged.q_heads, head = Index(r) % merged.q_heads;
    const PartialRowOutput<Acc>& partial = merged.rows[r];
    RowState<Acc> row = partial.state;
    Eigen::Map<Eigen::Matrix<Scalar, 1, Eigen::Dynamic>> output(out.row(query_row, head), merged.head_dim);
    if (stats) {
      ++stats->rows;
      stats->elements_visible[std::size_t(head)] += std::uint64_t(row.mass.length);
    }
    if (!row.has_softmax()) {  // as the kernels: no probabilities, o_i is NaN
      output.setConstant(std::numeric_limits<Scalar>::quiet_NaN());
      if (stats) ++stats->non_finite_rows;
      continue;
    }
    typename PartialRowOutput<Acc>::Vector numerator = partial.numerator, kept_value_sum = partial.kept_value_sum;
    if (row.keep_best_if_empty()) {
      detail::require(partial.best_value.size() == merged.head_dim, "merged",
                      "the V row of the max-score key of row " + std::to_string(r) + " (nothing was kept)",
                      "no range sent it");
      numerator = partial.best_value;
      if (compensation.v_mean_of_pruned) kept_value_sum = partial.best_value;
      if (stats) ++stats->empty_rows;
      if (!partial.best_kept_in_group)
        best_rows.emplace_back(head / (merged.q_heads / merged.kv_heads), row.best_position);
    }
    detail::require(!compensation.v_mean || partial.value_sum.size() == merged.head_dim, "merged",
                    "the V sum of row " + std::to_string(r) + " for V-mean compensation", "none");
    row.normalise(
        numerator, compensation, selection.post_softmax(),
        [&] { return (partial.value_sum / Acc(row.mass.length)).eval(); }, [&] { return kept_value_sum; });
    output = numerator.template cast<Scalar>();
    if (stats) {
      stats->elements_kept[std::size_t(head)] += std::uint64_t(row.mass.kept);
      stats->dense_rows += row.selection.dense;
      stats->capped_rows += row.capped;
      stats->extrapolated_rows += row.selection.extrapolated;
    }
  }
  if (!stats) return;
  std::sort(best_rows.begin(), best_rows.end());
  best_rows.erase(std::unique(best_rows.begin(), best_rows.end()), best_rows.end());
  if (stats->v_rows_kept.size() < std::size_t(merged.kv_heads)) stats->v_rows_kept.resize(std::size_t(merged.kv_heads));
  for (const auto& [kv_head, position] : best_rows) ++stats->v_rows_kept[std::size_t(kv_head)];
}

}  // namespace toptheta
