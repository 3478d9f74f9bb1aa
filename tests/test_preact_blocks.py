"""WideBasic and PreActBottleneck against an independent reference written here from the papers.

Wide ResNet (Zagoruyko & Komodakis 2016) block: BN-ReLU-conv3x3-BN-ReLU-[dropout]-conv3x3, plus the
shortcut; pre-activation bottleneck (He et al. 2016): [BN-ReLU-1x1][BN-ReLU-3x3, stride]
[BN-ReLU-1x1, x4]. A 1x1 projection shortcut takes the pre-activated input, the identity shortcut
the raw input. The reference is module by module with no code from resnet_fused.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import resnet_fused as rf
from resnet_fused.modules import _base
from utils import CUDA_BACKEND, INTERPRET, assert_close, randomize_bn

CL = torch.channels_last
NCHW = torch.contiguous_format
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not INTERPRET, reason="CPU tensors: the Triton backend needs TRITON_INTERPRET=1")), CUDA_BACKEND]


# ------------------------------------------------------------------------------ the reference
class RefWideBasic(nn.Module):
    """BN-ReLU-conv3x3(stride)-BN-ReLU-dropout-conv3x3 + shortcut(raw x, or 1x1 conv of BN-ReLU(x))."""

    def __init__(self, cin, cout, stride=1, dropout=0.0, norm=nn.BatchNorm2d):
        super().__init__()
        self.bn1 = norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, 0, bias=False)
        self.p = dropout

    def forward(self, x):
        pre = torch.relu(self.bn1(x))
        short = x if self.shortcut is None else self.shortcut(pre)
        h = self.conv1(pre)
        h = torch.relu(self.bn2(h))
        if self.p > 0:
            h = F.dropout(h, self.p, self.training)
        h = self.conv2(h)
        return h + short


class RefPreActBottleneck(nn.Module):
    """[BN-ReLU-1x1 c][BN-ReLU-3x3 c, stride][BN-ReLU-1x1 4c] + shortcut."""

    def __init__(self, cin, planes, stride=1, downsample=None, norm=nn.BatchNorm2d):
        super().__init__()
        self.bn1 = norm(cin)
        self.conv1 = nn.Conv2d(cin, planes, 1, 1, 0, bias=False)
        self.bn2 = norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = norm(planes)
        self.conv3 = nn.Conv2d(planes, 4 * planes, 1, 1, 0, bias=False)
        self.downsample = downsample

    def forward(self, x):
        pre = torch.relu(self.bn1(x))
        short = x if self.downsample is None else self.downsample(pre)
        h = self.conv1(pre)
        h = self.conv2(torch.relu(self.bn2(h)))
        h = self.conv3(torch.relu(self.bn3(h)))
        return h + short


# (kind, args, shortcut kind, input N, H, W)
CASES = {
    "wide-identity-7x7": ("wide", dict(cin=5, cout=5), None, (2, 7, 7)),
    "wide-proj-s2-batch1": ("wide", dict(cin=4, cout=6, stride=2), None, (1, 7, 7)),
    "wide-proj-samech-s2": ("wide", dict(cin=6, cout=6, stride=2), None, (2, 6, 5)),
    "wide-dropout": ("wide", dict(cin=6, cout=6, dropout=0.3), None, (2, 6, 6)),
    "preact-identity": ("preact", dict(cin=12, planes=3), None, (2, 5, 5)),
    "preact-proj-s2-batch1": ("preact", dict(cin=6, planes=3, stride=2), "conv", (1, 7, 7)),
    "preact-proj-seq": ("preact", dict(cin=8, planes=2), "seq", (2, 6, 6)),  # not a bare conv: eager
}


def build_pair(case, norm=nn.BatchNorm2d, seed=0, dropout=None):
    """(ours, reference) with one state: ``case`` names a :data:`CASES` entry or is such a tuple."""
    kind, kw, sc, _ = CASES[case] if isinstance(case, str) else case
    kw = dict(kw)
    if dropout is not None:
        kw["dropout"] = dropout
    torch.manual_seed(seed)
    if kind == "wide":
        ref = RefWideBasic(norm=norm, **kw)
        ours = rf.WideBasic(kw["cin"], kw["cout"], kw.get("stride", 1), kw.get("dropout", 0.0), norm_layer=norm)
    else:
        def ds():
            if sc is None:
                return None
            conv = nn.Conv2d(kw["cin"], 4 * kw["planes"], 1, kw.get("stride", 1), bias=False)
            return conv if sc == "conv" else nn.Sequential(conv)

        ref = RefPreActBottleneck(kw["cin"], kw["planes"], kw.get("stride", 1), ds(), norm=norm)
        ours = rf.PreActBottleneck(kw["cin"], kw["planes"], kw.get("stride", 1), ds(), norm_layer=norm)
    randomize_bn(ref)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ours, ref


def make_input(case, fmt=NCHW, seed=1):
    kind, kw, _, (n, h, w) = CASES[case]
    x = torch.randn(n, kw["cin"], h, w, generator=torch.Generator().manual_seed(seed))
    return x.to(memory_format=fmt)


def fmt_of(x):
    return CL if x.is_contiguous(memory_format=CL) and not x.is_contiguous() else NCHW


def assert_format(y, fmt):
    ok = y.is_contiguous(memory_format=CL) if fmt == CL else y.is_contiguous()
    assert ok, f"output strides {y.stride()} do not keep the input's memory format {fmt}"


def check_state(ours, ref32, ref64, tag=""):
    for (n0, b0), (n1, b1), (n2, b2) in zip(ours.named_buffers(), ref32.named_buffers(), ref64.named_buffers()):
        assert n0 == n1 == n2
        if n0.endswith("num_batches_tracked"):
            assert torch.equal(b0, b1) and torch.equal(b0, b2), f"{tag}{n0}: {b0} vs {b1}"
        else:
            assert_close(b0, b2, b1, name=tag + n0)
    for (n0, p0), (_, p1), (_, p2) in zip(ours.named_parameters(), ref32.named_parameters(), ref64.named_parameters()):
        assert_close(p0, p2, p1, name=tag + n0)


def run_step(models, x, seed=None, grad=True, tag=""):
    """Forward (+ backward) of ours / ref32 / ref64 on the same x; compare output and every grad."""
    xs = [x.detach().clone(), x.detach().clone(), x.detach().double()]
    outs = []
    for m, xi in zip(models, xs):
        if grad:
            xi.requires_grad_()
        if seed is not None:
            torch.manual_seed(seed)  # same dropout mask for every copy
        with torch.set_grad_enabled(grad):
            outs.append(m(xi))
    assert_format(outs[0], fmt_of(x))
    assert_close(outs[0], outs[2], outs[1], name=tag + "output")
    if grad:
        g = torch.randn(outs[1].shape, generator=torch.Generator().manual_seed(11))
        for o in outs:
            (o * g.to(o.dtype)).sum().backward()
        assert_close(xs[0].grad, xs[2].grad, xs[1].grad, name=tag + "x.grad")
        for (n0, p0), (n1, p1), (n2, p2) in zip(*(m.named_parameters() for m in models)):
            assert n0 == n1 == n2, (n0, n1)
            assert p0.grad is not None, f"{tag}{n0} got no gradient"
            assert_close(p0.grad, p2.grad, p1.grad, name=f"{tag}{n0}.grad")
    return outs


def train_steps(ours, ref, case, fmt=NCHW, steps=3, dropout_seed=None):
    ref64 = copy.deepcopy(ref).double()
    models = (ours, ref, ref64)
    for m in models:
        m.train()
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in models]
    for step in range(steps):
        seed = None if dropout_seed is None else dropout_seed + step
        run_step(models, make_input(case, fmt, seed=step), seed=seed, tag=f"train step {step}: ")
        for o in opts:
            o.step()
            o.zero_grad()
        check_state(ours, ref, ref64, tag=f"after step {step}: ")
    return ref64


@pytest.fixture
def fused_calls(monkeypatch):
    calls = []
    # the modules' internal (already validated) entry points of the two fused ops
    for attr, name in (("_conv_run", "conv_bias_act"), ("_bn_act_run", "bn_act")):
        real = getattr(_base, attr)

        def spy(*a, _real=real, _name=name, **k):
            calls.append((_name, k.get("backend")))
            return _real(*a, **k)

        monkeypatch.setattr(_base, attr, spy)
    return calls


# ------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("fmt", [NCHW, CL], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("case", list(CASES))
def test_train_three_sgd_steps(case, fmt, fused_calls):
    ours, ref = build_pair(case)
    train_steps(ours, ref, case, fmt, dropout_seed=123)
    assert fused_calls == [], "training must run the eager path"


@pytest.mark.parametrize("fmt", [NCHW, CL], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_eval_matches_reference(case, backend, fmt, fused_calls):
    ours, ref = build_pair(case)
    ref64 = copy.deepcopy(ref).double()
    models = (ours.eval(), ref.eval(), ref64.eval())
    with rf.use_backend(backend):
        run_step(models, make_input(case, fmt), grad=False, tag=f"eval {backend}: ")
    if CASES[case][2] == "seq":
        assert fused_calls == [], "a shortcut that is not a bare conv runs eagerly"
    else:
        n_convs = 2 if CASES[case][0] == "wide" else 3
        has_proj = ours._shortcut_module() is not None
        assert [c[0] for c in fused_calls].count("bn_act") == 1
        assert [c[0] for c in fused_calls].count("conv_bias_act") == n_convs + has_proj
        assert {c[1] for c in fused_calls} == {backend}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["wide-proj-s2-batch1", "preact-identity", "preact-proj-s2-batch1"])
def test_eval_autograd_through_fused_path(case, backend, fused_calls):
    ours, ref = build_pair(case)
    models = (ours.eval(), ref.eval(), copy.deepcopy(ref).double().eval())
    with rf.use_backend(backend):
        run_step(models, make_input(case, CL if backend == "triton" else NCHW), grad=True, tag=f"eval {backend}: ")
    assert fused_calls


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["wide-proj-s2-batch1", "wide-dropout", "preact-proj-s2-batch1"])
def test_eval_after_train(case, backend):
    ours, ref = build_pair(case)
    ref64 = train_steps(ours, ref, case, dropout_seed=5)
    models = (ours.eval(), ref.eval(), ref64.eval())
    with rf.use_backend(backend):
        for fmt in (NCHW, CL):
            run_step(models, make_input(case, fmt, seed=9), grad=False, tag=f"eval after train ({backend}): ")


def test_momentum_none_cumulative_average():
    norm = lambda c: nn.BatchNorm2d(c, momentum=None)  # noqa: E731
    for case in ("wide-proj-s2-batch1", "preact-proj-s2-batch1"):
        ours, ref = build_pair(case, norm=norm)
        train_steps(ours, ref, case, steps=4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_is_identity_in_eval(backend):
    ours, ref = build_pair("wide-dropout", dropout=0.5)
    plain, _ = build_pair("wide-dropout", dropout=0.0)
    x = make_input("wide-dropout")
    with torch.no_grad(), rf.use_backend(backend):
        ours.eval()
        plain.eval()
        torch.manual_seed(0)
        y1 = ours(x)
        torch.manual_seed(1)
        y2 = ours(x)
        assert torch.equal(y1, y2), "eval output must not depend on the RNG"
        assert torch.equal(y1, plain(x)), "dropout>0 in eval must equal the same block without dropout"
    models = (ours, ref.eval(), copy.deepcopy(ref).double().eval())
    run_step(models, x, grad=False)


def test_dropout_drops_in_training():
    p = 0.5
    ours, ref = build_pair("wide-dropout", dropout=p)
    ours.train()
    seen = {}
    ours.bn2.register_forward_hook(lambda m, i, o: seen.__setitem__("bn2", o.detach().clone()))
    ours.conv2.register_forward_pre_hook(lambda m, i: seen.__setitem__("conv2_in", i[0].detach().clone()))
    x = torch.randn(2, 6, 8, 8, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(42)
    y1 = ours(x)
    kept = seen["bn2"] > 0  # after ReLU these would be nonzero without dropout
    zeroed = (seen["conv2_in"][kept] == 0).double().mean().item()
    n = int(kept.sum())
    assert n > 200
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(zeroed - p) < 5 * sigma, f"dropped fraction {zeroed:.3f} of {n}, expected {p}"
    survivors = seen["conv2_in"][kept] != 0
    assert_close(seen["conv2_in"][kept][survivors], (seen["bn2"][kept][survivors] / (1 - p)).double(),
                 name="survivors scaled by 1/(1-p)")
    torch.manual_seed(43)
    assert not torch.allclose(ours(x), y1), "a different seed must give a different dropout mask"
    # The same seed gives the same mask in the reference: its RNG use is identical.
    ref.train()
    torch.manual_seed(42)
    y_ref = ref(x)
    torch.manual_seed(42)
    y_ref64 = copy.deepcopy(ref).double()(x.double())
    assert_close(y1, y_ref64, y_ref, name="train output with dropout, same seed")


def test_state_dict_and_names():
    ours, ref = build_pair("wide-proj-s2-batch1")
    assert set(ours.state_dict()) == set(ref.state_dict())
    assert ours.shortcut is not None and ours.stride == 2 and ours.dropout == 0.0
    ours, ref = build_pair("wide-identity-7x7")
    assert ours.shortcut is None
    ours, ref = build_pair("preact-proj-s2-batch1")
    assert set(ours.state_dict()) == set(ref.state_dict())
    assert rf.PreActBottleneck.expansion == 4 and ours.stride == 2


@pytest.mark.parametrize("case", ["wide-proj-s2-batch1", "preact-proj-s2-batch1"])
def test_non_batchnorm_norm_runs_eager(case, fused_calls):
    norm = lambda c: nn.GroupNorm(1, c)  # noqa: E731
    ours, ref = build_pair(case, norm=norm)
    train_steps(ours, ref, case, steps=2)
    models = (ours.eval(), ref.eval(), copy.deepcopy(ref).double().eval())
    for backend in ("torch", "triton") if INTERPRET else ("torch",):
        with rf.use_backend(backend):
            run_step(models, make_input(case, CL), grad=True)
    assert fused_calls == []


@pytest.mark.parametrize("how", ["cast", "autocast"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["wide-proj-s2-batch1", "preact-proj-s2-batch1"])
def test_eval_low_precision(case, backend, dtype, how):
    """Half-precision blocks and float32 blocks under autocast, vs PyTorch in the same dtype."""
    ours, ref = build_pair(case)
    ref64 = copy.deepcopy(ref).double().eval()
    ours.eval()
    ref.eval()
    x = make_input(case)
    if how == "cast":
        ours, ref, x = ours.to(dtype), ref.to(dtype), x.to(dtype)
    with torch.no_grad(), rf.use_backend(backend), torch.autocast("cpu", dtype=dtype, enabled=how == "autocast"):
        y, y_ref = ours(x), ref(x)
    assert y.dtype == y_ref.dtype
    with torch.no_grad():
        y64 = ref64(x.double())
    assert_close(y, y64, y_ref, name=f"{dtype} output ({how}, {backend})", dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_train_eval_follows_running_stats(backend):
    """Running stats move in place in training (no version bump): the next eval must not reuse old folds."""
    case = "preact-proj-s2-batch1"
    ours, ref = build_pair(case)
    ref64 = copy.deepcopy(ref).double()
    x = make_input(case, seed=9)
    with rf.use_backend(backend):
        run_step((ours.eval(), ref.eval(), ref64.eval()), x, grad=False, tag="first eval: ")
        with torch.no_grad():
            for m, xi in zip((ours, ref, ref64), (make_input(case, seed=3),) * 2 + (make_input(case, seed=3).double(),)):
                m.train()(xi)
        check_state(ours, ref, ref64)
        run_step((ours.eval(), ref.eval(), ref64.eval()), x, grad=False, tag="eval after a train forward: ")
