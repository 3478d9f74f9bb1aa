"""Shared builders of the block, training and dispatch tests (tests/utils.py holds the error
measures and references they judge by).

* The torchvision-structured drop-in blocks (``BasicBlock``, ``Bottleneck``) next to
  ``resnet_fused.models.reference``: :data:`BLOCK_CASES`, :func:`build_pair`, :func:`make_input`.
* The pre-activation blocks (``WideBasic``, ``PreActBottleneck``) next to an independent
  reference written here from the papers: :data:`PREACT_CASES`, :func:`build_preact_pair`,
  :func:`make_preact_input`.
* A user's own block for ``convert()`` (:class:`MyBasic`, :func:`conv`).
* Three-copy checks: ours (float32), the reference in float32 (PyTorch's own error) and in float64
  (the truth): :func:`compare_outputs_and_grads`, :func:`sgd_steps`, :func:`eval_compare`, ...;
  :func:`load_params` and :func:`compile_for_training` for the torch.compile training tests;
  :func:`spy_apply`, which launches of a fused op's Triton path ran.
* Fused training of either family by case name (:func:`build`, :func:`make_x`; the backend comes
  from the ``train_backend`` fixture of tests/conftest.py through :data:`TRAIN`).
* The measured dispatch's injected clock and a correct candidate (:class:`FakeTimer`,
  :func:`use_timer`, :func:`torch_conv`, :func:`conv_inputs`).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import resnet_fused as rf
from resnet_fused.dispatch import measure
from resnet_fused.models import reference as R
from utils import CUDA_BACKEND, INTERPRET, assert_close, fmt_of, randomize_bn

CL = torch.channels_last
NCHW = torch.contiguous_format
# The eval backends of the block tests: PyTorch, Triton (through the interpreter on CPU), the library.
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not INTERPRET, reason="CPU tensors: the Triton backend needs TRITON_INTERPRET=1")), CUDA_BACKEND]


# ================================================ torchvision-structured blocks (tests/test_blocks.py)
# (block, constructor kwargs, with downsample, input N, H, W). Tiny: the Triton interpreter is slow.
BLOCK_CASES = {
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
    """(ours, reference) built with the same arguments and holding the same state_dict; ``case``
    names a :data:`BLOCK_CASES` entry or is such a tuple."""
    kind, kw, with_ds, _ = BLOCK_CASES[case] if isinstance(case, str) else case
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
    kind, kw, _, (n, h, w) = BLOCK_CASES[case]
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, kw["inplanes"], h, w, generator=g, dtype=dtype).to(memory_format=fmt)


# ======================================= pre-activation blocks (tests/test_preact_blocks.py)
# Wide ResNet (Zagoruyko & Komodakis 2016) block: BN-ReLU-conv3x3-BN-ReLU-[dropout]-conv3x3, plus
# the shortcut; pre-activation bottleneck (He et al. 2016): [BN-ReLU-1x1][BN-ReLU-3x3, stride]
# [BN-ReLU-1x1, x4]. A 1x1 projection shortcut takes the pre-activated input, the identity shortcut
# the raw input. The reference is module by module with no code from resnet_fused.
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
PREACT_CASES = {
    "wide-identity-7x7": ("wide", dict(cin=5, cout=5), None, (2, 7, 7)),
    "wide-proj-s2-batch1": ("wide", dict(cin=4, cout=6, stride=2), None, (1, 7, 7)),
    "wide-proj-samech-s2": ("wide", dict(cin=6, cout=6, stride=2), None, (2, 6, 5)),
    "wide-dropout": ("wide", dict(cin=6, cout=6, dropout=0.3), None, (2, 6, 6)),
    "preact-identity": ("preact", dict(cin=12, planes=3), None, (2, 5, 5)),
    "preact-proj-s2-batch1": ("preact", dict(cin=6, planes=3, stride=2), "conv", (1, 7, 7)),
    "preact-proj-seq": ("preact", dict(cin=8, planes=2), "seq", (2, 6, 6)),  # not a bare conv: eager
}


def build_preact_pair(case, norm=nn.BatchNorm2d, seed=0, dropout=None):
    """(ours, reference) with one state: ``case`` names a :data:`PREACT_CASES` entry or is such a tuple."""
    kind, kw, sc, _ = PREACT_CASES[case] if isinstance(case, str) else case
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


def make_preact_input(case, fmt=NCHW, seed=1):
    kind, kw, _, (n, h, w) = PREACT_CASES[case]
    x = torch.randn(n, kw["cin"], h, w, generator=torch.Generator().manual_seed(seed))
    return x.to(memory_format=fmt)


# ================================ a user's own block, and convert() checks (tests/test_convert*.py)
def conv(cin, cout, k, stride=1):
    """A bias-free conv with "same" padding, as torchvision's conv3x3 / conv1x1."""
    return nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)


class MyBasic(nn.Module):
    """A user's own copy of torchvision's BasicBlock, under another name."""

    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, norm=nn.BatchNorm2d):
        super().__init__()
        self.conv1, self.bn1 = conv(inplanes, planes, 3, stride), norm(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = conv(planes, planes, 3), norm(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


# ================================================================ three-copy checks
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


def compare_outputs_and_grads(models, x, tag="", grad=True, *, dropout_seed=None, grad_seed=3, layout=False):
    """``models`` = (ours, the reference in float32, its float64 twin) on copies of ``x``: our output
    (and, with ``grad``, x.grad and every parameter gradient) within ``assert_close`` of float64.
    ``dropout_seed``: the RNG seed set before each copy's forward (the same dropout mask in all);
    ``layout``: our output must keep x's memory format."""
    xs = [x.detach().clone(), x.detach().clone(), x.detach().double()]
    outs = []
    with torch.set_grad_enabled(grad):
        for m, xi in zip(models, xs):
            if dropout_seed is not None:
                torch.manual_seed(dropout_seed)
            outs.append(m(xi.requires_grad_(grad)))
    if layout:
        assert_format(outs[0], fmt_of(x), tag + "output")
    assert_close(outs[0], outs[2], outs[1], name=tag + "output")
    if grad:
        g = torch.randn(outs[1].shape, generator=torch.Generator().manual_seed(grad_seed))
        for o in outs:
            (o * g.to(o.dtype)).sum().backward()
        assert_close(xs[0].grad, xs[2].grad, xs[1].grad, name=tag + "x.grad")
        for (n0, p0), (n1, p1), (n2, p2) in zip(*(m.named_parameters() for m in models)):
            assert n0 == n1 == n2, (n0, n1)
            if p1.grad is None:
                assert p0.grad is None, n0
                continue
            assert p0.grad is not None, f"{tag}{n0} got no gradient"
            assert_close(p0.grad, p2.grad, p1.grad, name=f"{tag}{n0}.grad")
    return outs


def run_step(models, x, seed=None, grad=True, tag=""):
    """The pre-activation tests' step: :func:`compare_outputs_and_grads` with the layout checked,
    ``seed`` as the dropout seed (gradient direction seed 11)."""
    return compare_outputs_and_grads(models, x, tag, grad, dropout_seed=seed, grad_seed=11, layout=True)


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
        other = NCHW if fmt_of(x) == CL else CL
        alt.to(memory_format=other)
        xs = [x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_(),
              x.detach().double().requires_grad_(), x.detach().contiguous(memory_format=other).requires_grad_()]
        outs = [m(xi) for m, xi in zip(models, xs)]
        assert_format(outs[0], fmt_of(x))
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
    xs = [x.detach().clone(), x.detach().clone(), x.detach().double()]
    with rf.use_backend(backend), torch.set_grad_enabled(grad):
        if grad:
            for t in xs:
                t.requires_grad_()
        outs = [ours(xs[0]), ref(xs[1]), ref64(xs[2])]
    assert_format(outs[0], fmt_of(x))
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


def train_steps(ours, ref, case, fmt=NCHW, steps=3, dropout_seed=None):
    """``steps`` SGD+momentum steps of a pre-activation pair and its float64 twin, every output,
    gradient and state checked; ``dropout_seed``: the same dropout masks in every copy."""
    ref64 = copy.deepcopy(ref).double()
    models = (ours, ref, ref64)
    for m in models:
        m.train()
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in models]
    for step in range(steps):
        seed = None if dropout_seed is None else dropout_seed + step
        run_step(models, make_preact_input(case, fmt, seed=step), seed=seed, tag=f"train step {step}: ")
        for o in opts:
            o.step()
            o.zero_grad()
        assert_state_close(ours, ref, ref64, what=f"after step {step}: ")
    return ref64




def check_eval_low_precision(ours, ref, x, backend, dtype, how):
    """Half-precision blocks (``how="cast"``: ``.to(dtype)``) and float32 blocks under CPU autocast
    (``how="autocast"``), in eval, against PyTorch in the same dtype and the float64 reference."""
    ref64 = copy.deepcopy(ref).double().eval()
    ours.eval()
    ref.eval()
    if how == "cast":
        ours, ref, x = ours.to(dtype), ref.to(dtype), x.to(dtype)
    with torch.no_grad(), rf.use_backend(backend), torch.autocast("cpu", dtype=dtype, enabled=how == "autocast"):
        y, y_ref = ours(x), ref(x)
    assert y.dtype == y_ref.dtype == dtype
    with torch.no_grad():
        y64 = ref64(x.double())
    assert_close(y, y64, y_ref, name=f"{dtype} output ({how}, {backend})", dtype=dtype)


def load_params(models, truth):
    """Copy ``truth`` ({name: tensor}) into every model's parameters and clear their gradients."""
    with torch.no_grad():
        for m in models:
            for n, p in m.named_parameters():
                p.copy_(truth[n])
                p.grad = None


def compile_for_training(ours, ref):
    """For the torch.compile training tests: (``ours`` compiled with fullgraph, an uncompiled copy of
    ``ours``, an eager copy of ``ref``, a float64 copy of ``ref``, SGD+momentum on the float64 copy)."""
    uncompiled = copy.deepcopy(ours)
    eager, ref64 = copy.deepcopy(ref), copy.deepcopy(ref).double()
    torch._dynamo.reset()
    compiled = torch.compile(ours, fullgraph=True)
    opt = torch.optim.SGD(ref64.parameters(), lr=0.05, momentum=0.9)
    return compiled, uncompiled, eager, ref64, opt


def spy_apply(monkeypatch, fn_cls):
    """A list that gets the first argument's dtype at every ``fn_cls.apply`` (an autograd Function
    of a fused op's Triton path): which launches really ran, in which dtype."""
    calls = []
    real = fn_cls.apply

    def apply(*args):
        calls.append(args[0].dtype)
        return real(*args)

    monkeypatch.setattr(fn_cls, "apply", apply)
    return calls


# ======================================== fused training of either family (tests/test_train_*.py)
TRAIN = {"backend": "triton"}  # the fused backend of the running test (tests/conftest.py's train_backend)
_DEFAULT = object()


def is_preact(case):
    return case not in BLOCK_CASES


def build(case, norm=None, seed=0, backend=_DEFAULT):
    """(ours, reference) with one state_dict, both in training mode, ours pinned to ``backend``
    (the running test's fused backend unless given; None follows the global choice)."""
    backend = TRAIN["backend"] if backend is _DEFAULT else backend
    if is_preact(case):
        ours, ref = build_preact_pair(case, norm=norm or nn.BatchNorm2d, seed=seed)
    else:
        ours, ref = build_pair(case, norm_layer=norm, seed=seed)
    ours.backend = backend
    return ours.train(), ref.train()


def make_x(case, fmt=NCHW, seed=1):
    return (make_preact_input if is_preact(case) else make_input)(case, fmt, seed=seed)


def saved_activations(block, x):
    """{storage: bytes} that autograd keeps for ``block(x)`` with x's batch dimension (4-D)."""
    seen = {}

    def pack(t):
        if t.dim() == 4 and t.shape[0] == x.shape[0]:
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = block(x)
    return seen, y


# ================================ the measured dispatch (tests/test_dispatch.py, test_dispatch_train.py)
X_SHAPE = (2, 8, 6, 6)


class FakeTimer:
    """Runs each candidate once (as a real timer would) and reports ``times[name]`` ms, or
    ``default`` for a candidate it was not told about."""

    def __init__(self, times=None, default=1.0, samples=3):
        self.times, self.default, self.samples = dict(times or {}), default, samples
        self.calls = []

    def __call__(self, runs, device):
        self.calls.append(sorted(runs))
        for run in runs.values():
            run()
        out = {}
        for name in runs:
            t = self.times.get(name, self.default)
            out[name] = list(t) if isinstance(t, (list, tuple)) else [t] * self.samples
        return out


def use_timer(**times) -> FakeTimer:
    t = FakeTimer(times)
    measure.set_timer(t)
    return t


def torch_conv(x, weight, bias, residual, stride, padding, dilation, relu, out_format):
    """A correct candidate: the op through PyTorch."""
    y = F.conv2d(x, weight, None if bias is None else bias.to(x.dtype), stride, padding, dilation)
    if residual is not None:
        y = y + residual
    y = torch.relu(y) if relu else y
    return y.contiguous(memory_format=out_format)


def conv_inputs(dtype=torch.float32, residual=True, cl=False, shape=X_SHAPE, cout=8, stride=1, padding=1, dilation=1):
    """x, weight, bias, residual (shaped like the conv's output for this geometry)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g).to(dtype)
    w = (torch.randn(cout, shape[1], 3, 3, generator=g) * 0.2).to(dtype)
    b = torch.randn(cout, generator=g)
    out_hw = [(n + 2 * padding - dilation * 2 - 1) // stride + 1 for n in shape[2:]]
    r = torch.randn(shape[0], cout, *out_hw, generator=g).to(dtype) if residual else None
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, w, b, r
