"""The compiled library's dispatch surface, on the CPU (runs in CI; no GPU, no CUDA build needed).

- ``torch.library.opcheck`` of every ``torch.ops.resnet_fused_C`` op on CPU tensors: schema,
  fake (meta) implementations against the real outputs (shape, dtype, strides, device), and AOT
  dispatch with dynamic shapes. A fake with the wrong layout or dtype fails here, long before
  ``torch.compile`` would mis-trace a GPU model.
- ``torch.compile(fullgraph=True, backend="aot_eager")`` of a training ``Bottleneck`` and a
  ``PreActBottleneck`` pinned to ``backend="cuda"`` (the C++ kernels run the CPU tensors): the
  graphs hold the library's ops, and two training steps match the uncompiled block bit for bit,
  and the float64 reference within 4x PyTorch's own float32 error.
- The tensor layer's argument checks: ``ValueError`` / ``TypeError`` naming the tensor.
- The loader's error paths (``resnet_fused._ext``): ``RESNET_FUSED_JIT=0`` without an
  ahead-of-time build, an ahead-of-time build recorded for another torch (or with no record, or
  that does not load), and a build without CUDA kernels asked to run a CUDA tensor. Each reason is
  precise, and reaches ``backend="cuda"`` as ``BackendUnavailableError``; ``"auto"`` on CPU never
  uses the library, so it takes the PyTorch path without a warning.

Tests that need the library skip with the loader's own reason when it is unavailable.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
import types
import warnings

import pytest
import torch

import resnet_fused as rf
from resnet_fused import _ext, backends
from resnet_fused.backends import BackendUnavailableError
from resnet_fused.dispatch import candidates as dispatch_candidates
from resnet_fused.ops import bn_act
from builders import build_pair, build_preact_pair, load_params
from utils import assert_close

CL = torch.channels_last
NCHW = torch.contiguous_format
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def C():
    """``torch.ops.resnet_fused_C``, loaded (built on first use); skips with the loader's reason."""
    err = _ext.load_error()
    if err is not None:
        pytest.skip(f"the compiled library is unavailable: {err}")
    return torch.ops.resnet_fused_C


def _rand(*shape, dtype=torch.float32, fmt=NCHW, seed=0, scale=1.0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    t = offset + scale * torch.randn(*shape, generator=g)
    return t.to(dtype).contiguous(memory_format=fmt) if len(shape) == 4 else t.to(dtype)


# ==================================================================================== opcheck
def _opcheck_cases(C):
    c = 5
    y = _rand(2, c, 4, 3, fmt=CL, seed=1)  # channels_last: a fake that ignores the layout fails
    y16 = _rand(2, c, 4, 3, dtype=torch.float16, fmt=CL, seed=2)
    r = _rand(2, c, 4, 3, seed=3)  # NCHW next to a channels_last y: the op makes it y's layout
    r16 = _rand(2, c, 4, 3, dtype=torch.float16, fmt=CL, seed=4)
    g = _rand(2, c, 4, 3, fmt=CL, seed=5)
    mean, scale, shift = _rand(c, seed=6), _rand(c, seed=7), _rand(c, seed=8)
    rm, rs, rh = _rand(c, seed=9), _rand(c, seed=10), _rand(c, seed=11)
    k = _rand(c, seed=12)
    mask = C.bn_act(y, mean, scale, shift, None, None, None, None, True, torch.float32, True)[1]
    x_cl = _rand(2, 8, 7, 6, fmt=CL, seed=13)
    x_nchw = _rand(1, 3, 9, 8, seed=14)
    x_bf = _rand(2, 8, 5, 5, dtype=torch.bfloat16, fmt=CL, seed=15)
    count = torch.tensor([24.0])
    anchor, off, m2 = _rand(c, seed=16), _rand(c, seed=17, scale=0.1), _rand(c, seed=18).abs() * 24
    return {
        "bn_act-eval-relu-mask": (C.bn_act, (y, None, scale, shift, None, None, None, None, True, torch.float32,
                                             True)),
        "bn_act-dual-out-bf16": (C.bn_act, (y, mean, scale, shift, r, rm, rs, rh, True, torch.bfloat16, True)),
        "bn_act-identity-norelu-fp16": (C.bn_act, (y16, mean, scale, shift, r16, None, None, None, False,
                                                   torch.float16, True)),
        "bn_act-nchw-fp16-out32": (C.bn_act, (y16.contiguous(), mean, scale, shift, None, None, None, None, True,
                                              torch.float32, False)),
        "relu_mask_backward-cl": (C.relu_mask_backward, (g, mask, True)),
        "relu_mask_backward-nchw": (C.relu_mask_backward, (g, mask, False)),
        "bn_act_bwd_reduce-dual": (C.bn_act_bwd_reduce, (g, y, mean, scale, shift, r, rm, rs, rh)),
        "bn_act_bwd_reduce-nores": (C.bn_act_bwd_reduce, (g, y, mean, scale, shift, None, None, None, None)),
        "bn_act_bwd_apply-dual": (C.bn_act_bwd_apply, (g, y, mean, scale, shift, k, k, r, rm, rs, rh, k, k,
                                                       torch.float32)),
        "bn_act_bwd_apply-identity-r16": (C.bn_act_bwd_apply, (g, y, mean, scale, shift, k, k, r16, None, None,
                                                               None, None, None, torch.float16)),
        "bn_act_bwd_apply-nores": (C.bn_act_bwd_apply, (g.contiguous(), y.contiguous(), mean, scale, shift, k, k,
                                                        None, None, None, None, None, None, torch.float32)),
        "channel_stats-cl-fp16": (C.channel_stats, (y16,)),
        "channel_stats-nchw": (C.channel_stats, (x_nchw,)),
        "bn_finalize-affine": (C.bn_finalize, (count, anchor, off, m2, scale, shift, 1e-5)),
        "bn_finalize-noaffine": (C.bn_finalize, (count, anchor, off, m2, None, None, 1e-3)),
        "conv_bias_act-cl-bias-res-relu-s2": (C.conv_bias_act, (
            x_cl, _rand(4, 8, 3, 3, seed=19), _rand(4, seed=20), _rand(2, 4, 4, 3, fmt=CL, seed=21),
            [2, 2], [1, 1], [1, 1], True, False)),
        "conv_bias_act-nchw-plain-dil2": (C.conv_bias_act, (
            x_nchw, _rand(6, 3, 3, 3, seed=22), None, None, [1, 1], [2, 2], [2, 2], False, False)),
        "conv_bias_act-bf16-1x1": (C.conv_bias_act, (
            x_bf, _rand(16, 8, 1, 1, dtype=torch.bfloat16, seed=23), _rand(16, seed=24), None, [1, 1], [0, 0],
            [1, 1], True, False)),
        "conv_bias_act_stats-cl-res-s2": (C.conv_bias_act_stats, (
            x_cl, _rand(4, 8, 3, 3, seed=25), None, _rand(2, 4, 4, 3, fmt=CL, seed=26), [2, 2], [1, 1], [1, 1],
            False, False)),
        "conv_bias_act_stats-nchw-bias-relu-fp16": (C.conv_bias_act_stats, (
            x_nchw.half(), _rand(6, 3, 3, 3, dtype=torch.float16, seed=27), _rand(6, seed=28), None, [1, 1], [1, 1],
            [1, 1], True, False)),
    }


OPCHECK_CASES = ["bn_act-eval-relu-mask", "bn_act-dual-out-bf16", "bn_act-identity-norelu-fp16",
                 "bn_act-nchw-fp16-out32", "relu_mask_backward-cl", "relu_mask_backward-nchw",
                 "bn_act_bwd_reduce-dual", "bn_act_bwd_reduce-nores", "bn_act_bwd_apply-dual",
                 "bn_act_bwd_apply-identity-r16", "bn_act_bwd_apply-nores", "channel_stats-cl-fp16",
                 "channel_stats-nchw", "bn_finalize-affine", "bn_finalize-noaffine",
                 "conv_bias_act-cl-bias-res-relu-s2", "conv_bias_act-nchw-plain-dil2", "conv_bias_act-bf16-1x1",
                 "conv_bias_act_stats-cl-res-s2", "conv_bias_act_stats-nchw-bias-relu-fp16"]


@pytest.mark.parametrize("case", OPCHECK_CASES)
def test_opcheck(C, case):
    op, args = _opcheck_cases(C)[case]
    torch.library.opcheck(op.default, args)


def test_every_op_has_an_opcheck_case(C):
    """A new op in bind.cpp must get a case above (the introspection ops return strings, no fake)."""
    tensor_ops = {"bn_act", "relu_mask_backward", "bn_act_bwd_reduce", "bn_act_bwd_apply", "channel_stats",
                  "bn_finalize", "conv_bias_act", "conv_bias_act_stats"}
    assert {case.split("-")[0] for case in OPCHECK_CASES} == tensor_ops
    for name in tensor_ops | {"conv_kernel_name", "build_info"}:
        assert hasattr(C, name), name


def test_introspection_ops_on_cpu(C):
    info = json.loads(C.build_info())
    assert info["torch"] == torch.__version__, info
    assert _ext.build_info() == info
    x, w = _rand(1, 8, 5, 5, fmt=CL), _rand(8, 8, 3, 3)
    name = C.conv_kernel_name(x, w, None, [1, 1], [1, 1], [1, 1], True)
    assert name == "fallback: CPU tensors (oneDNN conv + C++ epilogue)", name


@pytest.mark.skipif(torch.version.cuda is not None, reason="a CUDA build of torch may build the CUDA kernels")
def test_cpu_only_build_says_no_cuda_kernels(C):
    """The real library on a CPU-only torch: CPU tensors run, CUDA tensors are refused with why."""
    assert _ext.build_info()["cuda"] is False
    err = _ext.cuda_error()
    assert err is not None and "no CUDA kernels" in err and "is not a CUDA build" in err, err
    assert backends.unavailable_reason("cuda", torch.device("cpu")) is None
    assert "no CUDA kernels" in backends.unavailable_reason("cuda", torch.device("cuda"))


# ======================================================================= argument checks
def _bad_calls(C):
    """name: (callable, exception type, message regex). Each must fail naming the tensor."""
    y = _rand(2, 4, 3, 3)
    v = _rand(4)
    mask = C.bn_act(y, None, v, v, None, None, None, None, True, torch.float32, True)[1]
    x, w = _rand(1, 8, 5, 5), _rand(4, 8, 3, 3)
    one = torch.tensor([9.0])

    def bn(*a, out_dtype=torch.float32):
        return lambda: C.bn_act(*a, True, out_dtype, False)

    def conv(x_, w_, b_=None, r_=None, padding=1):
        return lambda: C.conv_bias_act(x_, w_, b_, r_, [1, 1], [padding, padding], [1, 1], True, False)

    return {
        "y-int": (bn(y.int(), None, v, v, None, None, None, None), TypeError,
                  r"^y: expected dtype float32, float16 or bfloat16"),
        "y-float64": (bn(y.double(), None, v, v, None, None, None, None), TypeError, r"^y: expected dtype"),
        "y-3d": (bn(y[0], None, v, v, None, None, None, None), ValueError, r"^y: expected a 4-D"),
        "scale-length": (bn(y, None, v[:3], v, None, None, None, None), ValueError, r"^scale: expected shape \[4\]"),
        "shift-int": (bn(y, None, v, v.int(), None, None, None, None), TypeError,
                      r"^shift: expected a floating-point tensor"),
        "mean-length": (bn(y, v[:2], v, v, None, None, None, None), ValueError, r"^mean: expected shape \[4\]"),
        "r-shape": (bn(y, None, v, v, y[:1], None, None, None), ValueError, r"^r: expected shape"),
        "r_scale-alone": (bn(y, None, v, v, y, None, v, None), ValueError,
                          r"r_scale, r_shift: expected both or neither"),
        "out_dtype-float64": (bn(y, None, v, v, None, None, None, None, out_dtype=torch.float64), TypeError,
                              r"^out_dtype: expected dtype"),
        "mask-size": (lambda: C.relu_mask_backward(y, mask[:-1], False), ValueError, r"^mask: expected shape"),
        "mask-dtype": (lambda: C.relu_mask_backward(y, mask.int(), False), TypeError, r"^mask: expected dtype uint8"),
        "g-shape": (lambda: C.bn_act_bwd_reduce(y[:1], y, v, v, v, None, None, None, None), ValueError,
                    r"^g: expected shape"),
        "r_k2-missing": (lambda: C.bn_act_bwd_apply(y, y, v, v, v, v, v, y, v, v, v, None, None, torch.float32),
                         ValueError, r"r_k2, r_k3: expected both"),
        "x-2d": (lambda: C.channel_stats(y[0, 0]), ValueError, r"^x: expected a 4-D"),
        "count-2-elements": (lambda: C.bn_finalize(torch.ones(2), v, v, v, None, None, 1e-5), ValueError,
                             r"^count: expected 1 element"),
        "anchor-2d": (lambda: C.bn_finalize(one, y[0, 0], v, v, None, None, 1e-5), ValueError,
                      r"^anchor: expected shape \[C\]"),
        "weight-length": (lambda: C.bn_finalize(one, v, v, v, v[:3], None, 1e-5), ValueError,
                          r"^weight: expected shape \[4\]"),
        "conv-in-channels": (conv(x, w[:, :5]), ValueError, r"^weight: expected 8 input channels"),
        "conv-weight-dtype": (conv(x, w.half()), TypeError, r"^weight: expected dtype"),
        "conv-bias-length": (conv(x, w, v[:3]), ValueError, r"^bias: expected shape \[4\]"),
        "conv-r-shape": (conv(x, w, None, _rand(1, 4, 3, 3)), ValueError, r"^r: expected shape \[1, 4, 5, 5\]"),
        "conv-too-small": (conv(x[..., :2, :2], w, padding=0), ValueError, r"^x: spatial size 2x2 is too small"),
    }


BAD_CALLS = ["y-int", "y-float64", "y-3d", "scale-length", "shift-int", "mean-length", "r-shape", "r_scale-alone",
             "out_dtype-float64", "mask-size", "mask-dtype", "g-shape", "r_k2-missing", "x-2d", "count-2-elements",
             "anchor-2d", "weight-length", "conv-in-channels", "conv-weight-dtype", "conv-bias-length",
             "conv-r-shape", "conv-too-small"]


@pytest.mark.parametrize("case", BAD_CALLS)
def test_bad_arguments_raise_naming_the_tensor(C, case):
    """The tensor layer's checks (csrc/ops.cpp): ValueError for shapes, ranks and devices, TypeError
    for dtypes, the message starting with the argument's name. CPU and CUDA share this code."""
    calls = _bad_calls(C)
    assert set(calls) == set(BAD_CALLS)
    call, exc, pattern = calls[case]
    with pytest.raises(exc, match=pattern):
        call()


# ===================================================================== empty tensors (CPU)
def test_empty_tensors(C):
    v = _rand(4)
    y = torch.empty(0, 4, 3, 3)
    out, mask = C.bn_act(y, v, v, v, y, v, v, v, True, torch.bfloat16, True)
    assert out.shape == y.shape and out.dtype == torch.bfloat16 and mask.shape == (0,)
    assert C.relu_mask_backward(y, mask, True).shape == y.shape
    sums = C.bn_act_bwd_reduce(y, y, v, v, v, y, v, v, v)
    assert all(torch.equal(s, torch.zeros(4)) for s in sums)
    dy, dr = C.bn_act_bwd_apply(y, y, v, v, v, v, v, y, v, v, v, v, v, torch.float16)
    assert dy.shape == y.shape and dr.shape == y.shape and dr.dtype == torch.float16
    for x in (y, torch.empty(2, 4, 0, 3)):
        count, anchor, off, m2 = C.channel_stats(x)
        assert count.tolist() == [0.0] and all(torch.equal(t, torch.zeros(4)) for t in (anchor, off, m2))
        mean, var, scale, shift, invstd = C.bn_finalize(count, anchor, off, m2, v, v, 1e-5)
        assert torch.isnan(var).all() and torch.isnan(scale).all(), "no values: NaN variance, as torch.var"
    out = C.conv_bias_act(torch.empty(0, 4, 7, 7), _rand(6, 4, 3, 3), _rand(6), None, [2, 2], [1, 1], [1, 1],
                          True, False)
    assert out.shape == (0, 6, 4, 4)


# ================================================================ torch.compile (aot_eager)
# name: (build () -> (ours, reference) with one state, input shape, memory format, bf16 autocast)
COMPILE_CASES = {
    "bottleneck-ds-s2": (lambda: build_pair(("Bottleneck", dict(inplanes=6, planes=3, stride=2), True, None)),
                         (2, 6, 7, 7), NCHW, False),
    "preact-bottleneck-proj-s2-cl": (lambda: build_preact_pair(("preact", dict(cin=8, planes=2, stride=2), "conv",
                                                                 None)), (2, 8, 7, 7), CL, False),
    "bottleneck-ds-s2-cl-autocast-bf16": (
        lambda: build_pair(("Bottleneck", dict(inplanes=8, planes=4, stride=2), True, None)), (2, 8, 7, 7), CL, True),
}


def _step(model, x, grad_seed, dtype=torch.float32, amp=False):
    xi = x.detach().to(dtype).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        out = model(xi)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed))
    (out * g.to(out.dtype)).sum().backward()
    return out.detach(), xi.grad


@pytest.mark.filterwarnings("ignore:Your compiler for AOTAutograd is returning a function")
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("case", list(COMPILE_CASES))
def test_compile_aot_eager_fullgraph_cuda_backend_on_cpu(C, case):
    """Two training steps of the block compiled whole (``fullgraph=True``: a graph break is an
    error) with the library's ops in it; bitwise the uncompiled block's results (aot_eager runs the
    very same ops), and (float32) within 4x PyTorch's float32 error of the float64 reference. Before
    each step every model takes the float64 reference's parameters; buffers are never copied, so
    running statistics and ``num_batches_tracked`` are each model's own updates. Under bf16
    autocast only the bitwise comparison: at these sizes one ReLU flip near 0 decides a bf16 error
    (tests/test_train_blocks.py judges autocast training by medians over draws)."""
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    build, shape, fmt, amp = COMPILE_CASES[case]
    ours, ref = build()
    ours.train()
    ref.train()
    ours.backend = "cuda"
    uncompiled = copy.deepcopy(ours)
    ref32, ref64 = copy.deepcopy(ref), copy.deepcopy(ref).double()
    rec = AotEagerAndRecordGraphs()
    torch._dynamo.reset()
    try:
        compiled = torch.compile(ours, fullgraph=True, backend=rec)
        opt = torch.optim.SGD(ref64.parameters(), lr=0.05, momentum=0.9)
        for step in range(2):
            tag = f"step {step}: "
            load_params((ours, uncompiled, ref32), dict(ref64.named_parameters()))
            x = torch.randn(shape, generator=torch.Generator().manual_seed(100 + step)).contiguous(memory_format=fmt)
            out_c, dx_c = _step(compiled, x, 200 + step, amp=amp)
            out_u, dx_u = _step(uncompiled, x, 200 + step, amp=amp)
            out_32, dx_32 = _step(ref32, x, 200 + step, amp=amp)
            out_64, dx_64 = _step(ref64, x, 200 + step, torch.float64)
            assert out_c.is_contiguous(memory_format=fmt), f"{tag}compiled output layout {out_c.stride()}"
            assert out_c.dtype == (torch.bfloat16 if amp else torch.float32), out_c.dtype
            for what, c, u, t32, t64 in (("output", out_c, out_u, out_32, out_64),
                                         ("x.grad", dx_c, dx_u, dx_32, dx_64)):
                if not amp:
                    assert_close(c, t64, t32, name=tag + "compiled " + what)
                assert torch.equal(c, u), f"{tag}{what}: compiled differs from the uncompiled block"
            named = [dict(m.named_parameters()) for m in (ours, uncompiled, ref32, ref64)]
            for n, p in named[0].items():
                assert p.grad is not None, f"{tag}{n}: no gradient through the compiled block"
                if not amp:
                    assert_close(p.grad, named[3][n].grad, named[2][n].grad, name=f"{tag}compiled {n}.grad")
                assert torch.equal(p.grad, named[1][n].grad), f"{tag}{n}.grad: compiled vs uncompiled"
            bufs = [dict(m.named_buffers()) for m in (ours, uncompiled, ref32, ref64)]
            for n, b in bufs[0].items():
                if n.endswith("num_batches_tracked"):
                    assert int(b) == int(bufs[1][n]) == int(bufs[3][n]) == step + 1, f"{tag}{n} = {int(b)}"
                else:
                    if not amp:
                        assert_close(b, bufs[3][n], bufs[2][n], name=f"{tag}compiled {n}")
                    assert torch.equal(b, bufs[1][n]), f"{tag}{n}: compiled vs uncompiled"
            opt.step()
            opt.zero_grad()
    finally:
        torch._dynamo.reset()
    # the fused training path with the library's kernels is what got compiled, once (no spy on the
    # Python path here: a recording closure would itself become a guard and force a recompile)
    fw = "\n".join(gm.code for gm in rec.fw_graphs)
    bw = "\n".join(gm.code for gm in rec.bw_graphs)
    assert len(rec.fw_graphs) == 1, f"{len(rec.fw_graphs)} forward graphs: recompiled between steps"
    # post-activation: every conv's statistics come with it; pre-activation: x's come from channel_stats
    needed = ("channel_stats", "conv_bias_act", "bn_finalize") if case.startswith("preact") else \
        ("conv_bias_act_stats", "bn_act", "bn_finalize")
    for op in needed:
        assert f"resnet_fused_C.{op}" in fw, f"the compiled forward does not call resnet_fused_C::{op}"
    for op in ("bn_act_bwd_reduce", "bn_act_bwd_apply"):
        assert f"resnet_fused_C.{op}" in bw, f"the compiled backward does not call resnet_fused_C::{op}"
    assert "torch.ops.resnet_fused." not in fw + bw, "the Triton ops got into a block pinned to the cuda backend"
    assert "batch_norm" not in fw, "the compiled forward runs eager BatchNorm"


_COMPILE_FIRST_CHILD = """
import json
import torch
from torch import nn
import resnet_fused as rf  # nothing else: the test helpers may load the library on import
from resnet_fused import _ext
torch.manual_seed(0)
ours = rf.Bottleneck(8, 4, 2, downsample=nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16)))
ours.train()
ours.backend = "cuda"
assert "done" not in _ext._state, "the library was already looked for"
compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
try:
    out = compiled(torch.randn(2, 8, 7, 7))
    print(json.dumps({"error": None, "shape": list(out.shape)}))
except Exception as exc:
    print(json.dumps({"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}"}))
"""


def test_compile_fullgraph_as_the_first_use_of_the_library(C):
    """In a fresh process (the library built and cached by this one, not loaded there yet)."""
    out = _run_child(_COMPILE_FIRST_CHILD, {})
    assert out["error"] is None, out["error"]
    assert out["shape"] == [2, 16, 4, 4]


# ============================================================================ the loader
@pytest.fixture
def fresh_loader(monkeypatch, tmp_path):
    """A loader that has tried nothing yet, whose package directory is ``tmp_path`` (no
    ahead-of-time build unless the test puts one there). The real state comes back afterwards
    (a library already loaded into this process stays loaded, whatever the fake state says)."""
    monkeypatch.setattr(_ext, "_state", {})
    monkeypatch.setattr(_ext, "_package_dir", lambda: tmp_path)
    monkeypatch.setattr(dispatch_candidates, "_warned", set())
    rf.dispatch.forget()  # decisions made with the real library present are not this loader's
    yield tmp_path
    rf.dispatch.forget()


def _cpu_x():
    return torch.randn(2, 4, 3, 3), torch.rand(4) + 0.5, torch.randn(4)


def _check_unavailable_everywhere(reason_part):
    """The recorded reason reaches every way of asking for the cuda backend."""
    err = _ext.load_error()
    assert err is not None and reason_part in err, err
    assert _ext.cuda_error() == err
    assert _ext.build_info() is None and _ext.library_path() is None
    assert backends.unavailable_reason("cuda") == err
    assert backends.unavailable_reason("cuda", torch.device("cpu")) == err
    assert "cuda" not in rf.available_backends(torch.device("cpu"))
    with pytest.raises(RuntimeError, match="^" + _re_escape(err)):
        _ext.extension()
    x, s, h = _cpu_x()
    with pytest.raises(BackendUnavailableError, match=_re_escape(err)):
        bn_act(x, s, h, backend="cuda")
    with pytest.raises(BackendUnavailableError, match=_re_escape(err)):
        rf.set_backend("cuda")
    with pytest.raises(BackendUnavailableError, match=_re_escape(err)):
        with rf.use_backend("cuda"):
            pass
    # "auto" measures without the library's candidate (the PyTorch path wins on CPU), and says so
    # once, with the reason
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y1 = bn_act(x, s, h, backend="auto")
        y2 = bn_act(x, s, h, backend="auto")
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "'cuda' candidate" in msgs[0] and err in msgs[0], msgs
    torch.testing.assert_close(y1, bn_act(x, s, h, backend="torch"), rtol=0, atol=0)
    assert torch.equal(y1, y2)
    return err


def _re_escape(s):
    import re

    return re.escape(s)


@pytest.mark.parametrize("value", ["false", " OFF ", "no"])
def test_jit_disabled_without_aot_build(fresh_loader, monkeypatch, value):
    """The other spellings the loader reads as off (case and spaces ignored; the subprocess test
    below runs "0")."""
    monkeypatch.setenv(_ext.JIT_ENV, value)
    err = _check_unavailable_everywhere("no ahead-of-time build")
    assert err == ("the C++/CUDA extension is not built: no ahead-of-time build, and RESNET_FUSED_JIT=0 "
                   "forbids building it on first use"), err


def test_aot_build_for_another_torch_is_refused(fresh_loader):
    (fresh_loader / "_C.dummy.so").write_bytes(b"not a library")
    (fresh_loader / "_C.build.json").write_text(json.dumps({"torch": "0.0.0"}))
    err = _check_unavailable_everywhere("built for torch 0.0.0")
    assert f"this is torch {torch.__version__}" in err and "_C.dummy.so" in err and "rebuild" in err, err


@pytest.mark.parametrize("meta", [None, "{not json", json.dumps({"cuda": True})],
                         ids=["missing", "corrupt", "no-torch"])
def test_aot_build_without_a_readable_record_is_refused(fresh_loader, meta):
    (fresh_loader / "_C.dummy.so").write_bytes(b"not a library")
    if meta is not None:
        (fresh_loader / "_C.build.json").write_text(meta)
    err = _check_unavailable_everywhere("has no readable _C.build.json")
    assert "_C.dummy.so" in err and "rebuild" in err, err


def test_build_without_cuda_kernels_refuses_cuda_tensors(monkeypatch):
    """A library built without CUDA (the state the loader records then): CPU tensors are fine,
    a CUDA tensor gets BackendUnavailableError saying there are no CUDA kernels, and why."""
    why = f"torch {torch.__version__} is not a CUDA build"
    monkeypatch.setattr(_ext, "_state", {"done": True, "path": "/nowhere/resnet_fused_C.so", "cuda_problem": why,
                                         "info": {"torch": torch.__version__, "cuda": False, "archs": ""}})
    assert _ext.load_error() is None
    assert _ext.cuda_error() == f"the C++/CUDA extension has no CUDA kernels in this build: {why}"
    assert backends.unavailable_reason("cuda", torch.device("cpu")) is None
    reason = backends.unavailable_reason("cuda", torch.device("cuda"))
    assert reason is not None and "no CUDA kernels" in reason and why in reason
    assert "cuda" in rf.available_backends(torch.device("cpu"))
    assert "cuda" not in rf.available_backends(torch.device("cuda"))
    rf.set_backend("cuda")  # usable on some device (the CPU): accepted (conftest restores the choice)
    # resolve() only reads the device of its tensor argument
    fake_cuda = types.SimpleNamespace(device=torch.device("cuda", 0))
    with pytest.raises(BackendUnavailableError, match="no CUDA kernels"):
        backends.resolve("cuda", fake_cuda)
    assert backends.resolve("cuda", torch.zeros(1, 1, 1, 1)) == "cuda"
    # no recorded problem: the generic reason
    monkeypatch.setitem(_ext._state, "cuda_problem", None)
    assert _ext.cuda_error() == "the C++/CUDA extension has no CUDA kernels in this build: it was built without CUDA"


def _run_child(code, env_extra, *args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]), **env_extra)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


_CHILD = """
import json, pathlib, sys, warnings
import torch
import resnet_fused as rf
from resnet_fused import _ext, backends
_ext._package_dir = lambda: pathlib.Path(sys.argv[1])
err = _ext.load_error()
out = {"err": err, "cuda_err": _ext.cuda_error(), "registered": _ext._registered()}
x = torch.zeros(1, 2, 1, 1)
try:
    backends.resolve("cuda", x)
    out["resolve"] = "no error"
except backends.BackendUnavailableError as exc:
    out["resolve"] = str(exc)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out["auto"] = backends.resolve("auto", x)
    for _ in range(2):  # the measured dispatch, twice, on a case "cuda" would take
        y = rf.ops.conv_bias_act(torch.randn(1, 2, 3, 3), torch.randn(2, 2, 1, 1), backend="auto")
    out["auto_ran"] = list(y.shape)
out["warnings"] = [str(w.message) for w in caught]
print(json.dumps(out))
"""


def test_jit_0_in_a_fresh_process_gives_the_precise_reason(tmp_path):
    """RESNET_FUSED_JIT=0, no ahead-of-time build, an empty extension cache: nothing is built, and
    the reason says so; "cuda" is refused with it; "auto" runs without the library's candidate and
    says so once, with the same reason."""
    pkg, cache = tmp_path / "pkg", tmp_path / "torch_extensions"
    pkg.mkdir()
    cache.mkdir()
    out = _run_child(_CHILD, {"RESNET_FUSED_JIT": "0", "TORCH_EXTENSIONS_DIR": str(cache)}, str(pkg))
    want = ("the C++/CUDA extension is not built: no ahead-of-time build, and RESNET_FUSED_JIT=0 forbids "
            "building it on first use")
    assert out["err"] == want == out["cuda_err"], out
    assert out["registered"] is False
    assert out["resolve"] == f"backend 'cuda' requested but unavailable: {want}", out
    assert out["auto"] == "auto" and out["auto_ran"] == [1, 2, 3, 3], out
    assert len(out["warnings"]) == 1 and "'cuda' candidate" in out["warnings"][0] and want in out["warnings"][0], out
    assert not any(cache.iterdir()), f"something was built or cached: {list(cache.iterdir())}"


def test_aot_build_that_does_not_load_in_a_fresh_process(tmp_path):
    """An ahead-of-time file recorded for this very torch that is no library: the load fails with
    the path and the loader's error (in a fresh process: one that already holds the real library
    would not load another)."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "_C.cpython-dummy.so").write_bytes(b"\x7fELF garbage, not a shared object")
    (pkg / "_C.build.json").write_text(json.dumps({"torch": torch.__version__}))
    out = _run_child(_CHILD, {"RESNET_FUSED_JIT": "0", "TORCH_EXTENSIONS_DIR": str(tmp_path / "cache")}, str(pkg))
    err = out["err"]
    assert err is not None and err.startswith("loading the C++/CUDA extension ") and "_C.cpython-dummy.so" in err \
        and "failed (OSError" in err, out
    assert out["registered"] is False and err in out["resolve"], out
