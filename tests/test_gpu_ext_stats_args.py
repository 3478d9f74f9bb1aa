"""The ``"cuda"`` backend's statistics ops and its input checks (``torch.ops.resnet_fused_C``):
``channel_stats`` (accuracy, anchor semantics, |mean| >> std, NaN/Inf channels, same bits twice),
``bn_finalize``, the two chained into BatchNorm's affine; every op on empty tensors; bad arguments
(a tensor on another device, a wrong dtype or shape) raising errors that name the tensor.

GPU only and judged as every tests/test_gpu_ext_*.py file (see tests/test_gpu_ext_bn.py): skipped
with the library loader's reason where it cannot run CUDA tensors; helpers in tests/utils.py.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from utils import CL, DIMS, DTYPE_PARAMS, FORMAT_PARAMS, FP16, FP32, GPU_DEV, assert_close, check_stats, gen, rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("cuda_library")]

DEV, DTYPES, FORMATS, V = GPU_DEV, DTYPE_PARAMS, FORMAT_PARAMS, (1, -1, 1, 1)
C = torch.ops.resnet_fused_C  # C: the library, loaded by the cuda_library fixture before any test uses it
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ==================================================================== statistics
STATS_SHAPES = {"c64-14x14": (4, 64, 14, 14), "c33-7x7": (1, 33, 7, 7), "c3-1x1-batch6": (6, 3, 1, 1),
                "r50-c256-56x56": (2, 256, 56, 56)}


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
