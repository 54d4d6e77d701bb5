// The keys of one score row that may still pass a threshold which only grows as keys arrive (design.md §6):
// the one-pass state of the probability and score_minus_max spaces.
#pragma once

#include <toptheta/detail/threshold_scan.hpp>
#include <toptheta/scalar_traits.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

namespace toptheta::detail {

/// The score below which a key can be forgotten while the running threshold is `tau_t`: `τ_t` less a margin of
/// `sqrt(ε) max(1, |τ_t|)`. The running `(m_t, Z_t)` round differently from the final `(m_i, Z_i)` (the sum is
/// rescaled as the max moves; its relative error stays far below `sqrt(ε)`), so a key kept by the final `τ_i`
/// is never forgotten early (design.md §6: monotone only up to rounding).
template <class Acc>
Acc forget_floor(Acc tau_t) {
  const Acc margin = std::sqrt(std::numeric_limits<Acc>::epsilon());
  return tau_t - margin * std::max(Acc(1), std::abs(tau_t));
}

/// The keys of one tile above a floor, found by one scan before they join a row's candidates.
template <class Acc>
class ScannedKeys {
 public:
  /// Finds the keys `first + c` of `scores[0 .. count)` (count >= 1) whose score exceeds `floor`; returns the
  /// largest score.
  Acc scan(const Acc* scores, Index count, Index first, Acc floor) {
    make_room(count);
    Acc max;
    count_ = scan_above(scores, count, floor, positions_.data(), scores_.data(), max, first);
    return max;
  }
  Index count() const { return count_; }
  const std::int32_t* positions() const { return positions_.data(); }
  const Acc* scores() const { return scores_.data(); }

 private:
  void make_room(Index count) {
    if (positions_.size() >= count + scan_slack) return;
    positions_.resize(count + scan_slack);
    scores_.resize(count + scan_slack);
  }

  Index count_ = 0;
  Eigen::Matrix<std::int32_t, Eigen::Dynamic, 1> positions_;
  Eigen::Matrix<Acc, Eigen::Dynamic, 1> scores_;
};

/// Candidates `(position j, score a_ij)` of one row: every key above the running floor when it arrived, less
/// those found stale when room ran short; in the probability space fewer than `1/θ` are live (design.md §6,
/// 3). They are held in room lent by the caller (`use_room`, a share of a work item's buffer) until they
/// outgrow it, then in storage of their own that doubles when the live candidates do not fit.
template <class Acc>
class RowCandidates {
 public:
  RowCandidates() = default;
  /// A copy holds the same candidates in storage of its own.
  RowCandidates(const RowCandidates& other) { append(other); }
  RowCandidates& operator=(const RowCandidates& other) {
    if (this != &other) {
      size_ = 0;
      append(other);
    }
    return *this;
  }

  /// Holds up to `room` candidates at `positions` and `scores` (which must outlive this) before any storage
  /// of its own; only while empty.
  void use_room(std::int32_t* positions, Acc* scores, Index room) {
    if (size_ > 0) return;
    positions_ = positions;
    scores_ = scores;
    room_ = room;
  }

  /// Forgets every candidate and the lent room; storage of its own stays for the next row (`use_room` next).
  void clear() {
    size_ = 0;
    positions_ = own_positions_.data();
    scores_ = own_scores_.data();
    room_ = Index(own_positions_.size());
  }

  Index size() const { return size_; }
  const std::int32_t* positions() const { return positions_; }
  const Acc* scores() const { return scores_; }

  /// Adds the keys `first + c` of `scores[0 .. count)` whose score exceeds `floor`: scanned straight into the
  /// room while it has `count + scan_slack` entries free, else into `scanned` first, the held candidates at or
  /// below `floor` forgotten when the room is short.
  void add_above(const Acc* scores, Index count, Index first, Acc floor, ScannedKeys<Acc>& scanned) {
    if (size_ + count + scan_slack <= room_) {
      Acc max;
      size_ += scan_above(scores, count, floor, positions_ + size_, scores_ + size_, max, first);
      return;
    }
    scanned.scan(scores, count, first, floor);
    add_above(scanned, floor);
  }

  /// Adds the keys `ScannedKeys::scan` found above `floor`, first forgetting the held candidates at or below
  /// `floor` when the room is short.
  void add_above(const ScannedKeys<Acc>& keys, Acc floor) {
    const Index count = keys.count();
    if (count == 0) return;
    if (size_ + count > room_) {
      keep_above(floor);
      make_room(size_ + count);
    }
    std::copy_n(keys.positions(), count, positions_ + size_);
    std::copy_n(keys.scores(), count, scores_ + size_);
    size_ += count;
  }

  /// Forgets the candidates with score <= `floor`; the rest keep their order.
  void keep_above(Acc floor) { size_ = copy_above(positions_, scores_, size_, floor, positions_, scores_); }

  /// Adds every candidate of `other` (the copies above).
  void append(const RowCandidates& other) {
    if (other.size_ == 0) return;
    make_room(size_ + other.size_);
    std::copy_n(other.positions_, other.size_, positions_ + size_);
    std::copy_n(other.scores_, other.size_, scores_ + size_);
    size_ += other.size_;
  }

  /// Adds the candidates of the same row over another key range whose score exceeds `floor`.
  void append_above(const RowCandidates& other, Acc floor) {
    make_room(size_ + other.size_);
    size_ += copy_above(other.positions_, other.scores_, other.size_, floor, positions_ + size_, scores_ + size_);
  }

  /// Keeps the `limit` candidates with the largest positions (the cap of design.md §1, step 2), in decreasing
  /// position.
  void keep_largest_positions(Index limit) {
    if (size_ <= limit) return;
    std::vector<std::pair<std::int32_t, Acc>> entries;
    entries.reserve(static_cast<std::size_t>(size_));
    for (Index t = 0; t < size_; ++t) entries.emplace_back(positions_[t], scores_[t]);
    std::partial_sort(entries.begin(), entries.begin() + limit, entries.end(),
                      [](const auto& a, const auto& b) { return a.first > b.first; });
    for (Index t = 0; t < limit; ++t) {
      positions_[t] = entries[std::size_t(t)].first;
      scores_[t] = entries[std::size_t(t)].second;
    }
    size_ = limit;
  }

  /// `m_S = max` of the scores (size() >= 1).
  Acc max_score() const { return held_scores().maxCoeff(); }

  /// Turns each score `a` into the weight `exp(a - kept_max)` in one vectorised pass and returns their sum.
  Acc weigh(Acc kept_max) {
    auto weights = held_scores();
    weights = (weights - kept_max).exp();
    return weights.sum();
  }

 private:
  Eigen::Map<Eigen::Array<Acc, Eigen::Dynamic, 1>> held_scores() const {
    return Eigen::Map<Eigen::Array<Acc, Eigen::Dynamic, 1>>(scores_, size_);
  }

  void make_room(Index needed) {
    if (needed <= room_) return;
    if (positions_ != own_positions_.data() && needed <= Index(own_positions_.size())) {  // lent room outgrown
      std::copy_n(positions_, size_, own_positions_.data());
      std::copy_n(scores_, size_, own_scores_.data());
      positions_ = own_positions_.data();
      scores_ = own_scores_.data();
      room_ = Index(own_positions_.size());
      return;
    }
    const Index grown = std::max(needed, 2 * room_);
    std::vector<std::int32_t> positions(positions_, positions_ + size_);
    positions.resize(std::size_t(grown));
    Eigen::Matrix<Acc, Eigen::Dynamic, 1> scores(grown);
    std::copy_n(scores_, size_, scores.data());
    own_positions_.swap(positions);
    own_scores_.swap(scores);
    positions_ = own_positions_.data();
    scores_ = own_scores_.data();
    room_ = grown;
  }

  std::int32_t* positions_ = nullptr;
  Acc* scores_ = nullptr;
  Index room_ = 0, size_ = 0;
  std::vector<std::int32_t> own_positions_;
  Eigen::Matrix<Acc, Eigen::Dynamic, 1> own_scores_;
};

}  // namespace toptheta::detail
