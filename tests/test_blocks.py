"""Drop-in BasicBlock / Bottleneck against the plain reference blocks (torchvision's structure).

Every comparison runs three copies with one state_dict: ours (float32), the reference in float32
(PyTorch's own error) and the reference in float64 (the truth); ours may be at most a few times
further from the truth than PyTorch is (tests/utils.py ``assert_close``).
"""
from __future__ import annotations

import copy
import functools
import pickle

import pytest
import torch
from torch import nn

import resnet_fused as rf
from resnet_fused.models import reference as R
from resnet_fused.ops.fold import FoldCache
from builders import (BACKENDS, BLOCK_CASES, CL, NCHW, build_pair, check_eval_low_precision, eval_compare,
                      make_input, sgd_steps)
from utils import INTERPRET, assert_close, copy_via, randomize_bn


# ------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("fmt", [NCHW, CL], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("case", list(BLOCK_CASES))
def test_train_three_sgd_steps_match_reference(case, fmt, fused_calls):
    ours, ref = build_pair(case)
    ours.train()
    ref.train()
    sgd_steps(ours, ref, lambda step: make_input(case, fmt, seed=step))
    assert fused_calls == [], "training must run the eager path"


@pytest.mark.parametrize("case", ["basic-s2-ds-batch1", "bottle-groups2-s2"])
def test_momentum_none_cumulative_average(case):
    norm = functools.partial(nn.BatchNorm2d, momentum=None)
    ours, ref = build_pair(case, norm_layer=norm)
    assert all(m.momentum is None for m in ours.modules() if isinstance(m, nn.BatchNorm2d))
    sgd_steps(ours, ref, lambda step: make_input(case, seed=step), steps=4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["basic-s2-ds-batch1", "bottle-s2-ds-batch1", "bottle-groups2-s2"])
def test_eval_after_train(case, backend):
    ours, ref = build_pair(case)
    ref64 = sgd_steps(ours, ref, lambda step: make_input(case, seed=step))
    for fmt in (NCHW, CL):
        eval_compare(ours, ref, make_input(case, fmt, seed=9), backend, ref64=ref64)


# ------------------------------------------------------------------------------------ eval, fused
@pytest.mark.parametrize("fmt", [NCHW, CL], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(BLOCK_CASES))
def test_eval_fused_matches_reference(case, backend, fmt, fused_calls):
    ours, ref = build_pair(case)
    eval_compare(ours, ref, make_input(case, fmt), backend)
    n_convs = 3 if BLOCK_CASES[case][0] == "Bottleneck" else 2
    assert len(fused_calls) == n_convs + BLOCK_CASES[case][2], "eval with BatchNorm must run the fused path"
    assert set(fused_calls) == {backend}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["basic-s2-ds-batch1", "bottle-identity", "bottle-groups2-s2"])
def test_eval_autograd_through_fused_path(case, backend, fused_calls):
    ours, ref = build_pair(case)
    eval_compare(ours, ref, make_input(case, CL if backend == "triton" else NCHW), backend, grad=True)
    assert fused_calls and set(fused_calls) == {backend}


@pytest.mark.parametrize("kind", ["BasicBlock", "Bottleneck"])
def test_zero_init_residual(kind):
    case = (kind, dict(inplanes=8, planes=2 if kind == "Bottleneck" else 8), False, (2, 6, 6))
    BLOCK_CASES["_zero"] = case
    try:
        ours, ref = build_pair("_zero")
        last_bn = "bn3" if kind == "Bottleneck" else "bn2"
        for m in (ours, ref):
            nn.init.zeros_(getattr(m, last_bn).weight)
        x = make_input("_zero")
        for backend in ("torch", "triton") if INTERPRET else ("torch",):
            y = eval_compare(ours, ref, x, backend)
            # the residual branch is the BN bias alone: relu(x + bias)
            expect = torch.relu(x + getattr(ours, last_bn).bias.detach().view(1, -1, 1, 1))
            assert_close(y, expect.double(), expect, name="zero-init residual output")
        ours.train()
        ref.train()
        sgd_steps(ours, ref, lambda step: make_input("_zero", seed=step))
        assert getattr(ours, last_bn).weight.abs().sum() > 0, "the zero-initialised BN weight must learn"
    finally:
        del BLOCK_CASES["_zero"]


# ------------------------------------------------------------------------------- the fold cache
def test_fold_cache_follows_optimizer_step_in_eval(monkeypatch):
    ours, ref = build_pair("bottle-s2-ds-batch1")
    ours.eval()
    ref.eval()
    computed = []
    real = FoldCache._compute
    monkeypatch.setattr(FoldCache, "_compute", staticmethod(lambda *a: computed.append(1) or real(*a)))
    x = make_input("bottle-s2-ds-batch1")
    with torch.no_grad():
        y0 = ours(x)
        n_first = len(computed)
        assert n_first == 4  # conv1..3 + downsample
        assert torch.equal(ours(x), y0)
        assert len(computed) == n_first, "a second no_grad forward must reuse the cached folds"
    ref64 = copy.deepcopy(ref).double()
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (ours, ref, ref64)]
    for step in range(2):
        eval_compare(ours, ref, make_input("bottle-s2-ds-batch1", seed=step), "torch", ref64=ref64, grad=True)
        for o in opts:
            o.step()
            o.zero_grad()
        with torch.no_grad():
            y = eval_compare(ours, ref, x, "torch", ref64=ref64)
        assert not torch.allclose(y, y0), "the optimizer step changed the weights, the output must follow"
        y0 = y


def test_fold_cache_follows_load_state_dict_and_running_stats():
    ours, ref = build_pair("basic-s2-ds-batch1")
    x = make_input("basic-s2-ds-batch1")
    eval_compare(ours, ref, x, "torch")
    _, other = build_pair("basic-s2-ds-batch1", seed=5)
    ours.load_state_dict(other.state_dict())
    eval_compare(ours, other, x, "torch")
    with torch.no_grad():  # in-place edit of a buffer only
        ours.bn1.running_var.mul_(3.0)
        other.bn1.running_var.mul_(3.0)
    eval_compare(ours, other, x, "torch")


def test_fold_cache_follows_data_assignment():
    """``param.data = t`` keeps the Parameter object and its version counter; the fold must follow."""
    ours, ref = build_pair("basic-ds-5x6")
    x = make_input("basic-ds-5x6")
    eval_compare(ours, ref, x, "torch")
    new = torch.randn_like(ref.conv1.weight)
    ours.conv1.weight.data = new.clone()
    ref.conv1.weight.data = new.clone()
    eval_compare(ours, ref, x, "torch")


# ------------------------------------------------------------------------- drop-in compatibility
@pytest.mark.parametrize("case", ["basic-identity-7x7", "basic-s2-ds-batch1", "bottle-groups2-s2"])
def test_names_and_state_dict_are_torchvisions(case):
    ours, ref = build_pair(case)
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert [n for n, _ in ours.named_modules()] == [n for n, _ in ref.named_modules()]
    for attr in ("conv1", "bn1", "conv2", "bn2", "relu", "downsample", "stride") + (
            ("conv3", "bn3") if BLOCK_CASES[case][0] == "Bottleneck" else ()):
        assert hasattr(ours, attr), attr
    assert type(ours.relu) is nn.ReLU
    assert ours.stride == ref.stride
    assert rf.BasicBlock.expansion == 1 and rf.Bottleneck.expansion == 4
    for name, m in ref.named_modules():
        if name:
            mo = ours.get_submodule(name)
            assert type(mo) is type(m) and repr(mo) == repr(m), name


def test_constructor_errors_match_torchvision():
    with pytest.raises(ValueError, match="groups=1 and base_width=64"):
        rf.BasicBlock(4, 4, groups=2)
    with pytest.raises(ValueError, match="groups=1 and base_width=64"):
        rf.BasicBlock(4, 4, base_width=32)
    with pytest.raises(NotImplementedError, match="Dilation > 1"):
        rf.BasicBlock(4, 4, dilation=2)
    rf.Bottleneck(4, 4, groups=2, base_width=32, dilation=2)  # all allowed there


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_deepcopy_and_pickle_a_whole_block(how):
    ours, ref = build_pair("bottle-s2-ds-batch1")
    x = make_input("bottle-s2-ds-batch1", CL)
    y = eval_compare(ours, ref, x, "torch")  # fills the fold cache first
    twin = copy_via(how, ours)
    if how == "pickle":
        assert pickle.loads(pickle.dumps(ours)).state_dict().keys() == ours.state_dict().keys()
    assert type(twin) is rf.Bottleneck and not twin.training
    assert list(twin.state_dict()) == list(ours.state_dict())
    with torch.no_grad():
        assert torch.equal(twin(x), y)
    # the copy trains like the original
    twin.train()
    ref.train()
    sgd_steps(twin, ref, lambda s: make_input("bottle-s2-ds-batch1", seed=s), steps=2)
    # and is independent of it: the original (cache included) did not move
    with torch.no_grad():
        assert torch.equal(ours(x), y)


NON_BN_NORMS = {
    "groupnorm": lambda c: nn.GroupNorm(1, c),
    "identity": lambda c: nn.Identity(),
}


@pytest.mark.parametrize("norm", list(NON_BN_NORMS))
@pytest.mark.parametrize("case", ["basic-s2-ds-batch1", "bottle-groups2-s2"])
def test_non_batchnorm_norm_layer_runs_eager_and_stays_correct(case, norm, fused_calls):
    ours, ref = build_pair(case, norm_layer=NON_BN_NORMS[norm])
    sgd_steps(ours, ref, lambda s: make_input(case, seed=s), steps=2)
    for backend in ("torch", "triton") if INTERPRET else ("torch",):
        for fmt in (NCHW, CL):
            eval_compare(ours, ref, make_input(case, fmt, seed=3), backend)
    assert fused_calls == [], "a block without BatchNorm cannot fold and must run eagerly"


def test_frozen_batchnorm_eval_block_in_train_mode():
    """Block in train mode but its BNs frozen in eval (fine-tuning): eager, running stats untouched."""
    ours, ref = build_pair("basic-s2-ds-batch1")
    for m in (ours, ref):
        m.train()
        for b in m.modules():
            if isinstance(b, nn.BatchNorm2d):
                b.eval()
    sgd_steps(ours, ref, lambda s: make_input("basic-s2-ds-batch1", seed=s), steps=2)


@pytest.mark.parametrize("how", ["cast", "autocast"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["basic-s2-ds-batch1", "bottle-s2-ds-batch1", "bottle-groups2-s2"])
def test_eval_low_precision(case, backend, dtype, how):
    """Half-precision blocks (``.to(dtype)``) and float32 blocks under autocast, vs PyTorch in the same dtype."""
    ours, ref = build_pair(case)
    check_eval_low_precision(ours, ref, make_input(case), backend, dtype, how)


@pytest.mark.parametrize("kind", ["BasicBlock", "Bottleneck"])
def test_resnet_d_downsample_avgpool_conv_bn(kind, fused_calls):
    """A downsample that is not torchvision's (conv1x1, BN) pair runs as a module, in both modes."""
    planes = 6 if kind == "BasicBlock" else 2
    cout = planes * getattr(rf, kind).expansion

    def make(cls):
        ds = nn.Sequential(nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False),
                           nn.Conv2d(4, cout, 1, bias=False), nn.BatchNorm2d(cout))
        return cls(4, planes, 2, ds)

    torch.manual_seed(0)
    ref = randomize_bn(make(getattr(R, kind)))
    ours = make(getattr(rf, kind))
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = lambda s: torch.randn(2, 4, 7, 7, generator=torch.Generator().manual_seed(s))  # noqa: E731
    ref64 = sgd_steps(ours, ref, x, steps=2)
    for backend in ("torch", "triton") if INTERPRET else ("torch",):
        eval_compare(ours, ref, x(5).to(memory_format=CL), backend, ref64=ref64)
    assert len(fused_calls) == (2 if INTERPRET else 1) * (3 if kind == "Bottleneck" else 2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["basic-s2-ds-batch1", "bottle-s2-ds-batch1"])
def test_eval_train_eval_follows_running_stats(case, backend):
    """A training forward moves running stats in place without bumping their versions: no stale fold."""
    ours, ref = build_pair(case)
    x = make_input(case, seed=9)
    y0 = eval_compare(ours, ref, x, backend)  # fills the fold cache
    ref64 = sgd_steps(ours.train(), ref.train(), lambda s: make_input(case, seed=s), steps=2)
    y1 = eval_compare(ours, ref, x, backend, ref64=ref64)
    assert not torch.allclose(y0, y1)
    with torch.no_grad():  # running statistics alone (no optimizer step), one more time
        ours.train()(make_input(case, seed=20))
        ref.train()(make_input(case, seed=20))
        ref64.train()(make_input(case, seed=20).double())
    eval_compare(ours, ref, x, backend, ref64=ref64)
