// The tiled attention kernel shared by dense, Top-θ and top-k attention: a selection policy decides which
// scores survive, the kernel streams K and V tiles and loads only the V rows some row of the block kept.
#pragma once

#include <toptheta/compensation.hpp>
#include <toptheta/detail/convert.hpp>
#include <toptheta/detail/exp_sum.hpp>
#include <toptheta/detail/kv_view.hpp>
#include <toptheta/detail/kept_row_sets.hpp>
#include <toptheta/detail/packed_queries.hpp>
#include <toptheta/detail/prefill_preparation.hpp>
#include <toptheta/detail/require.hpp>
#include <toptheta/detail/row_candidates.hpp>
#include <toptheta/detail/row_products.hpp>
#include <toptheta/detail/serial_product.hpp>
#include <toptheta/detail/threshold_scan.hpp>
#include <toptheta/detail/view_overlap.hpp>
#include <toptheta/online_softmax.hpp>
#include <toptheta/scalar_traits.hpp>
#include <toptheta/selection.hpp>
#include <toptheta/stats.hpp>
#include <toptheta/value_means.hpp>
#include <toptheta/views.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace toptheta {

/// Compile-time tile sizes: `QueryBlock` query rows (times the GQA group's heads) against `KvBlock` keys.
template <Index QueryBlock, Index KvBlock>
struct Tiles {
  static_assert(QueryBlock >= 1 && KvBlock >= 1, "tile sizes must be positive");
  static constexpr Index query_block = QueryBlock;
  static constexpr Index kv_block = KvBlock;
};

/// 64 query rows x 256 keys: on a Llama-3-8B layer (GQA 4, d = 128; benchmarks/) each K tile packed for the
/// score GEMM serves 256 stacked rows and per-tile work is paid a quarter as often as with 32 x 128 (prefill
/// n:2048 11 % faster for Top-θ, 9 % for dense; n:8192 15 % and 7 %), for about 1.5 MB of tile buffers per
/// work item. Decode (one query row, keys split across work items) is unaffected.
using DefaultTiles = Tiles<64, 256>;

namespace detail {

/// One attention call split into work items (KV head, query block). A block stacks the query rows of every
/// head of the KV head's group, so each K tile is loaded once for the group and each V row once for the
/// union of the group's survivors.
///
/// Calls with few stacked rows per block (decode) and a one-pass rule without a cap split the keys instead:
/// a work item is (query block, key range) over every KV head, so a `[tokens, heads, d]` cache is read in
/// address order and one long row uses every core; the ranges' partial rows merge exactly afterwards.
///
/// Calls with several GEMM blocks per KV head (prefill) first run their `PrefillPreparation`.
template <class Tiles, class Scalar, class Selection, class KvView = TensorView<const Scalar>>
class TiledAttention {
 public:
  using Acc = accumulator_t<Scalar>;
  using Matrix = Eigen::Matrix<Acc, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

  TiledAttention(const TensorView<const Scalar>& q, const KvView& k, const KvView& v, const TensorView<Scalar>& out,
                 const AttentionShape& shape,
                 const Selection& selection, const ValueMeans<Acc>* value_means, bool collect_stats)
      : q_(q), k_(k), v_(v), out_(out), shape_(shape), selection_(selection), value_means_(value_means),
        track_pruned_mass_(!selection.post_softmax() &&
                           selection.compensation().denominator == DenominatorCompensation::exact),
        defers_values_(selection.has_running_threshold()),
        collect_stats_(collect_stats) {
    query_blocks_ = (shape.query_rows + Tiles::query_block - 1) / Tiles::query_block;
    if (collect_stats_) kept_rows_.reset(shape.kv_heads, shape.key_rows);
    const Index block_rows = shape.group_size * std::min(Tiles::query_block, shape.query_rows);
    if (block_rows <= streaming_rows && !selection.needs_row_scores() &&
        (!selection.caps_rows() || defers_values_)) {
      tiles_ = (shape.max_row_length() + Tiles::kv_block - 1) / Tiles::kv_block;
      tiles_per_split_ = (tiles_ + max_key_splits - 1) / max_key_splits;
      key_splits_ = (tiles_ + tiles_per_split_ - 1) / tiles_per_split_;
      partials_.resize(std::size_t(query_blocks_ * key_splits_ * shape.kv_heads));
    } else if (block_rows > streaming_rows && query_blocks_ > 1) {  // several GEMM blocks per KV head
      preparation_.emplace(k, v, shape.max_row_length());
      v_ = preparation_->values();
    }
  }

  /// Whether some output row with a softmax came out non-finite with the fast V products; then
  /// `use_careful_values` and running every item again gives the rows that do not weigh a non-finite V value
  /// their finite output.
  bool found_non_finite_output() const { return non_finite_output_.load(); }
  void use_careful_values() { careful_values_ = true; }
  bool careful_values() const { return careful_values_; }

  /// Work items to run before the blocks (`PrefillPreparation`).
  Index preparation_items() const { return preparation_ ? preparation_->items() : 0; }
  void prepare(Index item) { preparation_->prepare(item); }

  /// Asks for row `n + rows_ahead` of `count` rows (`row_at(j)`, `bytes` each) while row `n` is worked on,
  /// and for the first rows too when `n` is 0: rows a token stride apart, each a miss of its own.
  template <bool ToWrite = false, class RowAt>
  static void ask_ahead(Index n, Index count, const RowAt& row_at, Index bytes) {
    if (n == 0)
      for (Index j = 0; j < std::min(rows_ahead, count); ++j) ask_for_bytes<ToWrite>(row_at(j), bytes);
    if (n + rows_ahead < count) ask_for_bytes<ToWrite>(row_at(n + rows_ahead), bytes);
  }

  Index work_items() const {
    return key_splits_ > 0 ? query_blocks_ * key_splits_ : shape_.kv_heads * query_blocks_;
  }

  /// Attends the query rows of block `item % query_blocks` for every head of KV head `item / query_blocks`,
  /// or with split keys, keeps the partial rows of query block `item / key_splits` over key range
  /// `item % key_splits` for every KV head.
  void run(Index item, AttentionStats& stats) {
    if (key_splits_ > 0) return run_key_range(item / key_splits_, item % key_splits_, stats);
    std::unique_ptr<Block> block = lend_block(item / query_blocks_, item % query_blocks_);
    block->select_rows(stats);
    const Index tiles = (block->visible_end + Tiles::kv_block - 1) / Tiles::kv_block;
    // Tiles run from the last to the first so that a cap of k keeps the largest positions in one pass.
    for (Index tile = tiles - 1; tile >= 0; --tile) block->accumulate_tile(tile * Tiles::kv_block, stats);
    block->finish_rows(stats);
    take_back(std::move(block));
  }

  /// Work items to run after `run`'s: with split keys, one per (query block, KV head).
  Index finish_items() const { return key_splits_ > 0 ? query_blocks_ * shape_.kv_heads : 0; }

  /// With split keys, after every item ran: merges the key ranges of (query block `item / kv_heads`, KV head
  /// `item % kv_heads`) and writes o_i.
  void finish_split_rows(Index item, AttentionStats& stats) {
    const Index query_block = item / shape_.kv_heads, kv_head = item % shape_.kv_heads;
    const auto partial = [&](Index split) -> std::unique_ptr<Block>& {
      return partials_[std::size_t((query_block * key_splits_ + split) * shape_.kv_heads + kv_head)];
    };
    // From the last range to the first, as the tiles of one range run.
    Block& merged = *partial(key_splits_ - 1);
    for (Index split = key_splits_ - 2; split >= 0; --split) merged.merge(*partial(split));
    merged.finish_rows(stats);
    // Only this item used these partial rows: lent again now, not kept until the call (or a whole batch) ends.
    for (Index split = 0; split < key_splits_; ++split) take_back(std::move(partial(split)));
  }

  /// Distinct V rows kept per KV head over the whole call (only when stats are collected).
  void count_kept_rows(AttentionStats& stats) const {
    for (Index h = 0; h < shape_.kv_heads; ++h) {
      stats.v_rows_kept[h] = kept_rows_.count(h);
      stats.v_rows_visible[h] = std::uint64_t(shape_.max_row_length());
    }
  }

 private:
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

  /// Most key ranges one call is split into (when it splits keys); a fixed count, not the thread count, so
  /// results do not depend on the executor.
  static constexpr Index max_key_splits = 16;

  /// Blocks with at most this many stacked rows stream K and V row by row instead of using GEMMs.
  static constexpr Index streaming_rows = 8;
  /// Candidates each row of a running threshold holds in its block's buffer before storage of its own
  /// (a multiple of 16, so that each row's share starts on a 64-byte line).
  static constexpr Index candidate_room = 512;
  /// Query and output rows, a token stride apart, are asked for this many rows before they are used.
  static constexpr Index rows_ahead = 8;
  /// With split keys, the KV heads' blocks take turns every this many keys, so that K and V are read in
  /// nearly address order from a `[tokens, heads, d]` cache and the hardware prefetcher follows.
  static constexpr Index sweep_keys = 16;
  /// A tile whose selected elements fill less than 1 / sparse_tile_ratio of (rows x kept columns) is
  /// accumulated row by row from each row's survivors (`add_gathered_rows`) instead of by a GEMM.
  static constexpr Index sparse_tile_ratio = 3;

  struct Block {
    TiledAttention& kernel;
    Index kv_head;
    std::vector<Row> rows;
    Matrix scaled_queries;  // s q_i, one row per (head of the group, query row)
    PackedQueries<Acc> packed_queries;  // scaled_queries for the GEMM, packed on first use
    Matrix row_scores;      // a_ij of every visible key, for selections that need whole rows
    Matrix tile_scores, tile_weights, output;
    Matrix converted_rows;              // K or V rows converted to Acc (stored type other than Acc)
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
    Index visible_end = 0;  // keys [0, visible_end) are visible to some row of the block
    Index tile_first = 0, tile_width = 0;  // the tile being accumulated
    bool tile_sparse = false;              // its V rows are added row by row from the survivors
    std::vector<Acc> scratch;
    std::vector<Index> candidate_cursor;  // per row: its candidates added so far (`accumulate_candidates`)
    std::vector<std::int32_t> candidate_tile_ends;  // [tile][row]: where the row's candidates of the tile end

    explicit Block(TiledAttention& owner) : kernel(owner) {}

    /// Takes the query rows of block `query_block` for every head of KV head `kv` (a block the kernel lends
    /// again starts afresh here, keeping only the room of its buffers).
    void start(Index kv, Index query_block) {
      const AttentionShape& shape = kernel.shape_;
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
        return kernel.q_.row(first + n % count, kv_head * shape.group_size + n / count);
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
      if (kernel.defers_values_) {
        if (kernel.collect_stats_) needed_values.assign(std::size_t((visible_end + 63) / 64), 0);
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
    void score(Index first, Index width, Into&& into, NextRows<Scalar> next = {}) {
      if (scaled_queries.rows() <= streaming_rows) {
        for_each_run(kernel.k_, first, width, [&](Index from, Index count) {
          dot_rows(RowBlock<const Acc>{scaled_queries.data(), scaled_queries.cols()}, scaled_queries.rows(),
                   kernel.k_.row(from, kv_head), kernel.k_.token_stride(), count, scaled_queries.cols(),
                   RowBlock<Acc>{into.data() + (from - first), into.outerStride()},
                   from + count == first + width ? next : NextRows<Scalar>{});
        });
      } else {
        if (packed_queries.rows() == 0)
          packed_queries.pack(scaled_queries.data(), scaled_queries.rows(), scaled_queries.cols(), scaled_queries.cols());
        if (const Acc* packed = kernel.packed_key_tile(kv_head, first, width)) {
          packed_queries.packed_scores(packed, width, into.data(), into.outerStride());
        } else {
          const auto keys = rows_as_accumulator<Acc>(kernel.k_, kv_head, first, width, converted_rows);
          packed_queries.scores(keys.data(), width, keys.outerStride(), into.data(), into.outerStride());
        }
      }
    }

    /// Decides each row's rule. Selections that need whole rows get their scores, max and sum first.
    void select_rows(AttentionStats& stats) {
      if (kernel.selection_.needs_row_scores()) {
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
        if (row_scores.size() > 0) {
          facts.scores = row_scores.row(r).data();
          const auto statistics = RowStatistics<Acc>::of(facts.scores, row.length);
          if (!has_softmax(statistics.max)) {  // the tiles find out the same; nothing to select from
            row.selection = RowState<Acc>::keep_nothing();
            continue;
          }
          facts.max = row.mass.max = statistics.max;
          facts.sum = row.mass.total_mass = statistics.sum;
        }
        row.selection = kernel.selection_.select(facts, scratch);
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
      if (row_scores.size() == 0) tile_scores.resize(Index(rows.size()), tile_width);
    }

    /// Scores of the tile's keys [from, from + count), unless the rows' scores are known already.
    void score_keys(Index from, Index count, AttentionStats& stats, NextRows<Scalar> next = {}) {
      if (row_scores.size() > 0) return;
      score(from, count, tile_scores.middleCols(from - tile_first, count), next);
      stats.k_rows_read[std::size_t(kv_head)] += std::uint64_t(count);
    }

    /// Updates each row's max, selects and weighs the tile's elements. Returns whether any V row is needed.
    bool weigh_tile(AttentionStats& stats) {
      const Index first = tile_first, width = tile_width;
      const Index row_count = Index(rows.size());
      const auto scores = row_scores.size() > 0 ? row_scores.middleCols(first, width) : tile_scores.leftCols(width);
      clear_tile_selection();
      Index dense_elements = 0;
      ++stats.kv_tiles;
      for (Index r = 0; r < row_count; ++r) {
        Row& row = rows[std::size_t(r)];
        const Index visible = std::min(width, row.length - first);
        if (visible <= 0) continue;
        const auto row_tile = scores.row(r).head(visible);
        if (row.selection.dense) {
          track_max_score_key(row, row_tile, first, max_of(row_tile.data(), visible));
          weigh_all(r, row, row_tile);
          dense_elements += visible;
        } else if (row.selection.running) {
          collect_candidates(row, row_tile, first);
        } else {
          select_and_weigh(r, row, row_tile, first);
        }
      }
      weigh_survivors();
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
      if (kernel.defers_values_) {  // V rows and skipped tiles are counted once every row is decided
        if (kernel.collect_stats_)
          for (Index c : kept_columns) need_value(tile_first + c);
        if (kept == 0) return false;
      } else {
        if (kept == 0) {
          ++stats.kv_tiles_without_survivor;
          return false;
        }
        stats.v_rows_read[std::size_t(kv_head)] += std::uint64_t(kept_columns.size());
        if (kernel.collect_stats_)
          for (Index c : kept_columns) kernel.kept_rows_.mark(kv_head, tile_first + c);
      }
      const Index selected = dense_elements + survivor_count;
      tile_sparse = dense_elements == 0 && (output.rows() <= streaming_rows
                                                ? kept < tile_width
                                                : selected * sparse_tile_ratio < output.rows() * kept);
      if (!tile_sparse) fill_tile_weights();
      return true;
    }

    /// Completes tile_weights (rows x tile width) for the GEMM and streaming paths: the rows no dense rule
    /// wrote are zeros and the survivors' weights.
    void fill_tile_weights() {
      for (Index r = 0; r < Index(rows.size()); ++r)
        if (!weights_written[std::size_t(r)]) tile_weights.row(r).setZero();
      for (const SurvivorRun& run : survivor_runs)
        for (Index t = run.begin; t < run.end; ++t)
          tile_weights(run.row, survivor_columns[t]) = survivor_weights[t];
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
      if (kernel.defers_values_) row.mass.total_mass += tile_mass;  // m_S = m_i: Z_i is the kept mass
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

    /// Tests each visible score against the row's rule (in decreasing position, for the cap), tracks the row max,
    /// and appends the survivors with their scores relative to the kept max, to be weighed with the tile's
    /// others. Pruned scores feed the exact compensation when it is on.
    template <class Visible>
    void select_and_weigh(Index r, Row& row, const Visible& visible, Index first) {
      make_survivor_room(visible.size());
      const Index begin = survivor_count;
      std::int32_t* columns = survivor_columns.data() + begin;
      Acc* kept = survivor_weights.data() + begin;
      Index survivors = 0;
      Acc kept_max = -std::numeric_limits<Acc>::infinity();  // of the tile's survivors
      if (row.selection.threshold_only()) {  // a > τ alone decides: one scan finds the survivors and the max
        const Acc threshold = row.selection.score_threshold;
        Acc tile_max = 0;
        survivors = scan_above(visible.data(), visible.size(), threshold, columns, kept, tile_max);
        track_max_score_key(row, visible, first, tile_max);
        if (kernel.track_pruned_mass_)
          row.mass.pruned_mass += (visible.array() <= threshold).select((visible.array() - row.mass.max).exp(), 0).sum();
        row.mass.kept += survivors;
        kept_max = tile_max;  // the tile's max survives whenever anything does
      } else {  // ties or a cap: elements in decreasing position
        track_max_score_key(row, visible, first, max_of(visible.data(), visible.size()));
        for (Index c = visible.size() - 1; c >= 0; --c) {
          const Acc a = visible(c);
          if (row.admit(a, first + c)) {
            columns[survivors] = std::int32_t(c);
            kept[survivors++] = a;
            kept_max = std::max(kept_max, a);
          } else if (kernel.track_pruned_mass_)
            row.mass.pruned_mass += std::exp(a - row.mass.max);
        }
      }
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
      track_max_score_key(row, visible, first, tile_max);
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
      if (kernel.track_pruned_mass_) row.mass.pruned_mass = row.mass.total_mass;
      if (candidates.size() == 0) return;  // the never-empty rule follows
      row.mass.kept = candidates.size();
      row.mass.kept_max = candidates.max_score();
      row.mass.kept_mass = candidates.weigh(row.mass.kept_max);
      if (kernel.track_pruned_mass_)  // Σ_{j∉S_i} exp(a_ij - m_i) = Z_i - D_i exp(m_S - m_i)
        row.mass.pruned_mass = std::max(
            Acc(0), row.mass.total_mass - row.mass.kept_mass * std::exp(row.mass.kept_max - row.mass.max));
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
        const Index row_bytes = output.cols() * Index(sizeof(Scalar));
        for (const Row& row : rows)
          for (Index t = 0; t < row.candidates.size(); ++t)
            ask_for_bytes(kernel.v_.row(row.candidates.positions()[t], kv_head), row_bytes);
      }
      for (Index r = 0; r < Index(rows.size()); ++r) {
        const RowCandidates<Acc>& candidates = rows[std::size_t(r)].candidates;
        if (kernel.careful_values_)
          for (Index t = 0; t < candidates.size(); ++t)
            add_if_weighed(candidates.scores()[t], candidates.positions()[t], r);
        if (kernel.collect_stats_)
          for (Index t = 0; t < candidates.size(); ++t) need_value(candidates.positions()[t]);
      }
      if (kernel.careful_values_) return;
      const Index dim = output.cols();
      if (output.rows() <= streaming_rows) {
        for (Index r = 0; r < Index(rows.size()); ++r) {
          const RowCandidates<Acc>& candidates = rows[std::size_t(r)].candidates;
          add_gathered_rows(candidates.scores(), candidates.positions(), candidates.size(),
                            kernel.value_rows(kv_head, 0), dim, output.row(r).data());
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
                            kernel.value_rows(kv_head, 0), dim, output.row(r).data());
          next[std::size_t(r)] = end;
        }
    }

    /// Marks V row `position` as needed by some row of the block (running thresholds, statistics collected).
    void need_value(Index position) {
      needed_values[std::size_t(position / 64)] |= std::uint64_t(1) << (position % 64);
    }

    /// With running thresholds, after the rows are finished: the V rows the block read (each once), the call's
    /// kept rows, and the tiles none of them fell in.
    void count_needed_values(AttentionStats& stats) {
      std::uint64_t read = 0;
      for (std::size_t w = 0; w < needed_values.size(); ++w) {
        read += std::uint64_t(__builtin_popcountll(needed_values[w]));
        if (kernel.collect_stats_ && needed_values[w]) kernel.kept_rows_.mark_word(kv_head, Index(w), needed_values[w]);
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
    void accumulate_values(Index from, Index count, NextRows<Scalar> next = {}) {
      const Index offset = from - tile_first, dim = output.cols();
      const auto in_range = [&](Index c) { return c >= offset && c < offset + count; };
      if (kernel.careful_values_ && tile_sparse) {
        for (const SurvivorRun& run : survivor_runs)
          for (Index t = run.begin; t < run.end; ++t)
            if (in_range(survivor_columns[std::size_t(t)]))
              add_if_weighed(survivor_weights[t], tile_first + survivor_columns[std::size_t(t)], run.row);
        return;
      }
      if (kernel.careful_values_) {
        for (Index r = 0; r < output.rows(); ++r)
          for (Index c : kept_columns)
            if (in_range(c)) add_if_weighed(tile_weights(r, c), tile_first + c, r);
        return;
      }
      if (tile_sparse) {
        for (const SurvivorRun& run : survivor_runs)
          add_gathered_rows(survivor_weights.data() + run.begin, survivor_columns.data() + run.begin,
                            run.end - run.begin, kernel.value_rows(kv_head, tile_first), dim,
                            output.data() + run.row * dim);
      } else if (output.rows() <= streaming_rows) {
        for_each_run(kernel.v_, from, count, [&](Index run_from, Index run_count) {
          add_weighted_rows(RowBlock<const Acc>{tile_weights.data() + (run_from - tile_first), tile_weights.cols()},
                            output.rows(), kernel.v_.row(run_from, kv_head), kernel.v_.token_stride(), run_count, dim,
                            RowBlock<Acc>{output.data(), dim},
                            run_from + run_count == from + count ? next : NextRows<Scalar>{});
        });
      } else if (Index(kept_columns.size()) == tile_width) {
        serial_product<true>(output, tile_weights.middleCols(offset, count),
                             rows_as_accumulator<Acc>(kernel.v_, kv_head, from, count, converted_rows));
      } else {
        Index kept = 0;
        for (Index c : kept_columns) kept += in_range(c);
        gathered_weights.resize(output.rows(), kept);
        gathered_values.resize(kept, dim);
        Index t = 0;
        for (Index c : kept_columns)
          if (in_range(c)) {
            gathered_weights.col(t) = tile_weights.col(c);
            convert(kernel.v_.row(tile_first + c, kv_head), dim, gathered_values.data() + t * dim);
            ++t;
          }
        serial_product<true>(output, gathered_weights, gathered_values);
      }
    }

    /// output_r += w v_position, only when w != 0 (careful V products: 0 · inf would be NaN).
    void add_if_weighed(Acc weight, Index position, Index r) {
      if (weight == Acc(0)) return;
      Acc* const into = output.row(r).data();
      const Scalar* const value = kernel.v_.row(position, kv_head);
      for (Index d = 0; d < output.cols(); ++d) into[d] += weight * Acc(value[d]);
    }

    /// Remembers the max-score key and moves the row's pruned mass to a larger row max (online softmax). A NaN
    /// or +inf `tile_max` marks the row as having no softmax; a NaN leaves its max where it was.
    template <class Visible>
    void track_max_score_key(Row& row, const Visible& visible, Index first, Acc tile_max) {
      row.note_scores_max(tile_max);
      if (tile_max != tile_max) return;
      if (tile_max > row.best_score) {  // strict, and tiles run backwards: ties go to the larger position
        row.best_score = tile_max;
        row.best_position = first + last_position_of(visible.data(), visible.size(), tile_max);
      }
      row.raise_max(tile_max);
    }

    /// Forgets the candidates at or below each row's running threshold: at the end of a key range, whose
    /// first tiles let many keys through while its sum was small.
    void forget_stale_candidates() {
      for (Row& row : rows)
        if (row.selection.running)
          row.candidates.keep_above(
              forget_floor(row.selection.running_threshold(row.mass.max, row.mass.total_mass)));
    }

    /// Joins the same rows' partial state over another key range; of its candidates, those above the joined
    /// running threshold.
    void merge(const Block& other) {
      for (Index r = 0; r < Index(rows.size()); ++r) {
        Row& row = rows[std::size_t(r)];
        const auto [own, theirs] = row.merge(other.rows[std::size_t(r)]);
        output.row(r) = own * output.row(r) + theirs * other.output.row(r);
        if (row.selection.running)
          row.candidates.append_above(other.rows[std::size_t(r)].candidates,
                                      forget_floor(row.selection.running_threshold(row.mass.max, row.mass.total_mass)));
      }
      for (std::size_t w = 0; w < needed_values.size(); ++w) needed_values[w] |= other.needed_values[w];
    }

    /// Applies the never-empty rule, the compensations, and writes o_i.
    void finish_rows(AttentionStats& stats) {
      const Compensation& compensation = kernel.selection_.compensation();
      const Index row_bytes = kernel.shape_.head_dim * Index(sizeof(Scalar));
      const auto output_row = [&](Index r) {
        return kernel.out_.row(rows[std::size_t(r)].query_row, rows[std::size_t(r)].query_head);
      };
      const auto output_row_of = [&](Index r) {
        return Eigen::Map<Eigen::Matrix<Scalar, 1, Eigen::Dynamic>>(output_row(r), kernel.shape_.head_dim);
      };
      if (kernel.defers_values_) accumulate_candidates();
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
          convert(kernel.v_.row(row.best_position, kv_head), output.cols(), output.row(r).data());
          ++stats.empty_rows;
          if (kernel.defers_values_) {
            if (kernel.collect_stats_) need_value(row.best_position);
          } else {
            ++stats.v_rows_read[std::size_t(kv_head)];
            if (kernel.collect_stats_) kernel.kept_rows_.mark(kv_head, row.best_position);
          }
        }
        const Acc denominator =
            softmax_denominator(row.mass, compensation, kernel.selection_.post_softmax(), row.selection.pruned_bound,
                                row.selection.calibrated_term);
        output.row(r) /= denominator;
        if (compensation.v_mean)
          if (const Acc weight = v_mean_weight(row.mass, denominator); weight != Acc(0))
            output.row(r) += weight * kernel.value_means_->mean(kv_head, row.length);
        // x · 0 is 0 for a finite x and NaN otherwise: one vectorised sum (Eigen's allFinite tests each element).
        if (!kernel.careful_values_ && !((output.row(r).array() * Acc(0)).sum() == Acc(0)))
          kernel.non_finite_output_ = true;
        output_row_of(r) = output.row(r).template cast<Scalar>();
        stats.elements_kept[std::size_t(row.query_head)] += std::uint64_t(row.mass.kept);
        stats.dense_rows += row.selection.dense;
        stats.capped_rows += row.capped;
        stats.extrapolated_rows += row.selection.extrapolated;
      }
      if (kernel.defers_values_ && kernel.collect_stats_) count_needed_values(stats);
    }
  };

  /// Tiles of key range `split`, from the last to the first, for every KV head in turn per tile.
  void run_key_range(Index query_block, Index split, AttentionStats& stats) {
    std::vector<std::unique_ptr<Block>> blocks;
    for (Index kv_head = 0; kv_head < shape_.kv_heads; ++kv_head) {
      blocks.push_back(lend_block(kv_head, query_block));
      blocks.back()->select_rows(stats);
    }
    // Every block holds the same query rows, so they share their visible keys and their tiles.
    const Index first_tile = split * tiles_per_split_, end_tile = std::min(first_tile + tiles_per_split_, tiles_);
    const Index row_bytes = shape_.head_dim * Index(sizeof(Scalar));
    // Keys [first, end) of the blocks `streams` says read every row of `rows`, `sweep_keys` at a time per block;
    // each block asks for its next rows while it works on the current ones: the next step's, and after the
    // last step those `after(block)` names. The first step's rows are asked for in one burst beforehand.
    // A step ends at the end of a page too (a paged view), so that its rows lie a token stride apart.
    const auto sweep = [&](Index first, Index end, const KvView& rows, auto&& streams, auto&& after, auto&& step) {
      const auto step_keys = [&](Index from) { return std::min({sweep_keys, end - from, rows.contiguous_from(from)}); };
      for (auto& block : blocks)
        if (streams(*block)) prefetch_rows(rows.row(first, block->kv_head), rows.token_stride(), step_keys(first), row_bytes);
      for (Index from = first; from < end;) {
        const Index count = step_keys(from), next = from + count;
        for (auto& block : blocks) {
          if (!streams(*block)) continue;
          step(*block, from, count,
               next < end ? NextRows<Scalar>{rows.row(next, block->kv_head), step_keys(next)} : after(*block));
        }
        from = next;
      }
    };
    std::vector<char> needs_values(blocks.size());
    for (Index tile = end_tile - 1; tile >= first_tile; --tile) {
      const Index first = tile * Tiles::kv_block;
      if (first >= blocks.front()->visible_end) continue;
      for (auto& block : blocks) block->begin_tile(first);
      const Index end = first + blocks.front()->tile_width;
      // After its last K rows, a block asks for the first K rows of the next tile (the one before).
      const auto next_tile_keys = [&](const Block& block) {
        return tile > first_tile ? NextRows<Scalar>{k_.row(first - Tiles::kv_block, block.kv_head),
                                                  std::min({sweep_keys, Tiles::kv_block,
                                                            k_.contiguous_from(first - Tiles::kv_block)})}
                                 : NextRows<Scalar>{};
      };
      sweep(first, end, k_, [](const Block& block) { return block.row_scores.size() == 0; }, next_tile_keys,
            [&](Block& block, Index from, Index count, NextRows<Scalar> next) {
              block.score_keys(from, count, stats, next);
            });
      for (std::size_t b = 0; b < blocks.size(); ++b) needs_values[b] = blocks[b]->weigh_tile(stats);
      for (std::size_t b = 0; b < blocks.size(); ++b)
        if (needs_values[b] && blocks[b]->tile_sparse) blocks[b]->accumulate_values(first, end - first);
      sweep(
          first, end, v_,
          [&](const Block& block) { return needs_values[std::size_t(block.kv_head)] && !block.tile_sparse; },
          [](const Block&) { return NextRows<Scalar>{}; },
          [&](Block& block, Index from, Index count, NextRows<Scalar> next) {
            block.accumulate_values(from, count, next);
          });
    }
    for (auto& block : blocks) block->forget_stale_candidates();
    for (Index kv_head = 0; kv_head < shape_.kv_heads; ++kv_head)
      partials_[std::size_t((query_block * key_splits_ + split) * shape_.kv_heads + kv_head)] =
          std::move(blocks[std::size_t(kv_head)]);
  }

  /// A block started on (KV head `kv_head`, query block `query_block`): one that an earlier item gave back when
  /// there is one, so that its buffers are neither allocated nor cold again.
  std::unique_ptr<Block> lend_block(Index kv_head, Index query_block) {
    std::unique_ptr<Block> block;
    {
      const std::lock_guard<std::mutex> lock(spare_blocks_mutex_);
      if (!spare_blocks_.empty()) {
        block = std::move(spare_blocks_.back());
        spare_blocks_.pop_back();
      }
    }
    if (!block) block = std::make_unique<Block>(*this);
    block->start(kv_head, query_block);
    return block;
  }

  /// Keeps a finished block for `lend_block` (the last one given back is lent first, while it is in cache).
  void take_back(std::unique_ptr<Block> block) {
    const std::lock_guard<std::mutex> lock(spare_blocks_mutex_);
    spare_blocks_.push_back(std::move(block));
  }

  /// `row_at(j)`: the V row of position `first + j` of `kv_head`, for the gathers.
  auto value_rows(Index kv_head, Index first) const {
    if constexpr (is_paged_view_v<KvView>) {
      return [this, kv_head, first](std::int32_t j) { return v_.row(first + j, kv_head); };
    } else {
      return [values = v_.row(first, kv_head), stride = v_.token_stride()](std::int32_t j) {
        return values + Index(j) * stride;
      };
    }
  }

  /// `f(from, count)` for each run of keys [first, first + count) whose rows lie a token stride apart in `view`
  /// (one run unless the view is paged), in order.
  template <class F>
  static void for_each_run(const KvView& view, Index first, Index count, F&& f) {
    for (Index from = first, end = first + count; from < end;) {
      const Index run = std::min(end - from, view.contiguous_from(from));
      f(from, run);
      from += run;
    }
  }

  /// Keys [first, first + width) of `kv_head` packed once for every block; null unless they were.
  const Acc* packed_key_tile(Index kv_head, Index first, Index width) const {
    return preparation_ ? preparation_->packed_key_tile(kv_head, first, width) : nullptr;
  }

  TensorView<const Scalar> q_;
  KvView k_;
  KvView v_;  // the caller's V, or its head-major copy that the blocks read
  TensorView<Scalar> out_;
  AttentionShape shape_;
  const Selection& selection_;
  const ValueMeans<Acc>* value_means_;
  bool track_pruned_mass_;
  bool defers_values_;  // running thresholds: V rows are read once each row's τ_i is known
  bool collect_stats_;
  // Non-finite V values: a zero weight times inf is NaN, so the fast V products (GEMMs, streams over every row
  // of a block) would let a V row that a row does not use (pruned, masked) poison it. They are used as long as
  // every output row with a softmax comes out finite; otherwise the call runs again `careful_values_`, adding
  // each V row only to the rows that weigh it.
  bool careful_values_ = false;
  std::atomic<bool> non_finite_output_{false};
  Index query_blocks_ = 0;
  Index tiles_ = 0, tiles_per_split_ = 0, key_splits_ = 0;  // key_splits_ = 0: items are (KV head, query block)
  std::vector<std::unique_ptr<Block>> partials_;              // [query block][key range][KV head]
  std::mutex spare_blocks_mutex_;
  std::vector<std::unique_ptr<Block>> spare_blocks_;  // finished blocks, for `lend_block`
  std::optional<PrefillPreparation<Tiles, Scalar, KvView>> preparation_;
  KeptRowSets kept_rows_;
};

/// One attention call of a batch: a sequence's views, placement and V prefix sum, and where its statistics go.
template <class Scalar, class KvView = TensorView<const Scalar>>
struct SequenceCall {
  TensorView<const Scalar> q;
  KvView k, v;
  TensorView<Scalar> out;
  AttentionOptions options;
  const double* value_prefix_sum = nullptr;
  AttentionStats* stats = nullptr;
};

/// Checks one call's views (`attention_shape`) and that `out` shares no memory with q, k, v or itself, and
/// returns its shape. With a `name` (a batch's "sequences[3]"), errors name the argument below it.
template <class Scalar, class KvView>
AttentionShape checked_call_shape(const SequenceCall<Scalar, KvView>& call, const std::string& name) {
  try {
    const AttentionShape shape = attention_shape(call.q, call.k, call.v, call.out, call.options);
    // The output is written while q, k and v are read (by other work items, and again when V values are not
    // finite), so it may share no memory with them, nor its rows with each other.
    const auto& out = call.out;
    require(!rows_overlap(out), "out", "rows that do not overlap (token_stride, head_stride >= head_dim)",
            "token_stride " + std::to_string(out.token_stride()) + ", head_stride " +
                std::to_string(out.head_stride()) + ", head_dim " + std::to_string(out.head_dim()));
    for (const auto& [input, overlaps] : {std::pair<const char*, bool>{"q", may_overlap(out, call.q)},
                                          {"k", may_overlap(out, call.k)}, {"v", may_overlap(out, call.v)}})
      require(!overlaps, "out", std::string("memory apart from ") + input + " (no in-place attention)",
              std::string("a view that overlaps ") + input);
    return shape;
  } catch (const invalid_argument& error) {
    if (name.empty()) throw;
    const std::string message = error.what(), prefix = "toptheta: ";  // "toptheta: <argument>: ..."
    throw invalid_argument(prefix + name + "." + message.substr(message.rfind(prefix, 0) == 0 ? prefix.size() : 0));
  }
}

/// Runs `selection` over a batch of attention calls on `executor`: the body of every public attention kernel
/// (a single call is a batch of one). Every call is checked before any work starts. The calls' work items
/// (preparation, then blocks or key ranges, then the merges of split keys) run as one list per stage, so short
/// calls and long ones share the threads; each call's results are those it gives alone, bit for bit.
template <class Tiles, class Scalar, class KvView, class Selection, class Executor>
void run_tiled_attention_batch(const std::vector<SequenceCall<Scalar, KvView>>& calls, const Selection& selection,
                               const Executor& executor, bool name_calls) {
  using Acc = accumulator_t<Scalar>;
  using Kernel = TiledAttention<Tiles, Scalar, Selection, KvView>;
  const std::size_t count = calls.size();
  std::vector<AttentionShape> shapes;
  for (std::size_t c = 0; c < count; ++c)
    shapes.push_back(checked_call_shape(calls[c], name_calls ? "sequences[" + std::to_string(c) + "]" : ""));
  std::vector<ValueMeans<Acc>> value_means(count);
  std::vector<std::unique_ptr<Kernel>> kernels(count);  // none for a call without query rows: it does nothing
  for (std::size_t c = 0; c < count; ++c) {
    const SequenceCall<Scalar, KvView>& call = calls[c];
    if (call.stats) call.stats->reset(shapes[c].q_heads, shapes[c].kv_heads);
    if (shapes[c].query_rows == 0) continue;
    if (selection.compensation().v_mean) value_means[c] = ValueMeans<Acc>::sized(shapes[c]);
    kernels[c] = std::make_unique<Kernel>(call.q, call.k, call.v, call.out, shapes[c], selection, &value_means[c],
                                          call.stats != nullptr);
  }
  // One parallel_for over `items_of(c)` items of each call c (0 for calls without a kernel), in call order.
  std::vector<Index> first(count + 1);
  const auto run_stage = [&](auto&& items_of, auto&& run) {
    first[0] = 0;
    for (std::size_t c = 0; c < count; ++c) first[c + 1] = first[c] + (kernels[c] ? items_of(c) : 0);
    if (first[count] == 0) return;
    executor.parallel_for(first[count], [&](Index item) {
      const std::size_t c = std::size_t(std::upper_bound(first.begin(), first.end(), item) - first.begin()) - 1;
      run(c, item - first[c]);
    });
  };
  // Before the blocks: each call's preparation, then the V means of each of its KV heads.
  const Index mean_items = selection.compensation().v_mean ? 1 : 0;
  run_stage([&](std::size_t c) { return kernels[c]->preparation_items() + mean_items * shapes[c].kv_heads; },
            [&](std::size_t c, Index item) {
              const Index preparation_items = kernels[c]->preparation_items();
              if (item < preparation_items) return kernels[c]->prepare(item);
              value_means[c].compute(item - preparation_items, calls[c].v, calls[c].value_prefix_sum);
            });
  std::vector<std::vector<AttentionStats>> item_stats(count), finish_stats(count);
  for (std::size_t c = 0; c < count; ++c)
    if (kernels[c]) {
      item_stats[c].resize(std::size_t(kernels[c]->work_items()));
      finish_stats[c].resize(std::size_t(kernels[c]->finish_items()));
    }
  const auto run_item = [&](std::size_t c, Index item) {
    item_stats[c][std::size_t(item)].reset(shapes[c].q_heads, shapes[c].kv_heads);
    kernels[c]->run(item, item_stats[c][std::size_t(item)]);
  };
  const auto finish_item = [&](std::size_t c, Index item) {
    finish_stats[c][std::size_t(item)].reset(shapes[c].q_heads, shapes[c].kv_heads);
    kernels[c]->finish_split_rows(item, finish_stats[c][std::size_t(item)]);
  };
  // Calls in groups of at least `group_items` work items, and one parallel_for per group that also runs the
  // previous group's merges (split keys): the threads stay busy across calls, and a group's partial rows are
  // merged while they are still in cache.
  constexpr Index group_items = 64;
  std::vector<std::size_t> group_first{0};
  for (std::size_t c = 0, items = 0; c < count; ++c) {
    items += kernels[c] ? std::size_t(kernels[c]->work_items()) : 0;
    if (items >= std::size_t(group_items) || c + 1 == count) {
      group_first.push_back(c + 1);
      items = 0;
    }
  }
  const std::size_t groups = group_first.size() - 1;
  for (std::size_t g = 0; g <= groups; ++g) {  // group g's work items and group g - 1's merges
    const auto in_group = [&](std::size_t c, std::size_t group) {
      return group < groups && c >= group_first[group] && c < group_first[group + 1];
    };
    const auto works = [&](std::size_t c) { return in_group(c, g); };
    const auto merges = [&](std::size_t c) { return g > 0 && in_group(c, g - 1); };
    run_stage(
        [&](std::size_t c) {
          return (works(c) ? kernels[c]->work_items() : 0) + (merges(c) ? kernels[c]->finish_items() : 0);
        },
        [&](std::size_t c, Index item) {
          if (works(c)) return run_item(c, item);
          finish_item(c, item);
        });
  }
  // Non-finite V values (or sums that overflow) in a call: V products that skip zero weights, for every row of
  // that call again (its out overlaps none of its inputs).
  bool any_careful = false;
  for (std::size_t c = 0; c < count; ++c)
    if (kernels[c] && kernels[c]->found_non_finite_output()) {
      kernels[c]->use_careful_values();
      any_careful = true;
    }
  if (any_careful) {
    const auto careful = [&](std::size_t c) { return kernels[c]->careful_values(); };
    run_stage([&](std::size_t c) { return careful(c) ? kernels[c]->work_items() : 0; }, run_item);
    run_stage([&](std::size_t c) { return careful(c) ? kernels[c]->finish_items() : 0; }, finish_item);
  }
  for (std::size_t c = 0; c < count; ++c) {
    AttentionStats* stats = calls[c].stats;
    if (!stats || !kernels[c]) continue;
    for (const auto& item : item_stats[c]) stats->merge(item);
    for (const auto& item : finish_stats[c]) stats->merge(item);
    kernels[c]->count_kept_rows(*stats);
  }
}

/// Runs `selection` over one attention call on `executor`.
template <class Tiles, class Scalar, class KvView, class Selection, class Executor>
void run_tiled_attention(const TensorView<const Scalar>& q, const KvView& k, const KvView& v,
                         const TensorView<Scalar>& out, const AttentionOptions& options, const Selection& selection,
                         const double* value_prefix_sum, const Executor& executor, AttentionStats* stats) {
  const std::vector<SequenceCall<Scalar, KvView>> call{{q, k, v, out, options, value_prefix_sum, stats}};
  run_tiled_attention_batch<Tiles, Scalar>(call, selection, executor, false);
}

}  // namespace detail
}  // namespace toptheta
