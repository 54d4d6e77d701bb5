// One K/V tile's selected elements over the rows of a block, their weights exp(a_ij - m_S), and the kept V
// rows added to the output numerators (design.md §1, steps 3 to 5 for rules decided before the tile).
#pragma once

#include <toptheta/detail/convert.hpp>
#include <toptheta/detail/kv_view.hpp>
#include <toptheta/detail/row_products.hpp>
#include <toptheta/detail/row_survivors.hpp>
#include <toptheta/detail/serial_product.hpp>
#include <toptheta/detail/threshold_scan.hpp>
#include <toptheta/stats.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace toptheta::detail {

/// Adds to the stacked rows `Rows` (a `BlockRows`) one tile's selection and V accumulation: each row's
/// survivors (sparse rows) or weights of every visible key (dense rows), the tile's kept columns, and the
/// choice between gathering V rows per row, streaming them, or a GEMM over the kept columns.
template <class Rows>
struct TileSurvivors : Rows {
  using typename Rows::Acc;
  using typename Rows::KvScalar;
  using typename Rows::Matrix;
  using typename Rows::Row;
  using Call = typename Rows::Call;
  using Tiles = typename Rows::TileSize;
  using Rows::add_if_weighed;
  using Rows::call;
  using Rows::converted_rows;
  using Rows::kv_head;
  using Rows::need_value;
  using Rows::output;
  using Rows::rows;
  using Rows::streaming_rows;

  /// A tile of a GEMM block whose selected elements fill less than 1 / sparse_tile_ratio of (rows x kept
  /// columns), and no dense row's, is accumulated row by row from each row's survivors (`add_gathered_rows`)
  /// instead of by a GEMM (a streaming block does so whenever some column of the tile is not kept).
  static constexpr Index sparse_tile_ratio = 3;

  Matrix tile_weights;                       // exp(a_ij - m_S) of the tile, for the GEMM and streaming paths
  Matrix gathered_weights, gathered_values;  // the kept columns of a tile, for one GEMM
  std::vector<char> column_kept;
  std::vector<Index> kept_columns;
  // The tile's selected elements of sparse rows, row by row: column c and score a_ic - m_kept, then (after
  // `weigh_survivors`) weight exp(a_ic - m_kept), filled to survivor_count. The room grows as a tile needs it
  // (room for every element of a tile would be rows x kv_block, where Top-θ keeps a few percent).
  struct SurvivorRun {
    Index row, begin, end;
  };
  std::vector<std::int32_t> survivor_columns;
  // Eigen storage: aligned, so that the vectorised exp over it rounds the same for any thread's allocation.
  Eigen::Matrix<Acc, Eigen::Dynamic, 1> survivor_weights;
  std::vector<SurvivorRun> survivor_runs;
  Index survivor_count = 0;
  std::vector<char> weights_written;     // per row: tile_weights holds its weights of this tile (dense rows)
  Index tile_first = 0, tile_width = 0;  // the tile being accumulated
  bool tile_sparse = false;              // its V rows are added row by row from the survivors

  /// Room for the survivors of a first tile, kept by a block lent again.
  void reserve_survivors() {
    make_survivor_room(Index(rows.size()) * std::min<Index>(Tiles::kv_block, 16));
    survivor_runs.reserve(rows.size());
  }

  /// Clears the tile's survivor lists and column marks before its rows are selected and weighed.
  void clear_tile_selection() {
    tile_weights.resize(Index(rows.size()), tile_width);
    weights_written.assign(rows.size(), 0);
    column_kept.assign(std::size_t(tile_width), 0);
    survivor_runs.clear();
    survivor_count = 0;
  }

  /// Room for `more` survivors after the tile's current ones (and the scan's slack), keeping them.
  void make_survivor_room(Index more) {
    const Index needed = survivor_count + more + scan_slack;
    if (needed <= Index(survivor_columns.size())) return;
    const Index room = std::max(needed, 2 * Index(survivor_columns.size()));
    survivor_columns.resize(std::size_t(room));
    survivor_weights.conservativeResize(room);
  }

  /// A dense row keeps every visible key: one vectorised exp over the tile.
  template <class Visible>
  void weigh_all(Index r, Row& row, const Visible& visible) {
    row.mass.kept += visible.size();
    if (const Acc factor = row.raise_kept_max(row.mass.max); factor != Acc(1)) output.row(r) *= factor;
    auto weights = tile_weights.row(r).head(visible.size());
    weights = (visible.array() - row.mass.kept_max).exp().matrix();
    tile_weights.row(r).tail(tile_width - visible.size()).setZero();
    weights_written[std::size_t(r)] = 1;
    const Acc tile_mass = weights.sum();
    row.mass.kept_mass += tile_mass;
    if (call->defers_values) row.mass.total_mass += tile_mass;  // m_S = m_i: Z_i is the kept mass
    std::fill(column_kept.begin(), column_kept.begin() + visible.size(), char(1));
  }

  /// Tests each visible score against the row's rule (`select_survivors`) and appends the survivors with their
  /// scores relative to the kept max, to be weighed with the tile's others.
  template <class Visible>
  void select_and_weigh(Index r, Row& row, const Visible& visible, Index first) {
    make_survivor_room(visible.size());
    const Index begin = survivor_count;
    std::int32_t* columns = survivor_columns.data() + begin;
    Acc* kept = survivor_weights.data() + begin;
    const auto [survivors, kept_max] =
        select_survivors<Acc>(row, visible.data(), visible.size(), first, call->track_pruned_mass, columns, kept);
    if (survivors == 0) return;
    if (const Acc factor = row.raise_kept_max(kept_max); factor != Acc(1)) output.row(r) *= factor;
    Eigen::Map<Eigen::Array<Acc, Eigen::Dynamic, 1>>(kept, survivors) -= row.mass.kept_max;
    // Field by field: GCC builds a pushed aggregate on the stack and reloads it whole (a store-forwarding
    // stall per row and tile).
    SurvivorRun& run = survivor_runs.emplace_back();
    run.row = r;
    run.begin = begin;
    run.end = begin + survivors;
    survivor_count += survivors;
  }

  /// w = exp(a - m_kept) for every survivor of the tile in one vectorised pass; adds each row's kept mass.
  void weigh_survivors() {
    Eigen::Map<Eigen::Array<Acc, Eigen::Dynamic, 1>> weights(survivor_weights.data(), survivor_count);
    weights = weights.exp();
    const std::int32_t* const columns = survivor_columns.data();
    char* const kept = column_kept.data();
    for (const SurvivorRun& run : survivor_runs) {
      rows[std::size_t(run.row)].mass.kept_mass += weights.segment(run.begin, run.end - run.begin).sum();
      for (Index t = run.begin, end = run.end; t < end; ++t) kept[columns[t]] = 1;  // end: not reloaded per store
    }
  }

  /// After the tile's elements are selected and weighed (`dense_elements` of them by dense rows): lists the
  /// kept columns, counts them, and chooses how their V rows are accumulated. Returns whether any is kept.
  bool settle_tile_columns(Index dense_elements, AttentionStats& stats) {
    kept_columns.resize(std::size_t(tile_width));
    Index kept = 0;
    for (Index c = 0; c < tile_width; ++c) {  // branch-free: every column is written, the kept ones advance
      kept_columns[std::size_t(kept)] = c;
      kept += column_kept[std::size_t(c)];
    }
    kept_columns.resize(std::size_t(kept));
    if (call->defers_values) {  // V rows and skipped tiles are counted once every row is decided
      if (call->collect_stats)
        for (Index c : kept_columns) need_value(tile_first + c);
      if (kept == 0) return false;
    } else {
      if (kept == 0) {
        ++stats.kv_tiles_without_survivor;
        return false;
      }
      stats.v_rows_read[std::size_t(kv_head)] += std::uint64_t(kept_columns.size());
      if (call->collect_stats)
        for (Index c : kept_columns) call->kept_rows.mark(kv_head, tile_first + c);
    }
    const Index selected = dense_elements + survivor_count;
    tile_sparse =
        dense_elements == 0 &&
        (output.rows() <= streaming_rows ? kept < tile_width : selected * sparse_tile_ratio < output.rows() * kept);
    if (!tile_sparse) fill_tile_weights();
    return true;
  }

  /// Completes tile_weights (rows x tile width) for the GEMM and streaming paths: the rows no dense rule
  /// wrote are zeros and the survivors' weights.
  void fill_tile_weights() {
    for (Index r = 0; r < Index(rows.size()); ++r)
      if (!weights_written[std::size_t(r)]) tile_weights.row(r).setZero();
    for (const SurvivorRun& run : survivor_runs)
      for (Index t = run.begin; t < run.end; ++t) tile_weights(run.row, survivor_columns[t]) = survivor_weights[t];
  }

  /// output += P_tile V_tile over the kept columns among keys [from, from + count) of the tile: V rows no row
  /// kept are never loaded. A sparse tile (few selected elements among many rows; accumulated whole) adds to
  /// each output row its survivors' V rows, gathered; a dense one streams the V rows (few rows; asking for
  /// the `next` ones meanwhile) or uses a GEMM over the kept columns.
  void accumulate_values(Index from, Index count, NextRows<KvScalar> next = {}) {
    const Index offset = from - tile_first, dim = output.cols();
    const auto in_range = [&](Index c) { return c >= offset && c < offset + count; };
    if (call->careful_values && tile_sparse) {
      for (const SurvivorRun& run : survivor_runs)
        for (Index t = run.begin; t < run.end; ++t)
          if (in_range(survivor_columns[std::size_t(t)]))
            add_if_weighed(survivor_weights[t], tile_first + survivor_columns[std::size_t(t)], run.row);
      return;
    }
    if (call->careful_values) {
      for (Index r = 0; r < output.rows(); ++r)
        for (Index c : kept_columns)
          if (in_range(c)) add_if_weighed(tile_weights(r, c), tile_first + c, r);
      return;
    }
    if (tile_sparse) {
      for (const SurvivorRun& run : survivor_runs)
        add_gathered_rows(survivor_weights.data() + run.begin, survivor_columns.data() + run.begin, run.end - run.begin,
                          call->value_rows(kv_head, tile_first), dim, output.data() + run.row * dim);
    } else if (output.rows() <= streaming_rows) {
      Call::for_each_run(call->v, from, count, [&](Index run_from, Index run_count) {
        add_weighted_rows(RowBlock<const Acc>{tile_weights.data() + (run_from - tile_first), tile_weights.cols()},
                          output.rows(), call->v.row(run_from, kv_head), call->v.token_stride(), run_count, dim,
                          RowBlock<Acc>{output.data(), dim},
                          run_from + run_count == from + count ? next : NextRows<KvScalar>{});
      });
    } else if (Index(kept_columns.size()) == tile_width) {
      serial_product<true>(output, tile_weights.middleCols(offset, count),
                           rows_as_accumulator<Acc>(call->v, kv_head, from, count, converted_rows));
    } else {
      Index kept = 0;
      for (Index c : kept_columns) kept += in_range(c);
      gathered_weights.resize(output.rows(), kept);
      gathered_values.resize(kept, dim);
      Index t = 0;
      for (Index c : kept_columns)
        if (in_range(c)) {
          gathered_weights.col(t) = tile_weights.col(c);
          convert(call->v.row(tile_first + c, kv_head), dim, gathered_values.data() + t * dim);
          ++t;
        }
      serial_product<true>(output, gathered_weights, gathered_values);
    }
  }
};

}  // namespace toptheta::detail
