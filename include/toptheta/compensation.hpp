// Softmax-denominator compensation (SDC) and V-mean compensation (VMC) of the mass that pruning drops.
#pragma once

#include <toptheta/detail/enum_names.hpp>
#include <toptheta/detail/require.hpp>
#include <toptheta/online_softmax.hpp>
#include <toptheta/scalar_traits.hpp>

#include <cmath>
#include <limits>
#include <string>

namespace toptheta {

/// The term `C_i` added (times λ) to the kept mass `D_i` in the softmax denominator (design.md §1, step 4).
enum class DenominatorCompensation {
  none,           ///< `C_i = 0`: the kept elements are renormalised to sum to 1.
  exact,          ///< `C_i = Σ_{j∉S_i} exp(a_ij - m_i)`: V traffic still drops, exp work does not.
  exp_threshold,  ///< `C_i = (L_i - |S_i|) exp(τ_i - m_i)`: each pruned term bounded by the threshold.
  calibrated,     ///< `C_i = c_h(L_i)`: the calibrated mean of the exact term, from the threshold table.
};

namespace detail {
inline constexpr EnumName<DenominatorCompensation> denominator_compensation_names[] = {
    {DenominatorCompensation::none, "none"},
    {DenominatorCompensation::exact, "exact"},
    {DenominatorCompensation::exp_threshold, "exp_threshold"},
    {DenominatorCompensation::calibrated, "calibrated"},
};
}  // namespace detail

inline const char* to_string(DenominatorCompensation value) {
  return detail::name_of(value, detail::denominator_compensation_names);
}

/// Parses the names printed by `to_string`; throws naming `argument` for any other text.
inline DenominatorCompensation denominator_compensation_from_string(const std::string& name,
                                                                    const std::string& argument = "denominator") {
  return detail::value_named(name, detail::denominator_compensation_names, argument);
}

/// How a sparse kernel compensates for pruned elements.
struct Compensation {
  DenominatorCompensation denominator = DenominatorCompensation::none;
  /// Scale λ of the denominator term: the denominator is `D_i + λ C_i`.
  double lambda = 1.0;
  /// V-mean compensation: add `(1 - Σ_j p_ij) vbar(L_i)`, `vbar(L) = (1/L) Σ_{j<L} v_j`.
  bool v_mean = false;
  /// With `v_mean`: the mean of the pruned V rows instead, `(Σ_{j<L_i} v_j - Σ_{j∈S_i} v_j) / (L_i - |S_i|)`
  /// (nothing is added when nothing is pruned). The kept rows are read anyway, so this costs O(d |S_i|) per
  /// row and no extra V traffic.
  bool v_mean_of_pruned = false;

  void validate(const std::string& argument = "compensation") const {
    detail::require(std::isfinite(lambda) && lambda >= 0, argument + ".lambda", "a finite value >= 0", lambda);
    detail::require(v_mean || !v_mean_of_pruned, argument + ".v_mean_of_pruned",
                    "false unless v_mean is on (it chooses which V rows v_mean averages)", "true with v_mean off");
  }
};

/// The normaliser of the kept weights: `p_ij = exp(a_ij - m_S) / denominator`, the denominator being
/// `(D_i + λ C_i) exp(m_i - m_S)` in design.md §1's units (`Z_i exp(m_i - m_S)` for the post-softmax placement).
/// \param post_softmax the probability placement: `p_ij = P_ij`, the full softmax, not renormalised.
/// \param pruned_bound the score `τ_i` bounding each pruned score, for `exp_threshold`.
/// \param calibrated_term `c_h(L_i)`, for `calibrated`.
/// `C_i = 0` when nothing is pruned. A term too large for `Acc` gives an infinite denominator: every
/// `p_ij = 0`, and V-mean compensation gives the row `vbar(L_i)`.
template <class Acc>
Acc softmax_denominator(const RowMass<Acc>& mass, const Compensation& compensation, bool post_softmax, Acc pruned_bound,
                        Acc calibrated_term) {
  const auto in_kept_units = [&](Acc term) {  // a term relative to m_i, times exp(m_i - m_S)
    return term == Acc(0) ? Acc(0) : term * std::exp(mass.max - mass.kept_max);
  };
  if (post_softmax) return in_kept_units(mass.total_mass);
  const Index pruned = mass.length - mass.kept;
  Acc term = 0;
  if (pruned > 0) {
    switch (compensation.denominator) {
      case DenominatorCompensation::none:
        break;
      case DenominatorCompensation::exact:
        term = in_kept_units(mass.pruned_mass);
        break;
      case DenominatorCompensation::exp_threshold:
        term = Acc(pruned) * std::exp(pruned_bound - mass.kept_max);
        break;
      case DenominatorCompensation::calibrated:
        term = in_kept_units(calibrated_term);
        break;
    }
  }
  return term == Acc(0) ? mass.kept_mass : mass.kept_mass + Acc(compensation.lambda) * term;
}

/// Weight of `vbar(L_i)` under V-mean compensation: the probability mass not given to kept rows, `1 - Σ_j p_ij`.
template <class Acc>
Acc v_mean_weight(const RowMass<Acc>& mass, Acc denominator) {
  return Acc(1) - mass.kept_mass / denominator;
}

}  // namespace toptheta
