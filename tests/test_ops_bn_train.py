"""The fused BN training ops against float64 references: the BN + (residual) + ReLU apply
(``bn_relu_apply``), its two-pass backward, the running-statistics update, and empty inputs. The
statistics conv and the statistics partials: tests/test_ops_conv_train.py.

Every result is judged against PyTorch's own error in the same dtype (``utils.assert_close``).
Statistics are those of the conv output *as stored*, so they are checked against the float64
statistics of the kernel's own output (``utils.check_stats``). On a CPU machine the Triton kernels
run through Triton's interpreter (conftest.py sets TRITON_INTERPRET=1), so shapes stay tiny.
"""
import pytest
import torch
from torch import nn

import resnet_fused.ops.bn_train  # noqa: F401 - registers the resnet_fused::bn_relu_* custom ops
from resnet_fused.ops.batch_stats import bn_affine, channel_stats_partials, finalize, merge_partials, update_running_stats
from utils import BN_SHAPE, DEVICE, INTERPRET, assert_close, bn_relu_train_grads, make_bn_case, rel_err, vec_stats

ops = torch.ops.resnet_fused

pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not INTERPRET, reason="Triton on CPU needs TRITON_INTERPRET=1")

CL = torch.channels_last
NCHW = torch.contiguous_format


# =========================================================================== bn_relu_apply
def apply_reference(y, vecs, r, rvecs, out_dtype, upcast):
    """relu((y - mean) * scale + shift + R): float64 with ``upcast``, else PyTorch's own way (fp32
    vectors promote y to fp32; one rounding to out_dtype)."""
    cast = (lambda t: t.double()) if upcast else (lambda t: t)
    v = (1, -1, 1, 1)

    def bn(t, mean, scale, shift):
        return (cast(t) - cast(mean).view(v)) * cast(scale).view(v) + cast(shift).view(v)

    z = bn(y, *vecs)
    if r is not None:
        z = z + (cast(r) if rvecs[0] is None else bn(r, *rvecs))
    out = torch.relu(z)
    return out if upcast else out.to(out_dtype)


@pytest.mark.parametrize("fmt", [NCHW, CL], ids=["nchw", "cl"])
@pytest.mark.parametrize("res", [0, 1, 2], ids=["res0", "res1_identity", "res2_bn"])
def test_bn_relu_apply(res, fmt, poisoned_empty):
    y, vecs, r, rvecs = make_bn_case(res, fmt=fmt)
    out = ops.bn_relu_apply(y, *vecs, r, *rvecs, torch.float32)
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=fmt)
    ref64 = apply_reference(y, vecs, r, rvecs, torch.float32, upcast=True)
    assert (ref64 == 0).any() and (ref64 > 0).any()
    assert_close(out, ref64, apply_reference(y, vecs, r, rvecs, torch.float32, upcast=False), name="out")


def test_bn_relu_apply_centres_before_scaling(poisoned_empty):
    """y ~1000 +- 1e-2 and r ~-1000 +- 1e-2 with their batch BNs: (y - mean) * scale + shift is
    exact, where the folded y * scale + (shift - mean * scale) would lose every digit."""
    y, vecs, r, rvecs = make_bn_case(2, shape=(2, 5, 7, 7), center=(1000.0, -1000.0), spread=(1e-2, 1e-2))
    out = ops.bn_relu_apply(y, *vecs, r, *rvecs, torch.float32)
    ref64 = apply_reference(y, vecs, r, rvecs, torch.float32, upcast=True)
    same = apply_reference(y, vecs, r, rvecs, torch.float32, upcast=False)
    assert (ref64 > 0).any()
    assert_close(out, ref64, same, name="out")
    v = (1, -1, 1, 1)
    folded = torch.relu(sum(t * s.view(v) + (h - mu * s).view(v) for t, (mu, s, h) in ((y, vecs), (r, rvecs))))
    assert rel_err(folded, ref64) > 100 * max(1e-5, 4 * rel_err(same, ref64))


@pytest.mark.parametrize("y_dtype,r_dtype,out_dtype", [
    (torch.float16, torch.float16, torch.float16),
    (torch.bfloat16, torch.float32, torch.bfloat16),
    (torch.bfloat16, torch.bfloat16, torch.float32),  # out_dtype wider than the input
    (torch.float32, torch.float16, torch.bfloat16),
], ids=["fp16", "bf16_r32", "bf16_out32", "fp32_outbf16"])
def test_bn_relu_apply_dtypes(y_dtype, r_dtype, out_dtype, poisoned_empty):
    y, vecs, r, rvecs = make_bn_case(2, y_dtype, fmt=CL, r_dtype=r_dtype)
    out = ops.bn_relu_apply(y, *vecs, r, *rvecs, out_dtype)
    assert out.dtype == out_dtype and out.is_contiguous(memory_format=CL)
    ref64 = apply_reference(y, vecs, r, rvecs, out_dtype, upcast=True)
    assert_close(out, ref64, apply_reference(y, vecs, r, rvecs, out_dtype, upcast=False), name="out")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.parametrize("res", [0, 1, 2], ids=["res0", "res1_identity", "res2_bn"])
def test_bn_relu_apply_nan_inf(res):
    y, vecs, r, rvecs = make_bn_case(res, shape=(2, 5, 7, 7))
    vecs[1].abs_()  # positive scales, so +Inf stays +Inf through the BN
    y[0, 1, 2, 3] = float("nan")
    y[0, 2, 5, 5] = float("inf")
    y[1, 3, 0, 6] = -float("inf")
    if r is not None:
        if rvecs[1] is not None:
            rvecs[1].abs_()
        r[0, 0, 6, 0] = float("nan")
        r[1, 1, 6, 1] = float("inf")
        r[0, 2, 5, 5] = -float("inf")  # +Inf + -Inf: NaN
    out = ops.bn_relu_apply(y, *vecs, r, *rvecs, torch.float32)
    ref64 = apply_reference(y, vecs, r, rvecs, torch.float32, upcast=True)
    assert torch.isnan(ref64).any() and (ref64 == float("inf")).any()
    assert_close(out, ref64, apply_reference(y, vecs, r, rvecs, torch.float32, upcast=False), name="out")


# ================================================================ the two-pass BN + ReLU backward
def kernel_backward(g, y, vecs, invstd, r, rvecs, r_invstd):
    """dy, dr, (dgamma, dbeta), (r's dgamma, dbeta) from the two kernels, with the module's formulas."""
    s_g, s_gy, s_gr = ops.bn_relu_bwd_reduce(g, y, *vecs, r, *rvecs)
    n = y.numel() // y.shape[1]
    scale = vecs[1]
    k2, k3 = -scale * invstd * invstd * s_gy / n, -scale * s_g / n
    rk2 = rk3 = None
    if rvecs[0] is not None:
        rk2, rk3 = -rvecs[1] * r_invstd * r_invstd * s_gr / n, -rvecs[1] * s_g / n
    else:
        assert torch.equal(s_gr, torch.zeros_like(s_gr))  # documented: zeros unless r has a BN
    dy, dr = ops.bn_relu_bwd_apply(g, y, *vecs, k2, k3, r, *rvecs, rk2, rk3,
                                   r.dtype if r is not None else y.dtype)
    return dy, dr, (invstd * s_gy, s_g), (None if r_invstd is None else r_invstd * s_gr, s_g)


@pytest.mark.parametrize("fmt", [NCHW, CL], ids=["nchw", "cl"])
@pytest.mark.parametrize("res", [0, 1, 2], ids=["res0", "res1_identity", "res2_bn"])
def test_bn_relu_backward(res, fmt, poisoned_empty):
    eps = 1e-5
    c = BN_SHAPE[1]
    y = (3.0 + 2.0 * torch.randn(BN_SHAPE, device=DEVICE)).contiguous(memory_format=fmt)
    r = (-2.0 + 3.0 * torch.randn(BN_SHAPE, device=DEVICE)).contiguous(memory_format=fmt) if res else None
    g = torch.randn(BN_SHAPE, device=DEVICE).contiguous(memory_format=fmt)

    def bn_state(t):
        mean, var = (s.float() for s in vec_stats(t))
        gamma, beta = torch.randn(c, device=DEVICE), 0.5 * torch.randn(c, device=DEVICE)
        scale, _, invstd = bn_affine(mean, var, gamma, None, eps)
        return (mean, scale, beta), invstd, (gamma, beta)

    vecs, invstd, params = bn_state(y)
    rvecs, r_invstd, rparams = bn_state(r) if res == 2 else ((None,) * 3, None, None)
    dy, dr, (dgamma, dbeta), (rdgamma, rdbeta) = kernel_backward(g, y, vecs, invstd, r, rvecs, r_invstd)
    want = bn_relu_train_grads(g, y, params, r, rparams, res, eps, torch.float64)
    same = bn_relu_train_grads(g, y, params, r, rparams, res, eps, torch.float32)
    assert dy.dtype == torch.float32 and dy.is_contiguous(memory_format=fmt)
    got = [dy, dgamma, dbeta] + ([dr] if res else []) + ([rdgamma, rdbeta] if res == 2 else [])
    names = ["dy", "dgamma", "dbeta", "dr", "r dgamma", "r dbeta"]
    assert len(got) == len(want)
    for name, a, w, s in zip(names, got, want, same):
        assert_close(a, w, s, name=name)
    if res:
        assert dr.dtype == r.dtype and dr.is_contiguous(memory_format=fmt)
    else:
        assert dr.numel() == 0


# ======================================================================= running statistics
RUNNING = {
    "momentum_0.1": dict(momentum=0.1),
    "momentum_None": dict(momentum=None),
    "momentum_0.5_no_affine": dict(momentum=0.5, affine=False),
    "no_running_stats": dict(track_running_stats=False),
}


@pytest.mark.parametrize("cfg", list(RUNNING), ids=list(RUNNING))
def test_update_running_stats_matches_batchnorm(cfg):
    """Over several batches (one of 2 values per channel: unbiased var = 2 x biased) the running
    statistics follow nn.BatchNorm2d's rule, num_batches_tracked exactly."""
    kw = RUNNING[cfg]
    c = 6
    ours, ref32 = nn.BatchNorm2d(c, **kw).to(DEVICE), nn.BatchNorm2d(c, **kw).to(DEVICE)
    if ours.running_mean is not None:
        with torch.no_grad():
            for m in (ours, ref32):
                m.running_mean.copy_(torch.linspace(-1, 1, c))
                m.running_var.copy_(torch.linspace(0.5, 2, c))
    ref64 = nn.BatchNorm2d(c, **kw).to(DEVICE, torch.float64)
    ref64.load_state_dict(ref32.state_dict())
    for shape, center in [((3, c, 4, 5), 2.0), ((1, c, 2, 3), -1.0), ((2, c, 1, 1), 0.5), ((2, c, 3, 3), 4.0)]:
        x = center + torch.randn(shape, device=DEVICE)
        ref32(x)
        ref64(x.double())
        count, mean, var = finalize(merge_partials(channel_stats_partials(x)))
        update_running_stats(ours, mean, var, count)
    if ours.running_mean is None:
        assert ours.running_var is None and ours.num_batches_tracked is None
        return
    assert torch.equal(ours.num_batches_tracked, ref32.num_batches_tracked) and ours.num_batches_tracked.item() == 4
    assert ours.running_mean.dtype == torch.float32
    assert_close(ours.running_mean, ref64.running_mean, ref32.running_mean, name="running_mean")
    assert_close(ours.running_var, ref64.running_var, ref32.running_var, name="running_var")


@pytest.mark.filterwarnings("ignore:var\\(\\):UserWarning")  # statistics of nothing
@pytest.mark.parametrize("res", [0, 1, 2], ids=["res0", "res1_identity", "res2_bn"])
def test_bn_ops_empty(res):
    y, vecs, r, rvecs = make_bn_case(res, shape=(0, 4, 3, 3))
    out = ops.bn_relu_apply(y, *vecs, r, *rvecs, torch.bfloat16)
    assert out.shape == (0, 4, 3, 3) and out.dtype == torch.bfloat16
    sums = ops.bn_relu_bwd_reduce(y, y, *vecs, r, *rvecs)
    assert all(torch.equal(s, torch.zeros(4, device=DEVICE)) for s in sums)
    k = torch.zeros(4, device=DEVICE)
    rk = (k, k) if res == 2 else (None, None)
    dy, dr = ops.bn_relu_bwd_apply(y, y, *vecs, k, k, r, *rvecs, *rk, torch.float32)
    assert dy.shape == y.shape and dr.shape == (y.shape if res else (0,))
