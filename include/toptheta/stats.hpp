// What a sparse kernel kept and read (design.md §1, "Statistics").
#pragma once

#include <toptheta/scalar_traits.hpp>

#include <cstdint>
#include <vector>

namespace toptheta {

/// Counters of one attention call, per query head and per KV head.
///
/// "Kept" counts selected elements and distinct V rows; "read" counts rows a kernel actually loaded, including
/// the same row loaded again by another query block. `merge` adds the counters of several calls (layers, decode
/// steps): distinct-row counts then add per call.
struct AttentionStats {
  std::vector<std::uint64_t> elements_kept;     ///< per query head: Σ_i |S_i|
  std::vector<std::uint64_t> elements_visible;  ///< per query head: Σ_i L_i
  std::vector<std::uint64_t> v_rows_kept;       ///< per KV head: |∪ S_i| over the group's heads and the call's rows
  std::vector<std::uint64_t> v_rows_visible;    ///< per KV head: |∪ visible keys| = max_i L_i
  std::vector<std::uint64_t> k_rows_read;       ///< per KV head: K rows loaded
  std::vector<std::uint64_t> v_rows_read;       ///< per KV head: V rows loaded
  std::uint64_t kv_tiles = 0;                   ///< KV tiles scored (causal tiles above the diagonal are not)
  std::uint64_t kv_tiles_without_survivor = 0;  ///< scored KV tiles whose V rows were skipped
  std::uint64_t rows = 0;                       ///< query rows, summed over query heads
  std::uint64_t dense_rows = 0;                 ///< rows with L_i <= k, kept dense
  std::uint64_t empty_rows = 0;                 ///< rows with no survivor, given their max-score key
  std::uint64_t capped_rows = 0;                ///< rows cut to k by cap_k
  std::uint64_t extrapolated_rows = 0;          ///< rows whose threshold lookup extrapolated
  /// rows without a softmax (a NaN or +inf score, or every score -inf): output NaN, no V row read
  std::uint64_t non_finite_rows = 0;

  /// Sizes the per-head counters and zeroes everything.
  void reset(Index q_heads, Index kv_heads) {
    *this = AttentionStats{};
    elements_kept.assign(q_heads, 0);
    elements_visible.assign(q_heads, 0);
    v_rows_kept.assign(kv_heads, 0);
    v_rows_visible.assign(kv_heads, 0);
    k_rows_read.assign(kv_heads, 0);
    v_rows_read.assign(kv_heads, 0);
  }

  /// Adds `other`'s counters; an empty `this` takes `other`'s shape.
  void merge(const AttentionStats& other) {
    if (elements_kept.empty()) reset(Index(other.elements_kept.size()), Index(other.v_rows_kept.size()));
    add(elements_kept, other.elements_kept);
    add(elements_visible, other.elements_visible);
    add(v_rows_kept, other.v_rows_kept);
    add(v_rows_visible, other.v_rows_visible);
    add(k_rows_read, other.k_rows_read);
    add(v_rows_read, other.v_rows_read);
    kv_tiles += other.kv_tiles;
    kv_tiles_without_survivor += other.kv_tiles_without_survivor;
    rows += other.rows;
    dense_rows += other.dense_rows;
    empty_rows += other.empty_rows;
    capped_rows += other.capped_rows;
    extrapolated_rows += other.extrapolated_rows;
    non_finite_rows += other.non_finite_rows;
  }

  static std::uint64_t total(const std::vector<std::uint64_t>& counts) {
    std::uint64_t sum = 0;
    for (auto count : counts) sum += count;
    return sum;
  }
  /// Σ kept / Σ visible attention elements.
  double kept_fraction() const { return ratio(total(elements_kept), total(elements_visible)); }
  /// Σ distinct V rows kept / Σ V rows visible.
  double v_rows_kept_fraction() const { return ratio(total(v_rows_kept), total(v_rows_visible)); }

 private:
  static void add(std::vector<std::uint64_t>& into, const std::vector<std::uint64_t>& from) {
    if (into.size() < from.size()) into.resize(from.size(), 0);
    for (std::size_t i = 0; i < from.size(); ++i) into[i] += from[i];
  }
  static double ratio(std::uint64_t a, std::uint64_t b) { return b == 0 ? 0.0 : double(a) / double(b); }
};

}  // namespace toptheta
