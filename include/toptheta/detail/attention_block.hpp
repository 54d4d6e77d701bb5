// The rows of one work item (a query block of one KV head's group, or its partial rows over a key range) and
// the steps of design.md §1 on them, tile by tile: scores, selection, weights, the kept V rows, o_i.
#pragma once

#include <toptheta/compensation.hpp>
#include <toptheta/detail/block_rows.hpp>
#include <toptheta/detail/convert.hpp>
#include <toptheta/detail/row_survivors.hpp>
#include <toptheta/detail/running_threshold_rows.hpp>
#include <toptheta/detail/tile_survivors.hpp>
#include <toptheta/selection.hpp>
#include <toptheta/stats.hpp>
#include <toptheta/value_means.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

namespace toptheta::detail {

/// The stacked rows of one work item (`BlockRows`) with both ways of selecting: rules decided before a tile
/// (`TileSurvivors`) and running thresholds (`RunningThresholdRows`, design.md §6). The plans run its steps:
/// `select_rows`, then for each tile (from the last) `begin_tile`, `score_keys`, `weigh_tile`,
/// `accumulate_values`, then `finish_rows`; with split keys the partial rows of several ranges `merge` first.
template <class Tiles, class Scalar, class Selection, class KvView>
struct AttentionBlock : TileSurvivors<RunningThresholdRows<BlockRows<Tiles, Scalar, Selection, KvView>>> {
  using Rows = BlockRows<Tiles, Scalar, Selection, KvView>;
  using Running = RunningThresholdRows<Rows>;
  using Tile = TileSurvivors<Running>;
  using Rows::add_kept_values;
  using Rows::call;
  using Rows::kept_value_sums;
  using Rows::kv_head;
  using Rows::need_value;
  using Rows::needed_values;
  using Rows::output;
  using Rows::rows;
  using Rows::score;
  using Rows::scores_rows_first;
  using Rows::sums_kept_values;
  using Rows::visible_end;
  using Running::accumulate_candidates;
  using Running::collect_candidates;
  using Running::count_needed_values;
  using Running::merge_candidates;
  using Tile::accumulate_values;
  using Tile::clear_tile_selection;
  using Tile::select_and_weigh;
  using Tile::settle_tile_columns;
  using Tile::survivor_columns;
  using Tile::survivor_runs;
  using Tile::tile_first;
  using Tile::tile_width;
  using Tile::weigh_all;
  using Tile::weigh_survivors;
  using typename Rows::Acc;
  using typename Rows::Call;
  using typename Rows::KvScalar;
  using typename Rows::Matrix;
  using typename Rows::Row;
  using typename Tile::SurvivorRun;

  Matrix row_scores;   // a_ij of every visible key, for selections that need whole rows
  Matrix tile_scores;  // a_ij of the tile's keys
  std::vector<Acc> scratch;

  /// Takes the query rows of block `query_block` of `state`'s call for every head of KV head `kv` (a block
  /// lent again, by any call of a batch, starts afresh here, keeping only the room of its buffers).
  void start(Call& state, Index kv, Index query_block) {
    this->take_rows(state, kv, query_block);
    if (call->defers_values) this->lend_candidate_room();
    this->reserve_survivors();
  }

  /// Decides each row's rule. Selections that need whole rows get their scores, max and sum first.
  void select_rows(AttentionStats& stats) {
    if (scores_rows_first()) {
      stats.k_rows_read[std::size_t(kv_head)] += std::uint64_t(visible_end);
      row_scores.resize(Index(rows.size()), visible_end);
      for (Index first = 0; first < visible_end; first += Tiles::kv_block) {
        const Index width = std::min(Tiles::kv_block, visible_end - first);
        score(first, width, row_scores.middleCols(first, width));
      }
    }
    for (Index r = 0; r < Index(rows.size()); ++r) {
      Row& row = rows[std::size_t(r)];
      RowFacts<Acc> facts{row.query_head, row.length, row.query_norm, 0, 0, nullptr};
      if (scores_rows_first()) {
        facts.scores = row_scores.row(r).data();
        const auto statistics = RowStatistics<Acc>::of(facts.scores, row.length);
        if (!has_softmax(statistics.max)) {  // the tiles find out the same; nothing to select from
          row.selection = RowState<Acc>::keep_nothing();
          continue;
        }
        facts.max = row.mass.max = statistics.max;
        facts.sum = row.mass.total_mass = statistics.sum;
      }
      row.selection = call->selection.select(facts, scratch);
    }
  }

  /// Keys [first, first + KvBlock): update each row's max, select, and accumulate the kept V rows.
  void accumulate_tile(Index first, AttentionStats& stats) {
    begin_tile(first);
    score_keys(first, tile_width, stats);
    if (weigh_tile(stats)) accumulate_values(first, tile_width);
  }

  /// Starts the tile of keys [first, first + KvBlock) that are visible to some row.
  void begin_tile(Index first) {
    tile_first = first;
    tile_width = std::min(Tiles::kv_block, visible_end - first);
    if (!scores_rows_first()) tile_scores.resize(Index(rows.size()), tile_width);
  }

  /// Scores of the tile's keys [from, from + count), unless the rows' scores are known already.
  void score_keys(Index from, Index count, AttentionStats& stats, NextRows<KvScalar> next = {}) {
    if (scores_rows_first()) return;
    score(from, count, tile_scores.middleCols(from - tile_first, count), next);
    stats.k_rows_read[std::size_t(kv_head)] += std::uint64_t(count);
  }

  /// Updates each row's max, selects and weighs the tile's elements. Returns whether any V row is needed.
  bool weigh_tile(AttentionStats& stats) {
    const Index first = tile_first, width = tile_width;
    const Index row_count = Index(rows.size());
    const auto scores = scores_rows_first() ? row_scores.middleCols(first, width) : tile_scores.leftCols(width);
    clear_tile_selection();
    Index dense_elements = 0;
    ++stats.kv_tiles;
    for (Index r = 0; r < row_count; ++r) {
      Row& row = rows[std::size_t(r)];
      const Index visible = std::min(width, row.length - first);
      if (visible <= 0) continue;
      const auto row_tile = scores.row(r).head(visible);
      if (row.selection.dense) {
        track_max_score_key<Acc>(row, row_tile.data(), visible, first, max_of(row_tile.data(), visible));
        weigh_all(r, row, row_tile);
        dense_elements += visible;
      } else if (row.selection.running) {
        collect_candidates(row, row_tile, first);
      } else {
        select_and_weigh(r, row, row_tile, first);
      }
    }
    weigh_survivors();
    if (sums_kept_values())
      for (const SurvivorRun& run : survivor_runs)
        add_kept_values(run.row, survivor_columns.data() + run.begin, run.end - run.begin,
                        call->value_rows(kv_head, tile_first));
    return settle_tile_columns(dense_elements, stats);
  }

  /// Joins the same rows' partial state over another key range; of its candidates, those above the joined
  /// running threshold.
  void merge(const AttentionBlock& other) {
    for (Index r = 0; r < Index(rows.size()); ++r) {
      Row& row = rows[std::size_t(r)];
      const auto [own, theirs] = row.merge(other.rows[std::size_t(r)]);
      output.row(r) = own * output.row(r) + theirs * other.output.row(r);
      if (sums_kept_values()) kept_value_sums.row(r) += other.kept_value_sums.row(r);
      merge_candidates(r, other);
    }
    if (call->collect_stats)  // both blocks hold the same rows: vectors of the same size
      for (std::size_t w = 0; w < needed_values.size(); ++w) needed_values[w] |= other.needed_values[w];
  }

  /// Applies the never-empty rule, the compensations, and writes o_i.
  void finish_rows(AttentionStats& stats) {
    const Compensation& compensation = call->selection.compensation();
    const Index row_bytes = call->shape.head_dim * Index(sizeof(Scalar));
    const auto output_row = [&](Index r) {
      return call->out.row(rows[std::size_t(r)].query_row, rows[std::size_t(r)].query_head);
    };
    const auto output_row_of = [&](Index r) {
      return Eigen::Map<Eigen::Matrix<Scalar, 1, Eigen::Dynamic>>(output_row(r), call->shape.head_dim);
    };
    if (call->defers_values) accumulate_candidates();
    for (Index r = 0; r < Index(rows.size()); ++r) {
      Rows::template ask_ahead<true>(r, Index(rows.size()), output_row, row_bytes);
      Row& row = rows[std::size_t(r)];
      row.mass.length = row.length;
      stats.elements_visible[std::size_t(row.query_head)] += std::uint64_t(row.length);
      ++stats.rows;
      if (!row.has_softmax()) {  // design.md §1 has no probabilities to give: o_i is NaN, as p_ij are
        output_row_of(r).setConstant(std::numeric_limits<Scalar>::quiet_NaN());
        ++stats.non_finite_rows;
        continue;
      }
      if (row.keep_best_if_empty()) {
        convert(call->v.row(row.best_position, kv_head), output.cols(), output.row(r).data());
        if (sums_kept_values()) kept_value_sums.row(r) = output.row(r);
        ++stats.empty_rows;
        if (call->defers_values) {
          if (call->collect_stats) need_value(row.best_position);
        } else {
          ++stats.v_rows_read[std::size_t(kv_head)];
          if (call->collect_stats) call->kept_rows.mark(kv_head, row.best_position);
        }
      }
      row.normalise(
          output.row(r), compensation, call->selection.post_softmax(),
          [&] { return call->value_means->mean(kv_head, row.length); }, [&] { return kept_value_sums.row(r); });
      // x · 0 is 0 for a finite x and NaN otherwise: one vectorised sum (Eigen's allFinite tests each element).
      if (!call->careful_values && !((output.row(r).array() * Acc(0)).sum() == Acc(0))) call->non_finite_output = true;
      output_row_of(r) = output.row(r).template cast<Scalar>();
      stats.elements_kept[std::size_t(row.query_head)] += std::uint64_t(row.mass.kept);
      stats.dense_rows += row.selection.dense;
      stats.capped_rows += row.capped;
      stats.extrapolated_rows += row.selection.extrapolated;
    }
    if (call->defers_values && call->collect_stats) count_needed_values(stats);
  }
};

}  // namespace toptheta::detail
