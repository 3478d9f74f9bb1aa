"""Fused convolution + bias (folded BatchNorm) + optional residual add + optional ReLU.

    out = relu?( conv2d(x, weight, stride, padding, dilation) + bias[c] + residual )

One pass: the conv is an implicit GEMM (M = N*OH*OW output pixels, N = Cout, K = KH*KW*Cin)
whose epilogue adds the bias and the residual in fp32, applies ReLU and casts to the output dtype,
so no intermediate tensor is written. With BatchNorm folded into ``weight``/``bias``
(:mod:`resnet_fused.ops.fold`) this is conv + BN (+ residual) + ReLU of an inference ResNet.

Shapes and layouts
    x        [N, Cin, H, W]        float32 / float16 / bfloat16; NCHW or channels_last (any strides)
    weight   [Cout, Cin, KH, KW]   x's dtype; any memory format (the launcher reads a channels_last
                                   copy: one small copy when it is not channels_last already)
    bias     [Cout] or None        any float dtype; added in fp32
    residual [N, Cout, OH, OW] or None, any float dtype and strides
    out      [N, Cout, OH, OW]     x's dtype (promoted with residual's, as ``conv(x) + residual``
                                   would be), in x's memory format
fp32 inputs use TF32 tensor cores when PyTorch's cuDNN convolutions do (``cudnn.allow_tf32`` /
``cudnn.conv.fp32_precision``; TF32 is cuDNN's default for convolutions), IEEE fp32 otherwise.
``groups > 1`` and float64 run on the PyTorch path. NaN and Inf propagate as ``torch.relu`` does.

The kernel
    * One flat K loop over (filter tap, Cin block), so the software pipeliner keeps
      ``num_stages`` operand loads in flight across taps; a tap moves each pixel's hoisted offset
      by one scalar.
    * Operands: on sm_90+ the weight comes through a TMA tensor descriptor (the channels_last
      weight is the dense [Cout, KH*KW*Cin] matrix; used when BLOCK_K divides Cin and the row is
      16-byte aligned), and so do the activations of a 1x1 / stride 1 / unpadded conv on a dense
      channels_last input (the [N*H*W, Cin] matrix). Everything else, sm_80, and batch-split or
      misaligned views load through pointers (cp.async where the alignment is provable).
      Triton's interpreter emulates descriptors, so CI runs the TMA path too.
    * NCHW: activations are loaded along the pixel axis (adjacent threads, adjacent addresses),
      output and residual stored along it. The loads stay scalar: the compiler cannot prove a
      pixel run's alignment, so NCHW gets neither 16-byte vectors nor cp.async. The fast layout is
      channels_last, and converting to it is a model-entry decision (one conversion of the input,
      which the modules / dispatch layer can make and measure), not the launcher's: converting
      per conv would read and write every activation once more, for every layer.
    * The stem (Cin < 8): one K block per filter row, its (kw, c) pairs in x's memory order (7*3
      = 21 of 32 lanes for ResNet's 7x7 stem). Loads stay scalar gathers for 16-bit types
      (a pixel's run starts at an odd element: no cp.async), at 8 warps to keep them in registers.
    * Tensor cores: fp16 and bf16 take wgmma on sm_90 (mma.sync on sm_80); fp32 takes TF32 or
      IEEE as above. Under the interpreter bf16 runs as an fp32 dot (``UPCAST``, its bf16 dot is
      wrong) and fp32 as IEEE: the bf16 wgmma, TF32 and TMA hardware paths are compiled
      (``benchmarks/results/codegen/conv_notes.md``), not executed, on a CPU machine.
    * Tiles, warps and stages: one configuration per shape class, :func:`conv_configs.conv_config`;
      exhaustive autotuning only with ``RESNET_FUSED_AUTOTUNE=1``.

Autograd: the Triton forward is wrapped in an ``autograd.Function`` whose backward uses the ReLU
mask from the saved output and cuDNN's ``convolution_backward`` for dgrad/wgrad, so an eval-mode
model with frozen BN can still be fine-tuned. Fused training kernels are a separate op.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backends
from .batch_stats import StatsPartials, tile_stats
from ._common import (autocast_applies, check_float_tensor, compute_dtype, conv_output_size, conv_uses_tf32,
                      device_guard, interpreting, memory_format_of, pair, triton_dtype_ok)
from .conv_configs import (CONFIGS, autotune_requested, conv_config, flat_k, interpreter_config, make_autotuner,
                           pixel_major_strides, register_cap, tma_descriptors)

IntPair = Union[int, Sequence[int]]

try:  # Triton is optional: the PyTorch path works without it.
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - exercised on machines without triton
    triton = None
    tl = None


# ------------------------------------------------------------------------------------ reference
def conv_bias_act_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                            residual: Optional[Tensor] = None, stride: IntPair = 1, padding: IntPair = 0,
                            dilation: IntPair = 1, groups: int = 1, relu: bool = True,
                            upcast: bool = False) -> Tensor:
    """Plain PyTorch, op by op. ``upcast=True`` computes (and returns) everything in float64."""
    if upcast:
        x, weight = x.double(), weight.double()
        bias = None if bias is None else bias.double()
        residual = None if residual is None else residual.double()
    dilation = tap_dilation(weight, dilation)
    y = F.conv2d(x, weight, None if bias is None else bias.to(x.dtype), stride, padding, dilation, groups)
    if residual is not None:
        y = y + residual
    return torch.relu(y) if relu else y


def tap_dilation(weight: Tensor, dilation) -> Tuple[int, int]:
    """``dilation`` with 1 along each dimension where the kernel has one tap: there it changes
    neither the output nor its size, and PyTorch 2.13's CPU conv crashes (SIGSEGV) on some such
    inputs: channels_last, a bias, 1x1 kernel, stride 2, padding 1, dilation 2, width 1, batch 2."""
    dh, dw = (dilation, dilation) if isinstance(dilation, int) else tuple(dilation)
    return (1 if weight.shape[2] == 1 else dh, 1 if weight.shape[3] == 1 else dw)


# ---------------------------------------------------------------------------------- Triton kernel
if triton is not None:

    @triton.jit
    def _bn_relu_prologue(a, mean_ptr, scale_ptr, shift_ptr, c, c_ok, a_ok):
        """relu((a - mean[c]) * scale[c] + shift[c]) in fp32, back in a's dtype; zero where nothing
        was loaded (the conv's zero padding pads the *activated* input, so it must stay zero).
        Centred on the batch mean first, as BatchNorm computes it: a * scale + (shift - mean * scale)
        would cancel catastrophically when |mean| >> std. ``c``/``c_ok`` come broadcastable to a."""
        mu = tl.load(mean_ptr + c, mask=c_ok, other=0.0)
        s = tl.load(scale_ptr + c, mask=c_ok, other=0.0)
        h = tl.load(shift_ptr + c, mask=c_ok, other=0.0)
        v = (a.to(tl.float32) - mu) * s + h
        v = tl.where(v < 0.0, 0.0, v)  # keeps NaN, as torch.relu does
        return tl.where(a_ok, v, 0.0).to(a.dtype)

    @triton.jit
    def _mma(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        if UPCAST:  # interpreter only: its bf16 dot is wrong, so dot in fp32 there
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        # bf16/fp16 -> wgmma (sm_90) / mma.sync (sm_80); fp32 -> "tf32" or "ieee" (PyTorch's conv setting)
        return tl.dot(a, b, acc, input_precision=PRECISION)

    @triton.jit
    def _conv_bias_act_kernel(
        # pointers
        x_ptr, w_ptr, bias_ptr, res_ptr, out_ptr,
        x_desc, w_desc,  # TMA descriptors or None: x as [M, CIN] (X_TMA), weight as [COUT, KH*KW*CIN] (W_TMA)
        in_mean_ptr, in_scale_ptr, in_shift_ptr,  # PROLOGUE: per-input-channel batch BN applied at load
        cnt_part_ptr, anchor_part_ptr, mean_part_ptr, m2_part_ptr,  # STATS: per-tile partials [tiles, COUT]
        tile0,  # STATS: first partial row of this launch (the batch may be split over launches)
        # sizes: GEMM view M = N*OH*OW, COUT, and the image geometry
        M, COUT, CIN, H, W, OH, OW,
        # strides, in elements
        sxn, sxc, sxh, sxw,
        swo, swi, swh, sww,
        srn, src, srh, srw,
        son, soc, soh, sow,
        # convolution geometry
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        # meta-parameters
        KH: tl.constexpr, KW: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr,
        PROLOGUE: tl.constexpr,  # the input is relu((x - in_mean[c]) * in_scale[c] + in_shift[c]): BN + ReLU
        STATS: tl.constexpr,  # write per-tile channel mean and M2 of the (rounded) output
        FLAT_K: tl.constexpr,  # Cin < 8 (the stem): one K block per filter row, (kw, c) pairs
        X_TMA: tl.constexpr, W_TMA: tl.constexpr,  # operands through the descriptors (sm_90+)
        PRECISION: tl.constexpr,  # "tf32" | "ieee" for fp32 operands
        UPCAST: tl.constexpr,  # interpreter only: its bf16 dot is wrong, so dot in fp32 there
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        # Grouped program order: consecutive programs share weight tiles (L2 reuse).
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(COUT, BLOCK_N)
        group = GROUP_M * num_n
        first_m = (pid // group) * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % group) % size_m
        pid_n = (pid % group) // size_m

        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # output pixel index (n, oh, ow)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output channel
        m_ok = rm < M
        n_ok = rn < COUT
        ow = rm % OW
        t = rm // OW
        oh = t % OH
        n64 = (t // OH).to(tl.int64)  # int64: activations can pass 2^31 elements
        ih0 = oh * stride_h - pad_h
        iw0 = ow * stride_w - pad_w
        # each pixel's offset at tap (0, 0), channel 0; a tap adds one scalar (hoisted index math)
        x_pix = n64 * sxn + ih0.to(tl.int64) * sxh + iw0.to(tl.int64) * sxw
        w_row = rn.to(tl.int64) * swo
        rk = tl.arange(0, BLOCK_K)

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if FLAT_K:
            # One K block per filter row kh: its KW*CIN (kw, c) pairs, in the channels_last weight's
            # order; index math once, outside the loop, instead of a div/mod per element per block.
            jw = rk // CIN
            jc = rk - jw * CIN
            j_ok = rk < KW * CIN
            iw = iw0[:, None] + (jw * dil_w)[None, :]
            col_ok = m_ok[:, None] & j_ok[None, :] & (iw >= 0) & (iw < W)  # the same for every row
            a_col = (jw * dil_w).to(tl.int64) * sxw + jc.to(tl.int64) * sxc
            b_col = (jw * sww + jc * swi).to(tl.int64)
            for kh in range(KH):
                ih = ih0 + kh * dil_h
                a_ok = col_ok & ((ih >= 0) & (ih < H))[:, None]
                a = tl.load(x_ptr + (x_pix + (kh * dil_h).to(tl.int64) * sxh)[:, None] + a_col[None, :],
                            mask=a_ok, other=0.0)
                if PROLOGUE:
                    a = _bn_relu_prologue(a, in_mean_ptr, in_scale_ptr, in_shift_ptr, jc[None, :], j_ok[None, :], a_ok)
                b = tl.load(w_ptr + (w_row + kh * swh)[None, :] + b_col[:, None],
                            mask=j_ok[:, None] & n_ok[None, :], other=0.0)
                acc = _mma(a, b, acc, PRECISION, UPCAST)
        else:
            # One flat K loop over (filter tap, Cin block), so the software pipeliner keeps
            # num_stages loads in flight across taps (a 64-channel 3x3 layer is 9 taps x 1 block).
            ncb = tl.cdiv(CIN, BLOCK_K)
            for s in range(KH * KW * ncb):
                tap = s // ncb
                c0 = (s - tap * ncb) * BLOCK_K
                kh = tap // KW
                kw = tap - kh * KW
                c = c0 + rk
                c_ok = c < CIN
                if X_TMA:  # 1x1, stride 1, no padding, dense channels_last: x is the [M, CIN] matrix
                    a = x_desc.load([pid_m * BLOCK_M, c0])
                    if PROLOGUE:
                        a = _bn_relu_prologue(a, in_mean_ptr, in_scale_ptr, in_shift_ptr, c[None, :], c_ok[None, :],
                                              m_ok[:, None] & c_ok[None, :])
                else:
                    ih = ih0 + kh * dil_h
                    iw = iw0 + kw * dil_w
                    pix_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                    a_pix = x_pix + ((kh * dil_h).to(tl.int64) * sxh + (kw * dil_w).to(tl.int64) * sxw)
                    # channels_last: sxc == 1 is specialised, so runs along c are vector loads (cp.async).
                    # NCHW: neither axis is provably contiguous; the compiler then puts adjacent
                    # threads on adjacent pixels (rows), so loads are scalar but coalesced.
                    a_ok = pix_ok[:, None] & c_ok[None, :]
                    a = tl.load(x_ptr + a_pix[:, None] + (c.to(tl.int64) * sxc)[None, :], mask=a_ok, other=0.0)
                    if PROLOGUE:
                        a = _bn_relu_prologue(a, in_mean_ptr, in_scale_ptr, in_shift_ptr, c[None, :], c_ok[None, :],
                                              a_ok)
                if W_TMA:  # BLOCK_K divides CIN: a block never reaches into the next tap's columns
                    b = tl.trans(w_desc.load([pid_n * BLOCK_N, tap * CIN + c0]))
                else:
                    b = tl.load(w_ptr + (w_row + (kh * swh + kw * sww))[None, :] + (c * swi)[:, None],
                                mask=c_ok[:, None] & n_ok[None, :], other=0.0)
                acc = _mma(a, b, acc, PRECISION, UPCAST)

        # Epilogue, in fp32: + bias (folded BN shift) + residual, ReLU, one cast, one store.
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        mask = m_ok[:, None] & n_ok[None, :]
        oh64 = oh.to(tl.int64)
        ow64 = ow.to(tl.int64)
        if HAS_RES:
            r_off = (n64 * srn + oh64 * srh + ow64 * srw)[:, None] + (rn.to(tl.int64) * src)[None, :]
            acc += tl.load(res_ptr + r_off, mask=mask, other=0.0).to(tl.float32)
        if RELU:
            # where(x < 0) rather than maximum: keeps NaN, as torch.relu does.
            acc = tl.where(acc < 0.0, 0.0, acc)
        y = acc.to(out_ptr.dtype.element_ty)
        if STATS:
            # statistics of the values as stored (rounded to the output dtype), as BatchNorm sees them
            cnt = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(tl.float32)
            tile_stats(y.to(tl.float32), mask, cnt, COUT, rn, n_ok, tile0 + pid_m,
                       anchor_part_ptr, mean_part_ptr, m2_part_ptr)
            if pid_n == 0:
                tl.store(cnt_part_ptr + tile0 + pid_m, cnt)
        o_off = (n64 * son + oh64 * soh + ow64 * sow)[:, None] + (rn.to(tl.int64) * soc)[None, :]
        tl.store(out_ptr + o_off, y, mask=mask)


# ---------------------------------------------------------------------------------------- launcher
_MAX_ROWS = 2**31 - 1024  # int32 GEMM row index, with room for the last tile's overhang
# smallest BLOCK_M of any configuration (GPU table, autotune set, interpreter): sizes the STATS
# partial buffers before the launch decides its tile
_MIN_BLOCK_M = min(c.block_m for c in CONFIGS + [interpreter_config(1, 1)])


def _device_arch(t: Tensor) -> int:
    """Compute capability major of ``t``'s GPU, 0 for the interpreter (CPU tensors). The one
    place the launcher asks the device. A ``meta`` tensor (the codegen recorder,
    :mod:`resnet_fused.aot`) plans for the GPU that ``torch.cuda.get_device_capability()``
    names: the recorder answers it per target; with neither a recorder nor a GPU it is 0."""
    if t.device.type == "meta":
        try:
            return torch.cuda.get_device_capability()[0]
        except (RuntimeError, AssertionError):  # no CUDA here, and no recorder answering for one
            return 0
    if t.device.type != "cuda":
        return 0
    return torch.cuda.get_device_capability(t.device)[0]


def _launch(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
            stride: Tuple[int, int], padding: Tuple[int, int], dilation: Tuple[int, int], relu: bool,
            out_dtype: torch.dtype, out_format: torch.memory_format,
            prologue: Optional[Tuple[Tensor, Tensor, Tensor]] = None, stats: bool = False):
    """Allocate the output and launch (batch-split when needed). Returns ``out``, or with
    ``stats=True`` ``(out, StatsPartials)``. ``prologue=(mean, scale, shift)``: fp32 [CIN] vectors,
    the conv reads ``relu((x - mean) * scale + shift)``."""
    N, CIN, H, W = x.shape
    COUT, _, KH, KW = weight.shape
    OH = conv_output_size(H, KH, stride[0], padding[0], dilation[0])
    OW = conv_output_size(W, KW, stride[1], padding[1], dilation[1])
    out = torch.empty((N, COUT, OH, OW), dtype=out_dtype, device=x.device, memory_format=out_format)
    M = N * OH * OW
    if OH * OW > _MAX_ROWS:
        raise ValueError(f"x: one image gives {OH * OW} output pixels; the Triton conv handles < {_MAX_ROWS}")
    # The GEMM row index (n, oh, ow) is int32 in the kernel (offsets are int64): split the batch so
    # every launch stays below 2^31 rows. Slices are strided views; the kernel takes any strides.
    per = max(1, _MAX_ROWS // max(1, OH * OW))
    chunks = [slice(n0, n0 + per) for n0 in range(0, N, per)]
    # each launch's partial rows: room for its tiles at the smallest BLOCK_M
    chunk_tiles = [triton.cdiv(len(range(N)[c]) * OH * OW, _MIN_BLOCK_M) for c in chunks]
    parts = StatsPartials(sum(chunk_tiles), COUT, x.device) if stats else None
    if M == 0 or COUT == 0:
        return (out, parts) if stats else out
    if CIN == 0:  # empty reduction: the conv is zero, only the epilogue remains
        y = torch.zeros_like(out, dtype=torch.float32)
        if bias is not None:
            y += bias.float().view(1, -1, 1, 1)
        if residual is not None:
            y += residual.float()
        out.copy_(torch.relu(y) if relu else y)
        if stats:  # one "tile" holding the whole (constant per channel) output
            yq = out.float()
            parts.count[0] = M
            parts.anchor[0] = 0.0
            parts.mean[0] = yq.mean(dim=(0, 2, 3))
            parts.m2[0] = ((yq - parts.mean[0].view(1, -1, 1, 1)) ** 2).sum(dim=(0, 2, 3))
        return (out, parts) if stats else out
    b = bias.contiguous() if bias is not None else None  # the kernel indexes bias densely: bias_ptr + channel
    # the kernel reads weights as [COUT, KH*KW*CIN] with K contiguous (vector loads, a TMA
    # descriptor): one channels_last copy of an NCHW weight (small next to the conv) here
    weight = weight.contiguous(memory_format=torch.channels_last)
    tile0 = 0
    for rows, tiles in zip(chunks, chunk_tiles):
        _launch_into(out[rows], x[rows], weight, b, None if residual is None else residual[rows],
                     stride, padding, dilation, relu, prologue=prologue, parts=parts, tile0=tile0)
        tile0 += tiles
    return (out, parts) if stats else out


def _pixel_major(t: Tensor) -> bool:
    """Pixels, not channels, adjacent in memory (NCHW-like strides): the NCHW configuration class."""
    return pixel_major_strides(t.stride(1), t.stride(3))


def _launch_into(out: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
                 stride: Tuple[int, int], padding: Tuple[int, int], dilation: Tuple[int, int], relu: bool,
                 prologue: Optional[Tuple[Tensor, Tensor, Tensor]] = None, parts: Optional[StatsPartials] = None,
                 tile0: int = 0) -> None:
    """One kernel launch writing ``out`` (all shapes already checked, fewer than 2^31 GEMM rows)."""
    N, CIN, H, W = x.shape
    COUT, _, KH, KW = weight.shape
    OH, OW = out.shape[2], out.shape[3]
    M = N * OH * OW
    res = residual if residual is not None else out  # dummy pointer, never read
    b = bias if bias is not None else out
    in_mean, in_scale, in_shift = prologue if prologue is not None else (out, out, out)
    partials = (parts.count, parts.anchor, parts.mean, parts.m2) if parts is not None else (out,) * 4
    interp = interpreting(x)
    arch = _device_arch(x)
    flat = flat_k(CIN, KW)
    precision = "tf32" if (x.dtype == torch.float32 and not interp and conv_uses_tf32()) else "ieee"
    cfg = (interpreter_config(CIN, KW) if interp
           else conv_config(M, COUT, CIN, KH, KW, x.element_size(), pixel_major=_pixel_major(x) or _pixel_major(out),
                            fma=x.dtype == torch.float32 and precision == "ieee"))
    one_by_one = (KH, KW) == (1, 1) and tuple(stride) == (1, 1) and tuple(padding) == (0, 0)
    x_desc, w_desc = tma_descriptors(x, weight, cfg, flat, one_by_one, arch, interp)
    args = (
        x, weight, b, res, out, x_desc, w_desc,
        in_mean, in_scale, in_shift, *partials, tile0,
        M, COUT, CIN, H, W, OH, OW,
        *x.stride(), *weight.stride(), *res.stride(), *out.stride(),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
    )
    meta = dict(KH=KH, KW=KW, HAS_BIAS=bias is not None, HAS_RES=residual is not None, RELU=relu,
                PROLOGUE=prologue is not None, STATS=parts is not None, FLAT_K=flat,
                X_TMA=x_desc is not None, W_TMA=w_desc is not None,
                PRECISION=precision,
                UPCAST=interp and x.dtype == torch.bfloat16)
    if not interp and autotune_requested():
        def grid(meta_):
            return (triton.cdiv(M, meta_["BLOCK_M"]) * triton.cdiv(COUT, meta_["BLOCK_N"]),)

        with device_guard(x):
            _autotuner(arch)[grid](*args, **meta)
        return
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(COUT, cfg.block_n),)
    with device_guard(x):
        _conv_bias_act_kernel[grid](*args, **meta, **cfg.meta(), num_warps=cfg.num_warps,
                                    num_stages=cfg.num_stages,
                                    maxnreg=cfg.maxnreg or register_cap(arch))


_AUTOTUNER = {}


def _autotuner(arch: int):
    """The opt-in autotuner (``RESNET_FUSED_AUTOTUNE=1``) for this GPU generation, built on first use."""
    if arch not in _AUTOTUNER:
        _AUTOTUNER[arch] = make_autotuner(_conv_bias_act_kernel, register_cap(arch))
    return _AUTOTUNER[arch]


def _launch_ext(x, weight, bias, residual, stride, padding, dilation, relu, out_format):
    """The compiled library's fused conv (CUTLASS + our epilogue on CUDA; oneDNN + our C++
    epilogue on CPU); residual in x's dtype."""
    from .. import _ext

    out = _ext.extension().conv_bias_act(x, weight, bias, residual, list(stride), list(padding), list(dilation),
                                         relu, x.is_cuda and conv_uses_tf32())
    return out.contiguous(memory_format=out_format)


class _ConvBiasActFn(torch.autograd.Function):
    """Triton (or compiled-library) forward; backward through the ReLU mask and cuDNN's
    convolution_backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, stride, padding, dilation, relu, out_dtype, out_format,
                impl="triton"):
        if impl == "cuda":
            out = _launch_ext(x, weight, bias, residual, stride, padding, dilation, relu, out_format)
        else:
            out = _launch(x, weight, bias, residual, stride, padding, dilation, relu, out_dtype, out_format)
        ctx.conf = (stride, padding, dilation, relu)
        ctx.has_bias, ctx.has_res = bias is not None, residual is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.res_dtype = None if residual is None else residual.dtype
        ctx.save_for_backward(x, weight, out if relu else None)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, out = ctx.saved_tensors
        stride, padding, dilation, relu = ctx.conf
        g = grad_out
        if relu:
            g = torch.where(out <= 0, torch.zeros((), dtype=g.dtype, device=g.device), g)  # as threshold_backward: NaN passes
        need_x, need_w, need_b, need_r = ctx.needs_input_grad[:4]
        grad_x = grad_w = grad_b = grad_r = None
        if need_x or need_w:
            grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
                g.to(x.dtype), x, weight, None, list(stride), list(padding), list(dilation),
                False, [0, 0], 1, [need_x, need_w, False])
        if need_b and ctx.has_bias:
            grad_b = g.float().sum(dim=(0, 2, 3)).to(ctx.bias_dtype)
        if need_r and ctx.has_res:
            grad_r = g.to(ctx.res_dtype)
        return grad_x, grad_w, grad_b, grad_r, None, None, None, None, None, None, None


# --------------------------------------------------------------------------------- functional API
def conv_bias_act(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, residual: Optional[Tensor] = None,
                  *, stride: IntPair = 1, padding: IntPair = 0, dilation: IntPair = 1, groups: int = 1,
                  relu: bool = True, backend: Optional[str] = None) -> Tensor:
    """``relu?(conv2d(x, weight) + bias + residual)`` in one fused pass (see module docstring).

    Args:
        x: [N, Cin, H, W], float32/float16/bfloat16 (float64 runs on the PyTorch path).
        weight: [Cout, Cin/groups, KH, KW], x's dtype.
        bias: [Cout] or None; typically a folded BatchNorm shift in float32.
        residual: [N, Cout, OH, OW] or None, added before the ReLU.
        stride, padding, dilation: ints or pairs, as in ``torch.nn.functional.conv2d``.
        groups: > 1 runs on the PyTorch path.
        relu: apply ReLU last.
        backend: ``"auto"``/``"triton"``/``"cuda"``/``"torch"``, or None for the current one.
    Returns:
        [N, Cout, OH, OW] in x's memory format.
    """
    check_float_tensor("x", x, dims=4)
    check_float_tensor("weight", weight, dims=4, device=x.device)
    stride, padding, dilation = pair(stride, "stride"), pair(padding, "padding"), pair(dilation, "dilation")
    for name, v, least in (("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1)):
        if min(v) < least:
            raise ValueError(f"{name}: expected values >= {least}, got {v}")
    N, CIN, H, W = x.shape
    COUT = weight.shape[0]
    if not isinstance(groups, int) or groups < 1 or COUT % groups:
        raise ValueError(f"groups: expected a positive int dividing weight's {COUT} output channels, got {groups!r}")
    if weight.shape[1] * groups != CIN:
        raise ValueError(f"x: expected {weight.shape[1] * groups} input channels to match weight "
                         f"{tuple(weight.shape)} with groups={groups}, got x of shape {tuple(x.shape)}")
    OH = conv_output_size(H, weight.shape[2], stride[0], padding[0], dilation[0])
    OW = conv_output_size(W, weight.shape[3], stride[1], padding[1], dilation[1])
    if OH <= 0 or OW <= 0:
        raise ValueError(f"x: spatial size {H}x{W} is too small for a {weight.shape[2]}x{weight.shape[3]} "
                         f"kernel with padding {padding}, dilation {dilation}")
    if bias is not None:
        check_float_tensor("bias", bias, dims=1, device=x.device)
        if bias.shape[0] != COUT:
            raise ValueError(f"bias: expected shape [{COUT}], got {list(bias.shape)}")
    if residual is not None:
        check_float_tensor("residual", residual, dims=4, device=x.device)
        if tuple(residual.shape) != (N, COUT, OH, OW):
            raise ValueError(f"residual: expected shape {[N, COUT, OH, OW]} (the conv output), "
                             f"got {list(residual.shape)}")

    cdt = compute_dtype(x)
    if weight.dtype != x.dtype and not autocast_applies(x):
        raise TypeError(f"weight: expected dtype {x.dtype} (x's dtype), got {weight.dtype}")
    out_dtype = cdt if residual is None else torch.promote_types(cdt, residual.dtype)
    fusable = groups == 1 and triton_dtype_ok(cdt) and triton_dtype_ok(out_dtype)
    impl = backends.resolve(backend, x, fusable=fusable)
    if impl == "auto":  # measured per case (resnet_fused.dispatch)
        from ..dispatch.sites import conv_site
        from ._common import weight_memory_format

        return conv_site(x, lambda fmt: (weight, bias), tuple(weight.shape), weight_memory_format(weight), residual,
                         stride, padding, dilation, relu, memory_format_of(x),
                         torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                         for t in (x, weight, bias, residual)),
                         site="ops.conv_bias_act")
    return _run(x, weight, bias, residual, stride, padding, dilation, groups, relu, backend=impl,
                out_format=memory_format_of(x))


def _run(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor], stride: Tuple[int, int],
         padding: Tuple[int, int], dilation: Tuple[int, int], groups: int, relu: bool, *, backend: str,
         out_format: torch.memory_format) -> Tensor:
    """The op without argument checks, for callers that already validated (the modules).

    ``backend`` is a resolved backend ("triton", "cuda" or "torch"); cases the backend has no
    kernel for run on the PyTorch path. ``out_format`` is the output's memory format.
    """
    dilation = tap_dilation(weight, dilation)
    cdt = compute_dtype(x)
    if cdt != x.dtype or weight.dtype != cdt:  # what autocast does to a conv: both operands in its dtype
        x, weight = x.to(cdt), weight.to(cdt)
    out_dtype = cdt if residual is None else torch.promote_types(cdt, residual.dtype)
    if backend == "triton" and groups == 1 and triton_dtype_ok(cdt) and triton_dtype_ok(out_dtype):
        with torch.autocast(x.device.type, enabled=False):
            return _ConvBiasActFn.apply(x, weight, bias, residual,
                                        stride, padding, dilation, relu, out_dtype, out_format)
    if (backend == "cuda" and groups == 1 and triton_dtype_ok(cdt) and out_dtype == cdt
            and (residual is None or residual.dtype == cdt)):
        with torch.autocast(x.device.type, enabled=False):
            return _ConvBiasActFn.apply(x, weight, bias, residual,
                                        stride, padding, dilation, relu, out_dtype, out_format, "cuda")
    return _torch_path(x, weight, bias, residual, stride, padding, dilation, groups, relu, out_format)


def _torch_path(x, weight, bias, residual, stride, padding, dilation, groups, relu, out_format):
    y = F.conv2d(x, weight, None if bias is None else bias.to(x.dtype), stride, padding, dilation, groups)
    # PyTorch picks channels_last when either operand is; the caller says which format it promises.
    if not y.is_contiguous(memory_format=out_format):
        y = y.contiguous(memory_format=out_format)
    if residual is not None:
        # in place only when it cannot change the result dtype (autocast may mix dtypes)
        y = y.add_(residual) if residual.dtype == y.dtype else y + residual
    if relu:
        y = y.relu_()
    return y
