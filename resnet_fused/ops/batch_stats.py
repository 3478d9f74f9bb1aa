"""Training-mode BatchNorm statistics: per-tile partials, their robust merge, the batch affine,
running-statistic updates and the cross-rank merge of ``nn.SyncBatchNorm``.

A tensor's per-channel statistics are gathered in pieces: the fused conv's epilogue (or
:func:`channel_stats` for a tensor no conv of ours produced) writes, for each tile of rows,
``count``, ``mean`` and ``M2 = sum((y - mean)^2)``. Pieces are merged with Chan et al.'s parallel
formula, never as ``sum(y^2) - sum(y)^2 / n``, which loses every digit when ``|mean| >> std``::

    n = n_a + n_b,  delta = mean_b - mean_a,
    mean = mean_a + delta * n_b / n,  M2 = M2_a + M2_b + delta^2 * n_a * n_b / n

Shapes: partials ``count [T]``, ``mean [T, C]``, ``m2 [T, C]``, all float32 (``count`` is zero for
rows no tile wrote). Results: ``mean [C]`` and biased ``var [C]``, float32.

The running statistics are updated exactly as ``nn.BatchNorm2d`` does: ``num_batches_tracked += 1``;
``running = (1 - f) * running + f * batch`` with ``f = momentum``, or ``f = 1 / num_batches_tracked``
for ``momentum=None``; the running variance takes the unbiased batch variance ``var * n / (n - 1)``.
Everything stays on the device (no host sync), so CUDA graph capture works.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from ._common import device_guard, interpreting

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover
    triton = None
    tl = None


class StatsPartials:
    """Per-tile statistics, merged by :func:`merge_partials`.

    Each row holds, per channel, an *anchor* (one value of the tile, finite or 0), the mean of the
    tile's values minus that anchor, and M2; plus the row's count. Means kept as anchor + offset
    stay exact when ``|mean| >> std``: a plain float32 mean would round away the spread of the
    tile means, which is what the variance is made of.

    anchor, mean, m2: [rows, C] float32; count: [rows] float32, zero for rows no tile wrote (the
    conv picks its tile height after allocation, so there is room for the smallest).
    """

    def __init__(self, rows: int, channels: int, device: torch.device) -> None:
        self.anchor = torch.empty((rows, channels), dtype=torch.float32, device=device)
        self.mean = torch.empty((rows, channels), dtype=torch.float32, device=device)
        self.m2 = torch.empty((rows, channels), dtype=torch.float32, device=device)
        self.count = torch.zeros((rows,), dtype=torch.float32, device=device)

    @classmethod
    def row(cls, count: Tensor, anchor: Tensor, mean: Tensor, m2: Tensor) -> "StatsPartials":
        """One merged row from its parts (``count [1]``, the others ``[C]``), as the ops return them."""
        merged = cls.__new__(cls)
        merged.count, merged.anchor, merged.mean, merged.m2 = count, anchor[None], mean[None], m2[None]
        return merged


# ------------------------------------------------------------------------------------ reference
def batch_stats_reference(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``x`` [N, C, H, W], in float64."""
    x = x.double()
    return x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)


# --------------------------------------------------------------------------------- Triton kernels
if triton is not None:

    @triton.jit
    def tile_stats(y, ok, cnt, C, rc, c_ok, row, anchor_ptr, mean_ptr, m2_ptr):
        """Store one partial row: anchor (the tile's first row, 0 where not finite), mean offset
        from it and M2 of ``y`` [rows, BLOCK_C] (fp32) over ``ok``; ``cnt`` valid rows (> 0).

        The mean is taken first and M2 from deviations (two passes over registers), so neither
        suffers the cancellation of sum(y^2) - sum(y)^2 / n.
        """
        first = tl.sum(tl.where(ok & (tl.arange(0, y.shape[0]) == 0)[:, None], y, 0.0), axis=0)
        anchor = tl.where((first == first) & (tl.abs(first) < float("inf")), first, 0.0)
        d = tl.where(ok, y - anchor[None, :], 0.0)
        mean = tl.sum(d, axis=0) / cnt
        e = tl.where(ok, d - mean[None, :], 0.0)
        off = row.to(tl.int64) * C + rc
        tl.store(anchor_ptr + off, anchor, mask=c_ok)
        tl.store(mean_ptr + off, mean, mask=c_ok)
        tl.store(m2_ptr + off, tl.sum(e * e, axis=0), mask=c_ok)

    @triton.jit
    def _merge_kernel(cnt_in, anchor_in, mean_in, m2_in, cnt_out, anchor_out, mean_out, m2_out,
                      T, C, TILES_PER_PROG,
                      BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
        # Program (g, cb) merges partial rows [g * TILES_PER_PROG, ...) of channels cb*BLOCK_C...
        # Means are carried as offsets from an anchor that is a value of the data (the anchor of
        # the first written row), so every offset below is small when |mean| >> std.
        g = tl.program_id(0)
        rc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = rc < C
        t_begin = g * TILES_PER_PROG
        t_end = tl.minimum(t_begin + TILES_PER_PROG, T)  # > t_begin: every program gets a row
        n_acc = tl.sum(tl.zeros((BLOCK_T,), dtype=tl.float32), axis=0)
        k_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
        mean_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
        m2_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for t0 in range(t_begin, t_end, BLOCK_T):
            rt = t0 + tl.arange(0, BLOCK_T)
            t_ok = rt < t_end
            cnt = tl.load(cnt_in + rt, mask=t_ok, other=0.0)
            written = t_ok & (cnt > 0)
            ok = written[:, None] & c_ok[None, :]
            # this chunk's anchor: its first written row's (rows with count 0 hold garbage)
            first = tl.minimum(tl.min(tl.where(written, rt, t_end), axis=0), t_end - 1)
            kc = tl.load(anchor_in + first.to(tl.int64) * C + rc, mask=c_ok, other=0.0)
            off = rt.to(tl.int64)[:, None] * C + rc[None, :]
            m = tl.load(anchor_in + off, mask=ok, other=0.0) - kc[None, :]
            m += tl.load(mean_in + off, mask=ok, other=0.0)
            m = tl.where(ok, m, 0.0)  # a chunk with no written row has a garbage anchor
            q = tl.load(m2_in + off, mask=ok, other=0.0)
            # the chunk as one piece (deviations from its own mean), then Chan into the total
            n_b = tl.sum(cnt, axis=0)
            mean_b = tl.sum(cnt[:, None] * m, axis=0) / tl.maximum(n_b, 1.0)
            d = tl.where(ok, m - mean_b[None, :], 0.0)
            m2_b = tl.sum(q, axis=0) + tl.sum(cnt[:, None] * d * d, axis=0)
            k_acc = tl.where(n_acc > 0, k_acc, tl.where(n_b > 0, kc, 0.0))  # the first data seen anchors
            n = n_acc + n_b
            w_b = n_b / tl.maximum(n, 1.0)
            delta = tl.where(n_b > 0, (kc - k_acc) + mean_b - mean_acc, 0.0)
            mean_acc = mean_acc + delta * w_b
            m2_acc = m2_acc + m2_b + delta * delta * (n_acc * w_b)
            n_acc = n
        out = g.to(tl.int64) * C + rc
        tl.store(anchor_out + out, k_acc, mask=c_ok)
        tl.store(mean_out + out, mean_acc, mask=c_ok)
        tl.store(m2_out + out, m2_acc, mask=c_ok)
        if tl.program_id(1) == 0:
            tl.store(cnt_out + g, n_acc)

    @triton.jit
    def _channel_stats_kernel(x_ptr, cnt_ptr, anchor_ptr, mean_ptr, m2_ptr, P, C, HW,
                              CHANNELS_LAST: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        # One tile of [pixels, channels] of a dense NCHW or NHWC tensor -> one partial row.
        pid_p = tl.program_id(0)
        rc, c_ok, ok, off = pixel_channel_tile(P, C, HW, CHANNELS_LAST, BLOCK_P, BLOCK_C)
        y = tl.load(x_ptr + off, mask=ok, other=0.0).to(tl.float32)
        cnt = tl.minimum(P - pid_p * BLOCK_P, BLOCK_P).to(tl.float32)
        tile_stats(y, ok, cnt, C, rc, c_ok, pid_p, anchor_ptr, mean_ptr, m2_ptr)
        if tl.program_id(1) == 0:
            tl.store(cnt_ptr + pid_p, cnt)

    @triton.jit
    def pixel_channel_tile(P, C, HW, CHANNELS_LAST: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        """This program's tile of a dense [N, C, H, W] tensor seen as [P = N*H*W pixels, C]: program
        (p, c) takes pixels p*BLOCK_P... and channels c*BLOCK_C... Returns (channels, channel
        mask, element mask, element offsets)."""
        rp = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        rc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = rc < C
        ok = (rp < P)[:, None] & c_ok[None, :]
        return rc, c_ok, ok, pixel_channel_offsets(rp, rc, C, HW, CHANNELS_LAST)

    @triton.jit
    def pixel_channel_offsets(rp, rc, C, HW, CHANNELS_LAST: tl.constexpr):
        """Element offsets of pixels ``rp`` (n * HW + hw) x channels ``rc`` in a dense tensor."""
        rp64 = rp.to(tl.int64)
        if CHANNELS_LAST:
            return rp64[:, None] * C + rc[None, :]
        n = rp64 // HW
        return (n * C * HW + rp64 % HW)[:, None] + (rc.to(tl.int64) * HW)[None, :]


_ROWS_PER_PROG = 1024  # partial rows one merge program takes (more: another merge round)


def merge_partials(parts: StatsPartials) -> StatsPartials:
    """Merge partial rows into one (``count [1]``, ``anchor``/``mean``/``m2`` [1, C]), in rounds
    of up to ``per`` rows per program so a large batch still spreads over many programs."""
    cnt, anchor, mean, m2 = parts.count, parts.anchor, parts.mean, parts.m2
    C = mean.shape[1]
    block_t, block_c = (64, 32) if interpreting(mean) else (32, 64)
    per = max(2, _ROWS_PER_PROG)  # 1 would never shrink
    if cnt.shape[0] == 0:  # nothing was written (an empty batch): count 0, NaN statistics later
        out = StatsPartials(1, C, mean.device)
        for t in (out.anchor, out.mean, out.m2):
            t.zero_()
        return out
    with device_guard(mean):
        while True:
            T = cnt.shape[0]
            groups = triton.cdiv(T, per) if T > per else 1
            tpp = triton.cdiv(T, groups)
            out = StatsPartials(groups, C, mean.device)
            _merge_kernel[(groups, triton.cdiv(C, block_c))](
                cnt, anchor, mean, m2, out.count, out.anchor, out.mean, out.m2,
                T, C, tpp, BLOCK_T=block_t, BLOCK_C=block_c)
            if groups == 1:
                return out
            cnt, anchor, mean, m2 = out.count, out.anchor, out.mean, out.m2


def channel_stats_partials(x: Tensor) -> StatsPartials:
    """Per-tile partials of a dense NCHW or channels_last tensor ``x`` [N, C, H, W] (Triton)."""
    N, C, H, W = x.shape
    P = N * H * W
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    x = x if cl else x.contiguous()
    bp, bc = (128, 32) if interpreting(x) else ((64, 64) if cl else (256, 16))
    parts = StatsPartials(max(1, triton.cdiv(P, bp)), C, x.device)
    if P and C:
        with device_guard(x):
            _channel_stats_kernel[(triton.cdiv(P, bp), triton.cdiv(C, bc))](
                x, parts.count, parts.anchor, parts.mean, parts.m2, P, C, H * W,
                CHANNELS_LAST=cl, BLOCK_P=bp, BLOCK_C=bc)
    return parts


@torch.library.custom_op("resnet_fused::channel_stats", mutates_args=())
def channel_stats(x: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-channel ``(count [1], anchor [C], mean offset [C], m2 [C])`` of ``x`` [N, C, H, W]
    (dense NCHW or channels_last), merged; :func:`finalize` turns it into mean and variance.
    A custom op, so ``torch.compile`` traces blocks that call it."""
    merged = merge_partials(channel_stats_partials(x))
    return merged.count, merged.anchor[0], merged.mean[0], merged.m2[0]


@channel_stats.register_fake
def _(x):
    C = x.shape[1]
    return (x.new_empty((1,), dtype=torch.float32),
            *(x.new_empty((C,), dtype=torch.float32) for _ in range(3)))


# ------------------------------------------------------------------------ the BN from batch stats
def finalize(merged: StatsPartials) -> Tuple[Tensor, Tensor, Tensor]:
    """``(count [1], mean [C], biased var [C])`` float32 from a merged row. An empty batch gives
    NaN statistics, as ``torch.var`` of nothing does."""
    count = merged.count
    return count, merged.anchor[0] + merged.mean[0], merged.m2[0] / count


def sync_across_ranks(merged: StatsPartials, group) -> Tuple[Tensor, Tensor, Tensor]:
    """``(count, mean, biased var)`` over every rank's batch (SyncBatchNorm), identical on all ranks.

    One ``all_gather`` per BatchNorm of the packed ``[count, anchor, mean offset, m2]``; merged in
    float64 (a few numbers per channel and rank), so ranks add no cancellation. A rank with an
    empty batch contributes nothing.
    """
    import torch.distributed as dist

    C = merged.mean.shape[1]
    local = torch.cat([merged.count.reshape(1), merged.anchor[0], merged.mean[0], merged.m2[0]])
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    allp = torch.stack(gathered).double()  # [ranks, 1 + 3C]
    n_i = allp[:, :1]
    has = n_i > 0
    k = allp[:1, 1:1 + C]  # any shared anchor; rank 0's
    mean_i = torch.where(has, allp[:, 1:1 + C] - k + allp[:, 1 + C:1 + 2 * C], 0.0)
    m2_i = torch.where(has, allp[:, 1 + 2 * C:], 0.0)
    n = n_i.sum()
    mean_off = (n_i * mean_i).sum(0) / n.clamp(min=1)
    m2 = m2_i.sum(0) + (n_i * (mean_i - mean_off) ** 2).sum(0)
    mean = (k[0] + mean_off).float()
    return n.float().reshape(1), mean, (m2 / n).float()


def sync_group(norm: nn.Module):
    """The process group a training SyncBatchNorm reduces over, or None (no sync: plain BN
    semantics, as ``nn.SyncBatchNorm`` itself behaves without an initialised group or on 1 rank)."""
    if not isinstance(norm, nn.SyncBatchNorm) or not norm.training:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = norm.process_group if norm.process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def bn_affine(mean: Tensor, var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
              eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """``(scale, shift, invstd)`` [C] float32 with ``bn(y) = (y - mean) * scale + shift`` for batch
    statistics: ``scale = gamma * invstd``, ``shift = beta`` (1 and 0 without affine). The centred
    form the kernels use: ``y * scale + (shift - mean * scale)`` cancels when |mean| >> std."""
    invstd = torch.rsqrt(var + eps)
    scale = invstd if weight is None else weight.float() * invstd
    shift = bias.float() if bias is not None else torch.zeros_like(mean)
    return scale, shift, invstd


def update_running_stats(norm: nn.Module, mean: Tensor, var: Tensor, count: Tensor) -> None:
    """``nn.BatchNorm2d``'s training-mode update from batch ``mean`` and biased ``var`` over
    ``count`` values per channel (``count`` a 1-element tensor). No-op without running stats."""
    if not norm.track_running_stats or norm.running_mean is None:
        return
    with torch.no_grad():
        if norm.num_batches_tracked is not None:
            norm.num_batches_tracked.add_(1)
        unbiased = var * (count / (count - 1).clamp(min=1))
        rm, rv = norm.running_mean, norm.running_var
        if norm.momentum is None:  # cumulative moving average: factor 1 / num_batches_tracked, on device
            f = 1.0 / norm.num_batches_tracked.to(torch.float32)
            rm.copy_(rm * (1 - f) + mean.to(rm.dtype) * f)
            rv.copy_(rv * (1 - f) + unbiased.to(rv.dtype) * f)
        else:  # a Python float: no host-to-device copy, so CUDA graph capture works
            m = float(norm.momentum)
            rm.mul_(1 - m).add_(mean.to(rm.dtype), alpha=m)
            rv.mul_(1 - m).add_(unbiased.to(rv.dtype), alpha=m)


__all__: List[str] = ["StatsPartials", "batch_stats_reference", "merge_partials", "channel_stats_partials",
                      "channel_stats", "finalize", "tile_stats", "pixel_channel_tile", "pixel_channel_offsets",
                      "sync_across_ranks", "sync_group", "bn_affine", "update_running_stats"]
