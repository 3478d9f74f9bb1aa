// Conv fprop with per-output-channel statistics of its output, for the training path (conv -> BN
// with batch statistics): the CUTLASS conv of kernels.h (conv2d_fprop_bias_act) that also writes,
// per threadblock row tile, the sum and the centred sum of squares of every output channel of the
// values it stored, so BN's batch mean / variance need no extra pass over y in DRAM.
//
// Implemented in conv_fprop.cu (same kernels, same configs: the statistics are a phase of the
// kernel skipped when not asked for, so they add no instantiations). Plain C++ declarations like
// kernels.h: no torch, no CUDA headers, so the C++ tensor layer can include this.
//
// Partials: the GEMM rows M = N*P*Q (output pixels, in NPQ order) are cut into
//   tiles = conv2d_fprop_stats_tiles(config, s) = ceil(M / rows_per_tile) row tiles,
//   rows_per_tile = conv2d_fprop_stats_tile_rows(config) (128 or 64),
//   count_t = min(rows_per_tile, M - t * rows_per_tile) rows in tile t (>= 1).
// For each tile t and channel k (float32 [tiles, K], row-major, every element written):
//   tile_sum[t * K + k] = sum over the tile's rows m of y[m, k]
//   tile_m2 [t * K + k] = sum over the tile's rows m of (y[m, k] - tile_sum[t * K + k] / count_t)^2
// where y[m, k] is the value as stored (rounded to the output dtype), after bias, residual and
// ReLU. Each partial is a fixed-order fp32 sum over at most 128 rows, computed in two passes over
// the tile (mean first, then centred squares), so M2 does not suffer from sum-of-squares
// cancellation when |mean| >> std. Deterministic (no atomics). NaN / Inf in y propagate.
//
// Merging (the caller, e.g. a fixed-order tree over t): Chan et al.'s pairwise formula
//   n = n_a + n_b,  delta = mean_b - mean_a,
//   mean = mean_a + delta * n_b / n,  M2 = M2_a + M2_b + delta^2 * n_a * n_b / n,
// with mean_t = tile_sum / count_t; then var = M2 / M (biased) as BN uses.
#pragma once

#include <cstdint>

#include "resnet_fused/kernels.h"

namespace rf {
namespace cuda {

/// GEMM rows (output pixels) per statistics tile of config: 128 or 64; 0 for an invalid config.
int conv2d_fprop_stats_tile_rows(int config);

/// Row tiles of the statistics partials, ceil(N*P*Q / conv2d_fprop_stats_tile_rows(config));
/// 0 for an invalid config.
int64_t conv2d_fprop_stats_tiles(int config, const Conv2dShape& s);

/// conv2d_fprop_bias_act (same arguments, same result y, same config from conv2d_fprop_config)
/// plus the statistics partials above. tile_sum and tile_m2: float32 device buffers of
/// conv2d_fprop_stats_tiles(config, s) * K elements each, both non-null, overlapping nothing else.
int conv2d_fprop_bias_act_stats(DType dtype, int config, const Conv2dShape& s, const void* x, const void* w,
                                const float* bias, const void* residual, void* y, bool relu, void* workspace,
                                float* tile_sum, float* tile_m2, cudaStream_t stream);

}  // namespace cuda
}  // namespace rf
