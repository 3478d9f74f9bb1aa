"""The compiled library's C++ kernels (the "cuda" backend on CPU tensors), op by op, against float64.

Each op of ``torch.ops.resnet_fused_C`` is compared with the same formula evaluated in float64 on the
same (rounded) inputs; our error is judged against the rounding of the output dtype (one rounding
of the exact result) or, for reductions, a float32 accumulation bound. Mask bits are compared with
``!(z <= 0)`` of the float64 pre-activation wherever z is not within rounding of 0.
Layouts: NCHW and channels_last; odd channel counts, 1x1 and 7x7 spatial, batch 1.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from utils import EXT_ERROR

pytestmark = pytest.mark.skipif(EXT_ERROR is not None, reason=f"the compiled library is unavailable: {EXT_ERROR}")

CL, NCHW = torch.channels_last, torch.contiguous_format
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}
SHAPES = [(2, 5, 7, 7), (1, 16, 1, 1), (3, 24, 5, 3), (2, 7, 4, 4)]
VARIANTS = ["bn-relu", "bn", "bias-relu", "bn-res-relu", "bn-dualbn-relu"]


def C():
    from resnet_fused import _ext

    return _ext.extension()


def vec(c, lo=-1.0, hi=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(c, generator=g) * (hi - lo) + lo


def act(shape, dtype, fmt, seed=0, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale + shift).to(dtype).contiguous(memory_format=fmt)


def variant_args(variant, y, r_dtype):
    """(mean, scale, shift, r, r_mean, r_scale, r_shift, relu) for one variant."""
    c = y.shape[1]
    mean = None if variant == "bias-relu" else vec(c, seed=1)
    scale, shift = vec(c, 0.5, 1.5, seed=2), vec(c, seed=3)
    r = r_mean = r_scale = r_shift = None
    if "res" in variant or "dual" in variant:
        r = act(y.shape, r_dtype, CL if y.is_contiguous(memory_format=CL) and not y.is_contiguous() else NCHW, seed=4)
    if "dual" in variant:
        r_mean, r_scale, r_shift = vec(c, seed=5), vec(c, 0.5, 1.5, seed=6), vec(c, seed=7)
    return mean, scale, shift, r, r_mean, r_scale, r_shift, variant.endswith("relu")


def z64(y, mean, scale, shift, r, r_mean, r_scale, r_shift):
    """The pre-activation in float64, broadcasting [C] vectors."""
    v = lambda t: t.double().view(1, -1, 1, 1)  # noqa: E731
    z = (y.double() - (v(mean) if mean is not None else 0.0)) * v(scale) + v(shift)
    if r is not None:
        z = z + ((r.double() - (v(r_mean) if r_mean is not None else 0.0)) * v(r_scale) + v(r_shift)
                 if r_scale is not None else r.double())
    return z


def mask_bits(z):
    """Reference bits in memory order: bit i%8 of byte i/8 set where !(z <= 0)."""
    flat = (~(z <= 0)).permute(*((0, 2, 3, 1) if z.is_contiguous(memory_format=CL) else (0, 1, 2, 3))).reshape(-1)
    pad = (-flat.numel()) % 8
    bits = torch.cat([flat, flat.new_zeros(pad)]).view(-1, 8).to(torch.uint8)
    return (bits << torch.arange(8, dtype=torch.uint8)).sum(1).to(torch.uint8)


# ------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("fmt", [NCHW, CL], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bn_act_forward(shape, variant, dtype, fmt):
    y = act(shape, dtype, fmt)
    args = variant_args(variant, y, dtype)
    out, mask = C().bn_act(y, *args, dtype, True)
    z = z64(y, *args[:7])
    want = torch.where(z < 0, torch.zeros_like(z), z) if args[7] else z
    assert out.dtype == dtype and out.is_contiguous(memory_format=fmt)
    err = (out.double() - want).abs()
    assert (err <= EPS[dtype] * want.abs() + 1e-6).all(), f"worst {err.max():.3e}"
    if args[7]:
        got = torch.stack([(mask >> i) & 1 for i in range(8)], 1).reshape(-1)[:z.numel()].bool()
        want_bits = torch.stack([(mask_bits(z) >> i) & 1 for i in range(8)], 1).reshape(-1)[:z.numel()].bool()
        zf = z.contiguous(memory_format=fmt).permute(*((0, 2, 3, 1) if fmt == CL else (0, 1, 2, 3))).reshape(-1)
        clear = zf.abs() > 1e-5 * (1 + zf.abs())  # away from zero: float32 z decides the same way
        assert torch.equal(got[clear], want_bits[clear])
        if mask.numel() * 8 > z.numel():  # trailing bits are zero
            assert mask[-1] >> (z.numel() % 8 or 8) == 0
    else:
        assert mask.numel() == 0


def test_bn_act_mixed_dtypes_and_nonfinite():
    """y fp16, residual fp32, output fp32 (autocast's mix); NaN and +-Inf pass as in PyTorch."""
    y = act((2, 6, 3, 3), torch.float16, CL)
    y[0, 1, 1, 1], y[1, 2, 0, 0], y[1, 3, 2, 2] = float("nan"), float("inf"), float("-inf")
    args = variant_args("bn-res-relu", y, torch.float32)
    out, _ = C().bn_act(y, *args, torch.float32, False)
    z = z64(y, *args[:7])
    want = torch.where(z < 0, torch.zeros_like(z), z)
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-6, equal_nan=True)
    assert out[0, 1, 1, 1].isnan() and out[1, 2, 0, 0] == float("inf") and out[1, 3, 2, 2] == 0


@pytest.mark.parametrize("fmt", [NCHW, CL], ids=["nchw", "cl"])
def test_relu_mask_backward(fmt):
    y = act((2, 5, 3, 3), torch.float32, fmt)
    args = variant_args("bn-relu", y, torch.float32)
    _, mask = C().bn_act(y, *args, torch.float32, True)
    g = act(y.shape, torch.float32, fmt, seed=9)
    z = z64(y, *args[:7])
    got = C().relu_mask_backward(g, mask, fmt == CL)
    assert torch.equal(got, torch.where(z <= 0, torch.zeros_like(g), g))


# ------------------------------------------------------------------------------------ backward
@pytest.mark.parametrize("fmt", [NCHW, CL], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("res", ["none", "identity", "bn"])
def test_bn_backward_matches_autograd(res, dtype, fmt):
    """The two-pass backward of relu(bn(y) + R) with batch statistics against float64 autograd."""
    shape, eps = (3, 7, 5, 5), 1e-5
    y = act(shape, dtype, fmt, scale=2.0, shift=0.5)
    r = act(shape, dtype, fmt, seed=4) if res != "none" else None
    w, b, rw, rb = vec(7, 0.5, 1.5, 1), vec(7, seed=2), vec(7, 0.5, 1.5, 3), vec(7, seed=4)

    def forward(yy, rr, ww, bb, rww, rbb):
        out = F.batch_norm(yy, None, None, ww, bb, True, 0.0, eps)
        if rr is not None:
            out = out + (F.batch_norm(rr, None, None, rww, rbb, True, 0.0, eps) if res == "bn" else rr)
        return torch.relu(out)

    leaves = [t.double().requires_grad_() for t in (y, r if r is not None else y, w, b, rw, rb)]
    out64 = forward(leaves[0], leaves[1] if r is not None else None, *leaves[2:])
    g = act(shape, dtype, fmt, seed=8)
    out64.backward(g.double())
    # our kernels, fed the statistics as the fused block computes them
    cnt, anc, mo, m2 = C().channel_stats(y)
    mean, var, scale, shift, invstd = C().bn_finalize(cnt, anc, mo, m2, w, b, eps)
    rv = (None, None, None)
    if res == "bn":
        rc, ra, rmo, rm2 = C().channel_stats(r)
        r_mean, _, r_scale, r_shift, r_inv = C().bn_finalize(rc, ra, rmo, rm2, rw, rb, eps)
        rv = (r_mean, r_scale, r_shift)
    s_g, s_gy, s_gr = C().bn_act_bwd_reduce(g, y, mean, scale, shift, r, *rv)
    n = float(y.numel() // y.shape[1])
    k2, k3 = -scale * invstd * invstd * s_gy / n, -scale * s_g / n
    rk2 = rk3 = None
    if res == "bn":
        rk2, rk3 = -r_scale * r_inv * r_inv * s_gr / n, -r_scale * s_g / n
    dy, dr = C().bn_act_bwd_apply(g, y, mean, scale, shift, k2, k3, r, *rv, rk2, rk3, dtype)
    tol = 50 * EPS[dtype]
    ref_dy = leaves[0].grad
    assert ((dy.double() - ref_dy).norm() / ref_dy.norm()) < tol
    torch.testing.assert_close((invstd * s_gy).double(), leaves[2].grad, rtol=tol, atol=tol)  # dgamma
    torch.testing.assert_close(s_g.double(), leaves[3].grad, rtol=tol, atol=tol)  # dbeta
    if r is not None:
        ref_dr = leaves[1].grad
        assert dr.dtype == dtype and ((dr.double() - ref_dr).norm() / ref_dr.norm()) < tol
    if res == "bn":
        torch.testing.assert_close((r_inv * s_gr).double(), leaves[4].grad, rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------- statistics
@pytest.mark.parametrize("fmt", [NCHW, CL], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES + [(64, 3, 17, 13)], ids=lambda s: "x".join(map(str, s)))
def test_channel_stats(shape, dtype, fmt):
    x = act(shape, dtype, fmt, scale=3.0, shift=1.0)
    cnt, anc, mo, m2 = C().channel_stats(x)
    x64 = x.double()
    n = x64.numel() // shape[1]
    assert cnt.item() == n
    mean64 = x64.mean(dim=(0, 2, 3))
    m2_64 = ((x64 - mean64.view(1, -1, 1, 1)) ** 2).sum(dim=(0, 2, 3))
    torch.testing.assert_close(anc.double() + mo.double(), mean64, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m2.double(), m2_64, rtol=1e-5, atol=1e-5)


def test_channel_stats_cancellation_trap():
    """|mean| >> std: a plain float32 sum of squares loses every digit; ours keeps float32 accuracy."""
    g = torch.Generator().manual_seed(0)
    x = (1e4 + 1e-2 * torch.randn(8, 6, 16, 16, generator=g)).contiguous(memory_format=CL)
    cnt, anc, mo, m2 = C().channel_stats(x)
    x64 = x.double()
    var64 = x64.var(dim=(0, 2, 3), unbiased=False)
    var = m2.double() / cnt.double()
    assert ((var - var64).abs() / var64).max() < 1e-4
    torch.testing.assert_close(anc.double() + mo.double(), x64.mean(dim=(0, 2, 3)), rtol=1e-9, atol=1e-6)


def test_reductions_independent_of_thread_count():
    x = act((16, 12, 9, 9), torch.float32, CL, scale=2.0, shift=3.0)
    g = act(x.shape, torch.float32, CL, seed=5)
    args = variant_args("bn-relu", x, torch.float32)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append((*C().channel_stats(x), *C().bn_act_bwd_reduce(g, x, *args[:3], None, None, None, None)))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_bn_finalize_formula():
    c = 9
    cnt = torch.tensor([37.0])
    anc, mo, m2 = vec(c, seed=1), vec(c, seed=2) * 0.1, vec(c, 0.5, 4.0, seed=3)
    w, b = vec(c, 0.5, 1.5, seed=4), vec(c, seed=5)
    mean, var, scale, shift, invstd = C().bn_finalize(cnt, anc, mo, m2, w, b, 1e-3)
    var64 = m2.double() / 37.0
    inv64 = 1.0 / torch.sqrt(var64 + 1e-3)
    torch.testing.assert_close(mean.double(), anc.double() + mo.double(), rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(var.double(), var64, rtol=1e-6, atol=0)
    torch.testing.assert_close(invstd.double(), inv64, rtol=1e-6, atol=0)
    torch.testing.assert_close(scale.double(), w.double() * inv64, rtol=1e-6, atol=0)
    assert torch.equal(shift, b)
    _, _, scale1, shift0, _ = C().bn_finalize(cnt, anc, mo, m2, None, None, 1e-3)
    assert torch.equal(scale1, invstd) and torch.equal(shift0, torch.zeros(c))
    empty = C().bn_finalize(torch.zeros(1), anc, mo, torch.zeros(c), w, b, 1e-3)
    assert empty[1].isnan().all()  # 0 / 0, as torch.var of nothing


def test_empty_inputs():
    y = torch.empty(0, 4, 3, 3)
    s = torch.ones(4)
    out, mask = C().bn_act(y, None, s, s, None, None, None, None, True, torch.float32, True)
    assert out.shape == y.shape and mask.numel() == 0
    cnt, anc, mo, m2 = C().channel_stats(y)
    assert cnt.item() == 0 and not anc.any() and not mo.any() and not m2.any()
    assert all(not t.any() for t in C().bn_act_bwd_reduce(y, y, s, s, s, None, None, None, None))
