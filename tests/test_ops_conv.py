"""conv_bias_act and conv_bn_act against a float64 reference, on the Triton and PyTorch paths.

Every result is judged against PyTorch's own error in the same dtype (both measured from the
float64 reference, ``utils.assert_close``). On a CPU machine the Triton kernels run through
Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest.py), so shapes stay tiny.
"""
import importlib

import pytest
import torch
import torch.nn.functional as F

from resnet_fused import BackendUnavailableError
from resnet_fused.ops import conv_bias_act, conv_bias_act_reference, conv_bn_act, conv_bn_act_reference
from builders import spy_apply
from utils import CUDA_BACKEND, DEVICE, INTERPRET, assert_close, assert_nonfinite_match

# the module (``resnet_fused.ops.conv_bias_act`` the attribute is the function of the same name)
cba = importlib.import_module("resnet_fused.ops.conv_bias_act")

CL = torch.channels_last
BACKENDS = [
    "torch",
    pytest.param("triton", marks=pytest.mark.skipif(DEVICE == "cpu" and not INTERPRET,
                                                    reason="Triton on CPU needs TRITON_INTERPRET=1")),
    CUDA_BACKEND,
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (N, Cin, H, W, Cout, kernel, stride, padding, dilation)
SHAPES = {
    "3x3s1": (2, 5, 7, 7, 6, 3, 1, 1, 1),
    "3x3s2_odd": (1, 17, 9, 5, 5, 3, 2, 1, 1),
    "3x3p0": (2, 5, 7, 7, 17, 3, 1, 0, 1),
    "3x3s2p2": (1, 6, 7, 7, 5, 3, 2, 2, 1),
    "1x1s1": (2, 17, 7, 7, 5, 1, 1, 0, 1),
    "1x1s2": (2, 5, 9, 5, 17, 1, 2, 0, 1),
    "stem7x7s2": (1, 3, 12, 12, 8, 7, 2, 3, 1),  # Cin=3: the FLAT_K path
    "flatk3x3": (2, 3, 9, 5, 6, 3, 1, 1, 1),  # Cin < 8 with a 3x3: FLAT_K again, odd sizes
    "dil2": (1, 5, 9, 9, 6, 3, 1, 2, 2),
    # every geometry argument different along H and W, so a swapped pair cannot pass
    "asym1x3": (1, 6, 9, 11, 5, (1, 3), (2, 1), (0, 2), (1, 2)),
    "asym3x5_flatk": (2, 3, 10, 7, 6, (3, 5), (1, 2), (2, 1), (2, 1)),
    # Cout 40 > the interpreter's 32-wide N tile and M = 162 > GROUP_M (4) x 32: several tile
    # columns and program groups, so the grouped program order is exercised (beyond C <= 20 on purpose)
    "tiles": (2, 5, 9, 9, 40, 3, 1, 1, 1),
}


def make_case(shape, dtype, bias=True, residual=True, x_fmt=torch.contiguous_format,
              res_fmt=torch.contiguous_format, res_dtype=None, requires_grad=False):
    """x, weight, bias, residual and the conv keyword arguments for one case, on DEVICE."""
    n, cin, h, w, cout, k, s, p, d = shape
    k, s, p, d = [v if isinstance(v, tuple) else (v, v) for v in (k, s, p, d)]
    oh, ow = [(v + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i, v in enumerate((h, w))]
    x = torch.randn(n, cin, h, w, device=DEVICE).to(dtype).contiguous(memory_format=x_fmt)
    wt = (torch.randn(cout, cin, *k, device=DEVICE) / (cin * k[0] * k[1]) ** 0.5).to(dtype)
    b = torch.randn(cout, device=DEVICE) if bias else None  # a folded BN shift: float32
    r = None
    if residual:
        r = torch.randn(n, cout, oh, ow, device=DEVICE).to(res_dtype or dtype).contiguous(memory_format=res_fmt)
    tensors = [x, wt, b, r]
    if requires_grad:
        for t in tensors:
            if t is not None:
                t.requires_grad_(True)
    return tensors, dict(stride=s, padding=p, dilation=d)


def torch_same_dtype(x, w, b, r, relu=True, **conv):
    """PyTorch's own result in x's dtype on x's device, op by op.

    None where PyTorch has no kernel for that dtype on the device (older CPU builds lacked a
    float16 convolution): assert_close then falls back to the dtype's floor. torch 2.13 on CPU
    has all three dtypes, so on CI the bound is always PyTorch's measured error.
    """
    try:
        return conv_bias_act_reference(x, w, b, r, relu=relu, **conv)
    except RuntimeError as exc:
        if "not implemented" not in str(exc):
            raise
        return None


def check(out, x, w, b, r, relu, conv, name="out", dtype=None):
    """Shape, dtype, finiteness and error of ``out`` against float64 and PyTorch's same-dtype run."""
    ref64 = conv_bias_act_reference(x, w, b, r, relu=relu, upcast=True, **conv)
    same = torch_same_dtype(x, w, b, r, relu=relu, **conv)
    if same is not None:
        assert out.dtype == same.dtype, (out.dtype, same.dtype)
    assert torch.isfinite(ref64).all()  # every output element below must then be written and finite
    assert_close(out, ref64, same, name=name, dtype=dtype)


# ------------------------------------------------------------------------------------ forward
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_shapes_dtypes(shape, dtype, backend, poisoned_empty):
    (x, w, b, r), conv = make_case(shape, dtype)
    out = conv_bias_act(x, w, b, r, **conv, backend=backend)
    check(out, x, w, b, r, True, conv)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
@pytest.mark.parametrize("residual", [True, False], ids=["res", "nores"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_epilogue_variants(dtype, bias, residual, relu, backend, poisoned_empty):
    (x, w, b, r), conv = make_case(SHAPES["3x3s2_odd"], dtype, bias=bias, residual=residual)
    out = conv_bias_act(x, w, b, r, **conv, relu=relu, backend=backend)
    check(out, x, w, b, r, relu, conv)
    if not relu:
        assert (out < 0).any()  # relu off really leaves negatives
    else:
        assert (out == 0).any() and (out >= 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("x_dtype,res_dtype", [(torch.float16, torch.float32), (torch.bfloat16, torch.float16),
                                               (torch.float32, torch.bfloat16)], ids=str)
def test_mixed_residual_dtype_promotes(x_dtype, res_dtype, backend, poisoned_empty):
    """out has promote_types(x, residual), as ``conv(x) + residual`` has."""
    (x, w, b, r), conv = make_case(SHAPES["3x3s1"], x_dtype, res_dtype=res_dtype)
    out = conv_bias_act(x, w, b, r, **conv, backend=backend)
    assert out.dtype == torch.promote_types(x_dtype, res_dtype)
    check(out, x, w, b, r, True, conv, dtype=x_dtype)  # the conv in x's dtype bounds the error


# ------------------------------------------------------------------------------------ layouts
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("w_fmt", [torch.contiguous_format, CL], ids=["w_nchw", "w_cl"])
@pytest.mark.parametrize("res_fmt", [torch.contiguous_format, CL], ids=["res_nchw", "res_cl"])
@pytest.mark.parametrize("x_fmt", [torch.contiguous_format, CL], ids=["x_nchw", "x_cl"])
def test_memory_formats(x_fmt, res_fmt, w_fmt, backend, poisoned_empty):
    """Any mix of layouts gives the right values, and the output keeps x's memory format."""
    (x, w, b, r), conv = make_case(SHAPES["3x3s2_odd"], torch.float32, x_fmt=x_fmt, res_fmt=res_fmt)
    w = w.contiguous(memory_format=w_fmt)
    out = conv_bias_act(x, w, b, r, **conv, backend=backend)
    check(out, x, w, b, r, True, conv)
    assert out.is_contiguous(memory_format=x_fmt)
    other = CL if x_fmt == torch.contiguous_format else torch.contiguous_format
    assert not out.is_contiguous(memory_format=other)  # the shape makes the two formats distinct


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend, poisoned_empty):
    """Sliced (strided, non-dense) x, weight, bias and residual are read through their strides."""
    x = torch.randn(2, 10, 9, 14, device=DEVICE)[:, ::2, :, 1::2]  # [2, 5, 9, 7]
    w = (torch.randn(12, 5, 3, 3, device=DEVICE) / 4)[::2]  # [6, 5, 3, 3]
    b = torch.randn(12, device=DEVICE)[1::2]
    r = torch.randn(2, 6, 8, 7, device=DEVICE).transpose(2, 3)[:, :, :, 1:]  # [2, 6, 7, 7]
    assert not (x.is_contiguous() or x.is_contiguous(memory_format=CL))
    assert not (w.is_contiguous() or b.is_contiguous() or r.is_contiguous())
    conv = dict(stride=(1, 1), padding=(0, 1), dilation=1)
    out = conv_bias_act(x, w, b, r, **conv, backend=backend)
    check(out, x, w, b, r, True, conv)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("x_fmt", [torch.contiguous_format, CL], ids=["x_nchw", "x_cl"])
def test_empty_batch(x_fmt, backend):
    (x, w, b, r), conv = make_case((0, 5, 9, 7, 6, 3, 2, 1, 1), torch.float32, x_fmt=x_fmt, requires_grad=True)
    out = conv_bias_act(x, w, b, r, **conv, backend=backend)
    assert out.shape == (0, 6, 5, 4) and out.dtype == torch.float32
    out.sum().backward()
    assert x.grad.shape == x.shape and r.grad.shape == r.shape
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


# --------------------------------------------------------------------------------- NaN and Inf
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_inf_propagate(dtype, relu, backend):
    (x, w, b, r), conv = make_case((1, 5, 7, 7, 6, 3, 1, 1, 1), dtype)
    x[0, 1, 2, 3] = float("nan")
    x[0, 2, 5, 5] = float("inf")
    x[0, 3, 0, 6] = -float("inf")
    r[0, 0, 6, 0] = float("nan")
    r[0, 1, 6, 1] = float("inf")
    r[0, 2, 6, 2] = -float("inf")
    r[0, 3, 0, 0] = float("nan")  # where x's NaN/Inf do not reach: the residual alone decides
    out = conv_bias_act(x, w, b, r, **conv, relu=relu, backend=backend)
    ref64 = conv_bias_act_reference(x, w, b, r, relu=relu, upcast=True, **conv)
    # the case is not vacuous: the reference has NaN, +Inf and (without ReLU) -Inf outputs
    assert torch.isnan(ref64).any() and (ref64 == float("inf")).any()
    assert (ref64 == -float("inf")).any() != relu
    assert_nonfinite_match(out, ref64, "out")
    # NaN-free (and written) wherever the reference is finite, and the finite part accurate
    assert_close(out, ref64, torch_same_dtype(x, w, b, r, relu=relu, **conv), name="out")


# ------------------------------------------------------------------------------------ autograd
GRAD_CASES = {
    "3x3s2_odd": (SHAPES["3x3s2_odd"], torch.contiguous_format, True),
    "stem_flatk": (SHAPES["stem7x7s2"], torch.contiguous_format, True),
    "1x1s2_cl": (SHAPES["1x1s2"], CL, True),
    "dil2_norelu": (SHAPES["dil2"], torch.contiguous_format, False),
    "asym3x5_flatk_cl": (SHAPES["asym3x5_flatk"], CL, True),
    "3x3p0_cl_norelu": (SHAPES["3x3p0"], CL, False),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(GRAD_CASES.values()), ids=list(GRAD_CASES))
def test_autograd(case, dtype, backend):
    """Gradients of x, weight, bias and residual vs autograd through the float64 reference."""
    shape, x_fmt, relu = case
    (x, w, b, r), conv = make_case(shape, dtype, x_fmt=x_fmt, requires_grad=True)
    inputs = (x, w, b, r)
    out = conv_bias_act(x, w, b, r, **conv, relu=relu, backend=backend)
    g = torch.randn(out.shape, device=DEVICE).to(out.dtype)
    grads = torch.autograd.grad(out, inputs, g)
    ref64 = conv_bias_act_reference(x, w, b, r, relu=relu, upcast=True, **conv)
    grads64 = torch.autograd.grad(ref64, inputs, g.double())
    same = torch_same_dtype(x, w, b, r, relu=relu, **conv)
    grads_same = torch.autograd.grad(same, inputs, g) if same is not None else [None] * 4
    # the ReLU mask of the output (rounded to dtype) decides which entries pass a gradient; where
    # the float64 pre-activation is within rounding of 0 the two masks may differ, so the bound is
    # PyTorch's own same-dtype error, which has the same ambiguity.
    for name, t, got, want, same_g in zip("x weight bias residual".split(), inputs, grads, grads64, grads_same):
        assert got is not None, name
        assert got.dtype == t.dtype and got.shape == t.shape, (name, got.dtype, got.shape)
        assert_close(got, want, same_g, name=f"grad {name}", dtype=dtype)


def test_autograd_partial_requires_grad():
    """Only some inputs require grad: the others get none, and the ones asked for are right."""
    if not INTERPRET and DEVICE == "cpu":
        pytest.skip("needs the Triton backend")
    (x, w, b, r), conv = make_case(SHAPES["3x3s1"], torch.float32)
    w.requires_grad_(True)
    out = conv_bias_act(x, w, b, r, **conv, backend="triton")
    assert out.requires_grad and out.grad_fn is not None
    (gw,) = torch.autograd.grad(out.sum(), [w])
    ref = conv_bias_act_reference(x, w, b, r, upcast=True, **conv)
    (gw64,) = torch.autograd.grad(ref.sum(), [w])
    (gw32,) = torch.autograd.grad(conv_bias_act_reference(x, w, b, r, **conv).sum(), [w])
    assert_close(gw, gw64, gw32, name="grad weight")
    assert x.grad is None and b.grad is None


# ------------------------------------------------------------------------------------ fallback
@pytest.fixture
def triton_spy(monkeypatch):
    """The input dtype of every launch of the Triton path (_ConvBiasActFn.apply)."""
    return spy_apply(monkeypatch, cba._ConvBiasActFn)


@pytest.mark.skipif(DEVICE == "cpu" and not INTERPRET, reason="needs the Triton backend")
def test_triton_backend_really_runs_triton(triton_spy):
    """The positive control for the fallback tests below: the spy sees a fusable case."""
    (x, w, b, r), conv = make_case(SHAPES["3x3s1"], torch.float32)
    conv_bias_act(x, w, b, r, **conv, backend="triton")
    assert triton_spy == [torch.float32]


@pytest.mark.skipif(DEVICE == "cpu" and not INTERPRET, reason="needs the Triton backend")
@pytest.mark.parametrize("case", ["groups2", "float64", "float64_residual"])
def test_unfusable_falls_back_to_torch(case, triton_spy):
    """groups > 1 and float64 run on the PyTorch path even with backend='triton', and are right."""
    dtype = torch.float64 if case == "float64" else torch.float32
    (x, w, b, r), conv = make_case(SHAPES["3x3s2_odd"], dtype,
                                   res_dtype=torch.float64 if case == "float64_residual" else None)
    groups = 1
    if case == "groups2":
        groups = 2
        x = torch.randn(1, 6, 9, 5, device=DEVICE)
        w = torch.randn(5 * 2, 3, 3, 3, device=DEVICE) / 5  # Cout 10, Cin/groups 3
        b = torch.randn(10, device=DEVICE)
        r = torch.randn(1, 10, 5, 3, device=DEVICE)
    out = conv_bias_act(x, w, b, r, **conv, groups=groups, backend="triton")
    assert triton_spy == []
    ref64 = conv_bias_act_reference(x, w, b, r, groups=groups, upcast=True, **conv)
    same = conv_bias_act_reference(x, w, b, r, groups=groups, **conv)
    assert out.dtype == same.dtype
    assert_close(out, ref64, same, name="out")


# -------------------------------------------------------------------------------- bad inputs
def _bad(case):
    x = torch.randn(2, 5, 7, 7)
    w = torch.randn(6, 5, 3, 3)
    b = torch.randn(6)
    r = torch.randn(2, 6, 5, 5)
    kw = {}
    if case == "x_channels":
        x = torch.randn(2, 4, 7, 7)
    elif case == "x_3d":
        x = torch.randn(5, 7, 7)
    elif case == "x_int":
        x = torch.randint(0, 3, (2, 5, 7, 7))
    elif case == "x_not_tensor":
        x = [[1.0]]
    elif case == "weight_dtype":
        w = w.half()
    elif case == "weight_int":
        w = w.long()
    elif case == "weight_3d":
        w = w[0]
    elif case == "weight_device":
        w = w.to("meta")
    elif case == "bias_shape":
        b = torch.randn(5)
    elif case == "bias_2d":
        b = b.view(2, 3)
    elif case == "residual_shape":
        r = torch.randn(2, 6, 7, 7)
    elif case == "residual_int":
        r = r.int()
    elif case == "too_small":
        x = torch.randn(2, 5, 2, 2)
    elif case == "stride0":
        kw = dict(stride=0)
    elif case == "padding_neg":
        kw = dict(padding=-1)
    elif case == "dilation0":
        kw = dict(dilation=(1, 0))
    elif case == "groups_bad":
        kw = dict(groups=4)
    return (x, w, b, r), kw


# case -> (exception, words the message must contain: the tensor's name, what was expected, what came)
BAD = {
    "x_channels": (ValueError, ["x:", "expected 5 input channels", "2, 4, 7, 7"]),
    "x_3d": (ValueError, ["x:", "expected a 4-D tensor", "got 3-D", "[5, 7, 7]"]),
    "x_int": (TypeError, ["x:", "floating-point", "torch.int64"]),
    "x_not_tensor": (TypeError, ["x:", "torch.Tensor", "list"]),
    "weight_dtype": (TypeError, ["weight:", "torch.float32", "got torch.float16"]),
    "weight_int": (TypeError, ["weight:", "floating-point", "torch.int64"]),
    "weight_3d": (ValueError, ["weight:", "4-D", "got 3-D"]),
    "weight_device": (ValueError, ["weight:", "cpu", "meta"]),
    "bias_shape": (ValueError, ["bias:", "[6]", "[5]"]),
    "bias_2d": (ValueError, ["bias:", "1-D", "got 2-D"]),
    "residual_shape": (ValueError, ["residual:", "[2, 6, 5, 5]", "[2, 6, 7, 7]"]),
    "residual_int": (TypeError, ["residual:", "floating-point", "torch.int32"]),
    "too_small": (ValueError, ["x:", "2x2", "too small"]),
    "stride0": (ValueError, ["stride:", ">= 1", "(0, 0)"]),
    "padding_neg": (ValueError, ["padding:", ">= 0", "(-1, -1)"]),
    "dilation0": (ValueError, ["dilation:", ">= 1", "(1, 0)"]),
    "groups_bad": (ValueError, ["groups:", "6 output channels", "4"]),
}


@pytest.mark.parametrize("backend", ["torch", "triton", "auto"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs(case, backend):
    if backend == "triton" and DEVICE == "cpu" and not INTERPRET:
        pytest.skip("needs the Triton backend")
    (x, w, b, r), kw = _bad(case)
    exc, words = BAD[case]
    with pytest.raises(exc) as info:
        conv_bias_act(x, w, b, r, padding=kw.pop("padding", 0), **kw, backend=backend)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_cuda_backend_is_refused_with_the_reason(monkeypatch):
    """Where the compiled library cannot be loaded, an explicit "cuda" says why (simulated)."""
    from resnet_fused import _ext

    monkeypatch.setattr(_ext, "_state", {"done": True, "error": "simulated: the extension is not built"})
    (x, w, b, r), conv = make_case(SHAPES["3x3s1"], torch.float32)
    with pytest.raises(BackendUnavailableError, match="simulated: the extension is not built"):
        conv_bias_act(x, w, b, r, **conv, backend="cuda")


# ------------------------------------------------------------------------------------ autocast
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("residual", [False, True], ids=["nores", "res_fp32"])
def test_autocast_bf16(residual, backend):
    """Under CPU autocast(bfloat16) the conv runs in bf16, as F.conv2d does under autocast."""
    if DEVICE != "cpu":
        pytest.skip("CPU autocast")
    (x, w, b, r), conv = make_case(SHAPES["3x3s2_odd"], torch.float32, residual=residual)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv_bias_act(x, w, b, r, **conv, backend=backend)
        same = F.conv2d(x, w, b, **conv)
        same = torch.relu(same if r is None else same + r)
    assert out.dtype == same.dtype == (torch.float32 if residual else torch.bfloat16)
    ref64 = conv_bias_act_reference(x, w, b, r, upcast=True, **conv)
    assert_close(out, ref64, same, name="out", dtype=torch.bfloat16)


# --------------------------------------------------------------------------------- conv_bn_act
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("residual", [True, False], ids=["res", "nores"])
@pytest.mark.parametrize("shape", ["3x3s2_odd", "stem7x7s2"])
def test_conv_bn_act(shape, residual, dtype, backend, poisoned_empty):
    """Fold-then-fuse equals the unfused conv -> eval BatchNorm -> add -> ReLU."""
    (x, w, _, r), conv = make_case(SHAPES[shape], dtype, bias=False, residual=residual)
    cout = w.shape[0]
    gamma = torch.rand(cout, device=DEVICE) + 0.5
    beta = torch.randn(cout, device=DEVICE) * 0.5
    mean = torch.randn(cout, device=DEVICE) * 0.5
    var = torch.rand(cout, device=DEVICE) * 1.5 + 0.5
    out = conv_bn_act(x, w, gamma, beta, mean, var, 1e-3, r, **conv, backend=backend)
    ref64 = conv_bn_act_reference(x, w, gamma, beta, mean, var, 1e-3, r, upcast=True, **conv)
    same = conv_bn_act_reference(x, w, gamma, beta, mean, var, 1e-3, r, **conv)
    assert out.dtype == same.dtype == dtype
    assert torch.isfinite(ref64).all()
    assert_close(out, ref64, same, name="out")


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_bn_act_autograd(backend):
    """Gradients reach x, weight, the BN weight and bias, and the residual."""
    (x, w, _, r), conv = make_case(SHAPES["3x3s1"], torch.float32, bias=False, requires_grad=True)
    cout = w.shape[0]
    gamma = (torch.rand(cout, device=DEVICE) + 0.5).requires_grad_()
    beta = torch.randn(cout, device=DEVICE).requires_grad_()
    mean, var = torch.randn(cout, device=DEVICE), torch.rand(cout, device=DEVICE) + 0.5
    inputs = (x, w, gamma, beta, r)
    out = conv_bn_act(x, w, gamma, beta, mean, var, 1e-5, r, **conv, backend=backend)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, g)
    ref64 = conv_bn_act_reference(x, w, gamma, beta, mean, var, 1e-5, r, upcast=True, **conv)
    grads64 = torch.autograd.grad(ref64, inputs, g.double())
    same = conv_bn_act_reference(x, w, gamma, beta, mean, var, 1e-5, r, **conv)
    grads_same = torch.autograd.grad(same, inputs, g)
    for name, got, want, s in zip("x weight bn_weight bn_bias residual".split(), grads, grads64, grads_same):
        assert_close(got, want, s, name=f"grad {name}")


@pytest.mark.skipif(not INTERPRET, reason="CPU tensors on the Triton backend need TRITON_INTERPRET=1")
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
def test_batch_split_keeps_row_index_in_int32(monkeypatch, fmt):
    """Above 2^31 GEMM rows the launcher splits the batch (int32 row index in the kernel).

    The limit is shrunk so the split runs on tiny CPU tensors: 3 rows of 5x4 pixels per launch.
    """
    monkeypatch.setattr(cba, "_MAX_ROWS", 3 * 5 * 4 + 1)
    calls = []
    real = cba._launch_into
    monkeypatch.setattr(cba, "_launch_into", lambda out, *a, **k: (calls.append(out.shape[0]), real(out, *a, **k)))
    x = torch.randn(7, 6, 5, 4).contiguous(memory_format=fmt)
    w = torch.randn(9, 6, 3, 3) / 54 ** 0.5
    b, r = torch.randn(9), torch.randn(7, 9, 5, 4)
    out = conv_bias_act(x, w, b, r, padding=1, backend="triton")
    assert calls == [3, 3, 1]
    ref = conv_bias_act_reference(x, w, b, r, 1, 1, 1, upcast=True)
    assert_close(out, ref, conv_bias_act_reference(x, w, b, r, 1, 1, 1))
    monkeypatch.setattr(cba, "_MAX_ROWS", 5 * 4 - 1)
    with pytest.raises(ValueError, match="output pixels"):
        conv_bias_act(x, w, b, r, padding=1, backend="triton")


# ----------------------------------------------------------------------------- TMA descriptors
NCHW = torch.contiguous_format
# (N, Cin, H, W, Cout, kernel, stride, padding, dilation), x's layout, descriptors expected (x, weight)
TMA_CASES = {
    "1x1s1_cl": ((2, 16, 5, 7, 40, 1, 1, 0, 1), CL, (True, True)),  # both operands: a plain GEMM
    "1x1s1_cl_cin24": ((2, 24, 5, 7, 20, 1, 1, 0, 1), CL, (True, False)),  # BLOCK_K 16 does not divide 24
    "3x3s1_cl": ((2, 32, 6, 5, 20, 3, 1, 1, 1), CL, (False, True)),  # 2 Cin blocks x 9 taps
    "3x3s2_nchw": ((1, 16, 9, 7, 40, 3, 2, 1, 1), NCHW, (False, True)),  # NCHW weight copied channels_last
    "1x1s2_cl": ((2, 16, 9, 5, 17, 1, 2, 0, 1), CL, (False, True)),  # strided: x not one matrix
    "1x1s1_nchw": ((2, 16, 5, 7, 20, 1, 1, 0, 1), NCHW, (False, True)),
    # 12 channels: 24-byte fp16/bf16 rows are not 16-byte aligned (fp32's 48 are); BLOCK_K 16 does not divide 12
    "1x1s1_cl_cin12": ((2, 12, 5, 7, 20, 1, 1, 0, 1), CL, lambda elem: (elem == 4, False)),
}


@pytest.fixture
def tma_spy(monkeypatch):
    """Which descriptors each launch got (x, weight): True where one was made."""
    seen = []
    real = cba.tma_descriptors

    def spy(*args):
        descs = real(*args)
        seen.append(tuple(d is not None for d in descs))
        return descs

    monkeypatch.setattr(cba, "tma_descriptors", spy)
    return seen


@pytest.mark.skipif(not INTERPRET, reason="the interpreter's descriptors; on a GPU test_gpu covers TMA")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(TMA_CASES), ids=list(TMA_CASES))
def test_tma_path_equals_pointer_path(case, dtype, tma_spy, monkeypatch, poisoned_empty):
    """Where the launcher builds tensor descriptors (the interpreter emulates TMA, zero-filling
    out of bounds as the hardware does), the result is right and bit-identical to the pointer path."""
    shape, fmt, want = TMA_CASES[case]
    (x, w, b, r), conv = make_case(shape, dtype, x_fmt=fmt, res_fmt=fmt)
    out = conv_bias_act(x, w, b, r, **conv, backend="triton")
    assert tma_spy == [want(x.element_size()) if callable(want) else want]
    check(out, x, w, b, r, True, conv)
    monkeypatch.setattr(cba, "tma_descriptors", lambda *args: (None, None))
    assert torch.equal(out, conv_bias_act(x, w, b, r, **conv, backend="triton"))


@pytest.mark.skipif(not INTERPRET, reason="CPU tensors on the Triton backend need TRITON_INTERPRET=1")
def test_batch_split_views_with_descriptors(monkeypatch, tma_spy):
    """A batch split hands the kernel views that start inside x: the x descriptor is built over
    the view (16-byte aligned here: 5*4*16 fp32 elements per image), and every launch is right."""
    monkeypatch.setattr(cba, "_MAX_ROWS", 3 * 5 * 4 + 1)
    x = torch.randn(7, 16, 5, 4).contiguous(memory_format=CL)
    w = torch.randn(9, 16, 1, 1) / 4
    b, r = torch.randn(9), torch.randn(7, 9, 5, 4).contiguous(memory_format=CL)
    out = conv_bias_act(x, w, b, r, backend="triton")
    assert tma_spy == [(True, True)] * 3
    assert_close(out, conv_bias_act_reference(x, w, b, r, upcast=True), conv_bias_act_reference(x, w, b, r))


# The GPU's tiles (wider than the interpreter's fixed 32x32x16) on small shapes: every edge masked,
# descriptors with the GPU's block shapes, several Cin blocks a tap. (shape, x layout, dtype, config)
GPU_TILE_CASES = {
    "3x3_cin64_cl_128x64x64": ((1, 64, 6, 5, 70, 3, 1, 1, 1), CL, torch.float16, (128, 64, 64, 8, 4)),
    "1x1_cin64_cl_128x128x64": ((2, 64, 5, 7, 130, 1, 1, 0, 1), CL, torch.bfloat16, (128, 128, 64, 8, 3)),
    "3x3s2_cin48_nchw_64x128x16": ((2, 48, 9, 7, 70, 3, 2, 1, 1), NCHW, torch.float32, (64, 128, 16, 4, 4)),
    "stem_7x7_cl_128x64x32": ((1, 3, 12, 12, 8, 7, 2, 3, 1), CL, torch.float16, (128, 64, 32, 8, 4)),
    "stem_7x7_nchw_64x64x32": ((1, 3, 12, 12, 8, 7, 2, 3, 1), NCHW, torch.float32, (64, 64, 32, 4, 4)),
}


@pytest.mark.skipif(not INTERPRET, reason="CPU tensors on the Triton backend need TRITON_INTERPRET=1")
@pytest.mark.parametrize("case", list(GPU_TILE_CASES), ids=list(GPU_TILE_CASES))
def test_gpu_configurations_in_the_interpreter(case, monkeypatch, poisoned_empty):
    from resnet_fused.ops.conv_configs import CONFIGS, ConvConfig

    shape, fmt, dtype, cfg = GPU_TILE_CASES[case]
    cfg = ConvConfig(*cfg)
    assert cfg in CONFIGS
    monkeypatch.setattr(cba, "interpreter_config", lambda cin, kw: cfg)
    (x, w, b, r), conv = make_case(shape, dtype, x_fmt=fmt, res_fmt=fmt)
    out = conv_bias_act(x, w, b, r, **conv, backend="triton")
    check(out, x, w, b, r, True, conv)


@pytest.fixture
def restore_tf32_flags():
    cudnn = torch.backends.cudnn
    saved = (cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision, cudnn.fp32_precision, torch.backends.fp32_precision)
    yield
    torch.backends.fp32_precision = saved[3]
    cudnn.fp32_precision = saved[2]
    cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision = saved[0], saved[1]


def test_tf32_choice_follows_pytorchs_conv_setting(restore_tf32_flags):
    """TF32 for fp32 convs exactly when cuDNN convs use it, through either API, and no crash when
    conv and RNN were set apart (then the legacy ``allow_tf32`` read itself raises)."""
    from resnet_fused.ops._common import conv_uses_tf32

    cudnn = torch.backends.cudnn
    cudnn.allow_tf32 = True
    assert conv_uses_tf32()
    cudnn.allow_tf32 = False
    assert not conv_uses_tf32()
    cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision = "ieee", "tf32"
    with pytest.raises(RuntimeError):
        cudnn.allow_tf32  # noqa: B018 - PyTorch's legacy read refuses this mix
    assert not conv_uses_tf32()
    if INTERPRET:  # the launcher reads the setting; it must not raise in this mixed state either
        x, w = torch.randn(1, 4, 5, 5), torch.randn(4, 4, 3, 3)
        out = conv_bias_act(x, w, padding=1, backend="triton")
        assert_close(out, conv_bias_act_reference(x, w, padding=1, upcast=True), conv_bias_act_reference(x, w, padding=1))
    cudnn.conv.fp32_precision = "tf32"
    assert conv_uses_tf32()


@pytest.mark.skipif(not INTERPRET, reason="CPU tensors: the Triton backend needs TRITON_INTERPRET=1")
def test_backward_lets_gradient_through_nan_like_relu():
    """A NaN output of the fused ReLU passes its gradient back, as ``torch.relu``'s backward does."""
    x = torch.randn(1, 2, 4, 4)
    x[0, 0, 1, 1] = float("nan")
    w = torch.randn(3, 2, 1, 1)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    conv_bias_act(xs[0], w, backend="triton").sum().backward()
    conv_bias_act_reference(xs[1], w).sum().backward()
    # the NaN pixel's output is NaN in every channel; its gradient is the sum of the weights
    torch.testing.assert_close(xs[0].grad[0, :, 1, 1], w.sum(dim=(0, 2, 3)))
    torch.testing.assert_close(xs[0].grad, xs[1].grad)
