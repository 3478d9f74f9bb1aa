"""The ``"cuda"`` backend's convolution ops ``conv_bias_act`` / ``conv_bias_act_stats``: every distinct
ResNet-50 conv at batch 2 in fp16, bf16 and TF32 channels_last, where ``conv_kernel_name`` must name a
CUTLASS configuration (the C = 3 stem: the fallback); float32 without TF32 and NCHW (the fallback);
every epilogue; awkward shapes; NaN/Inf; storage offsets; statistics of the stored output;
determinism; agreement with Triton; autograd.

GPU only and judged as every tests/test_gpu_ext_*.py file (see tests/test_gpu_ext_bn.py): skipped
with the library loader's reason where it cannot run CUDA tensors; helpers in tests/utils.py. TF32 convolutions are held to the worse of cuDNN and a TF32
emulation (forward), or of eager fp16 AMP (gradients: TF32 operands carry fp16's 10-bit mantissa).
"""
from __future__ import annotations

import math

import pytest
import torch

from resnet_fused.ops import conv_bias_act, conv_bias_act_reference
from utils import (BF16, CL, DIMS, FORMAT_PARAMS, FP16, FP32, FP64, GPU_DEV, NCHW, PRECISION, R50,
                   assert_close, assert_kernel, at_offset, bound_of, check_conv, check_stats, cudnn_tf32,
                   cutlass_prefix, gen, is_cl, make_conv, poison_next, rel_err, spec_case)

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("cuda_library")]

DEV, FORMATS = GPU_DEV, FORMAT_PARAMS
C = torch.ops.resnet_fused_C  # C: the library, loaded by the cuda_library fixture before any test uses it


# ================================================================ conv_bias_act (ops)
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
