"""The ``"cuda"`` backend's BatchNorm ops (``torch.ops.resnet_fused_C``): ``bn_act`` (BN + ReLU,
no ReLU, identity residual, residual with its own BN, eval form without mean; mixed dtypes and
layouts; C multiple of 8 and odd, odd H*W, 1x1 spatial, data at odd storage offsets), its packed
ReLU mask bit for bit against ``!(z <= 0)`` on exactly representable data with many z == 0, NaN and
+-Inf; ``relu_mask_backward``; the two-pass BN backward against autograd of ``F.batch_norm`` in
float64, deterministic; agreement of all of them with the Triton ops.

On a real GPU only (``-m gpu``; skipped without CUDA). When the library cannot run CUDA tensors
here (not built, no nvcc or CUTLASS, built for another torch...) the whole module skips with the
loader's own reason (the ``cuda_library`` fixture of conftest.py). Shared helpers: tests/utils.py.

Every result is judged as in the rest of the suite (``utils.assert_close``): against a float64
reference, at most 4x PyTorch's own error in the same precision plus the dtype's floor, with NaN and
Inf exactly where the reference has them. Element-wise ops are held to float32 math rounded once to
the output dtype (PyTorch's same-precision run is no fair yardstick there).

ReLU masks. Where a pre-activation lies within rounding of 0, float32 and float64 may disagree on
its sign, and one flipped mask element moves a gradient by O(1): a coin toss for any float32
implementation, PyTorch's included. Op tests therefore zero the incoming gradient at such elements
(or leave them out of a bit-for-bit mask check); block training tests use either tiny tensors in
float32 (no element that close to 0) or, in 16-bit / TF32 precision, tensors large enough that
flips are many on both sides and errors compare as statistics, never one lucky draw.
"""
from __future__ import annotations

import math

import pytest
import torch

import resnet_fused.ops.bn_train  # noqa: F401 - registers the Triton resnet_fused::bn_relu_* ops
from utils import (BF16, CL, DIMS, DTYPE_PARAMS, FLOOR, FORMAT_PARAMS, FP16, FP32, FP64, GPU_DEV, NCHW, assert_close,
                   at_offset, bn_relu_train_grads, bound_of, fmt_of, gen, is_cl, poison_next, rel_err)

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("cuda_library")]

DEV, DTYPES, FORMATS, V = GPU_DEV, DTYPE_PARAMS, FORMAT_PARAMS, (1, -1, 1, 1)
C = torch.ops.resnet_fused_C  # C: the library, loaded by the cuda_library fixture before any test uses it
T = torch.ops.resnet_fused  # the Triton training ops, same signatures


def mem_order(t: torch.Tensor, cl: bool) -> torch.Tensor:
    """t's elements in the memory order of an NCHW (cl False) or channels_last (cl True) tensor."""
    return (t.permute(0, 2, 3, 1) if cl else t).reshape(-1)


def unpack_bits(mask: torch.Tensor, numel: int):
    """(bit i of the packed mask for i < numel, the trailing bits): bit i % 8 of byte i // 8."""
    shifts = torch.arange(8, device=mask.device, dtype=torch.int32)
    bits = ((mask.to(torch.int32).unsqueeze(1) >> shifts) & 1).reshape(-1).bool()
    return bits[:numel], bits[numel:]


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
    want = bn_relu_train_grads(g, y, params, r, rparams, res, eps, FP64)
    same = bn_relu_train_grads(g, y, params, r, rparams, res, eps, FP32)
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
