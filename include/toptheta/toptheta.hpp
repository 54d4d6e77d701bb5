// toptheta: sparse transformer attention by compensated static thresholds (Top-θ). The public API in one include.
#pragma once

#define TOPTHETA_VERSION_MAJOR 0
#define TOPTHETA_VERSION_MINOR 1
#define TOPTHETA_VERSION_PATCH 0

#include <toptheta/aligned_vector.hpp>
#include <toptheta/attention_batch.hpp>
#include <toptheta/calibrator.hpp>
#include <toptheta/compensation.hpp>
#include <toptheta/dense_attention.hpp>
#include <toptheta/errors.hpp>
#include <toptheta/executor.hpp>
#include <toptheta/key_range_attention.hpp>
#include <toptheta/kv_cache.hpp>
#include <toptheta/length_buckets.hpp>
#include <toptheta/online_softmax.hpp>
#include <toptheta/page_pool.hpp>
#include <toptheta/paged_kv_cache.hpp>
#include <toptheta/paged_view.hpp>
#include <toptheta/partial_attention.hpp>
#include <toptheta/partial_encoding.hpp>
#include <toptheta/q8_block.hpp>
#include <toptheta/reference_attention.hpp>
#include <toptheta/reference_thresholds.hpp>
#include <toptheta/scalar_traits.hpp>
#include <toptheta/selection.hpp>
#include <toptheta/sparse_options.hpp>
#include <toptheta/stats.hpp>
#include <toptheta/threshold_space.hpp>
#include <toptheta/threshold_table.hpp>
#include <toptheta/thresholded_softmax.hpp>
#include <toptheta/top_k_attention.hpp>
#include <toptheta/top_theta_attention.hpp>
#include <toptheta/value_means.hpp>
#include <toptheta/views.hpp>
