// A compact, versioned byte encoding of partial attention (partial_attention.hpp), so that the partials of a
// sharded KV cache cross process boundaries (MPI messages, sockets, files).
//
// Format version 1, every number little-endian, floats as their IEEE-754 bits (NaN payloads kept):
//   header    "TTPA", u8 version = 1, u8 kind (1 row statistics, 2 partial output), u8 sizeof(Acc) (4 or 8),
//             u8 0, u32 query_rows, u32 q_heads
//   kind 1    u8 list (CandidateList), u8 needed, u32 list_limit; per row: u8 flags (1 non_finite), Acc max,
//             Acc sum, Acc best_score, i64 best_position, u32 candidates, then (i64 position, Acc score) each
//   kind 2    u32 kv_heads, u32 head_dim, u8 sums (1 kept_value_sum, 2 value_sum); per row: u8 flags (1 non_finite,
//             2 capped, 4 dense, 8 extrapolated, 16 best_value,
//             32 best_kept_in_group), Acc score_threshold, Acc pruned_bound,
//             Acc calibrated_term, i64 tie_from, i64 keep_limit, Acc max, Acc kept_max, Acc kept_mass,
//             Acc pruned_mass, Acc total_mass, i64 kept, i64 length, Acc best_score, i64 best_position, then
//             head_dim Acc each of numerator, kept_value_sum, value_sum, best_value (those present)
// A decoder reads only its own version and rejects anything else: a wrong magic, version, kind or type size,
// unknown flag bits, counts beyond the bytes given, trailing bytes.
#pragma once

#include <toptheta/detail/byte_codec.hpp>
#include <toptheta/detail/require.hpp>
#include <toptheta/partial_attention.hpp>
#include <toptheta/scalar_traits.hpp>

#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace toptheta {

/// The encoding version `encode_partial` writes and the decoders read.
inline constexpr std::uint8_t partial_encoding_version = 1;

namespace detail {

enum class PartialKind : std::uint8_t { statistics = 1, output = 2 };

template <class Acc>
void write_partial_header(ByteWriter& out, PartialKind kind, Index query_rows, Index q_heads) {
  out.magic("TTPA");
  out.unsigned_integer(partial_encoding_version, 1);
  out.unsigned_integer(std::uint8_t(kind), 1);
  out.unsigned_integer(sizeof(Acc), 1);
  out.unsigned_integer(0, 1);
  out.count(query_rows, "query_rows");
  out.count(q_heads, "q_heads");
}

/// Reads the header of `kind` and returns (query_rows, q_heads).
template <class Acc>
std::pair<Index, Index> read_partial_header(ByteReader& in, PartialKind kind) {
  in.magic("TTPA", "a partial attention encoding");
  const auto version = in.unsigned_integer(1);
  require(version == partial_encoding_version, "bytes", "encoding version " + std::to_string(partial_encoding_version),
          version);
  const auto found = in.unsigned_integer(1);
  require(found == std::uint64_t(kind), "bytes",
          kind == PartialKind::statistics ? "row statistics (kind 1)" : "a partial output (kind 2)", found);
  const auto acc_bytes = in.unsigned_integer(1);
  require(acc_bytes == sizeof(Acc), "bytes", "values of " + std::to_string(sizeof(Acc)) + " bytes", acc_bytes);
  require(in.unsigned_integer(1) == 0, "bytes", "a zero reserved byte", "another value");
  const Index query_rows = in.count(), q_heads = in.count();
  return {query_rows, q_heads};
}

}  // namespace detail

/// Row statistics (round 1) as bytes.
/// \throws invalid_argument naming the field for a count beyond the format's 32 bits.
template <class Acc>
std::vector<std::uint8_t> encode_partial(const PartialStatistics<Acc>& statistics) {
  detail::require(Index(statistics.rows.size()) == statistics.query_rows * statistics.q_heads, "statistics.rows",
                  "query_rows x q_heads rows", statistics.rows.size());
  detail::ByteWriter out;
  detail::write_partial_header<Acc>(out, detail::PartialKind::statistics, statistics.query_rows, statistics.q_heads);
  out.unsigned_integer(std::uint8_t(statistics.list), 1);
  out.unsigned_integer(statistics.needed, 1);
  out.count(statistics.list_limit, "statistics.list_limit");
  for (const PartialRowStatistics<Acc>& row : statistics.rows) {
    out.unsigned_integer(row.non_finite ? 1 : 0, 1);
    out.real(row.max);
    out.real(row.sum);
    out.real(row.best_score);
    out.integer(row.best_position);
    out.count(Index(row.candidates.size()), "candidates");
    for (const ScoredKey<Acc>& key : row.candidates) {
      out.integer(key.position);
      out.real(key.score);
    }
  }
  return out.take();
}

/// A partial output (round 2) as bytes.
/// \throws invalid_argument naming the field when a row's vectors do not have head_dim values, or only some
/// rows carry a V sum.
template <class Acc>
std::vector<std::uint8_t> encode_partial(const PartialOutput<Acc>& partial) {
  detail::require(Index(partial.rows.size()) == partial.query_rows * partial.q_heads, "partial.rows",
                  "query_rows x q_heads rows", partial.rows.size());
  const bool kept_sums = !partial.rows.empty() && partial.rows.front().kept_value_sum.size() > 0;
  const bool value_sums = !partial.rows.empty() && partial.rows.front().value_sum.size() > 0;
  detail::ByteWriter out;
  detail::write_partial_header<Acc>(out, detail::PartialKind::output, partial.query_rows, partial.q_heads);
  out.count(partial.kv_heads, "partial.kv_heads");
  out.count(partial.head_dim, "partial.head_dim");
  out.unsigned_integer((kept_sums ? 1 : 0) | (value_sums ? 2 : 0), 1);
  const auto sized = [&](const auto& values, bool present, const char* argument) {
    detail::require(values.size() == (present ? partial.head_dim : 0), argument,
                    present ? "head_dim values in every row" : "none in every row", values.size());
  };
  for (const PartialRowOutput<Acc>& row : partial.rows) {
    const RowState<Acc>& state = row.state;
    sized(row.numerator, true, "numerator");
    sized(row.kept_value_sum, kept_sums, "kept_value_sum");
    sized(row.value_sum, value_sums, "value_sum");
    const bool best = row.best_value.size() > 0;
    if (best) sized(row.best_value, true, "best_value");
    out.unsigned_integer((state.non_finite ? 1 : 0) | (state.capped ? 2 : 0) | (state.selection.dense ? 4 : 0) |
                             (state.selection.extrapolated ? 8 : 0) | (best ? 16 : 0) |
                             (row.best_kept_in_group ? 32 : 0),
                         1);
    out.real(state.selection.score_threshold);
    out.real(state.selection.pruned_bound);
    out.real(state.selection.calibrated_term);
    out.integer(state.selection.tie_from);
    out.integer(state.selection.keep_limit);
    out.real(state.mass.max);
    out.real(state.mass.kept_max);
    out.real(state.mass.kept_mass);
    out.real(state.mass.pruned_mass);
    out.real(state.mass.total_mass);
    out.integer(state.mass.kept);
    out.integer(state.mass.length);
    out.real(state.best_score);
    out.integer(state.best_position);
    out.reals(row.numerator);
    out.reals(row.kept_value_sum);
    out.reals(row.value_sum);
    out.reals(row.best_value);
  }
  return out.take();
}

/// Row statistics from `size` bytes written by `encode_partial`.
/// \throws invalid_argument naming `bytes` and what was expected for anything but one whole valid encoding.
template <class Acc>
PartialStatistics<Acc> decode_partial_statistics(const std::uint8_t* bytes, std::size_t size) {
  detail::ByteReader in(bytes, size);
  PartialStatistics<Acc> statistics;
  std::tie(statistics.query_rows, statistics.q_heads) =
      detail::read_partial_header<Acc>(in, detail::PartialKind::statistics);
  const auto list = in.unsigned_integer(1);
  detail::require(list <= std::uint64_t(CandidateList::above_running_threshold), "bytes", "a candidate list 0-3", list);
  statistics.list = CandidateList(list);
  const auto needed = in.unsigned_integer(1);
  detail::require(needed <= 1, "bytes", "a flag 0 or 1 (needed)", needed);
  statistics.needed = needed == 1;
  statistics.list_limit = in.count();
  const std::size_t row_bytes = 1 + 3 * sizeof(Acc) + 8 + 4, key_bytes = 8 + sizeof(Acc);
  // Counts of 32 bits: their product fits in 64.
  in.need_rows(std::uint64_t(statistics.query_rows) * std::uint64_t(statistics.q_heads), row_bytes);
  statistics.rows.resize(std::size_t(statistics.query_rows * statistics.q_heads));
  for (PartialRowStatistics<Acc>& row : statistics.rows) {
    row.non_finite = in.flags(1, "row flags") != 0;
    row.max = in.real<Acc>();
    row.sum = in.real<Acc>();
    row.best_score = in.real<Acc>();
    row.best_position = in.integer();
    detail::require(row.best_position >= -1, "bytes", "a max-score position >= -1", row.best_position);
    const Index candidates = in.count();
    in.need_rows(std::uint64_t(candidates), key_bytes);
    row.candidates.resize(std::size_t(candidates));
    for (ScoredKey<Acc>& key : row.candidates) {
      key.position = in.integer();
      detail::require(key.position >= 0, "bytes", "a candidate position >= 0", key.position);
      key.score = in.real<Acc>();
    }
  }
  in.finish();
  return statistics;
}

/// A partial output from `size` bytes written by `encode_partial`.
/// \throws invalid_argument naming `bytes` and what was expected for anything but one whole valid encoding.
template <class Acc>
PartialOutput<Acc> decode_partial_output(const std::uint8_t* bytes, std::size_t size) {
  detail::ByteReader in(bytes, size);
  PartialOutput<Acc> partial;
  std::tie(partial.query_rows, partial.q_heads) = detail::read_partial_header<Acc>(in, detail::PartialKind::output);
  partial.kv_heads = in.count();
  detail::require(partial.kv_heads >= 1 && partial.q_heads % partial.kv_heads == 0, "bytes",
                  "KV heads that divide the " + std::to_string(partial.q_heads) + " query heads", partial.kv_heads);
  partial.head_dim = in.count();
  detail::require(partial.head_dim >= 1, "bytes", "a head_dim >= 1", partial.head_dim);
  const std::uint8_t sums = in.flags(3, "V sum flags");
  detail::require(sums == 0 || std::uint64_t(partial.query_rows) * std::uint64_t(partial.q_heads) > 0, "bytes",
                  "no V sum flags for a partial without rows", int(sums));
  const std::size_t row_bytes = 1 + 9 * sizeof(Acc) + 5 * 8;
  in.need_rows(std::uint64_t(partial.query_rows) * std::uint64_t(partial.q_heads),
               row_bytes + std::size_t(partial.head_dim) * sizeof(Acc));
  partial.rows.resize(std::size_t(partial.query_rows * partial.q_heads));
  for (PartialRowOutput<Acc>& row : partial.rows) {
    RowState<Acc>& state = row.state;
    const std::uint8_t flags = in.flags(63, "row flags");
    state.non_finite = flags & 1;
    state.capped = flags & 2;
    state.selection.dense = flags & 4;
    state.selection.extrapolated = flags & 8;
    state.selection.score_threshold = in.real<Acc>();
    state.selection.pruned_bound = in.real<Acc>();
    state.selection.calibrated_term = in.real<Acc>();
    state.selection.tie_from = in.integer();
    state.selection.keep_limit = in.integer();
    state.mass.max = in.real<Acc>();
    state.mass.kept_max = in.real<Acc>();
    state.mass.kept_mass = in.real<Acc>();
    state.mass.pruned_mass = in.real<Acc>();
    state.mass.total_mass = in.real<Acc>();
    state.mass.kept = in.integer();
    state.mass.length = in.integer();
    detail::require(state.mass.length >= 0 && state.mass.kept >= 0 && state.mass.kept <= state.mass.length, "bytes",
                    "0 <= kept <= length",
                    std::to_string(state.mass.kept) + " of " + std::to_string(state.mass.length));
    state.best_score = in.real<Acc>();
    state.best_position = in.integer();
    detail::require(state.best_position >= -1, "bytes", "a max-score position >= -1", state.best_position);
    in.reals(row.numerator, partial.head_dim);
    in.reals(row.kept_value_sum, (sums & 1) ? partial.head_dim : 0);
    in.reals(row.value_sum, (sums & 2) ? partial.head_dim : 0);
    in.reals(row.best_value, (flags & 16) ? partial.head_dim : 0);
    row.best_kept_in_group = flags & 32;
  }
  in.finish();
  return partial;
}

}  // namespace toptheta
