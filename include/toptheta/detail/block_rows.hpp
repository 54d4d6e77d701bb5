// The stacked rows of one work item: their query rows, online-softmax state, output numerators, and the
// scores s q_i k_jᵀ of a range of keys (design.md §1, steps 1 and 5's numerator).
#pragma once

#include <toptheta/detail/call_state.hpp>
#include <toptheta/detail/convert.hpp>
#include <toptheta/detail/kv_view.hpp>
#include <toptheta/detail/packed_queries.hpp>
#include <toptheta/detail/row_candidates.hpp>
#include <toptheta/detail/row_products.hpp>
#include <toptheta/scalar_traits.hpp>
#include <toptheta/selection.hpp>
#include <toptheta/views.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace toptheta::detail {

/// The rows of one work item, stacked: each query row of a query block for every head of one KV head's group,
/// so that each K tile is loaded once for the group and each V row once for the union of the group's
/// survivors. Holds what every step shares: the rows' state, s q_i, the output numerators, the V rows some row
/// needs (statistics of a running threshold) and the unweighted kept V sums (V-mean compensation).
/// `TileSurvivors` and `RunningThresholdRows` add the two ways of selecting; `AttentionBlock` runs the steps.
template <class Tiles, class Scalar, class Selection, class KvView>
struct BlockRows {
  using Acc = accumulator_t<Scalar>;
  using KvScalar = typename KvView::value_type;  // Scalar, or int8 blocks (BlockQ8)
  using Matrix = Eigen::Matrix<Acc, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using Call = CallState<Tiles, Scalar, Selection, KvView>;
  using TileSize = Tiles;

  /// Blocks with at most this many stacked rows stream K and V row by row instead of using GEMMs.
  static constexpr Index streaming_rows = 8;
  /// Query and output rows, a token stride apart, are asked for this many rows before they are used.
  static constexpr Index rows_ahead = 8;

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

  Call* call = nullptr;  // the call whose rows the block holds since `take_rows`
  Index kv_head = 0;
  std::vector<Row> rows;
  Matrix scaled_queries;              // s q_i, one row per (head of the group, query row)
  PackedQueries<Acc> packed_queries;  // scaled_queries for the GEMM, packed on first use
  Matrix output;                      // Σ_j w_ij v_j per row, w_ij relative to the row's kept max
  Matrix converted_rows;              // K or V rows converted to Acc (stored type other than Acc)
  Index visible_end = 0;              // keys [0, visible_end) are visible to some row of the block
  // Bit j set when some row of the block needs V row j (running thresholds; one bit per visible key, only when
  // the call collects statistics, the one thing it is for).
  std::vector<std::uint64_t> needed_values;
  // Σ_{j∈S_i} v_j per row, for V-mean compensation over the pruned rows (`Compensation::v_mean_of_pruned`), and
  // unit weights to gather them with.
  Matrix kept_value_sums;
  std::vector<Acc> unit_weights;

  /// Whether the rows' scores over every visible key come first (`select_rows`), with their max and sum: the
  /// two-pass rules (top-k, Top-θ with `Passes::two`). The tiles then read them instead of scoring keys.
  bool scores_rows_first() const { return call->selection.needs_row_scores(); }

  /// Whether the rows sum their kept V rows unweighted (`kept_value_sums`).
  bool sums_kept_values() const { return call->selection.compensation().v_mean_of_pruned; }

  /// Takes the query rows of block `query_block` of `state`'s call for every head of KV head `kv` (a block
  /// lent again, by any call of a batch, starts afresh here, keeping only the room of its buffers).
  void take_rows(Call& state, Index kv, Index query_block) {
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
    // Emptied without statistics too: a block lent again keeps a vector sized for an earlier call.
    if (call->defers_values) needed_values.assign(call->collect_stats ? std::size_t((visible_end + 63) / 64) : 0, 0);
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

  /// kept_value_sums_r += Σ_t v_{row_at(columns_t)} over `count` kept V rows.
  template <class RowAt>
  void add_kept_values(Index r, const std::int32_t* columns, Index count, const RowAt& row_at) {
    if (Index(unit_weights.size()) < count) unit_weights.assign(std::size_t(count), Acc(1));
    add_gathered_rows(unit_weights.data(), columns, count, row_at, kept_value_sums.cols(),
                      kept_value_sums.row(r).data());
  }

  /// output_r += w v_position, only when w != 0 (careful V products: 0 · inf would be NaN).
  void add_if_weighed(Acc weight, Index position, Index r) {
    if (weight == Acc(0)) return;
    Acc* const into = output.row(r).data();
    const KvScalar* const value = call->v.row(position, kv_head);
    for (Index d = 0; d < output.cols(); ++d) into[d] += weight * value_at<Acc>(value, d);
  }

  /// Marks V row `position` as needed by some row of the block (running thresholds, statistics collected).
  void need_value(Index position) { needed_values[std::size_t(position / 64)] |= std::uint64_t(1) << (position % 64); }
};

}  // namespace toptheta::detail
