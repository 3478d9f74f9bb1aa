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
from utils import CUDA_BACKEND, INTERPRET, assert_close, copy_via, randomize_bn

CL = torch.channels_last
NCHW = torch.contiguous_format
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not INTERPRET, reason="CPU tensors: the Triton backend needs TRITON_INTERPRET=1")), CUDA_BACKEND]

# (block, constructor kwargs, with downsample, input N, H, W). Tiny: the Triton interpreter is slow.
CASES = {
    "basic-identity-7x7": ("BasicBlock", dict(inplanes=5, planes=5), False, (2, 7, 7)),
    "basic-s2-ds-batch1": ("BasicBlock", dict(inplanes=6, planes=10, stride=2), True, (1, 7, 7)),
    "basic-ds-5x6": ("BasicBlock", dict(inplanes=3, planes=7), True, (2, 5, 6)),
    "bottle-identity": ("Bottleneck", dict(inplanes=12, planes=3), False, (2, 7, 7)),
    "bottle-s2-ds-batch1": ("Bottleneck", dict(inplanes=6, planes=3, stride=2), True, (1, 7, 7)),
    "bottle-groups2-s2": ("Bottleneck", dict(inplanes=8, planes=4, stride=2, groups=2), True, (2, 6, 6)),
    "bottle-resnext-bw32": ("Bottleneck", dict(inplanes=8, planes=4, groups=4, base_width=32), True, (1, 5, 5)),
    "bottle-dilation2": ("Bottleneck", dict(inplanes=16, planes=4, dilation=2), False, (1, 8, 8)),
}


def build_pair(case, norm_layer=None, seed=0):
    """(ours, reference) built with the same arguments and holding the same state_dict."""
    kind, kw, with_ds, _ = CASES[case] if isinstance(case, str) else case
    ours_cls, ref_cls = getattr(rf, kind), getattr(R, kind)
    norm = norm_layer or nn.BatchNorm2d

    def make(cls):
        kwargs = dict(kw)
        if with_ds:
            cout = kw["planes"] * cls.expansion
            kwargs["downsample"] = nn.Sequential(R.conv1x1(kw["inplanes"], cout, kw.get("stride", 1)), norm(cout))
        return cls(norm_layer=norm_layer, **kwargs)

    torch.manual_seed(seed)
    ref = make(ref_cls)
    randomize_bn(ref)
    ours = make(ours_cls)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ours, ref


def make_input(case, fmt=NCHW, seed=1, dtype=torch.float32):
    kind, kw, _, (n, h, w) = CASES[case]
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, kw["inplanes"], h, w, generator=g, dtype=dtype).to(memory_format=fmt)


def assert_format(y, fmt, what="output"):
    if fmt == CL:
        assert y.is_contiguous(memory_format=CL), \
            f"{what}: expected channels_last like the input, got strides {y.stride()}"
    else:
        assert y.is_contiguous(), f"{what}: expected NCHW-contiguous like the input, got strides {y.stride()}"


def assert_state_close(ours, ref32, ref64, what="", alt32=None):
    """Every buffer (running stats to tolerance, num_batches_tracked exactly) and every parameter.
    ``alt32``: PyTorch's same-dtype run by another algorithm (see :func:`sgd_steps`)."""
    alt_b = dict(alt32.named_buffers()) if alt32 is not None else {}
    alt_p = dict(alt32.named_parameters()) if alt32 is not None else {}
    for (n0, b0), (n1, b1), (n2, b2) in zip(ours.named_buffers(), ref32.named_buffers(), ref64.named_buffers()):
        assert n0 == n1 == n2
        if n0.endswith("num_batches_tracked"):
            assert torch.equal(b0, b1) and torch.equal(b0, b2), f"{what}{n0}: {b0} vs reference {b1}"
        else:
            assert_close(b0, b2, [b1] + ([alt_b[n0]] if n0 in alt_b else []), name=f"{what}{n0}")
    for (n0, p0), (n1, p1), (n2, p2) in zip(*(m.named_parameters() for m in (ours, ref32, ref64))):
        assert n0 == n1 == n2
        assert_close(p0, p2, [p1] + ([alt_p[n0]] if n0 in alt_p else []), name=f"{what}{n0}")


def sgd_steps(ours, ref, make_x, steps=3, lr=0.05, momentum=0.9):
    """``steps`` SGD+momentum steps on ours, the reference and a float64 reference; check everything.

    Frozen parameters (``requires_grad=False``) are not stepped and must get no gradient.
    Returns the float64 reference (already stepped) so callers can go on comparing.
    """
    ref64 = copy.deepcopy(ref).double()
    # PyTorch's same-dtype error is judged by two of its algorithms, not one rounding sample: the
    # reference again in the other memory format (oneDNN/cuDNN sum in another order there; after a
    # few steps of training with BatchNorm's cancelling sums the two differ by several x).
    alt = copy.deepcopy(ref)
    models = (ours, ref, ref64, alt)
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=lr, momentum=momentum)
            for m in models]
    for step in range(steps):
        x = make_x(step)
        other = NCHW if x.is_contiguous(memory_format=CL) and not x.is_contiguous() else CL
        alt.to(memory_format=other)
        xs = [x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_(),
              x.detach().double().requires_grad_(), x.detach().contiguous(memory_format=other).requires_grad_()]
        outs = [m(xi) for m, xi in zip(models, xs)]
        assert_format(outs[0], torch.channels_last if x.is_contiguous(memory_format=CL) and not x.is_contiguous()
                      else NCHW)
        g = torch.randn(outs[1].shape, generator=torch.Generator().manual_seed(100 + step))
        for o in outs:
            (o * g.to(o.dtype)).sum().backward()
        tag = f"step {step}: "
        assert_close(outs[0], outs[2], outs[1:4:2], name=tag + "output")
        assert_close(xs[0].grad, xs[2].grad, [xs[1].grad, xs[3].grad], name=tag + "x.grad")
        for (n0, p0), (n1, p1), (n2, p2), (_, p3) in zip(*(m.named_parameters() for m in models)):
            assert n0 == n1 == n2
            if not p0.requires_grad:
                assert p0.grad is None and p1.grad is None, f"{tag}{n0} is frozen but got a gradient"
                continue
            assert p0.grad is not None, f"{tag}{n0} got no gradient"
            assert_close(p0.grad, p2.grad, [p1.grad, p3.grad], name=f"{tag}{n0}.grad")
        for o in opts:
            o.step()
            o.zero_grad()
        assert_state_close(ours, ref, ref64, what=tag, alt32=alt)
    return ref64


def eval_compare(ours, ref, x, backend, ref64=None, grad=False):
    """Eval-mode forward (and optionally backward) of ours vs the reference, on ``backend``."""
    ours.eval()
    ref.eval()
    ref64 = (copy.deepcopy(ref).double() if ref64 is None else ref64).eval()
    fmt = CL if (x.is_contiguous(memory_format=CL) and not x.is_contiguous()) else NCHW
    xs = [x.detach().clone(), x.detach().clone(), x.detach().double()]
    with rf.use_backend(backend), torch.set_grad_enabled(grad):
        if grad:
            for t in xs:
                t.requires_grad_()
        outs = [ours(xs[0]), ref(xs[1]), ref64(xs[2])]
    assert_format(outs[0], fmt)
    assert_close(outs[0], outs[2], outs[1], name=f"eval output ({backend})")
    if grad:
        g = torch.randn(outs[1].shape, generator=torch.Generator().manual_seed(7))
        for o in outs:
            (o * g.to(o.dtype)).sum().backward()
        assert_close(xs[0].grad, xs[2].grad, xs[1].grad, name="eval x.grad")
        for (n0, p0), (_, p1), (_, p2) in zip(*(m.named_parameters() for m in (ours, ref, ref64))):
            assert p0.grad is not None, f"{n0} got no gradient through the fused eval path"
            assert_close(p0.grad, p2.grad, p1.grad, name=f"eval {n0}.grad")
    return outs[0]


# ------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("fmt", [NCHW, CL], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("case", list(CASES))
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
@pytest.mark.parametrize("case", list(CASES))
def test_eval_fused_matches_reference(case, backend, fmt, fused_calls):
    ours, ref = build_pair(case)
    eval_compare(ours, ref, make_input(case, fmt), backend)
    n_convs = 3 if CASES[case][0] == "Bottleneck" else 2
    assert len(fused_calls) == n_convs + CASES[case][2], "eval with BatchNorm must run the fused path"
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
    CASES["_zero"] = case
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
        del CASES["_zero"]


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
            ("conv3", "bn3") if CASES[case][0] == "Bottleneck" else ()):
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
    ref64 = copy.deepcopy(ref).double().eval()
    ours.eval()
    ref.eval()
    x = make_input(case)
    if how == "cast":
        ours, ref, x = ours.to(dtype), ref.to(dtype), x.to(dtype)
    with torch.no_grad(), rf.use_backend(backend), torch.autocast("cpu", dtype=dtype, enabled=how == "autocast"):
        y, y_ref = ours(x), ref(x)
    assert y.dtype == y_ref.dtype == dtype
    with torch.no_grad():
        y64 = ref64(x.double())
    assert_close(y, y64, y_ref, name=f"{dtype} output ({how}, {backend})", dtype=dtype)


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
