// The rows of one work item: a query block of one KV head's group (or its partial rows over a key range) and
// the steps of design.md §1 on them, tile by tile: scores, selection, weights, the kept V rows, o_i.
#pragma once

#include <toptheta/compensation.hpp>
#include <toptheta/detail/call_state.hpp>
#include <toptheta/detail/convert.hpp>
#include <toptheta/detail/exp_sum.hpp>
#include <toptheta/detail/kv_view.hpp>
#include <toptheta/detail/packed_queries.hpp>
#include <toptheta/detail/row_candidates.hpp>
#include <toptheta/detail/row_products.hpp>
#include <toptheta/detail/row_survivors.hpp>
#include <toptheta/detail/serial_product.hpp>
#include <toptheta/detail/threshold_scan.hpp>
#include <toptheta/scalar_traits.hpp>
#include <toptheta/selection.hpp>
#include <toptheta/stats.hpp>
#include <toptheta/value_means.hpp>
#include <toptheta/views.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace toptheta::detail {

/// The stacked rows of one work item (each query row of the block for every head of the KV head's group, so
/// that each K tile is loaded once for the group and each V row once for the union of the group's survivors),
/// their online-softmax state and selection, and the tile steps the plans run on them: `select_rows`, then
/// for each tile (from the last) `begin_tile`, `score_keys`, `weigh_tile`, `accumulate_values`, then
/// `finish_rows`; with split keys the partial rows of several ranges `merge` first.
template <class Tiles, class Scalar, class Selection, class KvView>
struct AttentionBlock {
  using Acc = accumulator_t<Scalar>;
  using KvScalar = typename KvView::value_type;  // Scalar, or int8 blocks (BlockQ8)
  using Matrix = Eigen::Matrix<Acc, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using Call = CallState<Tiles, Scalar, Selection, KvView>;

  /// Blocks with at most this many stacked rows stream K and V row by row instead of using GEMMs.
  static constexpr Index streaming_rows = 8;
  /// Candidates each row of a running threshold holds in its block's buffer before storage of its own
  /// (a multiple of 16, so that each row's share starts on a 64-byte line).
  static constexpr Index candidate_room = 512;
  /// Query and output rows, a token stride apart, are asked for this many rows before they are used.
  static constexpr Index rows_ahead = 8;
  /// A tile of a GEMM block whose selected elements fill less than 1 / sparse_tile_ratio of (rows x kept
  /// columns), and no dense row's, is accumulated row by row from each row's survivors (`add_gathered_rows`)
  /// instead of by a GEMM (a streaming block does so whenever some column of the tile is not kept).
  static constexpr Index sparse_tile_ratio = 3;

  /// Asks for row `n + rows_ahead` of `count` rows (`row_at(j)`, `bytes` each) while row `n` is worked on,
  /// and for the first rows too when `n` is 0: rows a token stride apart, each a miss of its own.
  template <bool ToWrite = false, class RowAt>
  static void ask_ahead(Index n, Index count, const RowAt& row_at, Index bytes) {
    if (n == 0)
      for (Index j = 0; j < std::min(rows_ahead, count); ++j) ask_for_bytes<ToWrite>(row_at(j), bytes);
    if (n + rows_ahead < count) ask_for_bytes<ToWrite>(row_at(n + rows_ahead), bytes);
  }

  struct Row : RowState<Acc> {
    Index query_head = 0, query_row = 0, length = 0;
    Acc query_norm = 0;
    RowCandidates<Acc> candidates;  // of a running threshold

    /// The state of a row that saw no key; the candidates keep their storage.
    void reset() {
      static_cast<RowState<Acc>&>(*this) = RowState<Acc>{};
      candidates.clear();
    }
  };

  Call* call = nullptr;  // the call whose rows the block holds since `start`
  Index kv_head = 0;
  std::vector<Row> rows;
  Matrix scaled_queries;              // s q_i, one row per (head of the group, query row)
  PackedQueries<Acc> packed_queries;  // scaled_queries for the GEMM, packed on first use
  Matrix row_scores;                  // a_ij of every visible key, for selections that need whole rows
  Matrix tile_scores, tile_weights, output;
  Matrix converted_rows;                     // K or V rows converted to Acc (stored type other than Acc)
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
  std::vector<char> weights_written;  // per row: tile_weights holds its weights of this tile (dense rows)
  // With running thresholds: bit j set when some row of the block needs V row j (one bit per visible key;
  // only when the call collects statistics, the one thing it is for);
  // `candidate_room` candidates per row lent to the rows, and the tile's keys above a row's floor.
  std::vector<std::uint64_t> needed_values;
  Eigen::Matrix<std::int32_t, Eigen::Dynamic, 1> candidate_positions;
  Eigen::Matrix<Acc, Eigen::Dynamic, 1> candidate_scores;
  ScannedKeys<Acc> scanned_keys;
  Index visible_end = 0;                 // keys [0, visible_end) are visible to some row of the block
  Index tile_first = 0, tile_width = 0;  // the tile being accumulated
  bool tile_sparse = false;              // its V rows are added row by row from the survivors
  std::vector<Acc> scratch;
  std::vector<Index> candidate_cursor;            // per row: its candidates added so far (`accumulate_candidates`)
  std::vector<std::int32_t> candidate_tile_ends;  // [tile][row]: where the row's candidates of the tile end
  // Σ_{j∈S_i} v_j per row, for V-mean compensation over the pruned rows (`Compensation::v_mean_of_pruned`), and
  // unit weights to gather them with.
  Matrix kept_value_sums;
  std::vector<Acc> unit_weights;

  /// Whether the rows' scores over every visible key come first (`select_rows`), with their max and sum: the
  /// two-pass rules (top-k, Top-θ with `Passes::two`). The tiles then read them instead of scoring keys.
  bool scores_rows_first() const { return call->selection.needs_row_scores(); }

  /// Whether the rows sum their kept V rows unweighted (`kept_value_sums`).
  bool sums_kept_values() const { return call->selection.compensation().v_mean_of_pruned; }

  /// kept_value_sums_r += Σ_t v_{row_at(columns_t)} over `count` kept V rows.
  template <class RowAt>
  void add_kept_values(Index r, const std::int32_t* columns, Index count, const RowAt& row_at) {
    if (Index(unit_weights.size()) < count) unit_weights.assign(std::size_t(count), Acc(1));
    add_gathered_rows(unit_weights.data(), columns, count, row_at, kept_value_sums.cols(),
                      kept_value_sums.row(r).data());
  }

  /// Takes the query rows of block `query_block` of `state`'s call for every head of KV head `kv` (a block
  /// lent again, by any call of a batch, starts afresh here, keeping only the room of its buffers).
  void start(Call& state, Index kv, Index query_block) {
    call = &state;
    const AttentionShape& shape = call->shape;
    kv_head = kv;
    const Index first = query_block * Tiles::query_block;
    const Index count = std::min(Tiles::query_block, shape.query_rows - first);
    const Index stacked = shape.group_size * count;
    rows.resize(std::size_t(stacked));
    visible_end = 0;
    packed_queries.clear();
    scaled_queries.resize(stacked, shape.head_dim);
    // Stacked row n is query row first + n % count of head n / count of the group.
    const auto stacked_row = [&](Index n) {
      return call->q.row(first + n % count, kv_head * shape.group_size + n / count);
    };
    const Index row_bytes = shape.head_dim * Index(sizeof(Scalar));
    for (Index n = 0; n < stacked; ++n) {
      ask_ahead(n, stacked, stacked_row, row_bytes);
      auto query = scaled_queries.row(n);  // q_i, then s q_i
      convert(stacked_row(n), shape.head_dim, query.data());
      Row& row = rows[std::size_t(n)];
      row.reset();
      row.query_head = kv_head * shape.group_size + n / count;
      row.query_row = first + n % count;
      row.length = shape.row_length(row.query_row);
      row.query_norm = query.norm();
      query *= Acc(shape.scale);
      visible_end = std::max(visible_end, row.length);
    }
    output.setZero(Index(rows.size()), shape.head_dim);
    if (sums_kept_values()) kept_value_sums.setZero(Index(rows.size()), shape.head_dim);
    if (call->defers_values) {
      // Emptied without statistics too: a block lent again keeps a vector sized for an earlier call.
      needed_values.assign(call->collect_stats ? std::size_t((visible_end + 63) / 64) : 0, 0);
      candidate_positions.resize(stacked * candidate_room);
      candidate_scores.resize(stacked * candidate_room);
      for (Index n = 0; n < stacked; ++n)
        rows[std::size_t(n)].candidates.use_room(candidate_positions.data() + n * candidate_room,
                                                 candidate_scores.data() + n * candidate_room, candidate_room);
    }
    make_survivor_room(Index(rows.size()) * std::min<Index>(Tiles::kv_block, 16));
    survivor_runs.reserve(rows.size());
  }

  /// s Q_block K_tileᵀ for keys [first, first + width). A block of few rows (decode) streams the keys: each
  /// key row is loaded once and dotted with every query row, and the `next` key rows are asked for
  /// meanwhile; a larger block uses a GEMM.
  template <class Into>
  void score(Index first, Index width, Into&& into, NextRows<KvScalar> next = {}) {
    if (scaled_queries.rows() <= streaming_rows) {
      Call::for_each_run(call->k, first, width, [&](Index from, Index count) {
        dot_rows(RowBlock<const Acc>{scaled_queries.data(), scaled_queries.cols()}, scaled_queries.rows(),
                 call->k.row(from, kv_head), call->k.token_stride(), count, scaled_queries.cols(),
                 RowBlock<Acc>{into.data() + (from - first), into.outerStride()},
                 from + count == first + width ? next : NextRows<KvScalar>{});
      });
    } else {
      if (packed_queries.rows() == 0)
        packed_queries.pack(scaled_queries.data(), scaled_queries.rows(), scaled_queries.cols(), scaled_queries.cols());
      if (const Acc* packed = call->packed_key_tile(kv_head, first, width)) {
        packed_queries.packed_scores(packed, width, into.data(), into.outerStride());
      } else {
        const auto keys = rows_as_accumulator<Acc>(call->k, kv_head, first, width, converted_rows);
        packed_queries.scores(keys.data(), width, keys.outerStride(), into.data(), into.outerStride());
      }
    }
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

  /// Clears the tile's survivor lists and column marks for `weigh_tile`.
  void clear_tile_selection() {
    tile_weights.resize(Index(rows.size()), tile_width);
    weights_written.assign(rows.size(), 0);
    column_kept.assign(std::size_t(tile_width), 0);
    survivor_runs.clear();
    survivor_count = 0;
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

  /// Room for `more` survivors after the tile's current ones (and the scan's slack), keeping them.
  void make_survivor_room(Index more) {
    const Index needed = survivor_count + more + scan_slack;
    if (needed <= Index(survivor_columns.size())) return;
    const Index room = std::max(needed, 2 * Index(survivor_columns.size()));
    survivor_columns.resize(std::size_t(room));
    survivor_weights.conservativeResize(room);
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
      const Index row_bytes = stored_bytes<KvScalar>(output.cols());
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

  /// Marks V row `position` as needed by some row of the block (running thresholds, statistics collected).
  void need_value(Index position) { needed_values[std::size_t(position / 64)] |= std::uint64_t(1) << (position % 64); }

  /// With running thresholds, after the rows are finished: the V rows the block read (each once), the call's
  /// kept rows, and the tiles none of them fell in.
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

  /// output_r += w v_position, only when w != 0 (careful V products: 0 · inf would be NaN).
  void add_if_weighed(Acc weight, Index position, Index r) {
    if (weight == Acc(0)) return;
    Acc* const into = output.row(r).data();
    const KvScalar* const value = call->v.row(position, kv_head);
    for (Index d = 0; d < output.cols(); ++d) into[d] += weight * value_at<Acc>(value, d);
  }

  /// Forgets the candidates at or below each row's running threshold: at the end of a key range, whose
  /// first tiles let many keys through while its sum was small.
  void forget_stale_candidates() {
    for (Row& row : rows)
      if (row.selection.running)
        row.candidates.keep_above(forget_floor(row.selection.running_threshold(row.mass.max, row.mass.total_mass)));
  }

  /// Joins the same rows' partial state over another key range; of its candidates, those above the joined
  /// running threshold.
  void merge(const AttentionBlock& other) {
    for (Index r = 0; r < Index(rows.size()); ++r) {
      Row& row = rows[std::size_t(r)];
      const auto [own, theirs] = row.merge(other.rows[std::size_t(r)]);
      output.row(r) = own * output.row(r) + theirs * other.output.row(r);
      if (sums_kept_values()) kept_value_sums.row(r) += other.kept_value_sums.row(r);
      if (row.selection.running)
        row.candidates.append_above(other.rows[std::size_t(r)].candidates,
                                    forget_floor(row.selection.running_threshold(row.mass.max, row.mass.total_mass)));
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
      ask_ahead<true>(r, Index(rows.size()), output_row, row_bytes);
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
