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

/// Candidates `(position j, score a_ij)` of one row: every key above the running floor when it arrived, less
/// those found stale when room ran short. Room grows only when the live candidates and one tile do not fit,
/// so it stays near (live candidates + one tile); in the probability space fewer than `1/θ` are live
/// (design.md §6, 3).
template <class Acc>
class RowCandidates {
 public:
  Index size() const { return size_; }
  const std::int32_t* positions() const { return positions_.data(); }
  const Acc* scores() const { return scores_.data(); }

  /// Adds the keys `first + c` of `scores[0 .. count)` whose score exceeds `floor`, first forgetting the held
  /// candidates at or below `floor` when the room is short.
  void add_above(const Acc* scores, Index count, Index first, Acc floor) {
    if (size_ + count + scan_slack > room()) {
      keep_above(floor);
      make_room(size_ + count + scan_slack);
    }
    Acc max;
    size_ += scan_above(scores, count, floor, positions_.data() + size_, scores_.data() + size_, max, first);
  }

  /// Forgets the candidates with score <= `floor`; the rest keep their order.
  void keep_above(Acc floor) {
    Index kept = 0;
    for (Index t = 0; t < size_; ++t) {  // branch-free: every entry is written, the kept ones advance
      positions_[std::size_t(kept)] = positions_[std::size_t(t)];
      scores_[kept] = scores_[t];
      kept += scores_[t] > floor;
    }
    size_ = kept;
  }

  /// Adds the candidates of the same row over another key range.
  void append(const RowCandidates& other) {
    if (other.size_ == 0) return;  // rows without a running threshold merge nothing
    make_room(size_ + other.size_ + scan_slack);
    std::copy_n(other.positions_.data(), other.size_, positions_.data() + size_);
    std::copy_n(other.scores_.data(), other.size_, scores_.data() + size_);
    size_ += other.size_;
  }

  /// Keeps the `limit` candidates with the largest positions (the cap of design.md §1, step 2), in decreasing
  /// position.
  void keep_largest_positions(Index limit) {
    if (size_ <= limit) return;
    std::vector<std::pair<std::int32_t, Acc>> entries;
    entries.reserve(static_cast<std::size_t>(size_));
    for (Index t = 0; t < size_; ++t) entries.emplace_back(positions_[std::size_t(t)], scores_[t]);
    std::partial_sort(entries.begin(), entries.begin() + limit, entries.end(),
                      [](const auto& a, const auto& b) { return a.first > b.first; });
    for (Index t = 0; t < limit; ++t) {
      positions_[std::size_t(t)] = entries[std::size_t(t)].first;
      scores_[t] = entries[std::size_t(t)].second;
    }
    size_ = limit;
  }

  /// `m_S = max` of the scores (size() >= 1).
  Acc max_score() const { return scores_.head(size_).maxCoeff(); }

  /// Turns each score `a` into the weight `exp(a - kept_max)` in one vectorised pass and returns their sum.
  Acc weigh(Acc kept_max) {
    auto weights = scores_.head(size_).array();
    weights = (weights - kept_max).exp();
    return weights.sum();
  }

 private:
  Index room() const { return Index(positions_.size()); }
  void make_room(Index needed) {
    if (needed <= room()) return;
    const Index grown = std::max(needed, 2 * room());
    positions_.resize(std::size_t(grown));
    scores_.conservativeResize(grown);
  }

  Index size_ = 0;
  std::vector<std::int32_t> positions_;
  // Eigen storage: aligned, so that the vectorised exp over it rounds the same for any thread's allocation.
  Eigen::Matrix<Acc, Eigen::Dynamic, 1> scores_;
};

}  // namespace toptheta::detail
