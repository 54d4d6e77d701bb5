// Rows with a running threshold (design.md §6): one pass over the keys moves m_t and Z_t, keeps the keys above
// τ_t as candidates, and reads the kept V rows only once τ_i is final.
#pragma once

#include <toptheta/detail/exp_sum.hpp>
#include <toptheta/detail/kv_view.hpp>
#include <toptheta/detail/row_candidates.hpp>
#include <toptheta/detail/row_products.hpp>
#include <toptheta/detail/row_survivors.hpp>
#include <toptheta/detail/threshold_scan.hpp>
#include <toptheta/stats.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace toptheta::detail {

/// Adds to the stacked rows `Rows` (a `BlockRows`) what the rows with a running threshold need: candidate
/// storage lent to each row, the one-pass step per tile (`collect_candidates`), the decision once every key is
/// seen and the gather of the kept V rows (`accumulate_candidates`), and the count of the V rows read.
template <class Rows>
struct RunningThresholdRows : Rows {
  using typename Rows::Acc;
  using typename Rows::Row;
  using Tiles = typename Rows::TileSize;
  using Rows::add_if_weighed;
  using Rows::add_kept_values;
  using Rows::call;
  using Rows::kv_head;
  using Rows::need_value;
  using Rows::needed_values;
  using Rows::output;
  using Rows::rows;
  using Rows::streaming_rows;
  using Rows::sums_kept_values;
  using Rows::visible_end;

  /// Candidates each row of a running threshold holds in its block's buffer before storage of its own
  /// (a multiple of 16, so that each row's share starts on a 64-byte line).
  static constexpr Index candidate_room = 512;

  Eigen::Matrix<std::int32_t, Eigen::Dynamic, 1> candidate_positions;
  Eigen::Matrix<Acc, Eigen::Dynamic, 1> candidate_scores;
  ScannedKeys<Acc> scanned_keys;                  // the tile's keys above a row's floor
  std::vector<Index> candidate_cursor;            // per row: its candidates added so far (`accumulate_candidates`)
  std::vector<std::int32_t> candidate_tile_ends;  // [tile][row]: where the row's candidates of the tile end

  /// Lends `candidate_room` candidates of the block's buffers to each row.
  void lend_candidate_room() {
    const Index stacked = Index(rows.size());
    candidate_positions.resize(stacked * candidate_room);
    candidate_scores.resize(stacked * candidate_room);
    for (Index n = 0; n < stacked; ++n)
      rows[std::size_t(n)].candidates.use_room(candidate_positions.data() + n * candidate_room,
                                               candidate_scores.data() + n * candidate_room, candidate_room);
  }

  /// A running threshold (design.md §6): moves m_t and Z_t over the tile's visible scores and keeps the keys
  /// above τ_t (less the rounding margin) as candidates. No V row is read until τ_i is known.
  /// A tile whose max is not above the floor has no candidate and is not scanned.
  template <class Visible>
  void collect_candidates(Row& row, const Visible& visible, Index first) {
    const Acc tile_max = max_of(visible.data(), visible.size());
    track_max_score_key<Acc>(row, visible.data(), visible.size(), first, tile_max);
    row.mass.total_mass += exp_sum(visible.data(), visible.size(), row.mass.max);
    const Acc floor = forget_floor(row.selection.running_threshold(row.mass.max, row.mass.total_mass));
    if (!(tile_max > floor)) return;
    row.candidates.add_above(visible.data(), visible.size(), first, floor, scanned_keys);
  }

  /// Decides S_i of a row with a running threshold once it has seen every key: the candidates above the
  /// final τ_i, capped to the largest positions, weighed `exp(a_ij - m_S)`.
  void decide_candidates(Row& row) {
    RowCandidates<Acc>& candidates = row.candidates;
    const Acc tau = row.selection.running_threshold(row.mass.max, row.mass.total_mass);
    row.selection.score_threshold = row.selection.pruned_bound = tau;
    candidates.keep_above(tau);
    if (candidates.size() > row.selection.keep_limit) {
      candidates.keep_largest_positions(row.selection.keep_limit);
      row.capped = true;
    }
    if (call->track_pruned_mass) row.mass.pruned_mass = row.mass.total_mass;
    if (candidates.size() == 0) return;  // the never-empty rule follows
    row.mass.kept = candidates.size();
    row.mass.kept_max = candidates.max_score();
    row.mass.kept_mass = candidates.weigh(row.mass.kept_max);
    if (call->track_pruned_mass)  // Σ_{j∉S_i} exp(a_ij - m_i) = Z_i - D_i exp(m_S - m_i)
      row.mass.pruned_mass =
          std::max(Acc(0), row.mass.total_mass - row.mass.kept_mass * std::exp(row.mass.kept_max - row.mass.max));
  }

  /// Decides the rows with a running threshold and adds their kept V rows, row by row: each row gathers its
  /// V rows at once (weights `exp(a_ij - m_S)` from the candidates, no copy). In a block of few rows (decode)
  /// every kept V row is asked for first, so that the loads from memory overlap instead of stalling the
  /// gathers one row at a time; a GEMM block's V rows of one KV head were read by its neighbours already
  /// (prefill). Gathering row by row measured as fast as replaying the tiles with GEMMs over kept columns.
  void accumulate_candidates() {
    for (Row& row : rows)
      if (row.selection.running) decide_candidates(row);
    if (output.rows() <= streaming_rows) {
      const Index row_bytes = stored_bytes<typename Rows::KvScalar>(output.cols());
      for (const Row& row : rows)
        for (Index t = 0; t < row.candidates.size(); ++t)
          ask_for_bytes(call->v.row(row.candidates.positions()[t], kv_head), row_bytes);
    }
    for (Index r = 0; r < Index(rows.size()); ++r) {
      const RowCandidates<Acc>& candidates = rows[std::size_t(r)].candidates;
      if (call->careful_values)
        for (Index t = 0; t < candidates.size(); ++t)
          add_if_weighed(candidates.scores()[t], candidates.positions()[t], r);
      if (call->collect_stats)
        for (Index t = 0; t < candidates.size(); ++t) need_value(candidates.positions()[t]);
    }
    if (sums_kept_values())
      for (Index r = 0; r < Index(rows.size()); ++r) {
        const RowCandidates<Acc>& candidates = rows[std::size_t(r)].candidates;
        add_kept_values(r, candidates.positions(), candidates.size(), call->value_rows(kv_head, 0));
      }
    if (call->careful_values) return;
    const Index dim = output.cols();
    if (output.rows() <= streaming_rows) {
      for (Index r = 0; r < Index(rows.size()); ++r) {
        const RowCandidates<Acc>& candidates = rows[std::size_t(r)].candidates;
        add_gathered_rows(candidates.scores(), candidates.positions(), candidates.size(), call->value_rows(kv_head, 0),
                          dim, output.row(r).data());
      }
      return;
    }
    // Tile by tile, from the last: the tile's V rows stay in cache while every row adds its own. A row's
    // candidates are grouped by tile in that order, so each group ends where the last of its tile stands:
    // found in one branch-free pass (ends[tile][row], 0 for none).
    const Index tiles = (visible_end + Tiles::kv_block - 1) / Tiles::kv_block, row_count = Index(rows.size());
    std::vector<std::int32_t>& ends = candidate_tile_ends;
    ends.assign(std::size_t(tiles * row_count), 0);
    for (Index r = 0; r < row_count; ++r) {
      const RowCandidates<Acc>& candidates = rows[std::size_t(r)].candidates;
      for (Index t = 0; t < candidates.size(); ++t)
        ends[std::size_t(candidates.positions()[t] / Tiles::kv_block * row_count + r)] = std::int32_t(t + 1);
    }
    std::vector<Index>& next = candidate_cursor;
    next.assign(rows.size(), 0);
    for (Index tile = tiles - 1; tile >= 0; --tile)
      for (Index r = 0; r < row_count; ++r) {
        const Index begin = next[std::size_t(r)], end = ends[std::size_t(tile * row_count + r)];
        if (end == 0) continue;
        const RowCandidates<Acc>& candidates = rows[std::size_t(r)].candidates;
        add_gathered_rows(candidates.scores() + begin, candidates.positions() + begin, end - begin,
                          call->value_rows(kv_head, 0), dim, output.row(r).data());
        next[std::size_t(r)] = end;
      }
  }

  /// After the rows are finished: the V rows the block read (each once), the call's kept rows, and the tiles
  /// none of them fell in.
  void count_needed_values(AttentionStats& stats) {
    std::uint64_t read = 0;
    for (std::size_t w = 0; w < needed_values.size(); ++w) {
      read += std::uint64_t(__builtin_popcountll(needed_values[w]));
      if (call->collect_stats && needed_values[w]) call->kept_rows.mark_word(kv_head, Index(w), needed_values[w]);
    }
    stats.v_rows_read[std::size_t(kv_head)] += read;
    for (Index first = 0; first < visible_end; first += Tiles::kv_block) {
      bool needed = false;
      for (Index position = first; position < std::min(first + Tiles::kv_block, visible_end); position += 64)
        needed = needed || (needed_values[std::size_t(position / 64)] != 0);
      stats.kv_tiles_without_survivor += !needed;
    }
  }

  /// Forgets the candidates at or below each row's running threshold: at the end of a key range, whose
  /// first tiles let many keys through while its sum was small.
  void forget_stale_candidates() {
    for (Row& row : rows)
      if (row.selection.running)
        row.candidates.keep_above(forget_floor(row.selection.running_threshold(row.mass.max, row.mass.total_mass)));
  }

  /// Of another key range's candidates of row r, those above the joined running threshold (after the rows'
  /// state is merged).
  void merge_candidates(Index r, const RunningThresholdRows& other) {
    Row& row = rows[std::size_t(r)];
    if (row.selection.running)
      row.candidates.append_above(other.rows[std::size_t(r)].candidates,
                                  forget_floor(row.selection.running_threshold(row.mass.max, row.mass.total_mass)));
  }
};

}  // namespace toptheta::detail
