"""bn_act (per-channel affine + residual + ReLU) against a float64 reference, Triton and PyTorch paths.

Errors are judged against PyTorch's own error in the same dtype (``utils.assert_close``). On a CPU
machine the Triton kernel runs through Triton's interpreter (conftest.py sets TRITON_INTERPRET=1).
"""
import importlib

import pytest
import torch

from resnet_fused import BackendUnavailableError
from resnet_fused.ops import bn_act, bn_act_reference
from builders import spy_apply
from utils import CUDA_BACKEND, DEVICE, INTERPRET, assert_close, assert_nonfinite_match

bam = importlib.import_module("resnet_fused.ops.bn_act")  # the module; the attribute is the function
CL = torch.channels_last
NEEDS_TRITON = pytest.mark.skipif(DEVICE == "cpu" and not INTERPRET, reason="Triton on CPU needs TRITON_INTERPRET=1")
BACKENDS = ["torch", pytest.param("triton", marks=NEEDS_TRITON), CUDA_BACKEND]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = {
    "2x5x7x7": (2, 5, 7, 7),
    "1x17x9x5": (1, 17, 9, 5),
    "2x20x12x12": (2, 20, 12, 12),  # 5760 elements: several programs and a ragged last block
    "2x3x1x1": (2, 3, 1, 1),  # both NCHW- and channels_last-contiguous
    "1x1x5x5": (1, 1, 5, 5),  # C == 1: likewise
}


def make_case(shape, dtype, residual=True, x_fmt=torch.contiguous_format, res_fmt=torch.contiguous_format,
              res_dtype=None, requires_grad=False):
    x = torch.randn(shape, device=DEVICE).to(dtype).contiguous(memory_format=x_fmt)
    c = shape[1]
    scale = torch.rand(c, device=DEVICE) + 0.5  # an eval BN's folded scale/shift: float32
    shift = torch.randn(c, device=DEVICE) * 0.5
    r = torch.randn(shape, device=DEVICE).to(res_dtype or dtype).contiguous(memory_format=res_fmt) if residual else None
    tensors = [x, scale, shift, r]
    if requires_grad:
        for t in tensors:
            if t is not None:
                t.requires_grad_(True)
    return tensors


def check(out, x, scale, shift, r, relu, name="out", dtype=None):
    ref64 = bn_act_reference(x, scale, shift, r, relu=relu, upcast=True)
    same = bn_act_reference(x, scale, shift, r, relu=relu)  # PyTorch, op by op, in x's dtype
    assert out.dtype == same.dtype, (out.dtype, same.dtype)
    assert torch.isfinite(ref64).all()  # so every output element must be written and finite
    assert_close(out, ref64, same, name=name, dtype=dtype)


# ------------------------------------------------------------------------------------ forward
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
@pytest.mark.parametrize("residual", [True, False], ids=["res", "nores"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_forward(shape, dtype, residual, relu, backend, poisoned_empty):
    x, scale, shift, r = make_case(shape, dtype, residual=residual)
    out = bn_act(x, scale, shift, r, relu=relu, backend=backend)
    check(out, x, scale, shift, r, relu)
    assert out.shape == x.shape
    if relu:
        assert (out >= 0).all()
    elif out.numel() > 8:
        assert (out < 0).any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("x_dtype,res_dtype", [(torch.float16, torch.float32), (torch.bfloat16, torch.float16),
                                               (torch.float32, torch.bfloat16)], ids=str)
def test_mixed_residual_dtype_promotes(x_dtype, res_dtype, backend, poisoned_empty):
    x, scale, shift, r = make_case(SHAPES["2x5x7x7"], x_dtype, res_dtype=res_dtype)
    out = bn_act(x, scale, shift, r, backend=backend)
    assert out.dtype == torch.promote_types(x_dtype, res_dtype)
    check(out, x, scale, shift, r, True, dtype=x_dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("param_dtype", [torch.float16, torch.float64], ids=str)
def test_scale_shift_dtypes(param_dtype, backend, poisoned_empty):
    """scale/shift need not be float32 (they are read and applied in fp32 by the kernel)."""
    x, scale, shift, r = make_case(SHAPES["1x17x9x5"], torch.float32)
    scale, shift = scale.to(param_dtype), shift.to(param_dtype)
    out = bn_act(x, scale, shift, r, backend=backend)
    check(out, x, scale, shift, r, True)


# ------------------------------------------------------------------------------------ layouts
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("res_fmt", [torch.contiguous_format, CL], ids=["res_nchw", "res_cl"])
@pytest.mark.parametrize("x_fmt", [torch.contiguous_format, CL], ids=["x_nchw", "x_cl"])
def test_memory_formats(x_fmt, res_fmt, backend, poisoned_empty):
    x, scale, shift, r = make_case(SHAPES["1x17x9x5"], torch.float16, x_fmt=x_fmt, res_fmt=res_fmt)
    out = bn_act(x, scale, shift, r, backend=backend)
    check(out, x, scale, shift, r, True)
    assert out.is_contiguous(memory_format=x_fmt)
    other = CL if x_fmt == torch.contiguous_format else torch.contiguous_format
    assert not out.is_contiguous(memory_format=other)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend, poisoned_empty):
    x = torch.randn(2, 10, 9, 14, device=DEVICE)[:, ::2, :, 1::2]  # [2, 5, 9, 7]
    scale = (torch.rand(10, device=DEVICE) + 0.5)[::2]
    shift = torch.randn(15, device=DEVICE)[::3]
    r = torch.randn(2, 5, 7, 9, device=DEVICE).transpose(2, 3)
    assert not (x.is_contiguous() or x.is_contiguous(memory_format=CL) or scale.is_contiguous()
                or shift.is_contiguous() or r.is_contiguous())
    out = bn_act(x, scale, shift, r, backend=backend)
    check(out, x, scale, shift, r, True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("x_fmt", [torch.contiguous_format, CL], ids=["x_nchw", "x_cl"])
def test_empty_batch(x_fmt, backend):
    x, scale, shift, r = make_case((0, 5, 7, 7), torch.float32, x_fmt=x_fmt, requires_grad=True)
    out = bn_act(x, scale, shift, r, backend=backend)
    assert out.shape == (0, 5, 7, 7) and out.dtype == torch.float32
    out.sum().backward()
    assert x.grad.shape == x.shape and r.grad.shape == r.shape
    assert torch.equal(scale.grad, torch.zeros(5)) and torch.equal(shift.grad, torch.zeros(5))


# --------------------------------------------------------------------------------- NaN and Inf
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_inf_propagate(dtype, relu, backend):
    x, scale, shift, r = make_case(SHAPES["2x5x7x7"], dtype)
    x[0, 1, 2, 3] = float("nan")
    x[0, 2, 5, 5] = float("inf")
    x[1, 3, 0, 6] = -float("inf")
    r[0, 0, 6, 0] = float("nan")
    r[1, 1, 6, 1] = float("inf")
    r[1, 2, 6, 2] = -float("inf")
    r[0, 2, 5, 5] = -float("inf")  # +Inf + -Inf: NaN
    out = bn_act(x, scale, shift, r, relu=relu, backend=backend)
    ref64 = bn_act_reference(x, scale, shift, r, relu=relu, upcast=True)
    assert int(torch.isnan(ref64).sum()) == 3 and int((ref64 == float("inf")).sum()) == 1
    assert int((ref64 == -float("inf")).sum()) == (0 if relu else 2)
    assert_nonfinite_match(out, ref64, "out")
    assert_close(out, ref64, bn_act_reference(x, scale, shift, r, relu=relu), name="out")


# ------------------------------------------------------------------------------------ autograd
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
@pytest.mark.parametrize("x_fmt", [torch.contiguous_format, CL], ids=["x_nchw", "x_cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_autograd(dtype, x_fmt, relu, backend):
    """Gradients of x, scale, shift and residual vs autograd through the float64 reference."""
    inputs = make_case(SHAPES["1x17x9x5"], dtype, x_fmt=x_fmt, requires_grad=True)
    out = bn_act(*inputs, relu=relu, backend=backend)
    g = torch.randn(out.shape, device=DEVICE).to(out.dtype)
    grads = torch.autograd.grad(out, inputs, g)
    grads64 = torch.autograd.grad(bn_act_reference(*inputs, relu=relu, upcast=True), inputs, g.double())
    grads_same = torch.autograd.grad(bn_act_reference(*inputs, relu=relu), inputs, g)
    for name, t, got, want, same in zip("x scale shift residual".split(), inputs, grads, grads64, grads_same):
        assert got is not None and got.dtype == t.dtype and got.shape == t.shape, name
        assert_close(got, want, same, name=f"grad {name}", dtype=dtype)


@NEEDS_TRITON
def test_autograd_without_residual_and_partial():
    x, scale, shift, _ = make_case(SHAPES["2x5x7x7"], torch.float32, residual=False)
    scale.requires_grad_(True)
    out = bn_act(x, scale, shift, backend="triton")
    (gs,) = torch.autograd.grad(out.sum(), [scale])
    (gs64,) = torch.autograd.grad(bn_act_reference(x, scale, shift, upcast=True).sum(), [scale])
    (gs32,) = torch.autograd.grad(bn_act_reference(x, scale, shift).sum(), [scale])
    assert_close(gs, gs64, gs32, name="grad scale")
    assert x.grad is None and shift.grad is None


# ------------------------------------------------------------------------------------ fallback
@pytest.fixture
def triton_spy(monkeypatch):
    """The input dtype of every launch of the Triton path (_BnActFn.apply)."""
    return spy_apply(monkeypatch, bam._BnActFn)


@NEEDS_TRITON
def test_triton_backend_really_runs_triton(triton_spy):
    x, scale, shift, r = make_case(SHAPES["2x5x7x7"], torch.float16)
    bn_act(x, scale, shift, r, backend="triton")
    assert triton_spy == [torch.float16]


@NEEDS_TRITON
@pytest.mark.parametrize("case", ["float64", "float64_residual"])
def test_float64_falls_back_to_torch(case, triton_spy):
    x, scale, shift, r = make_case(SHAPES["2x5x7x7"], torch.float64 if case == "float64" else torch.float32,
                                   res_dtype=torch.float64)
    out = bn_act(x, scale, shift, r, backend="triton")
    assert triton_spy == [] and out.dtype == torch.float64
    check(out, x, scale, shift, r, True)


# -------------------------------------------------------------------------------- bad inputs
def _bad(case):
    x, scale, shift, r = torch.randn(2, 5, 7, 7), torch.rand(5), torch.randn(5), torch.randn(2, 5, 7, 7)
    if case == "x_3d":
        x = x[0]
    elif case == "x_int":
        x = x.long()
    elif case == "x_not_tensor":
        x = 1.0
    elif case == "scale_shape":
        scale = torch.rand(4)
    elif case == "scale_2d":
        scale = scale.view(5, 1)
    elif case == "shift_int":
        shift = shift.int()
    elif case == "shift_device":
        shift = shift.to("meta")
    elif case == "residual_shape":
        r = torch.randn(2, 5, 7, 6)
    elif case == "residual_int":
        r = r.long()
    return x, scale, shift, r


BAD = {
    "x_3d": (ValueError, ["x:", "4-D", "got 3-D", "[5, 7, 7]"]),
    "x_int": (TypeError, ["x:", "floating-point", "torch.int64"]),
    "x_not_tensor": (TypeError, ["x:", "torch.Tensor", "float"]),
    "scale_shape": (ValueError, ["scale:", "[5]", "[4]"]),
    "scale_2d": (ValueError, ["scale:", "1-D", "got 2-D"]),
    "shift_int": (TypeError, ["shift:", "floating-point", "torch.int32"]),
    "shift_device": (ValueError, ["shift:", "cpu", "meta"]),
    "residual_shape": (ValueError, ["residual:", "[2, 5, 7, 7]", "[2, 5, 7, 6]"]),
    "residual_int": (TypeError, ["residual:", "floating-point", "torch.int64"]),
}


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=NEEDS_TRITON), "auto"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs(case, backend):
    exc, words = BAD[case]
    with pytest.raises(exc) as info:
        bn_act(*_bad(case), backend=backend)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_cuda_backend_is_refused_with_the_reason(monkeypatch):
    """Where the compiled library cannot be loaded, an explicit "cuda" says why (simulated)."""
    from resnet_fused import _ext

    monkeypatch.setattr(_ext, "_state", {"done": True, "error": "simulated: the extension is not built"})
    with pytest.raises(BackendUnavailableError, match="simulated: the extension is not built"):
        bn_act(*make_case(SHAPES["2x5x7x7"], torch.float32), backend="cuda")


@pytest.mark.skipif(not INTERPRET, reason="CPU tensors: the Triton backend needs TRITON_INTERPRET=1")
def test_backward_lets_gradient_through_nan_like_relu():
    """PyTorch's ReLU backward zeroes the gradient only where the pre-activation is <= 0: at a NaN
    it passes. The fused backward must do the same (it recomputes the mask from the output)."""
    x = torch.randn(2, 3, 4, 5)
    x[0, 1, 2, 3] = float("nan")
    scale, shift = torch.rand(3) + 0.5, torch.randn(3)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    bn_act(xs[0], scale, shift, backend="triton").backward(torch.ones(2, 3, 4, 5))
    bn_act_reference(xs[1], scale, shift).backward(torch.ones(2, 3, 4, 5))
    assert xs[0].grad[0, 1, 2, 3] == xs[1].grad[0, 1, 2, 3] == scale[1]
    torch.testing.assert_close(xs[0].grad, xs[1].grad)
