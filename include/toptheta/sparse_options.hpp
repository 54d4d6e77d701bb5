// Options shared by the sparse kernels.
#pragma once

#include <toptheta/compensation.hpp>
#include <toptheta/views.hpp>

namespace toptheta {

/// Placement, compensation, and the V prefix sum that V-mean compensation starts from.
struct SparseAttentionOptions {
  AttentionOptions attention;
  Compensation compensation;
  /// `kv_heads x head_dim` row-major `Σ_{j<past} v_j` (see `KvCache::value_sum_before`). Null: V-mean
  /// compensation reads the V rows before `past` itself.
  const double* value_prefix_sum = nullptr;
};

}  // namespace toptheta
