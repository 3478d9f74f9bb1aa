"""The ``"cuda"`` backend - the compiled library ``torch.ops.resnet_fused_C``: CUDA kernels, and CUTLASS
convolutions with our epilogue - on a real GPU (``-m gpu``; skipped without CUDA). When the library
cannot run CUDA tensors here (not built, no nvcc or CUTLASS, built for another torch...) the whole
module skips with the loader's own reason, also issued as a warning so the summary shows it.

Every result is judged as in the rest of the suite (``utils.assert_close``): against a float64
reference, at most 4x PyTorch's own error in the same precision plus the dtype's floor, with NaN and
Inf exactly where the reference has them. Where PyTorch's same-precision run is no fair yardstick,
a fair one replaces it, and the test says which: element-wise ops are held to float32 math rounded
once to the output dtype; TF32 convolutions to the worse of cuDNN and a TF32 emulation (forward),
or of eager fp16 AMP (gradients: TF32 operands carry fp16's 10-bit mantissa).

ReLU masks. Where a pre-activation lies within rounding of 0, float32 and float64 may disagree on
its sign, and one flipped mask element moves a gradient by O(1): a coin toss for any float32
implementation, PyTorch's included. Op tests therefore zero the incoming gradient at such elements
(or leave them out of a bit-for-bit mask check); block training tests use either tiny tensors in
float32 (no element that close to 0) or, in 16-bit / TF32 precision, tensors large enough that
flips are many on both sides and errors compare as statistics, never one lucky draw.

Covered:
- ops: ``bn_act`` (BN + ReLU, no ReLU, identity residual, residual with its own BN, eval form
  without mean; mixed dtypes and layouts; C multiple of 8 and odd, odd H*W, 1x1 spatial, data at
  odd storage offsets), its packed ReLU mask bit for bit against ``!(z <= 0)`` on exactly
  representable data with many z == 0, NaN and +-Inf; ``relu_mask_backward``; the two-pass BN
  backward against autograd of ``F.batch_norm`` in float64, deterministic; ``channel_stats``
  (accuracy, anchor semantics, |mean| >> std, NaN/Inf channels, same bits twice); ``bn_finalize``;
  empty tensors; argument checks naming the tensor; agreement with the Triton ops.
- ``conv_bias_act`` / ``conv_bias_act_stats``: every distinct ResNet-50 conv at batch 2 in fp16,
  bf16 and TF32 channels_last, where ``conv_kernel_name`` must name a CUTLASS configuration (the
  C = 3 stem: the fallback); float32 without TF32 and NCHW (the fallback); every epilogue; awkward
  shapes; NaN/Inf; storage offsets; statistics of the stored output; determinism; autograd.
- modules: ``rf.convert`` of torchvision-structured blocks and ResNet-50, and the pre-activation
  blocks and networks, pinned to ``backend="cuda"``, in eval (fp16, bf16, fp32, TF32; both
  layouts); training, 3 SGD steps of every block kind against eager and float64, with running
  statistics and ``num_batches_tracked`` (AMP fp16 / bf16, TF32, float32); the low-memory mode;
  agreement with the Triton backend within the two backends' combined error.
- ``torch.compile(fullgraph=True)`` (Inductor) of an AMP training Bottleneck; CUDA graph capture of
  a training step; bad inputs raise before any running statistic changes.

A spy on the library (``conv_calls``) records the kernel ``conv_kernel_name`` reports for every conv
the package runs, and each must match the documented CUTLASS support (``cutlass_prefix``).

Cost: the library's kernels are compiled ahead, so most tests take milliseconds. Triton compiles and
autotunes only for the few cross-checks against it (two training blocks, one conv, a few
element-wise ops), and Inductor for one block; the whole file is meant to run in about two minutes
on an H100 once the library is built (the Triton cross-checks and the Inductor compile are most of
it).
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import resnet_fused as rf
import resnet_fused.ops.bn_train  # noqa: F401 - registers the Triton resnet_fused::bn_relu_* ops
import test_train_blocks as ttb
from resnet_fused import _ext
from resnet_fused.models import reference as R
from resnet_fused.ops import _ext_ops
from resnet_fused.ops import conv_bias_act, conv_bias_act_reference
from test_gpu_train import check_graph_capture
from test_train_blocks import _saved_activations
from test_gpu import (R50, calibrate, check_conv, compare_models, cudnn_tf32, is_cl, make_conv, spec_case,
                      tf32_emulated)
from utils import FLOOR, assert_close, randomize_bn, rel_err

pytestmark = pytest.mark.gpu

DEV = "cuda"
CL = torch.channels_last
NCHW = torch.contiguous_format
FP16, BF16, FP32, FP64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
DTYPES = [pytest.param(FP16, id="fp16"), pytest.param(BF16, id="bf16"), pytest.param(FP32, id="fp32")]
FORMATS = [pytest.param(CL, id="cl"), pytest.param(NCHW, id="nchw")]
DIMS = (0, 2, 3)
V = (1, -1, 1, 1)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

C = torch.ops.resnet_fused_C  # the library (loaded by the module fixture before any test uses it)
T = torch.ops.resnet_fused  # the Triton training ops, same signatures

# precision modes: the compute dtype; "tf32" is float32 with TF32 convolutions on
PRECISION = {"fp16": FP16, "bf16": BF16, "fp32": FP32, "tf32": FP32}


@pytest.fixture(scope="module", autouse=True)
def _cuda_library():
    """Build (or load) the library once. Without CUDA kernels the whole module skips with the
    loader's exact reason, and says it as a warning too (shown without ``-rs``)."""
    err = _ext.cuda_error()
    if err is not None:
        reason = f"resnet_fused's cuda backend cannot run CUDA tensors here: {err}"
        warnings.warn(reason, UserWarning, stacklevel=1)
        pytest.skip(reason)
    info = _ext.build_info()
    assert info["cuda"] is True and info["torch"] == torch.__version__, info


# =============================================================================== helpers
def gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEV).manual_seed(seed)


def poison_next(*nbytes: int) -> None:
    """Leave freed blocks of these sizes, every byte 0xFF (NaN in float32, float16 and bfloat16, all
    bits set in a mask), in PyTorch's caching allocator: the op's outputs most likely reuse them, so
    an element an op never writes stays NaN (or a set bit) and fails the checks."""
    blocks = [torch.full((max(int(n), 1),), 255, dtype=torch.uint8, device=DEV) for n in nbytes]
    del blocks


def fmt_of(t: torch.Tensor):
    return CL if is_cl(t) else NCHW


def mem_order(t: torch.Tensor, cl: bool) -> torch.Tensor:
    """t's elements in the memory order of an NCHW (cl False) or channels_last (cl True) tensor."""
    return (t.permute(0, 2, 3, 1) if cl else t).reshape(-1)


def unpack_bits(mask: torch.Tensor, numel: int):
    """(bit i of the packed mask for i < numel, the trailing bits): bit i % 8 of byte i // 8."""
    shifts = torch.arange(8, device=mask.device, dtype=torch.int32)
    bits = ((mask.to(torch.int32).unsqueeze(1) >> shifts) & 1).reshape(-1).bool()
    return bits[:numel], bits[numel:]


def worse(ref64: torch.Tensor, *candidates: torch.Tensor) -> torch.Tensor:
    """The candidate furthest from the float64 reference: the fairest yardstick among them."""
    return max(candidates, key=lambda t: rel_err(t, ref64))


def bound_of(yardstick, ref64, floor_dtype, factor=4.0) -> float:
    """The error ``assert_close`` allows: ``factor`` x the yardstick's error, at least the floor."""
    return max(FLOOR[floor_dtype], factor * rel_err(yardstick, ref64))


# ======================================================================= bn_act (forward)
BN_SHAPES = {"c64-14x14": (2, 64, 14, 14), "c33-7x7": (1, 33, 7, 7), "c8-5x3": (3, 8, 5, 3),
             "c3-1x1": (5, 3, 1, 1), "r50-c256-56x56": (2, 256, 56, 56)}
# (training form with a mean, residual: 0 none / 1 identity / 2 with its own BN, relu)
BN_VARIANTS = {"eval-relu": (False, 0, True), "eval-res-relu": (False, 1, True), "train": (True, 0, False),
               "train-relu": (True, 0, True), "res-relu": (True, 1, True), "dual-relu": (True, 2, True),
               "dual": (True, 2, False)}


def bn_inputs(shape, dtype, fmt, with_mean, res, r_dtype=None, seed=0, vec_dtype=FP32):
    """``(y, mean, scale, shift, r, r_mean, r_scale, r_shift)`` for ``bn_act``. Scales of both
    signs (a BN's gamma * invstd can be negative); means are the batch means."""
    g = gen(seed)
    c = shape[1]

    def act(center, spread, dt):
        return (center + spread * torch.randn(shape, device=DEV, generator=g)).to(dt).contiguous(memory_format=fmt)

    def vec(spread):
        return (spread * torch.randn(c, device=DEV, generator=g)).to(vec_dtype)

    y = act(3.0, 2.0, dtype) if with_mean else act(0.0, 1.0, dtype)
    mean = y.double().mean(dim=DIMS).to(vec_dtype) if with_mean else None
    scale, shift = vec(0.7), vec(0.5)
    r = rm = rs = rh = None
    if res:
        r = act(-2.0, 3.0, r_dtype or dtype)
        if res == 2:
            rm, rs, rh = r.double().mean(dim=DIMS).to(vec_dtype), vec(0.4), vec(0.5)
    return y, mean, scale, shift, r, rm, rs, rh


def bn_reference(args, relu, dt):
    """``(z, out, magnitude)`` of ``bn_act`` computed in ``dt``: float64 is the truth; float32 is
    PyTorch's own way (float32 vectors promote 16-bit inputs; the caller rounds once to the output
    dtype). magnitude: the sum of the terms' absolute values, the scale of z's rounding error."""
    y, mean, scale, shift, r, rm, rs, rh = args

    def c(t):
        return t.to(dt)

    t1 = (c(y) if mean is None else c(y) - c(mean).view(V)) * c(scale).view(V)
    z = t1 + c(shift).view(V)
    mag = t1.abs() + c(shift).abs().view(V)
    if r is not None:
        rr = c(r)
        if rs is not None:
            rr = (rr if rm is None else rr - c(rm).view(V)) * c(rs).view(V)
            mag = mag + rr.abs() + c(rh).abs().view(V)
            rr = rr + c(rh).view(V)
        else:
            mag = mag + rr.abs()
        z = z + rr
    return z, (torch.relu(z) if relu else z), mag


def check_bn_act(out, mask, args, relu, out_dtype, want_mask, name="bn_act"):
    """Output (dtype, y's layout, values vs float64) and the packed mask (size, trailing bits,
    each bit ``!(z <= 0)`` except where float32 rounding decides z's sign)."""
    y = args[0]
    cl = is_cl(y)
    assert out.shape == y.shape and out.dtype == out_dtype and out.device == y.device, (out.shape, out.dtype)
    assert out.is_contiguous(memory_format=fmt_of(y)), f"{name}: output strides {out.stride()} lost y's layout"
    z64, ref64, mag = bn_reference(args, relu, FP64)
    same = bn_reference(args, relu, FP32)[1].to(out_dtype)
    assert_close(out, ref64, same, name=name)
    assert mask.dtype == torch.uint8 and mask.device == y.device
    if not (relu and want_mask):
        assert mask.shape == (0,), f"{name}: a mask of {mask.shape} nobody asked for"
        return
    numel = y.numel()
    assert mask.shape == ((numel + 7) // 8,), mask.shape
    bits, tail = unpack_bits(mask, numel)
    assert not tail.any(), f"{name}: the mask's trailing bits must be zero"
    zm, mm = mem_order(z64, cl), mem_order(mag, cl)
    want = ~(zm <= 0)  # a NaN pre-activation passes its gradient, as threshold_backward
    ambiguous = torch.isfinite(zm) & (zm.abs() <= 1e-5 * mm)
    wrong = (bits != want) & ~ambiguous
    assert not wrong.any(), (f"{name}: {int(wrong.sum())} mask bits differ from !(z <= 0); first at memory "
                             f"index {int(wrong.nonzero()[0])}")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("variant", list(BN_VARIANTS))
@pytest.mark.parametrize("shape", list(BN_SHAPES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_bn_act(dtype, shape, variant, fmt):
    with_mean, res, relu = BN_VARIANTS[variant]
    args = bn_inputs(BN_SHAPES[shape], dtype, fmt, with_mean, res)
    y = args[0]
    poison_next(y.numel() * y.element_size(), (y.numel() + 7) // 8)
    out, mask = C.bn_act(*args, relu, dtype, True)
    check_bn_act(out, mask, args, relu, dtype, True)
    if relu:  # no mask unless asked for
        out2, mask2 = C.bn_act(*args, relu, dtype, False)
        assert mask2.shape == (0,) and torch.equal(out2, out)


MIXED = [(FP16, FP32, FP32), (BF16, FP16, BF16), (FP32, BF16, FP16), (FP16, FP16, BF16), (BF16, BF16, FP32)]


@pytest.mark.parametrize("res", [1, 2], ids=["identity", "dual"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dts", MIXED, ids=[f"y{str(a)[6:]}-r{str(b)[6:]}-out{str(c)[6:]}" for a, b, c in MIXED])
def test_bn_act_mixed_dtypes(dts, fmt, res):
    y_dt, r_dt, out_dt = dts
    args = bn_inputs((2, 24, 9, 7), y_dt, fmt, True, res, r_dtype=r_dt)
    out, mask = C.bn_act(*args, True, out_dt, True)
    check_bn_act(out, mask, args, True, out_dt, True)


@pytest.mark.parametrize("vec_dtype", [FP16, BF16, FP64], ids=str)
def test_bn_act_vector_dtypes(vec_dtype):
    """BN vectors need not be float32: the op reads them as float32."""
    args = bn_inputs((2, 16, 6, 6), FP16, CL, True, 2, vec_dtype=vec_dtype)
    out, mask = C.bn_act(*args, True, FP16, True)
    check_bn_act(out, mask, args, True, FP16, True)


@pytest.mark.parametrize("y_fmt", FORMATS)
def test_bn_act_mixed_layouts(y_fmt):
    """A residual in the other layout: the output keeps y's layout, and the mask y's memory order."""
    args = list(bn_inputs((2, 16, 5, 7), FP16, y_fmt, True, 2))
    args[4] = args[4].contiguous(memory_format=NCHW if y_fmt == CL else CL)
    assert fmt_of(args[4]) != y_fmt
    out, mask = C.bn_act(*args, True, FP16, True)
    check_bn_act(out, mask, args, True, FP16, True)


def at_offset(t: torch.Tensor, offset: int) -> torch.Tensor:
    """A copy of ``t`` with t's strides whose data starts ``offset`` elements into a fresh storage
    (what a view into a flat buffer is): for an odd offset, not 16-byte aligned."""
    buf = torch.empty(t.numel() + offset + 16, dtype=t.dtype, device=t.device)
    v = buf.as_strided(t.shape, t.stride(), storage_offset=offset)
    v.copy_(t)
    return v


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", ["c64-14x14", "c33-7x7"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_bn_act_unaligned_storage(dtype, shape, fmt):
    """y, r and every vector at odd storage offsets (16-byte vector loads must not be assumed)."""
    args = list(bn_inputs(BN_SHAPES[shape], dtype, fmt, True, 2, seed=1))
    for i, off in ((0, 1), (4, 3), (1, 1), (2, 3), (3, 1), (5, 1), (6, 2), (7, 3)):
        args[i] = at_offset(args[i], off)
    assert args[0].data_ptr() % 16 and args[4].data_ptr() % 16 and fmt_of(args[0]) == fmt
    out, mask = C.bn_act(*args, True, dtype, True)
    check_bn_act(out, mask, args, True, dtype, True)


def test_bn_act_non_contiguous_inputs():
    g = gen(2)
    y = torch.randn(2, 10, 9, 14, device=DEV, generator=g)[:, ::2, :, 1::2]  # [2, 5, 9, 7]
    r = torch.randn(2, 5, 7, 9, device=DEV, generator=g).transpose(2, 3)
    v = torch.randn(30, device=DEV, generator=g)
    args = (y, v[0:10:2], v[10:15], v[15:30:3], r, None, None, None)
    assert not (y.is_contiguous() or is_cl(y) or r.is_contiguous() or args[1].is_contiguous())
    out, mask = C.bn_act(*args, True, FP32, True)
    check_bn_act(out, mask, args, True, FP32, True)


# ----------------------------------------------------------- exact data: the ReLU boundary
def exact_inputs(shape, dtype, fmt, res, seed):
    """Small integers and powers of two: every z is exact in float32 (and the output exact in every
    dtype), many z are exactly 0, the ReLU's boundary; plus NaN and +-Inf in y and r."""
    g = gen(seed)
    c = shape[1]

    def ints(lo, hi, size):
        return torch.randint(lo, hi, size, device=DEV, generator=g)

    pow2 = torch.tensor([-2.0, -1.0, -0.5, 0.5, 1.0, 2.0], device=DEV)
    y = ints(-4, 5, shape).to(dtype).contiguous(memory_format=fmt)
    mean, scale, shift = ints(-2, 3, (c,)).float(), pow2[ints(0, 6, (c,))], 0.5 * ints(-4, 5, (c,)).float()
    r = rm = rs = rh = None
    if res:
        r = ints(-3, 4, shape).to(dtype).contiguous(memory_format=fmt)
    if res == 2:
        rm, rs, rh = ints(-2, 3, (c,)).float(), pow2[ints(0, 6, (c,))], 0.5 * ints(-3, 4, (c,)).float()
    n, _, h, w = shape
    with torch.no_grad():
        y[0, 0, 0, 0] = math.nan
        y[n - 1, c - 1, h - 1, w - 1] = math.inf
        y[0, c // 2, h // 2, w // 2] = -math.inf
        if r is not None:
            r[n - 1, c - 1, h - 1, w - 1] = -math.inf  # +-Inf + -+Inf: NaN, or a doubled Inf
            r[n - 1, 0, h - 1, 0] = math.inf
            r[0, c - 1, 0, w - 1] = math.nan
    return y, mean, scale, shift, r, rm, rs, rh


@pytest.mark.parametrize("res", [0, 1, 2], ids=["nores", "identity", "dual"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(3, 5, 7, 3), (2, 64, 28, 28)], ids=["315-elements", "c64-28x28"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_bn_act_mask_bits_exact(dtype, shape, fmt, res):
    """Outputs and every mask bit exactly: bit i set iff !(z_i <= 0) in memory order (z == 0 and
    -Inf clear, NaN and +Inf set), trailing bits zero."""
    args = exact_inputs(shape, dtype, fmt, res, seed=4)
    numel = math.prod(shape)
    poison_next(numel * args[0].element_size(), (numel + 7) // 8)
    out, mask = C.bn_act(*args, True, dtype, True)
    z, ref, _ = bn_reference(args, True, FP64)
    assert (z == 0).any() and (z < 0).any() and (z > 0).any() and torch.isnan(z).any(), "not a boundary test"
    z32 = bn_reference(args, True, FP32)[0]
    torch.testing.assert_close(z32.double(), z, rtol=0, atol=0, equal_nan=True, msg="the data is not exact")
    torch.testing.assert_close(out.double(), ref.to(dtype).double(), rtol=0, atol=0, equal_nan=True)
    bits, tail = unpack_bits(mask, numel)
    want = ~(mem_order(z, is_cl(args[0])) <= 0)
    assert not tail.any() and torch.equal(bits, want), f"{int((bits != want).sum())} wrong bits"


@pytest.mark.parametrize("g_fmt", FORMATS)
@pytest.mark.parametrize("y_fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_mask_backward(dtype, y_fmt, g_fmt):
    """dx = g where the mask bit is set, else exactly 0 (a NaN or Inf gradient included), in the
    layout the ``channels_last`` flag names, whatever g's own layout."""
    shape = (3, 24, 7, 5)
    args = exact_inputs(shape, FP32, y_fmt, 2, seed=5)
    _, mask = C.bn_act(*args, True, FP32, True)
    z = bn_reference(args, True, FP64)[0]
    g = torch.randn(shape, device=DEV, generator=gen(6)).to(dtype).contiguous(memory_format=g_fmt)
    with torch.no_grad():
        for i, v in enumerate((math.nan, math.inf, -math.inf, math.nan, math.inf)):
            g[i % 3, 3 * i + 1, i + 1, i] = v
    cl = y_fmt == CL
    poison_next(g.numel() * g.element_size())
    dx = C.relu_mask_backward(g, mask, cl)
    assert dx.dtype == dtype and dx.shape == g.shape and dx.is_contiguous(memory_format=y_fmt)
    want = torch.where(~(z <= 0), g, torch.zeros((), dtype=dtype, device=DEV))
    torch.testing.assert_close(dx, want, rtol=0, atol=0, equal_nan=True)


# ======================================================== BN + ReLU backward (two passes)
BWD_SHAPES = {"c64-14x14": (4, 64, 14, 14), "c33-7x7": (1, 33, 7, 7)}
BWD_DTYPES = {"fp32": (FP32, FP32), "fp16": (FP16, FP16), "bf16": (BF16, BF16), "fp16-r32": (FP16, FP32)}


def batch_bn(t, g, eps):
    """A training BN of t: ``(mean, scale, shift)`` float32 from t's batch statistics, its invstd,
    and ``(gamma, beta)``."""
    c = t.shape[1]
    t64 = t.double()
    mean, var = t64.mean(dim=DIMS).float(), t64.var(dim=DIMS, unbiased=False).float()
    gamma = torch.randn(c, device=DEV, generator=g)  # mixed signs
    beta = 0.5 * torch.randn(c, device=DEV, generator=g)
    invstd = torch.rsqrt(var + eps)
    return (mean, gamma * invstd, beta), invstd, (gamma, beta)


def autograd_grads(g, y, params, r, rparams, res, eps, dt):
    """Gradients of relu(batch_norm(y) + R) by autograd in ``dt`` (the batch statistics' own
    dependence on y included): y, gamma, beta[, r[, r's gamma, beta]]."""
    y = y.detach().to(dt).requires_grad_()
    gamma, beta = (p.detach().to(dt).requires_grad_() for p in params)
    inputs = [y, gamma, beta]
    z = F.batch_norm(y, None, None, gamma, beta, True, 0.0, eps)
    if res:
        r = r.detach().to(dt).requires_grad_()
        inputs.append(r)
        if res == 2:
            rg, rb = (p.detach().to(dt).requires_grad_() for p in rparams)
            inputs += [rg, rb]
            z = z + F.batch_norm(r, None, None, rg, rb, True, 0.0, eps)
        else:
            z = z + r
    return torch.autograd.grad(torch.relu(z), inputs, g.to(dt))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("res", [0, 1, 2], ids=["nores", "identity", "dual"])
@pytest.mark.parametrize("dts", list(BWD_DTYPES))
@pytest.mark.parametrize("shape", list(BWD_SHAPES))
def test_bn_backward_matches_autograd(shape, dts, res, fmt):
    """``bn_act_bwd_reduce`` then ``bn_act_bwd_apply`` (with the module's k2, k3 formulas) give
    dy, dgamma, dbeta (and dr, r's dgamma, dbeta) of relu(bn(y) + R) as autograd does in float64;
    the reduction is deterministic (same bits twice)."""
    dt, r_dt = BWD_DTYPES[dts]
    sh = BWD_SHAPES[shape]
    c, eps = sh[1], 1e-5
    rng = gen(7)
    y = (3.0 + 2.0 * torch.randn(sh, device=DEV, generator=rng)).to(dt).contiguous(memory_format=fmt)
    r = (-2.0 + 3.0 * torch.randn(sh, device=DEV, generator=rng)).to(r_dt).contiguous(memory_format=fmt) if res \
        else None
    vecs, invstd, params = batch_bn(y, rng, eps)
    rvecs, r_invstd, rparams = batch_bn(r, rng, eps) if res == 2 else ((None,) * 3, None, None)
    # no gradient where float32 may put z on the other side of 0 than float64 does (module docstring)
    z64, _, mag = bn_reference((y, *vecs, r, *rvecs), True, FP64)
    g = torch.randn(sh, device=DEV, generator=rng)
    g = torch.where(z64.abs() <= 1e-4 * mag, 0.0, g).to(dt).contiguous(memory_format=fmt)
    sums = C.bn_act_bwd_reduce(g, y, *vecs, r, *rvecs)
    again = C.bn_act_bwd_reduce(g, y, *vecs, r, *rvecs)
    assert all(torch.equal(a, b) for a, b in zip(sums, again)), "bn_act_bwd_reduce is not deterministic"
    s_g, s_gy, s_gr = sums
    assert all(s.shape == (c,) and s.dtype == FP32 for s in sums)
    if res != 2:
        assert torch.equal(s_gr, torch.zeros_like(s_gr)), "sum_gr must be zeros unless r has a BN"
    n = y.numel() // c
    k2, k3 = -vecs[1] * invstd * invstd * s_gy / n, -vecs[1] * s_g / n
    rk2 = rk3 = None
    if res == 2:
        rk2, rk3 = -rvecs[1] * r_invstd * r_invstd * s_gr / n, -rvecs[1] * s_g / n
    poison_next(y.numel() * y.element_size(), y.numel() * 4)
    dy, dr = C.bn_act_bwd_apply(g, y, *vecs, k2, k3, r, *rvecs, rk2, rk3, r_dt)
    want = autograd_grads(g, y, params, r, rparams, res, eps, FP64)
    same = autograd_grads(g, y, params, r, rparams, res, eps, FP32)
    got = [("dy", dy, dt), ("dgamma", invstd * s_gy, FP32), ("dbeta", s_g, FP32)]
    if res:
        got.append(("dr", dr, r_dt))
    if res == 2:
        got += [("r dgamma", r_invstd * s_gr, FP32), ("r dbeta", s_g, FP32)]
    assert len(got) == len(want)
    for (name, a, floor_dt), w, s in zip(got, want, same):
        assert_close(a, w, s, name=name, dtype=floor_dt)
    assert dy.dtype == dt and dy.is_contiguous(memory_format=fmt_of(y))
    if res:
        assert dr.dtype == r_dt and dr.is_contiguous(memory_format=fmt_of(y))
    else:
        assert dr.numel() == 0


# ==================================================================== statistics
STATS_SHAPES = {"c64-14x14": (4, 64, 14, 14), "c33-7x7": (1, 33, 7, 7), "c3-1x1-batch6": (6, 3, 1, 1),
                "r50-c256-56x56": (2, 256, 56, 56)}


def check_stats(x, count, anchor, off, m2, name="x"):
    """count, mean = anchor + offset and biased var = m2 / count of ``x`` as stored, against float64,
    PyTorch's float32 statistics as the yardstick."""
    c = x.shape[1]
    assert count.shape == (1,) and count.dtype == FP32 and count.item() == x.numel() // c, count
    for t in (anchor, off, m2):
        assert t.shape == (c,) and t.dtype == FP32 and t.device == x.device
    x64, xf = x.double(), x.float()
    assert_close(anchor + off, x64.mean(dim=DIMS), xf.mean(dim=DIMS), name=f"{name} mean")
    assert_close(m2 / count, x64.var(dim=DIMS, unbiased=False), xf.var(dim=DIMS, unbiased=False),
                 name=f"{name} var")


def anchors_are_values(x, anchor):
    """Each channel's anchor is one of its values (a finite one where there is any), else 0."""
    c = x.shape[1]
    xs = x.transpose(0, 1).reshape(c, -1).float()
    has_finite = torch.isfinite(xs).any(dim=1)
    hit = (xs == anchor[:, None]).any(dim=1)
    return bool((torch.where(has_finite, hit & torch.isfinite(anchor), anchor == 0)).all())


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", list(STATS_SHAPES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_channel_stats(dtype, shape, fmt):
    sh = STATS_SHAPES[shape]
    g = gen(8)
    offsets = 4.0 * torch.randn(sh[1], device=DEV, generator=g).view(V)
    x = (offsets + 2.0 * torch.randn(sh, device=DEV, generator=g)).to(dtype).contiguous(memory_format=fmt)
    st = C.channel_stats(x)
    check_stats(x, *st)
    assert anchors_are_values(x, st[1]), "anchor must be one of the channel's values"
    again = C.channel_stats(x)
    assert all(torch.equal(a, b) for a, b in zip(st, again)), "channel_stats is not deterministic"


@pytest.mark.parametrize("fmt", FORMATS)
def test_channel_stats_cancellation(fmt):
    """x ~ 1000 +- 0.01: the variance within 4x PyTorch's float32 error, where the one-pass
    ``sum(x^2)/n - mean^2`` in float32 misses by orders of magnitude (the trap is real)."""
    sh = (4, 64, 14, 14)
    x = (1000.0 + 0.01 * torch.randn(sh, device=DEV, generator=gen(9))).contiguous(memory_format=fmt)
    count, anchor, off, m2 = C.channel_stats(x)
    check_stats(x, count, anchor, off, m2)
    var64 = x.double().var(dim=DIMS, unbiased=False)
    bound = max(1e-5, 4 * rel_err(x.var(dim=DIMS, unbiased=False), var64))
    n = x.numel() // sh[1]
    naive = ((x * x).sum(dim=DIMS) - x.sum(dim=DIMS) ** 2 / n) / n
    assert rel_err(naive, var64) > 100 * bound, "no trap: the naive formula is accurate here"


def test_channel_stats_nan_inf():
    x = torch.randn(2, 6, 5, 5, device=DEV, generator=gen(10))
    with torch.no_grad():
        x[0, 1, 2, 2] = math.nan  # one NaN
        x[:, 2] = math.nan  # all NaN
        x[1, 3, 0, 0] = math.inf  # one +Inf
        x[0, 4, 0, 0], x[1, 4, 1, 1] = -math.inf, math.inf
    count, anchor, off, m2 = C.channel_stats(x)
    mean, var = anchor + off, m2 / count
    ok = [0, 5]
    check_stats(x[:, ok], count, anchor[ok], off[ok], m2[ok], name="finite channels")
    assert anchors_are_values(x, anchor)
    assert torch.isnan(mean[[1, 2]]).all() and torch.isnan(var[[1, 2]]).all()
    assert not torch.isfinite(mean[[3, 4]]).any() and not torch.isfinite(var[[3, 4]]).any()


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
def test_bn_finalize(affine):
    c, n, eps = 37, 150.0, 1e-3
    g = gen(11)
    count = torch.tensor([n], device=DEV)
    anchor = 100.0 * torch.randn(c, device=DEV, generator=g)
    off = 0.1 * torch.randn(c, device=DEV, generator=g)
    m2 = n * torch.rand(c, device=DEV, generator=g) + 1e-3
    w = torch.randn(c, device=DEV, generator=g) if affine else None
    b = torch.randn(c, device=DEV, generator=g) if affine else None
    mean, var, scale, shift, invstd = C.bn_finalize(count, anchor, off, m2, w, b, eps)
    for t in (mean, var, scale, shift, invstd):
        assert t.shape == (c,) and t.dtype == FP32 and t.device == anchor.device
    torch.testing.assert_close(mean, anchor + off, rtol=2e-7, atol=0)
    var64 = m2.double() / n
    inv64 = 1.0 / torch.sqrt(var64 + eps)
    torch.testing.assert_close(var.double(), var64, rtol=1e-6, atol=0)
    torch.testing.assert_close(invstd.double(), inv64, rtol=1e-6, atol=0)
    if affine:
        torch.testing.assert_close(scale.double(), w.double() * inv64, rtol=2e-6, atol=0)
        assert torch.equal(shift, b)
    else:
        assert torch.equal(scale, invstd) and torch.equal(shift, torch.zeros_like(shift))
    # no values: NaN variance (as torch.var of nothing), so NaN invstd and scale
    _, var0, scale0, shift0, inv0 = C.bn_finalize(torch.zeros(1, device=DEV), anchor, off, m2 * 0, w, b, eps)
    assert torch.isnan(var0).all() and torch.isnan(inv0).all() and torch.isnan(scale0).all()
    assert torch.equal(shift0, b if affine else torch.zeros_like(shift0))


def test_stats_then_finalize_is_batchnorms_affine():
    """channel_stats -> bn_finalize -> bn_act: F.batch_norm's training forward + ReLU."""
    x = (5.0 + 3.0 * torch.randn(4, 40, 9, 9, device=DEV, generator=gen(12))).contiguous(memory_format=CL)
    w, b = torch.rand(40, device=DEV) + 0.5, torch.randn(40, device=DEV)
    mean, var, scale, shift, invstd = C.bn_finalize(*C.channel_stats(x), w, b, 1e-5)
    out = C.bn_act(x, mean, scale, shift, None, None, None, None, True, FP32, False)[0]
    ref64 = torch.relu(F.batch_norm(x.double(), None, None, w.double(), b.double(), True, 0.0, 1e-5))
    same = torch.relu(F.batch_norm(x, None, None, w, b, True, 0.0, 1e-5))
    assert_close(out, ref64, same, name="bn + relu")


# ==================================================== agreement with the Triton ops
@pytest.mark.parametrize("case", ["fp16-cl-dual", "bf16-nchw-identity", "fp32-cl-nores"])
def test_bn_ops_agree_with_triton(case):
    """Forward, both backward passes and channel statistics of the two backends: each within its
    bound of float64, and the two within their combined error of each other."""
    dt = {"fp16": FP16, "bf16": BF16, "fp32": FP32}[case[:4]]
    fmt = CL if "-cl-" in case else NCHW
    res = {"dual": 2, "identity": 1, "nores": 0}[case.rsplit("-", 1)[1]]
    args = bn_inputs((4, 64, 14, 14), dt, fmt, True, res, seed=13)
    z64, ref64, mag = bn_reference(args, True, FP64)
    bound = bound_of(bn_reference(args, True, FP32)[1].to(dt), ref64, dt)
    out_c = C.bn_act(*args, True, dt, False)[0]
    out_t = T.bn_relu_apply(*args, dt)
    for name, o in (("cuda", out_c), ("triton", out_t)):
        assert rel_err(o, ref64) <= bound, f"{name} forward: {rel_err(o, ref64):.3e} > {bound:.3e}"
    assert rel_err(out_c, out_t) <= 2 * bound
    g = torch.randn(args[0].shape, device=DEV, generator=gen(14))
    g = torch.where(z64.abs() <= 1e-4 * mag, 0.0, g).to(dt).contiguous(memory_format=fmt)
    y, mean, scale, shift, r, rm, rs, rh = args
    gz = torch.where(z64 <= 0, 0.0, g.double())
    want = [gz.sum(dim=DIMS), (gz * (y.double() - mean.double().view(V))).sum(dim=DIMS),
            (gz * (r.double() - rm.double().view(V))).sum(dim=DIMS) if res == 2 else torch.zeros_like(mean).double()]
    sums_c = C.bn_act_bwd_reduce(g, *args)
    sums_t = T.bn_relu_bwd_reduce(g, *args)
    for i, (a, b, w) in enumerate(zip(sums_c, sums_t, want)):
        assert_close(a, w, name=f"cuda sum {i}", dtype=FP32)
        assert_close(b, w, name=f"triton sum {i}", dtype=FP32)
    kg = gen(15)
    k2, k3 = 1e-2 * torch.randn(64, device=DEV, generator=kg), 1e-2 * torch.randn(64, device=DEV, generator=kg)
    rk = (k2.flip(0), k3.flip(0)) if res == 2 else (None, None)
    dy_c, dr_c = C.bn_act_bwd_apply(g, *args[:4], k2, k3, *args[4:], *rk, dt)
    dy_t, dr_t = T.bn_relu_bwd_apply(g, *args[:4], k2, k3, *args[4:], *rk, dt)

    def lin(t, s, a, b, m):  # s * gz + a * (t - m) + b, per channel, float64
        return s.double().view(V) * gz + a.double().view(V) * (t.double() - m.double().view(V)) + b.double().view(V)

    want_d = [("dy", dy_c, dy_t, lin(y, scale, k2, k3, mean))]
    if res == 1:
        want_d.append(("dr", dr_c, dr_t, gz))
    elif res == 2:
        want_d.append(("dr", dr_c, dr_t, lin(r, rs, rk[0], rk[1], rm)))
    for name, a, b, w in want_d:
        assert_close(a, w, name=f"cuda {name}", dtype=dt)
        assert_close(b, w, name=f"triton {name}", dtype=dt)
        assert rel_err(a, b) <= 2 * FLOOR[dt], f"{name}: cuda vs triton {rel_err(a, b):.3e}"
    st_c, st_t = C.channel_stats(y), T.channel_stats(y)
    y64 = y.double()
    for what, idx, ref, same in (("mean", 0, y64.mean(DIMS), y.float().mean(DIMS)),
                                 ("var", 1, y64.var(DIMS, unbiased=False), y.float().var(DIMS, unbiased=False))):
        vals = [(s[1] + s[2]) if idx == 0 else s[3] / s[0] for s in (st_c, st_t)]
        b_ = bound_of(same, ref, FP32)
        assert all(rel_err(v, ref) <= b_ for v in vals), (what, [rel_err(v, ref) for v in vals], b_)
        assert rel_err(vals[0], vals[1]) <= 2 * b_


# =============================================================== empty tensors, bad input
def test_empty_tensors():
    v = torch.randn(4, device=DEV)
    for y in (torch.empty(0, 4, 3, 3, device=DEV, dtype=FP16), torch.empty(2, 4, 0, 3, device=DEV, dtype=FP16)):
        out, mask = C.bn_act(y, v, v, v, y, v, v, v, True, FP16, True)
        assert out.shape == y.shape and out.dtype == FP16 and mask.shape == (0,)
        assert C.relu_mask_backward(y, mask, False).shape == y.shape
        sums = C.bn_act_bwd_reduce(y, y, v, v, v, y, v, v, v)
        assert all(torch.equal(s, torch.zeros_like(v)) for s in sums)
        dy, dr = C.bn_act_bwd_apply(y, y, v, v, v, v, v, y, v, v, v, v, v, FP32)
        assert dy.shape == y.shape and dr.shape == y.shape and dr.dtype == FP32
        count, anchor, off, m2 = C.channel_stats(y)
        assert count.item() == 0 and all(torch.equal(t, torch.zeros_like(v)) for t in (anchor, off, m2))
        mean, var, scale, shift, invstd = C.bn_finalize(count, anchor, off, m2, v, v, 1e-5)
        assert torch.isnan(var).all() and torch.isnan(scale).all()
    e = torch.empty(0, device=DEV)
    assert all(t.shape == (0,) for t in C.bn_finalize(torch.ones(1, device=DEV), e, e, e, None, None, 1e-5))
    for dtype, tf in ((FP16, False), (FP32, True)):
        x = torch.empty(0, 64, 7, 7, device=DEV, dtype=dtype).contiguous(memory_format=CL)
        w = torch.randn(32, 64, 3, 3, device=DEV).to(dtype).contiguous(memory_format=CL)
        r = torch.empty(0, 32, 4, 4, device=DEV, dtype=dtype)
        out = C.conv_bias_act(x, w, torch.zeros(32, device=DEV), r, [2, 2], [1, 1], [1, 1], True, tf)
        assert out.shape == (0, 32, 4, 4) and out.dtype == dtype
        y, count, *_ = C.conv_bias_act_stats(x, w, None, r, [2, 2], [1, 1], [1, 1], True, tf)
        assert y.shape == (0, 32, 4, 4) and count.item() == 0


def _bad_op_calls():
    """name: (callable, exception type, message regex); CUDA tensors with a CPU one, and dtypes."""
    y = torch.randn(2, 4, 3, 3, device=DEV)
    v = torch.randn(4, device=DEV)
    mask = C.bn_act(y, None, v, v, None, None, None, None, True, FP32, True)[1]
    x, w = torch.randn(1, 8, 5, 5, device=DEV), torch.randn(4, 8, 3, 3, device=DEV)
    one = torch.tensor([9.0], device=DEV)

    def bn(*a):
        return lambda: C.bn_act(*a, True, FP32, False)

    def conv(b_=None, r_=None, x_=x):
        return lambda: C.conv_bias_act(x_, w, b_, r_, [1, 1], [1, 1], [1, 1], True, False)

    return {
        "scale-on-cpu": (bn(y, None, v.cpu(), v, None, None, None, None), ValueError, r"^scale: .*on cuda.*cpu"),
        "mean-on-cpu": (bn(y, v.cpu(), v, v, None, None, None, None), ValueError, r"^mean: .*cpu"),
        "r-on-cpu": (bn(y, None, v, v, y.cpu(), None, None, None), ValueError, r"^r: .*cpu"),
        "r_scale-on-cpu": (bn(y, None, v, v, y, None, v.cpu(), v), ValueError, r"^r_scale: .*cpu"),
        "y-int": (bn(y.int(), None, v, v, None, None, None, None), TypeError, r"^y: expected dtype"),
        "mask-on-cpu": (lambda: C.relu_mask_backward(y, mask.cpu(), False), ValueError, r"^mask: .*cpu"),
        "g-on-cpu": (lambda: C.bn_act_bwd_reduce(y.cpu(), y, v, v, v, None, None, None, None), ValueError,
                     r"^g: .*cpu"),
        "k2-on-cpu": (lambda: C.bn_act_bwd_apply(y, y, v, v, v, v.cpu(), v, None, None, None, None, None, None,
                                                 FP32), ValueError, r"^k2: .*cpu"),
        "count-on-cpu": (lambda: C.bn_finalize(one.cpu(), v, v, v, None, None, 1e-5), ValueError, r"^count: .*cpu"),
        "weight-on-cpu": (lambda: C.bn_finalize(one, v, v, v, v.cpu(), None, 1e-5), ValueError, r"^weight: .*cpu"),
        "conv-bias-on-cpu": (conv(b_=v.cpu()), ValueError, r"^bias: .*cpu"),
        "conv-r-on-cpu": (conv(r_=torch.randn(1, 4, 5, 5)), ValueError, r"^r: .*cpu"),
        "conv-r-shape": (conv(r_=torch.randn(1, 4, 3, 3, device=DEV)), ValueError, r"^r: expected shape"),
        "conv-x-float64": (conv(x_=x.double()), TypeError, r"^x: expected dtype"),
    }


BAD_OP_CALLS = ["scale-on-cpu", "mean-on-cpu", "r-on-cpu", "r_scale-on-cpu", "y-int", "mask-on-cpu", "g-on-cpu",
                "k2-on-cpu", "count-on-cpu", "weight-on-cpu", "conv-bias-on-cpu", "conv-r-on-cpu", "conv-r-shape",
                "conv-x-float64"]


@pytest.mark.parametrize("case", BAD_OP_CALLS)
def test_bad_op_arguments_name_the_tensor(case):
    """Checked before any kernel runs: ValueError for devices and shapes, TypeError for dtypes."""
    calls = _bad_op_calls()
    assert set(calls) == set(BAD_OP_CALLS)
    call, exc, pattern = calls[case]
    with pytest.raises(exc, match=pattern):
        call()
    torch.cuda.synchronize()  # and no kernel failed behind the error


_WEIGHT_ON_CPU_CHILD = """
import json, torch
from resnet_fused import _ext
assert _ext.cuda_error() is None, _ext.cuda_error()
C = torch.ops.resnet_fused_C
x = torch.randn(2, 64, 8, 8, device="cuda").half().contiguous(memory_format=torch.channels_last)
w = torch.randn(64, 64, 1, 1).half()  # on the CPU
out = {"plan": C.conv_kernel_name(x, w, None, [1, 1], [0, 0], [1, 1], False)}
for name in ("conv_bias_act", "conv_bias_act_stats"):
    try:
        getattr(C, name)(x, w, None, None, [1, 1], [0, 0], [1, 1], False, False)
        torch.cuda.synchronize()
        out[name] = "no error"
    except Exception as exc:
        out[name] = f"{type(exc).__name__}: {exc}"[:400]
print(json.dumps(out))
"""


def test_conv_weight_on_another_device_is_a_value_error():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(_WEIGHT_ON_CPU_CHILD)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"child exited {proc.returncode}: {proc.stderr[-2000:]}"
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ("conv_bias_act", "conv_bias_act_stats"):
        assert out[name].startswith("ValueError: weight:") and "cpu" in out[name], out


# ================================================================ conv_bias_act (ops)
CUTLASS_TAG = {FP16: "f16", BF16: "bf16", FP32: "tf32"}


def cutlass_prefix(x, w, r, allow_tf32):
    """The kernel-name prefix CUTLASS must run under, by the support csrc/cuda/conv_fprop.cu
    documents (and CUTLASS's can_implement checks): a channels_last CUDA x, C and K multiples of
    the 16-byte vector (8 elements of 16 bits, 4 of float32), float32 only with TF32, a residual in
    x's dtype. None: the fallback (cuDNN + our epilogue kernel) must run."""
    if not x.is_cuda or not is_cl(x) or x.numel() == 0:
        return None
    if (x.dtype == FP32 and not allow_tf32) or (r is not None and r.dtype != x.dtype):
        return None
    align = 4 if x.dtype == FP32 else 8
    if x.shape[1] % align or w.shape[0] % align:
        return None
    return f"cutlass_sm80_{CUTLASS_TAG[x.dtype]}_"


def assert_kernel(name: str, prefix, what: str) -> None:
    if prefix is None:
        assert name.startswith("fallback"), f"{what}: expected the fallback, got kernel {name!r}"
    else:
        assert name.startswith(prefix), f"{what}: expected a CUTLASS {prefix}* kernel, got {name!r}"


def pairs(conv):
    return [list(v) if isinstance(v, (tuple, list)) else [v, v]
            for v in (conv["stride"], conv["padding"], conv["dilation"])]


def ext_conv(tensors, conv, relu, allow_tf32, stats=False):
    x, w, b, r = tensors
    return (C.conv_bias_act_stats if stats else C.conv_bias_act)(x, w, b, r, *pairs(conv), relu, allow_tf32)


def kernel_name(tensors, conv, allow_tf32):
    x, w, _, r = tensors
    return C.conv_kernel_name(x, w, r, *pairs(conv), allow_tf32)


def out_bytes(tensors, conv):
    x, w, _, _ = tensors
    (s, _), (p, _), (d, _) = pairs(conv)
    k = w.shape[2]
    o = [(v + 2 * p - d * (k - 1) - 1) // s + 1 for v in x.shape[2:]]
    return x.shape[0] * w.shape[0] * o[0] * o[1] * x.element_size()


def run_conv_checked(tensors, conv, relu, allow_tf32, name):
    """conv_bias_act (values, dtype, layout), the kernel it reports, determinism, and
    conv_bias_act_stats: the very same y, with the statistics of y as stored."""
    x, w, _, r = tensors
    assert_kernel(kernel_name(tensors, conv, allow_tf32), cutlass_prefix(x, w, r, allow_tf32), name)
    poison_next(out_bytes(tensors, conv))
    out = ext_conv(tensors, conv, relu, allow_tf32)
    check_conv(out, *tensors, relu, conv, name=name)
    assert torch.equal(ext_conv(tensors, conv, relu, allow_tf32), out), f"{name}: not deterministic"
    poison_next(out_bytes(tensors, conv))
    y, *st = ext_conv(tensors, conv, relu, allow_tf32, stats=True)
    assert torch.equal(y, out), f"{name}: conv_bias_act_stats stored another y than conv_bias_act"
    check_stats(y, *st, name=f"{name} statistics")
    return out


@pytest.mark.parametrize("spec", list(R50))
@pytest.mark.parametrize("mode", ["fp16", "bf16", "tf32"])
def test_resnet50_conv(mode, spec):
    """Every distinct ResNet-50 conv, channels_last, batch 2, epilogue as in the network: CUTLASS
    (the C = 3 stem: the fallback), within 4x PyTorch's same-precision error of float64 (TF32: the
    worse of cuDNN and a TF32 emulation)."""
    tensors, conv, relu = spec_case(R50[spec], PRECISION[mode])
    with cudnn_tf32(mode == "tf32"):
        run_conv_checked(tensors, conv, relu, mode == "tf32", spec)


@pytest.mark.parametrize("spec", ["conv1", "layer1.0.conv2", "layer3.0.downsample", "layer4.0.conv3"])
def test_conv_fp32_ieee_and_tf32(spec):
    """allow_tf32=False: the fallback, IEEE float32 (~1e-7); True: CUTLASS TF32, ~1e3x coarser -
    the switch reaches the kernel."""
    tensors, conv, relu = spec_case(R50[spec], FP32)
    x, w, b, r = tensors
    ref64 = conv_bias_act_reference(x, w, b, r, relu=relu, upcast=True, **conv)
    with cudnn_tf32(False):
        name = kernel_name(tensors, conv, False)
        assert name.startswith("fallback: float32 without TF32"), name
        out = ext_conv(tensors, conv, relu, False)
        assert_close(out, ref64, conv_bias_act_reference(x, w, b, r, relu=relu, **conv), name=spec)
    err_ieee = rel_err(out, ref64)
    assert err_ieee < 1e-5
    with cudnn_tf32(True):
        out_tf32 = run_conv_checked(tensors, conv, relu, True, spec)
    if cutlass_prefix(x, w, r, True) is not None:
        assert rel_err(out_tf32, ref64) > 10 * err_ieee, "allow_tf32=True did not reach the CUTLASS kernel"


@pytest.mark.parametrize("spec", ["conv1", "layer1.0.conv3", "layer2.0.conv2", "layer3.0.downsample"])
@pytest.mark.parametrize("mode", ["fp16", "bf16", "fp32", "tf32"])
def test_conv_nchw_fallback(mode, spec):
    """NCHW activations and weights: cuDNN + the epilogue kernel, output NCHW."""
    tensors, conv, relu = spec_case(R50[spec], PRECISION[mode], fmt=NCHW, w_fmt=NCHW)
    with cudnn_tf32(mode == "tf32"):
        assert kernel_name(tensors, conv, mode == "tf32").startswith("fallback: x is not channels_last")
        run_conv_checked(tensors, conv, relu, mode == "tf32", spec)


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
@pytest.mark.parametrize("res", [True, False], ids=["res", "nores"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [FP16, BF16], ids=["fp16", "bf16"])
def test_conv_epilogue_variants(dtype, fmt, bias, res, relu):
    """Bias / residual / ReLU on and off, CUTLASS's epilogue (channels_last) and the fallback's."""
    tensors, conv, _ = spec_case(R50["layer1.0.conv3"], dtype, fmt=fmt, w_fmt=fmt, bias=bias, residual=res)
    out = run_conv_checked(tensors, conv, relu, False, "layer1.0.conv3")
    if relu:
        assert (out >= 0).all() and (out == 0).any()
    else:
        assert (out < 0).any()


# id: (dtype ("tf32": float32 with TF32), (n, cin, (h, w), cout, k, stride, padding, dilation), residual)
AWKWARD = {
    "fp16-b1-c17to33-7x7-3x3": (FP16, (1, 17, (7, 7), 33, 3, 1, 1, 1), True),  # odd C and K: fallback
    "fp16-b3-c16to24-9x9-3x3-dil2": (FP16, (3, 16, (9, 9), 24, 3, 1, 2, 2), False),
    "bf16-b1-c16to32-7x7-1x1s2": (BF16, (1, 16, (7, 7), 32, 1, 2, 0, 1), True),
    "bf16-b2-c32to16-15x15-3x3s2": (BF16, (2, 32, (15, 15), 16, 3, 2, 1, 1), False),
    "bf16-b2-c8to12-6x5-3x3": (BF16, (2, 8, (6, 5), 12, 3, 1, 1, 1), True),  # K % 8: fallback
    "tf32-b2-c4to36-11x13-3x3s2": ("tf32", (2, 4, (11, 13), 36, 3, 2, 1, 1), True),
    "tf32-b1-c3to16-17x17-7x7s2": ("tf32", (1, 3, (17, 17), 16, 7, 2, 3, 1), False),  # the stem's C = 3
    "fp16-b4-c16to16-1x1spatial": (FP16, (4, 16, (1, 1), 16, 1, 1, 0, 1), True),  # NCHW and NHWC at once
    "fp16-b2-c64to64-5x5-5x5": (FP16, (2, 64, (5, 5), 64, 5, 1, 2, 1), False),
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", list(AWKWARD))
def test_conv_awkward_shapes(case, fmt):
    dt, (n, cin, hw, cout, k, s, p, d), res = AWKWARD[case]
    tf = dt == "tf32"
    tensors, conv = make_conv(n, cin, hw, cout, k, s, p, d, dtype=FP32 if tf else dt, fmt=fmt, w_fmt=fmt,
                              residual=res)
    with cudnn_tf32(tf):
        run_conv_checked(tensors, conv, True, tf, case)


def test_conv_residual_of_another_dtype_falls_back():
    """An fp16 conv with a float32 residual: the fallback, output in x's dtype (the op's contract)."""
    tensors, conv, relu = spec_case(R50["layer1.0.conv3"], FP16, res_dtype=FP32)
    x, w, b, r = tensors
    assert kernel_name(tensors, conv, False).startswith("fallback: residual dtype differs")
    out = ext_conv(tensors, conv, relu, False)
    assert out.dtype == FP16 and is_cl(out)
    assert_close(out, conv_bias_act_reference(x, w, b, r, relu=relu, upcast=True, **conv), name="out", dtype=FP16)


@pytest.mark.parametrize("which", ["x", "weight", "residual", "bias"])
@pytest.mark.parametrize("mode", ["fp16", "tf32"])
def test_conv_unaligned_storage(mode, which):
    """One tensor at an odd storage offset (a view into a flat buffer): CUTLASS's 16-byte vector
    loads cannot take it, so the right result must come anyway (the fallback, or an aligned copy)."""
    tensors, conv, relu = spec_case(R50["layer1.0.conv3"], PRECISION[mode])
    i = ["x", "weight", "bias", "residual"].index(which)
    strides = tensors[i].stride()
    tensors[i] = at_offset(tensors[i], 1)
    assert tensors[i].data_ptr() % 16 and tensors[i].stride() == strides
    with cudnn_tf32(mode == "tf32"):
        out = ext_conv(tensors, conv, relu, mode == "tf32")
        check_conv(out, *tensors, relu, conv, name=f"{which} at offset 1")
        y, *st = ext_conv(tensors, conv, relu, mode == "tf32", stats=True)
        assert torch.equal(y, out)
        check_stats(y, *st, name="statistics")


def test_conv_kernel_name_for_unaligned_x_is_the_fallback():
    tensors, conv, _ = spec_case(R50["layer1.0.conv3"], FP16, residual=False)
    tensors[0] = at_offset(tensors[0], 1)
    name = kernel_name(tensors, conv, False)
    assert name.startswith("fallback"), f"x at an odd offset runs the fallback, but the name says {name!r}"


def poke(t, points):
    with torch.no_grad():
        for (n, c, h, w), v in points:
            t[n, c, h, w] = v


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("spec", ["layer1.0.conv3", "layer2.0.conv2"])
@pytest.mark.parametrize("dtype", [FP16, BF16], ids=["fp16", "bf16"])
def test_conv_nonfinite_propagate_like_pytorch(dtype, spec, fmt, relu):
    """NaN / +-Inf in x and the residual give NaN / Inf exactly where float64 has them (the epilogue's
    ReLU keeps NaN, as torch.relu)."""
    s = R50[spec]
    tensors, conv, _ = spec_case(s, dtype, fmt=fmt, w_fmt=fmt)
    x, w, b, r = tensors
    last = s.hw - 1
    poke(x, [((0, 3, 5, 5), math.nan), ((0, 1, 0, 0), -math.inf), ((1, 2, 20, 21), math.nan),
             ((1, s.cin - 1, last, last), math.inf)])
    if r is not None:
        o = s.out_hw - 1
        poke(r, [((0, 10, 20, 20), math.nan), ((1, 11, 40, 41), math.inf), ((1, 12, 2, 50), -math.inf),
                 ((1, s.cout - 1, o, o - 1), math.nan)])
    out = ext_conv(tensors, conv, relu, False)
    ref64 = conv_bias_act_reference(x, w, b, r, relu=relu, upcast=True, **conv)
    assert torch.isnan(ref64).any() and torch.isinf(ref64).any()
    assert_close(out, ref64, conv_bias_act_reference(x, w, b, r, relu=relu, **conv), name=spec)


def test_conv_stats_cancellation_tf32():
    """CUTLASS's statistics epilogue with outputs ~1000 +- 0.01 (a large residual): the variance
    within 4x PyTorch's float32 error of y's, where the one-pass float32 formula fails."""
    n, cin, cout, h = 4, 16, 32, 14
    g = gen(16)
    x = torch.randn(n, cin, h, h, device=DEV, generator=g).contiguous(memory_format=CL)
    w = (1e-2 * torch.randn(cout, cin, 3, 3, device=DEV, generator=g) / 12.0).contiguous(memory_format=CL)
    r = (1000.0 + torch.arange(cout, device=DEV, dtype=FP32)).view(1, -1, 1, 1).expand(n, cout, h, h)
    r = r.contiguous(memory_format=CL)
    with cudnn_tf32(True):
        assert kernel_name([x, w, None, r], dict(stride=1, padding=1, dilation=1), True).startswith("cutlass_sm80_tf32")
        y, count, anchor, off, m2 = C.conv_bias_act_stats(x, w, None, r, [1, 1], [1, 1], [1, 1], False, True)
    assert (y - r).abs().max() < 0.1  # |mean| >> std indeed
    check_stats(y, count, anchor, off, m2, name="y")
    var64 = y.double().var(dim=DIMS, unbiased=False)
    bound = max(1e-5, 4 * rel_err(y.var(dim=DIMS, unbiased=False), var64))
    cnt = y.numel() // cout
    naive = ((y * y).sum(dim=DIMS) - y.sum(dim=DIMS) ** 2 / cnt) / cnt
    assert rel_err(naive, var64) > 100 * bound


def test_conv_agrees_with_triton_fp16():
    """One ResNet-50 conv through both backends (Triton autotunes it: one shape only)."""
    tensors, conv, relu = spec_case(R50["layer1.0.conv3"], FP16)
    x, w, b, r = tensors
    out_c = conv_bias_act(x, w, b, r, **conv, relu=relu, backend="cuda")
    out_t = conv_bias_act(x, w, b, r, **conv, relu=relu, backend="triton")
    ref64 = conv_bias_act_reference(x, w, b, r, relu=relu, upcast=True, **conv)
    bound = bound_of(conv_bias_act_reference(x, w, b, r, relu=relu, **conv), ref64, FP16)
    for name, o in (("cuda", out_c), ("triton", out_t)):
        assert rel_err(o, ref64) <= bound, (name, rel_err(o, ref64), bound)
    assert rel_err(out_c, out_t) <= 2 * bound


def leaf_copies(tensors, dtype=None):
    return [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_(True) for t in tensors]


@pytest.mark.parametrize("mode,fmt", [("fp16", CL), ("fp32", NCHW), ("tf32", CL)], ids=["fp16-cl", "fp32-nchw",
                                                                                     "tf32-cl"])
def test_conv_autograd_through_the_cuda_forward(mode, fmt):
    """rf.ops.conv_bias_act(backend="cuda"): gradients of x, weight, bias and residual vs float64 (the
    output gradient is zero where the pre-activation is within rounding of 0: see the docstring).
    TF32 gradients are held to PyTorch's fp16 gradients (the same 10-bit operands)."""
    dtype = PRECISION[mode]
    tensors, conv = make_conv(2, 32, (9, 9), 48, 3, 2, 1, 1, dtype=dtype, fmt=fmt, w_fmt=fmt, residual=True)
    x, w, b, r = tensors
    pre64 = conv_bias_act_reference(x, w, b, r, relu=False, upcast=True, **conv)
    g = torch.randn(pre64.shape, device=DEV, generator=gen(17))
    g = torch.where(pre64.abs() <= 0.02 * pre64.abs().mean(), 0.0, g)
    with cudnn_tf32(mode == "tf32"):
        ours, same, t64 = leaf_copies(tensors), leaf_copies(tensors), leaf_copies(tensors, FP64)
        out = conv_bias_act(*ours, **conv, backend="cuda")
        out.backward(g.to(out.dtype))
        conv_bias_act_reference(*same, **conv).backward(g.to(dtype))
        conv_bias_act_reference(*t64, **conv).backward(g.double())
    yard = same
    if mode == "tf32":
        yard = leaf_copies(tensors, FP16)
        conv_bias_act_reference(*yard, **conv).backward(g.to(FP16))
    for t, t64_, ys, nm in zip(ours, t64, yard, ["x", "weight", "bias", "residual"]):
        assert t.grad is not None and t.grad.dtype == t.dtype and t.grad.shape == t.shape, nm
        assert_close(t.grad, t64_.grad, ys.grad, name=f"grad {nm}", dtype=FP16 if mode == "tf32" else dtype)


# ========================================================================== modules
@pytest.fixture
def conv_calls(monkeypatch):
    """``(kernel name, expected CUTLASS prefix or None)`` of every library conv the package runs (eval
    and training), the name from ``conv_kernel_name`` on the very arguments."""
    calls = []
    real = torch.ops.resnet_fused_C

    class Spy:
        def __getattr__(self, name):
            return getattr(real, name)

        @staticmethod
        def _record(x, w, r, stride, padding, dilation, allow_tf32):
            calls.append((real.conv_kernel_name(x, w, r, stride, padding, dilation, allow_tf32),
                          cutlass_prefix(x, w, r, allow_tf32)))

        def conv_bias_act(self, x, w, b, r, stride, padding, dilation, relu, allow_tf32):
            self._record(x, w, r, stride, padding, dilation, allow_tf32)
            return real.conv_bias_act(x, w, b, r, stride, padding, dilation, relu, allow_tf32)

        def conv_bias_act_stats(self, x, w, b, r, stride, padding, dilation, relu, allow_tf32):
            self._record(x, w, r, stride, padding, dilation, allow_tf32)
            return real.conv_bias_act_stats(x, w, b, r, stride, padding, dilation, relu, allow_tf32)

    spy = Spy()
    monkeypatch.setattr(_ext, "extension", lambda: spy)
    monkeypatch.setattr(_ext_ops, "ops", lambda: spy)
    return calls


def assert_conv_calls(calls, tag=""):
    assert calls, f"{tag}no library conv ran"
    for i, (name, prefix) in enumerate(calls):
        assert_kernel(name, prefix, f"{tag}conv call {i}")


def _ds(cin, cout, stride):
    return nn.Sequential(R.conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))


# name: (pre-activation, reference block, our block (pre-activation only; post-activation blocks go
# through rf.convert), training input shape). Channels multiples of 8 (CUTLASS in 16-bit and TF32),
# tensors of 10^5..10^6 elements per layer (see the module docstring on ReLU masks).
BIG = {
    "basic-s2-ds": (False, lambda: R.BasicBlock(64, 128, 2, _ds(64, 128, 2)), None, (16, 64, 28, 28)),
    "bottleneck-identity": (False, lambda: R.Bottleneck(256, 64), None, (16, 256, 28, 28)),
    "bottleneck-s2-ds": (False, lambda: R.Bottleneck(256, 128, 2, _ds(256, 512, 2)), None, (16, 256, 28, 28)),
    "wide-s2-proj": (True, lambda: R.RefWideBasic(64, 128, 2), lambda: rf.WideBasic(64, 128, 2), (16, 64, 28, 28)),
    "preact-identity": (True, lambda: R.RefPreActBottleneck(256, 64), lambda: rf.PreActBottleneck(256, 64),
                        (16, 256, 14, 14)),
    "preact-s2-proj": (True, lambda: R.RefPreActBottleneck(256, 64, 2, R.conv1x1(256, 256, 2)),
                       lambda: rf.PreActBottleneck(256, 64, 2, R.conv1x1(256, 256, 2)), (16, 256, 28, 28)),
}
# tiny float32 cases of tests/test_train_blocks.py: odd channels, batch 1, 7x7 and 5x6 inputs,
# stride 2, dilation 2 (all on the fallback conv: odd channels, or IEEE float32)
SMALL = ["basic-s2-ds-batch1", "basic-ds-5x6", "bottle-s2-ds-batch1", "bottle-dilation2", "wide-proj-s2-batch1",
         "preact-proj-s2-batch1"]


def build_block(name, seed=0):
    """(ours pinned to "cuda", reference, preact, training input shape), one state, on the GPU.
    Post-activation blocks are torchvision-structured reference blocks put through rf.convert."""
    if name in SMALL:
        ours, ref = ttb.build(name, backend="cuda", seed=seed)
        return ours.to(DEV), ref.to(DEV), ttb.is_preact(name), tuple(ttb.make_x(name).shape)
    preact, make_ref, make_ours, shape = BIG[name]
    torch.manual_seed(seed)
    ref = randomize_bn(make_ref())
    if preact:
        ours = make_ours()
        ours.load_state_dict(ref.state_dict(), strict=True)
        ours.backend = "cuda"
    else:
        ours = rf.convert(copy.deepcopy(ref), backend="cuda")
        assert type(ours) in (rf.BasicBlock, rf.Bottleneck) and ours.backend == "cuda"
    return ours.to(DEV).train(), ref.to(DEV).train(), preact, shape


# ---------------------------------------------------------------------------------- eval
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("mode", ["fp16", "bf16", "fp32", "tf32"])
@pytest.mark.parametrize("block", list(BIG) + ["basic-s2-ds-batch1", "bottle-dilation2", "preact-proj-s2-batch1"])
def test_eval_block(block, mode, fmt, fused_calls, conv_calls):
    """Eval with BatchNorm folded: every conv one fused library call (CUTLASS where supported), the
    block against eager in the same precision and float64."""
    ours, ref, _, shape = build_block(block)
    x64 = torch.randn((4,) + shape[1:], dtype=FP64, device=DEV, generator=gen(2))
    with cudnn_tf32(mode == "tf32"):
        compare_models(ours, ref, x64, PRECISION[mode], fmt=fmt, name=f"{block} eval output")
    n_convs = sum(isinstance(m, nn.Conv2d) for m in ours.modules())
    assert fused_calls == ["cuda"] * n_convs, fused_calls
    assert len(conv_calls) == n_convs
    assert_conv_calls(conv_calls)


@pytest.mark.parametrize("mode", ["fp16", "bf16", "tf32"])
def test_convert_resnet50_eval(mode, fused_calls, conv_calls):
    """rf.convert(ResNet-50, backend="cuda"): same state_dict keys; 53 fused convs, CUTLASS but for
    the C = 3 stem; the model within 4x eager's same-precision error of float64, 2x3x224x224."""
    torch.manual_seed(0)
    state = calibrate(R.resnet50(), 224)
    ref = R.resnet50()
    ref.load_state_dict(state, strict=True)
    ours = rf.convert(copy.deepcopy(ref), backend="cuda")
    assert sum(type(m) is rf.Bottleneck for m in ours.modules()) == 16
    assert list(ours.state_dict()) == list(state)
    x64 = torch.randn(2, 3, 224, 224, dtype=FP64, device=DEV, generator=gen(3))
    with cudnn_tf32(mode == "tf32"):
        compare_models(ours, ref, x64, PRECISION[mode])
    assert fused_calls == ["cuda"] * 53
    assert len(conv_calls) == 53 and conv_calls[0][0].startswith("fallback"), conv_calls[:2]
    assert sum(name.startswith("cutlass_") for name, _ in conv_calls) == 52
    assert_conv_calls(conv_calls)


@pytest.mark.parametrize("net", ["wrn-16-4-fp16", "preact-resnet164-bf16"])
def test_cifar_networks_eval(net, fused_calls, conv_calls):
    """The pre-activation networks pinned to "cuda" (bn_act for the first BN + ReLU of each block,
    fused convs for the rest) vs their plain references, 2x3x32x32."""
    torch.manual_seed(0)
    if net.startswith("wrn"):
        ref, ours, dtype = R.ref_wrn(16, 4), rf.models.wrn(16, 4, backend="cuda"), FP16
    else:
        ref, ours, dtype = R.ref_preact_resnet(164), rf.models.preact_resnet(164, backend="cuda"), BF16
    state = calibrate(ref, 32)
    ours.load_state_dict(state, strict=True)
    compare_models(ours, ref, torch.randn(2, 3, 32, 32, dtype=FP64, device=DEV, generator=gen(4)), dtype)
    assert fused_calls and set(fused_calls) == {"cuda"}
    assert_conv_calls(conv_calls)


# ------------------------------------------------------------------------------ training
def autocast_for(mode):
    return torch.autocast(DEV, dtype=PRECISION[mode]) if mode in ("fp16", "bf16") else contextlib.nullcontext()


def fwd_bwd(model, x, g, mode, dtype=FP32):
    """``(out, x.grad)`` of one forward + backward of ``sum(out * g)`` in ``mode``'s precision."""
    xi = x.detach().to(dtype).requires_grad_()
    with autocast_for(mode):
        out = model(xi)
    (out * g.to(torch.promote_types(out.dtype, FP32))).sum().backward()
    return out.detach(), xi.grad


def loss_grad(shape, rng):
    """The gradient of the loss ``sum(out * g)``: random, scaled by 1/sqrt(values per channel) so
    that a BN beta's gradient (a sum over the batch) is O(1) and an SGD step moves it by O(lr)
    whatever the batch (unscaled, a block whose output has no BN after it blows up within steps)."""
    return torch.randn(shape, device=DEV, generator=rng) * (shape[1] / math.prod(shape)) ** 0.5


def load_params(models, truth):
    with torch.no_grad():
        for m in models:
            for n, p in m.named_parameters():
                p.copy_(truth[n])
                p.grad = None


def train_steps(ours, ref, preact, shape, fmt, mode, steps=3, twin=None, calls=None, tag=""):
    """``steps`` training steps of ``ours`` (and of ``twin``, the same block on the Triton backend)
    against eager ``ref`` in ``mode``'s precision and a float64 copy: output (dtype, layout, values),
    x.grad, every parameter gradient, running statistics, ``num_batches_tracked``.

    Before each step every model takes the float64 reference's parameters (rounded), and only the
    reference takes the SGD step: each step is judged from one state (models stepped on their own
    drift apart by rounding). Buffers are never copied: each model's running statistics and
    ``num_batches_tracked`` are its own updates. TF32: the forward yardstick is the worse of eager
    TF32 and a TF32-emulated float64 model, the gradients' the worse of eager TF32 and eager fp16 AMP.
    """
    tf32_on = mode == "tf32"
    floor_dt = {"fp16": FP16, "bf16": BF16, "fp32": FP32, "tf32": FP16}[mode]
    fused = [("cuda", ours.to(memory_format=fmt))]
    if twin is not None:
        fused.append(("triton", twin.to(memory_format=fmt)))
    eager = copy.deepcopy(ref).to(memory_format=fmt)
    amp = copy.deepcopy(ref).to(memory_format=fmt) if tf32_on else None
    ref64 = copy.deepcopy(ref).double()
    opt = torch.optim.SGD(ref64.parameters(), lr=0.05, momentum=0.9)
    rng = gen(1)
    for step in range(steps):
        t = f"{tag}step {step}: "
        truth = dict(ref64.named_parameters())
        load_params([m for _, m in fused] + [eager] + ([amp] if amp is not None else []), truth)
        ref64.zero_grad(set_to_none=True)
        emu = tf32_emulated(ref64) if tf32_on else None  # copied before ref64's forward moves its buffers
        x = torch.randn(shape, device=DEV, generator=rng).contiguous(memory_format=fmt)
        first_call = len(calls) if calls is not None else 0
        results, g = {}, None
        with cudnn_tf32(tf32_on):
            for name, m in fused:
                xi = x.clone().requires_grad_()
                with autocast_for(mode):
                    out = m(xi)
                if g is None:
                    g = loss_grad(out.shape, rng)
                (out * g.to(torch.promote_types(out.dtype, FP32))).sum().backward()
                results[name] = (out.detach(), xi.grad)
                if name == "cuda" and calls is not None:
                    assert_conv_calls(calls[first_call:], tag=t)
            out_e, dx_e = fwd_bwd(eager, x, g, mode)
            out_64, dx_64 = fwd_bwd(ref64, x, g, "fp32", FP64)
            if tf32_on:
                out_a, dx_a = fwd_bwd(amp, x, g, "fp16")
                with torch.no_grad():
                    out_emu = emu(x.double())
        p_e, p_64 = dict(eager.named_parameters()), dict(ref64.named_parameters())
        b_e, b_64 = dict(eager.named_buffers()), dict(ref64.named_buffers())
        p_a = dict(amp.named_parameters()) if tf32_on else {}
        b_emu = dict(emu.named_buffers()) if tf32_on else {}
        yard_out = worse(out_64, out_e, out_emu) if tf32_on else out_e
        yard_dx = worse(dx_64, dx_e, dx_a) if tf32_on else dx_e

        def yard_p(n):
            return worse(p_64[n].grad, p_e[n].grad, p_a[n].grad) if tf32_on else p_e[n].grad

        def yard_b(n):
            return worse(b_64[n], b_e[n], b_emu[n]) if tf32_on else b_e[n]

        # torchvision's post-activation blocks end with ``out += identity``: the autocast dtype
        want_dtype = out_e.dtype if preact else PRECISION[mode]
        for name, m in fused:
            tn = f"{t}{name}: "
            out, dx = results[name]
            assert out.dtype == want_dtype, f"{tn}output dtype {out.dtype}, eager's rule gives {want_dtype}"
            assert out.is_contiguous(memory_format=fmt), f"{tn}output lost the input's layout: {out.stride()}"
            assert_close(out, out_64, yard_out, name=tn + "output", dtype=floor_dt)
            assert dx.dtype == FP32
            assert_close(dx, dx_64, yard_dx, name=tn + "x.grad", dtype=floor_dt)
            for n, p in m.named_parameters():
                assert p.grad is not None and p.grad.dtype == p.dtype, f"{tn}{n}.grad"
                assert_close(p.grad, p_64[n].grad, yard_p(n), name=f"{tn}{n}.grad", dtype=floor_dt)
            for n, b in m.named_buffers():
                if n.endswith("num_batches_tracked"):
                    assert int(b) == int(b_e[n]) == step + 1, f"{tn}{n} = {int(b)}, eager {int(b_e[n])}"
                else:
                    assert_close(b, b_64[n], yard_b(n), name=f"{tn}{n}", dtype=floor_dt)
        if twin is not None:  # the two backends within their combined error of each other
            (oc, dc), (ot, dt_) = results["cuda"], results["triton"]
            pairs_ = [("output", oc, ot, yard_out, out_64), ("x.grad", dc, dt_, yard_dx, dx_64)]
            pt = dict(twin.named_parameters())
            pairs_ += [(f"{n}.grad", p.grad, pt[n].grad, yard_p(n), p_64[n].grad) for n, p in ours.named_parameters()]
            bt = dict(twin.named_buffers())
            pairs_ += [(n, b, bt[n], yard_b(n), b_64[n]) for n, b in ours.named_buffers()
                       if not n.endswith("num_batches_tracked")]
            for what, a, b, yard, r64 in pairs_:
                combined = 2 * bound_of(yard, r64, floor_dt)
                assert rel_err(a, b) <= combined, \
                    f"{t}{what}: cuda vs triton differ by {rel_err(a, b):.3e} > {combined:.3e}"
        opt.step()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("mode", ["fp16", "bf16", "tf32"])
@pytest.mark.parametrize("block", list(BIG))
def test_train_block(block, mode, fmt, fused_train_calls, conv_calls):
    """3 SGD steps of every block kind, fused on the cuda backend, against eager and float64: AMP
    fp16 / bf16 (autocast, float32 parameters and input) and float32 with TF32, both layouts
    (channels_last: CUTLASS; NCHW: the fallback)."""
    ours, ref, preact, shape = build_block(block)
    train_steps(ours, ref, preact, shape, fmt, mode, calls=conv_calls)
    assert fused_train_calls == [preact] * 3, "the block did not train through the fused path"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", SMALL)
def test_train_small_block_fp32(case, fmt, fused_train_calls, conv_calls):
    """IEEE float32 (TF32 off) on tiny awkward blocks: odd channels, batch 1, 7x7 / 5x6 inputs,
    stride 2, dilation 2."""
    ours, ref, preact, shape = build_block(case)
    train_steps(ours, ref, preact, shape, fmt, "fp32", calls=conv_calls)
    assert fused_train_calls == [preact] * 3


@pytest.mark.parametrize("block", ["bottleneck-s2-ds", "preact-s2-proj"])
def test_train_cuda_and_triton_agree(block, fused_train_calls):
    """The same block on both backends, AMP fp16 channels_last: each against eager and float64, and
    the two within their combined error (twice the bound each must meet) of each other."""
    ours, ref, preact, shape = build_block(block)
    twin = copy.deepcopy(ours)
    twin.backend = "triton"
    train_steps(ours, ref, preact, shape, CL, "fp16", twin=twin)
    assert fused_train_calls == [preact] * 6


@pytest.mark.parametrize("block,mode,fmt", [("bottleneck-s2-ds", "fp16", CL), ("bottle-s2-ds-batch1", "fp32", NCHW)],
                         ids=["big-fp16-cl", "small-fp32-nchw"])
def test_low_memory_mode(block, mode, fmt, fused_train_calls, conv_calls):
    """Low-memory mode on the cuda backend: conv3's output is not kept (exactly its bytes fewer
    saved) but recomputed in the backward (one more library conv); the same forward bit for bit and
    the same gradients as the default mode; 3 SGD steps against eager and float64."""
    ours, ref, preact, shape = build_block(block)
    low = copy.deepcopy(ours)
    x = torch.randn(shape, device=DEV, generator=gen(5)).contiguous(memory_format=fmt)
    ours.to(memory_format=fmt)
    low.to(memory_format=fmt)
    runs = {}
    with cudnn_tf32(False):
        for name, m, enabled in (("default", ours, False), ("low", low, True)):
            first = len(conv_calls)
            xi = x.clone().requires_grad_()
            with rf.use_low_memory(enabled), autocast_for(mode):
                seen, out = _saved_activations(m, xi)
                saved = sum(seen.values())
            g = torch.randn(out.shape, device=DEV, generator=gen(6))
            (out * g.to(torch.promote_types(out.dtype, FP32))).sum().backward()
            runs[name] = (saved, out.detach(), xi.grad, len(conv_calls) - first)
    (s_d, o_d, dx_d, n_d), (s_l, o_l, dx_l, n_l) = runs["default"], runs["low"]
    assert n_l == n_d + 1, f"library convs: {n_d} default, {n_l} low-memory (conv3 recomputed once)"
    assert s_d - s_l == o_d.numel() * o_d.element_size(), f"saved bytes: default {s_d}, low-memory {s_l}"
    assert torch.equal(o_l, o_d), "low-memory mode changed the forward"
    for (n, b), (_, b_l) in zip(ours.named_buffers(), low.named_buffers()):
        assert torch.equal(b, b_l), f"{n} differs between the modes"
    tol = 1e-5 if mode == "fp32" else 1e-3  # cuDNN's weight gradient may sum in another order
    assert rel_err(dx_l, dx_d) <= tol
    for (n, p), (_, p_l) in zip(ours.named_parameters(), low.named_parameters()):
        assert rel_err(p_l.grad, p.grad) <= tol, f"{n}.grad: low-memory vs default {rel_err(p_l.grad, p.grad):.3e}"
    assert fused_train_calls == [preact] * 2
    fresh, ref2, _, _ = build_block(block, seed=1)
    with rf.use_low_memory(True):
        train_steps(fresh, ref2, preact, shape, fmt, mode, calls=conv_calls, tag="low-memory ")
    assert fused_train_calls == [preact] * 5


# ============================================================= torch.compile, CUDA graphs
def test_compile_inductor_fullgraph_amp_bottleneck():
    """``torch.compile(fullgraph=True)`` (Inductor) of an AMP fp16 channels_last training Bottleneck
    on the cuda backend (CUTLASS convs with statistics, the ops' fakes): two steps, against eager
    and float64, against the uncompiled block (Inductor may fuse the glue between the library's ops
    differently: to fp16 rounding), and its running statistics / ``num_batches_tracked``."""
    ours, ref, _, shape = build_block("bottleneck-s2-ds")
    ours.to(memory_format=CL)
    ref.to(memory_format=CL)
    uncompiled = copy.deepcopy(ours)
    eager, ref64 = copy.deepcopy(ref), copy.deepcopy(ref).double()
    torch._dynamo.reset()
    compiled = torch.compile(ours, fullgraph=True)
    opt = torch.optim.SGD(ref64.parameters(), lr=0.05, momentum=0.9)
    rng = gen(1)
    tight = 1e-3
    try:
        with cudnn_tf32(False):
            for step in range(2):
                t = f"step {step}: "
                load_params((ours, uncompiled, eager), dict(ref64.named_parameters()))
                ref64.zero_grad(set_to_none=True)
                x = torch.randn(shape, device=DEV, generator=rng).contiguous(memory_format=CL)
                xi = x.clone().requires_grad_()
                with autocast_for("fp16"):
                    out = compiled(xi)
                g = loss_grad(out.shape, rng)
                (out * g.to(FP32)).sum().backward()
                out_u, dx_u = fwd_bwd(uncompiled, x, g, "fp16")
                out_e, dx_e = fwd_bwd(eager, x, g, "fp16")
                out_64, dx_64 = fwd_bwd(ref64, x, g, "fp32", FP64)
                assert out.dtype == FP16 and out.is_contiguous(memory_format=CL), (out.dtype, out.stride())
                for what, c_, u, e, r64 in (("output", out, out_u, out_e, out_64),
                                            ("x.grad", xi.grad, dx_u, dx_e, dx_64)):
                    assert_close(c_, r64, e, name=t + "compiled " + what, dtype=FP16)
                    assert rel_err(c_, u) <= tight, f"{t}{what}: compiled vs uncompiled {rel_err(c_, u):.3e}"
                pu, pe, p64 = (dict(m.named_parameters()) for m in (uncompiled, eager, ref64))
                for n, p in ours.named_parameters():
                    assert p.grad is not None, f"{t}{n}: no gradient through the compiled block"
                    assert_close(p.grad, p64[n].grad, pe[n].grad, name=f"{t}compiled {n}.grad", dtype=FP16)
                    assert rel_err(p.grad, pu[n].grad) <= tight, f"{t}{n}.grad: compiled vs uncompiled"
                bu, be, b64 = (dict(m.named_buffers()) for m in (uncompiled, eager, ref64))
                for n, b in ours.named_buffers():
                    if n.endswith("num_batches_tracked"):
                        assert int(b) == int(bu[n]) == int(be[n]) == step + 1, f"{t}{n} = {int(b)}"
                    else:
                        assert_close(b, b64[n], be[n], name=f"{t}compiled {n}", dtype=FP16)
                        assert rel_err(b, bu[n]) <= tight, f"{t}{n}: compiled vs uncompiled"
                opt.step()
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("dtype", [FP32, FP16], ids=["fp32-fallback", "fp16-cutlass"])
def test_cuda_graph_capture_training_step(dtype, fused_train_calls, conv_calls):
    """Forward + backward of a fused Bottleneck (ResNet-50 layer1.0: 64 -> 256 with downsample,
    channels_last) on the cuda backend captured once, replayed twice on new data; each replay equals
    the same step run uncaptured from the same state (outputs, x.grad, every parameter gradient,
    running statistics, ``num_batches_tracked`` advancing by one per replay). float32 (TF32 off)
    runs the fallback conv, float16 (a half model, no autocast) CUTLASS."""
    want = "cutlass_sm80_f16_" if dtype == FP16 else "fallback: float32 without TF32"

    def captured_the_expected_conv():
        assert conv_calls and all(name.startswith(want) for name, _ in conv_calls), conv_calls[:4]

    tol = 1e-5 if dtype == FP32 else 1e-3  # cuDNN's weight gradient may sum in another order
    check_graph_capture("cuda", fused_train_calls, dtype=dtype, tol=tol, after_capture=captured_the_expected_conv)


# ============================================================== bad input, no side effects
@pytest.mark.parametrize("block", ["bottleneck-s2-ds", "preact-s2-proj", "wide-s2-proj"])
def test_bad_input_raises_before_any_statistic_moves(block, fused_train_calls):
    """Wrong channels, dtype, rank, device, a batch a BatchNorm cannot normalise: ValueError /
    TypeError naming the input, and not one running statistic or counter changed."""
    ours, _, preact, shape = build_block(block)
    n, c = 2, shape[1]
    x = torch.randn(n, c, 8, 8, device=DEV, generator=gen(7))
    bad = {
        "wrong-channels": (ValueError, torch.randn(n, c + 1, 8, 8, device=DEV)),
        "float64": (TypeError, x.double()),
        "float16-no-autocast": (TypeError, x.half()),
        "int": (TypeError, x.long()),
        "3-D": (ValueError, x[0]),
        "batch1-1x1": (ValueError, torch.randn(1, c, 1, 1, device=DEV)),
        "batch1-2x2-stride2": (ValueError, torch.randn(1, c, 2, 2, device=DEV)),  # the BN after the stride
        "on-the-cpu": (ValueError, x.cpu()),
        "not-a-tensor": (TypeError, x.cpu().numpy()),
    }
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    for what, (exc, bad_x) in bad.items():
        with pytest.raises(exc, match="input x"):
            ours(bad_x)
        for k, v in ours.state_dict().items():
            assert torch.equal(v, before[k]), f"{what}: {k} changed before the error"
        assert fused_train_calls == [], what
    ours(x)  # a good input trains through the fused path and moves the counters by one
    assert fused_train_calls == [preact]
    assert int(ours.bn1.num_batches_tracked) == int(before["bn1.num_batches_tracked"]) + 1
