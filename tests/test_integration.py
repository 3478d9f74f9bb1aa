"""Cross-cutting behaviour: FX tracing, PyTorch's output-layout rule, and a property test of the
fused conv over random geometries (Hypothesis) on both backends."""
import copy

import pytest
import torch
import torch.fx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import resnet_fused as rf
from resnet_fused.models import reference as R
from resnet_fused.ops import conv_bias_act, conv_bias_act_reference
from utils import CUDA_BACKEND, INTERPRET, assert_close, randomize_bn

CL = torch.channels_last


def _models():
    return [
        ("converted_resnet18", lambda: rf.convert(randomize_bn(R.resnet18(num_classes=5))), (2, 3, 32, 32)),
        ("resnet18", lambda: randomize_bn(rf.models.resnet18(num_classes=5)), (2, 3, 32, 32)),
        ("wrn10_1", lambda: randomize_bn(rf.models.wrn(10, 1)), (2, 3, 16, 16)),
        ("preact20", lambda: randomize_bn(rf.models.preact_resnet(20)), (2, 3, 16, 16)),
    ]


@pytest.mark.parametrize("name,build,shape", _models(), ids=[m[0] for m in _models()])
def test_fx_symbolic_trace_keeps_the_function(name, build, shape):
    """torch.fx (e.g. torchvision's create_feature_extractor) traces the module-by-module forward."""
    model = build().eval()
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(shape)
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
        assert_close(gm(x), ref, model(x), name=f"{name} traced")
    # the traced graph also trains like the model (running statistics move the same way)
    gm.train()
    model.train()
    gm(x).sum().backward()
    bn_traced = [m for m in gm.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bn_traced and all(int(m.num_batches_tracked) == 1 for m in bn_traced)


@pytest.mark.parametrize("model_fmt,input_fmt", [(CL, torch.contiguous_format), (torch.contiguous_format, CL),
                                                 (CL, CL), (torch.contiguous_format, torch.contiguous_format)])
def test_output_layout_follows_pytorch(model_fmt, input_fmt):
    """A channels_last model fed NCHW input gives channels_last out, like eager (and the reverse)."""
    ref = randomize_bn(R.Bottleneck(16, 4, stride=2, downsample=torch.nn.Sequential(
        R.conv1x1(16, 16, 2), torch.nn.BatchNorm2d(16)))).eval().to(memory_format=model_fmt)
    ours = rf.convert(copy.deepcopy(ref))
    x = torch.randn(2, 16, 9, 9).contiguous(memory_format=input_fmt)
    with torch.no_grad():
        want, got = ref(x), ours(x)
    for fmt in (CL, torch.contiguous_format):
        assert want.is_contiguous(memory_format=fmt) == got.is_contiguous(memory_format=fmt), fmt
    assert_close(got, copy.deepcopy(ref).double()(x.double()), want)


def test_fold_cache_hit_returns_same_tensors_and_follows_changes():
    """The cheap hit path must still see an optimizer step and a load_state_dict."""
    block = randomize_bn(rf.BasicBlock(8, 8)).eval()
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        block(x)
        w1, _ = block._fold.get("conv1", block.conv1, block.bn1, memory_format=torch.contiguous_format)
        w2, _ = block._fold.get("conv1", block.conv1, block.bn1, memory_format=torch.contiguous_format)
        assert w1 is w2
        block.bn1.running_var.mul_(4.0)  # in place: must refold
        y = block(x)
        assert_close(y, copy.deepcopy(block).double()._forward_eager(x.double()))
        other = randomize_bn(rf.BasicBlock(8, 8))
        block.load_state_dict(other.state_dict())
        assert_close(block(x), other.eval().double()._forward_eager(x.double()))


# ---------------------------------------------------------------------------------- property test
_geometry = st.tuples(
    st.integers(1, 2),  # N
    st.integers(1, 12),  # Cin
    st.integers(1, 12),  # Cout
    st.sampled_from([1, 3, 5, 7]),  # kernel
    st.integers(1, 2),  # stride
    st.integers(0, 3),  # padding
    st.integers(1, 2),  # dilation
    st.integers(1, 9),  # H
    st.integers(1, 9),  # W
    st.booleans(),  # channels_last
    st.booleans(),  # residual
    st.booleans(),  # relu
)


def _check_geometry(geom, backend):
    n, cin, cout, k, s, p, d, h, w, cl, res, relu = geom
    oh = (h + 2 * p - d * (k - 1) - 1) // s + 1
    ow = (w + 2 * p - d * (k - 1) - 1) // s + 1
    x = torch.randn(n, cin, h, w)
    if cl:
        x = x.to(memory_format=CL)
    weight = torch.randn(cout, cin, k, k) / (cin * k * k) ** 0.5
    bias = torch.randn(cout)
    if oh <= 0 or ow <= 0:
        with pytest.raises(ValueError, match="too small"):
            conv_bias_act(x, weight, bias, stride=s, padding=p, dilation=d, backend=backend)
        return
    r = torch.randn(n, cout, oh, ow) if res else None
    out = conv_bias_act(x, weight, bias, r, stride=s, padding=p, dilation=d, relu=relu, backend=backend)
    ref = conv_bias_act_reference(x, weight, bias, r, s, p, d, relu=relu, upcast=True)
    assert_close(out, ref, conv_bias_act_reference(x, weight, bias, r, s, p, d, relu=relu), name=str(geom))
    assert out.is_contiguous(memory_format=CL if cl and x.dim() == 4 and not x.is_contiguous() else torch.contiguous_format)


@pytest.mark.parametrize("backend", ["torch", CUDA_BACKEND, pytest.param("triton", marks=pytest.mark.skipif(
    not INTERPRET, reason="CPU tensors on the Triton backend need TRITON_INTERPRET=1"))])
def test_dilated_one_tap_kernel_that_crashes_pytorchs_cpu_conv(backend):
    """(N, Cin, Cout, k, stride, padding, dilation, H, W, channels_last, residual, relu) found by
    the geometry search below: PyTorch 2.13's CPU conv dies with SIGSEGV on it (a 1x1 kernel,
    whose dilation changes nothing). The op and its reference pass dilation 1 for one-tap
    dimensions, so it runs and matches."""
    _check_geometry((2, 8, 2, 1, 2, 1, 2, 5, 1, True, False, True), backend)
    _check_geometry((2, 1, 2, 1, 2, 1, 2, 5, 1, True, True, False), backend)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_geometry)
def test_conv_bias_act_any_geometry_torch(geom):
    _check_geometry(geom, "torch")


@pytest.mark.skipif(not INTERPRET, reason="CPU tensors on the Triton backend need TRITON_INTERPRET=1")
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_geometry)
def test_conv_bias_act_any_geometry_triton(geom):
    _check_geometry(geom, "triton")
