"""Input validation at the blocks' public boundary, and inputs PyTorch handles that we must too.

A bad input raises TypeError/ValueError naming the tensor ('x'), the expectation and what came,
before any module runs: every running_mean / running_var / num_batches_tracked is unchanged
afterwards (``nn.BatchNorm2d`` itself bumps the counter before it rejects a batch). Empty batches
and NaN/Inf inputs behave as in the reference blocks.
"""
from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

import resnet_fused as rf
from resnet_fused.models import reference as R
from builders import BACKENDS, RefPreActBottleneck, RefWideBasic
from utils import assert_close, assert_nonfinite_match, randomize_bn

CIN = 4


def _ds(cout, stride):
    return nn.Sequential(nn.Conv2d(CIN, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


def build(kind, stride=2):
    """(ours, reference) sharing one state_dict; CIN input channels, stride ``stride``."""
    torch.manual_seed(0)
    if kind == "BasicBlock":
        ds = (lambda: _ds(6, stride))
        ref, ours = R.BasicBlock(CIN, 6, stride, ds()), rf.BasicBlock(CIN, 6, stride, ds())
    elif kind == "Bottleneck":
        ds = (lambda: _ds(8, stride))
        ref, ours = R.Bottleneck(CIN, 2, stride, ds()), rf.Bottleneck(CIN, 2, stride, ds())
    elif kind == "WideBasic":
        ref, ours = RefWideBasic(CIN, 6, stride), rf.WideBasic(CIN, 6, stride)
    else:
        ds = (lambda: nn.Conv2d(CIN, 8, 1, stride, bias=False))
        ref, ours = RefPreActBottleneck(CIN, 2, stride, ds()), rf.PreActBottleneck(CIN, 2, stride, ds())
    randomize_bn(ref)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


KINDS = ["BasicBlock", "Bottleneck", "WideBasic", "PreActBottleneck"]


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_unchanged(module, snap):
    now = module.state_dict()
    assert now.keys() == snap.keys()
    for k, v in snap.items():
        assert torch.equal(now[k], v), f"{k} changed although the input was rejected"


def expect_error(block, x, exc, *patterns):
    """``block(x)`` raises ``exc`` whose message names 'x' and matches every pattern; no state moves."""
    snap = snapshot(block)
    with pytest.raises(exc) as info:
        block(x)
    msg = str(info.value)
    assert re.search(r"\bx\b", msg), f"message does not name the tensor 'x': {msg}"
    assert type(block).__name__ in msg, msg
    for p in patterns:
        assert re.search(p, msg), f"{p!r} not in message: {msg}"
    assert_unchanged(block, snap)
    return msg


@pytest.fixture(params=["train", "eval"])
def mode(request):
    return request.param


def set_mode(block, mode):
    return block.train() if mode == "train" else block.eval()


# --------------------------------------------------------------------------- rejected inputs
@pytest.mark.parametrize("kind", KINDS)
def test_wrong_channel_count(kind, mode):
    block = set_mode(build(kind)[0], mode)
    expect_error(block, torch.randn(2, CIN + 1, 6, 6), ValueError, rf"expected {CIN} channels", r"\[2, 5, 6, 6\]")
    expect_error(block, torch.randn(2, 1, 6, 6), ValueError, rf"expected {CIN} channels", r"\[2, 1, 6, 6\]")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(CIN, 6, 6), (2, CIN, 6, 6, 1), (2, CIN), ()])
def test_not_4d(kind, shape, mode):
    block = set_mode(build(kind)[0], mode)
    expect_error(block, torch.randn(shape), ValueError, r"4-D", rf"got {len(shape)}-D", re.escape(str(list(shape))))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_dtype(kind, dtype, mode):
    block = set_mode(build(kind)[0], mode)
    x = torch.ones(2, CIN, 6, 6, dtype=dtype)
    expect_error(block, x, TypeError, r"floating-point", re.escape(str(dtype)))


@pytest.mark.parametrize("kind", KINDS)
def test_non_tensor(kind, mode):
    block = set_mode(build(kind)[0], mode)
    expect_error(block, [[1.0]], TypeError, r"torch\.Tensor", r"list")


@pytest.mark.parametrize("kind", KINDS)
def test_mixed_devices(kind, mode):
    block = set_mode(build(kind)[0], mode)
    # input elsewhere than the (CPU) parameters
    expect_error(block, torch.randn(2, CIN, 6, 6, device="meta"), ValueError, r"expected a tensor on cpu", r"meta")
    # parameters elsewhere than the (CPU) input; the meta block has no values to compare
    meta_block = set_mode(build(kind)[0].to("meta"), mode)
    with pytest.raises(ValueError, match=r"input x: expected a tensor on meta.*got one on cpu"):
        meta_block(torch.randn(2, CIN, 6, 6))


@pytest.mark.parametrize("kind", KINDS)
def test_dtype_mismatch(kind, mode):
    block = set_mode(build(kind)[0], mode)
    expect_error(block, torch.randn(2, CIN, 6, 6, dtype=torch.float64), TypeError, r"float32", r"float64")
    expect_error(block, torch.randn(2, CIN, 6, 6, dtype=torch.bfloat16), TypeError, r"float32", r"bfloat16",
                 r"autocast")
    expect_error(set_mode(build(kind)[0].double(), mode), torch.randn(2, CIN, 6, 6), TypeError,
                 r"expected dtype torch.float64", r"got torch.float32")


@pytest.mark.parametrize("kind", KINDS)
def test_float64_rejected_even_under_autocast(kind, mode):
    """autocast never casts float64, so PyTorch fails mid-block (pre-act blocks after bn1 moved)."""
    block = set_mode(build(kind)[0], mode)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expect_error(block, torch.randn(2, CIN, 6, 6, dtype=torch.float64), TypeError, r"float32", r"float64")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expect_error(set_mode(build(kind)[0].double(), mode), torch.randn(2, CIN, 6, 6), TypeError,
                     r"expected dtype torch.float64", r"got torch.float32")


@pytest.mark.parametrize("kind", KINDS)
def test_low_precision_input_allowed_under_autocast(kind, mode):
    """Mixed precision is what autocast is for: a bf16 input into a float32 block, as PyTorch does it."""
    ours, ref = build(kind)
    set_mode(ours, mode)
    set_mode(ref, mode)
    ref64 = copy.deepcopy(ref).double()
    x = torch.randn(2, CIN, 6, 6).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ours(x)
        y_ref = ref(x)
    y64 = ref64(x.double())
    assert y.dtype == y_ref.dtype
    assert_close(y, y64, y_ref, name="autocast output", dtype=torch.bfloat16)
    assert_close(ours.bn1.running_mean, ref64.bn1.running_mean, ref.bn1.running_mean, name="bn1.running_mean")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("where", ["input-1x1", "inside-after-stride2"])
def test_training_batch_batchnorm_cannot_normalise(kind, where):
    ours, ref = build(kind, stride=1 if where == "input-1x1" else 2)
    ours.train()
    ref.train()
    hw = 1 if where == "input-1x1" else 2
    x = torch.randn(1, CIN, hw, hw)
    msg = expect_error(ours, x, ValueError, r"more than 1 value per channel", re.escape(str(list(x.shape))),
                       r"1x1")
    assert re.search(r"\bbn\d\b|downsample", msg), f"message does not say which BatchNorm: {msg}"
    # PyTorch itself rejects it too, on a copy: it may have moved earlier BatchNorms' statistics first
    with pytest.raises(ValueError):
        copy.deepcopy(ref)(x)
    # eval mode takes the same input, like the reference
    ours.eval()
    ref.eval()
    with torch.no_grad():
        assert_close(ours(x), copy.deepcopy(ref).double()(x.double()), ref(x), name="eval output")
    # batch 2 of the same size is fine in training
    ours.train()
    ours(torch.randn(2, CIN, hw, hw))


@pytest.mark.parametrize("kind", KINDS)
def test_batchnorm_left_in_training_inside_an_eval_block(kind):
    """block.eval() with one BatchNorm switched back to train(): that BN still needs a real batch."""
    ours, _ = build(kind, stride=1)
    ours.eval()
    ours.bn2.train()
    expect_error(ours, torch.randn(1, CIN, 1, 1), ValueError, r"bn2", r"more than 1 value per channel")
    with torch.no_grad():
        ours(torch.randn(2, CIN, 1, 1))  # a batch of 2 is fine


@pytest.mark.parametrize("kind", ["BasicBlock", "WideBasic"])
def test_batchnorm_without_running_stats_in_eval(kind):
    """track_running_stats=False normalises with batch statistics even in eval."""
    torch.manual_seed(0)
    norm = (lambda c: nn.BatchNorm2d(c, track_running_stats=False))  # noqa: E731
    block = (rf.BasicBlock(CIN, CIN, norm_layer=norm) if kind == "BasicBlock"
             else rf.WideBasic(CIN, CIN, norm_layer=norm)).eval()
    expect_error(block, torch.randn(1, CIN, 1, 1), ValueError, r"more than 1 value per channel")


# ---------------------------------------------------------------------- accepted edge inputs
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_empty_batch_like_pytorch(kind, backend, mode):
    ours, ref = build(kind)
    set_mode(ours, mode)
    set_mode(ref, mode)
    x = torch.randn(0, CIN, 6, 6)
    xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    with rf.use_backend(backend):
        y = ours(xo)
    y_ref = ref(xr)
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype
    y.sum().backward()
    y_ref.sum().backward()
    assert xo.grad.shape == xr.grad.shape
    for (n, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters()):
        assert (p.grad is None) == (q.grad is None), n
        if q.grad is not None:
            assert torch.equal(p.grad, q.grad), n
    # running stats and num_batches_tracked exactly as PyTorch leaves them (the counter moves in train)
    for (n, b), (_, c) in zip(ours.named_buffers(), ref.named_buffers()):
        assert torch.equal(b, c), f"{n}: {b} vs reference {c}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_nan_inf_propagate_in_eval_like_the_reference(kind, backend):
    ours, ref = build(kind)
    ours.eval()
    ref.eval()
    ref64 = copy.deepcopy(ref).double()
    x = torch.randn(2, CIN, 7, 7, generator=torch.Generator().manual_seed(4))
    x[0, 1, 2, 3] = float("nan")
    x[1, 0, 5, 5] = float("inf")
    x[1, 2, 0, 1] = float("-inf")
    x[0, 3, 6, 6] = float("inf")
    for fmt in (torch.contiguous_format, torch.channels_last):
        xf = x.to(memory_format=fmt)
        with torch.no_grad(), rf.use_backend(backend):
            y = ours(xf)
            y32 = ref(xf)
            y64 = ref64(xf.double())
        assert not torch.isfinite(y64).all(), "the test input must reach the output"
        assert_nonfinite_match(y, y64, name=f"{backend} output")
        assert_close(y, y64, y32, name=f"{backend} output (finite entries)")
