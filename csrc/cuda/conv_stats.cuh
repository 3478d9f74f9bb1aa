// Conv fprop with per-output-channel statistics of its output, for the training path (conv -> BN
// with batch statistics): the CUTLASS conv of kernels.h (conv2d_fprop_bias_act) that also writes,
// per threadblock row tile and output channel, an anchor (the tile's first stored value), the sum
// of the stored values minus the anchor and their centred sum of squares, so BN's batch mean /
// variance need no extra pass over y in DRAM.
//
// Implemented in conv_fprop.cu (same kernels, same configs: the statistics are a phase of the
// kernel skipped when not asked for, so they add no instantiations). Plain C++ declarations like
// kernels.h: no torch, no CUDA headers, so the C++ tensor layer can include this.
//
// Partials: the GEMM rows M = N*P*Q (output pixels, in NPQ order) are cut into
//   tiles = conv2d_fprop_stats_tiles(config, s) = ceil(M / rows_per_tile) row tiles,
//   rows_per_tile = conv2d_fprop_stats_tile_rows(config) (128 or 64),
//   row0_t = t * rows_per_tile, the tile's first row,
//   count_t = min(rows_per_tile, M - row0_t) rows in tile t (>= 1; rows >= M are never read).
// For each tile t and channel k (three float32 [tiles, K] buffers, row-major, every element of
// every tile written, the last, partial tile included):
//   tile_anchor[t * K + k] = a = y[row0_t, k] if that value is finite, else 0
//   tile_sum   [t * K + k] = S = sum over the tile's rows m of (y[m, k] - a)
//   tile_m2    [t * K + k] = sum over the tile's rows m of (y[m, k] - a - S / count_t)^2
// where y[m, k] is the value as stored (rounded to the output dtype, then converted to float32),
// after bias, residual and ReLU. The anchor is a stored value itself, so y - a is exact for
// values within a factor 2 of it: with |mean| >> std (BN's cancellation trap, e.g. 1e5 + N(0, 1))
// the fp32 sums are of small shifted values and the tile mean keeps its precision. Each partial
// is a fixed-order fp32 sum over at most 128 rows, computed in two passes over the tile (shifted
// mean first, then centred squares), so M2 does not suffer from sum-of-squares cancellation
// either. Deterministic (no atomics). NaN / Inf in y propagate into tile_sum / tile_m2: a
// non-finite first row gets anchor 0 and is summed like any other row (the anchor itself is
// always finite).
//
// Merging (the caller, in float64): the tile means are
//   mean_t = tile_anchor[t, k] + tile_sum[t, k] / count_t,
// and tile_m2 is already centred (shift-invariant), so the merge is the usual one, e.g. Chan et
// al.'s pairwise formula over a fixed-order tree over t:
//   n = n_a + n_b,  delta = mean_b - mean_a,
//   mean = mean_a + delta * n_b / n,  M2 = M2_a + M2_b + delta^2 * n_a * n_b / n,
// or all at once: mean = sum n_t mean_t / M, M2 = sum M2_t + sum n_t (mean_t - mean)^2; then
// var = M2 / M (biased) as BN uses.
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
/// plus the statistics partials above. tile_anchor, tile_sum and tile_m2: float32 device buffers
/// of conv2d_fprop_stats_tiles(config, s) * K elements each, all three non-null (else
/// cudaErrorInvalidValue), overlapping nothing else (nor each other). Any alignment of float.
int conv2d_fprop_bias_act_stats(DType dtype, int config, const Conv2dShape& s, const void* x, const void* w,
                                const float* bias, const void* residual, void* y, bool relu, void* workspace,
                                float* tile_anchor, float* tile_sum, float* tile_m2, cudaStream_t stream);

}  // namespace cuda
}  // namespace rf
