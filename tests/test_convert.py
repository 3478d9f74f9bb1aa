"""``convert()``: swaps blocks and the stem in place, keeps every tensor object and the function.

The comparisons are against an unconverted deep copy made before ``convert`` (float32: PyTorch's
own error) and its float64 twin (the truth), as in the block tests.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import resnet_fused as rf
from resnet_fused.models import reference as R
from resnet_fused.modules import StemBatchNorm, StemConv, _base
from builders import MyBasic, compare_outputs_and_grads, conv
from utils import INTERPRET, assert_close, copy_via, randomize_bn

CL = torch.channels_last


# --------------------------------------------------------------------- blocks users might have
class MyBottle(nn.Module):
    """A user's own copy of torchvision's Bottleneck (stride on the 3x3)."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1, self.bn1 = conv(inplanes, planes, 1), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = conv(planes, planes, 3, stride), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = conv(planes, planes * 4, 1), nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class TimmBasic(nn.Module):
    """timm's BasicBlock layout: separate activations, optional extras absent."""

    def __init__(self, inplanes, planes, stride=1, downsample=None, se=None):
        super().__init__()
        self.conv1, self.bn1 = conv(inplanes, planes, 3, stride), nn.BatchNorm2d(planes)
        self.drop_block = None
        self.act1 = nn.ReLU(inplace=True)
        self.aa = nn.Identity()
        self.conv2, self.bn2 = conv(planes, planes, 3), nn.BatchNorm2d(planes)
        self.se = se
        self.act2 = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.drop_path = None

    def forward(self, x):
        shortcut = x
        x = self.bn1(self.conv1(x))
        if self.drop_block is not None:
            x = self.drop_block(x)
        x = self.aa(self.act1(x))
        x = self.bn2(self.conv2(x))
        if self.se is not None:
            x = self.se(x)
        if self.drop_path is not None:
            x = self.drop_path(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x += shortcut
        return self.act2(x)


class TimmBottle(nn.Module):
    """timm's Bottleneck layout (conv3/bn3/act3)."""

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1, self.bn1, self.act1 = conv(inplanes, planes, 1), nn.BatchNorm2d(planes), nn.ReLU(inplace=True)
        self.conv2, self.bn2 = conv(planes, planes, 3, stride), nn.BatchNorm2d(planes)
        self.drop_block = nn.Identity()
        self.act2 = nn.ReLU(inplace=True)
        self.aa = nn.Identity()
        self.conv3, self.bn3 = conv(planes, planes * 4, 1), nn.BatchNorm2d(planes * 4)
        self.se = None
        self.act3 = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.drop_path = None

    def forward(self, x):
        shortcut = x
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.aa(self.act2(self.drop_block(self.bn2(self.conv2(x)))))
        x = self.bn3(self.conv3(x))
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x += shortcut
        return self.act3(x)


class GeluBasic(MyBasic):
    """A block whose 'relu' is GELU: not ours to fuse."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.relu = nn.GELU()


class SE(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, max(c // 4, 1), 1), nn.Conv2d(max(c // 4, 1), c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


class SEBasic(MyBasic):
    """torchvision-style names (relu is nn.ReLU) plus an SE module: not ours to fuse."""

    def __init__(self, inplanes, planes):
        super().__init__(inplanes, planes)
        self.se = SE(planes)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.se(self.bn2(self.conv2(out)))
        return self.relu(out + x)


class FrozenBatchNorm2d(nn.Module):
    """A detection-style frozen BN (buffers only, no num_features), as torchvision.ops.misc has."""

    def __init__(self, c, eps=1e-5):
        super().__init__()
        for name, init in (("weight", torch.ones), ("bias", torch.zeros), ("running_mean", torch.zeros),
                           ("running_var", torch.ones)):
            self.register_buffer(name, init(c))
        self.eps = eps

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)


def ds(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class TinyNet(nn.Module):
    """ResNet-shaped (conv1/bn1/relu stem, layerN) with every kind of block, small for the interpreter."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(MyBasic(8, 8), TimmBasic(8, 8))
        self.layer2 = nn.Sequential(R.BasicBlock(8, 12, 2, ds(8, 12, 2)), TimmBottle(12, 3))
        self.layer3 = nn.Sequential(MyBottle(12, 4, 2, ds(12, 16, 2)), GeluBasic(16, 16), SEBasic(16, 16),
                                    TimmBasic(16, 16, se=SE(16)))
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean((2, 3)))


TINY_CONVERTED = {"layer1.0": ("MyBasic", "BasicBlock"), "layer1.1": ("TimmBasic", "BasicBlock"),
                  "layer2.0": ("BasicBlock", "BasicBlock"), "layer2.1": ("TimmBottle", "Bottleneck"),
                  "layer3.0": ("MyBottle", "Bottleneck")}
TINY_SKIPPED = {"layer3.1": "GELU", "layer3.2": "se", "layer3.3": "se"}


# --------------------------------------------------------------------------------- helpers
def tensors_of(model):
    return [(n, t) for n, t in model.named_parameters()] + [(n, t) for n, t in model.named_buffers()]


def compare_state(models, tag="", params=True):
    for (n0, b0), (n1, b1), (n2, b2) in zip(*(m.named_buffers() for m in models)):
        assert n0 == n1 == n2
        if n0.endswith("num_batches_tracked"):
            assert torch.equal(b0, b1) and torch.equal(b0, b2), f"{tag}{n0}: {b0} vs {b1}"
        else:
            assert_close(b0, b2, b1, name=tag + n0)
    if params:
        for (n0, p0), (_, p1), (_, p2) in zip(*(m.named_parameters() for m in models)):
            assert_close(p0, p2, p1, name=tag + n0)


def train_compare(models, opts, make_x, steps):
    """SGD steps on every copy; output, x.grad and every grad each step, buffers after each step.

    Parameters are compared once at the end (each step's update is fixed by the grads checked).
    The converted model trains on the PyTorch path: these tests are about what convert keeps
    (structure, Parameters, function). Under "auto" the measured dispatch could pick the fused
    chain for some blocks and not others, by timing: a different mix of roundings each run, judged
    against one eager sample — a verdict by luck. The fused training chains are proven per block
    and backend in test_train_blocks.py, and "auto"'s training choice in test_dispatch_train.py.
    """
    for m in models:
        m.train()
    with rf.use_backend("torch"):
        for step in range(steps):
            compare_outputs_and_grads(models, make_x(step), tag=f"train step {step}: ")
            for o in opts:
                o.step()
                o.zero_grad()
            compare_state(models, tag=f"after step {step}: ", params=step == steps - 1)


def tiny_input(step=0, fmt=torch.contiguous_format):
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(step)).to(memory_format=fmt)


# ----------------------------------------------------------------------- torchvision ResNets
@pytest.mark.parametrize("arch,steps", [("resnet18", 3), ("resnet50", 2)])
def test_convert_reference_resnet(arch, steps, fused_calls):
    torch.manual_seed(0)
    model = getattr(R, arch)(num_classes=10)
    randomize_bn(model)
    ref = copy.deepcopy(model)
    ref64 = copy.deepcopy(model).double()
    blocks = [n for n, m in ref.named_modules() if isinstance(m, (R.BasicBlock, R.Bottleneck))]
    before = tensors_of(model)
    keys = list(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)  # made before convert

    out = rf.convert(model)

    assert out is model
    report = model.resnet_fused_report
    assert [n for n, _, _ in report.converted] == blocks + ["conv1+bn1"]
    assert report.skipped == []
    target = rf.BasicBlock if arch == "resnet18" else rf.Bottleneck
    for n in blocks:
        assert type(model.get_submodule(n)) is target, n
    assert type(model.conv1) is StemConv and type(model.bn1) is StemBatchNorm
    after = tensors_of(model)
    assert [n for n, _ in after] == [n for n, _ in before]
    for (n, t0), (_, t1) in zip(before, after):
        assert t0 is t1, f"{n} is a new tensor object after convert"
    assert list(model.state_dict()) == keys

    models = (model, ref, ref64)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    for m in models:
        m.eval()
    with torch.no_grad():
        compare_outputs_and_grads(models, x, "eval: ", grad=False)
    n_ds = sum(ref.get_submodule(n).downsample is not None for n in blocks)
    assert len(fused_calls) == 1 + (3 if target is rf.Bottleneck else 2) * len(blocks) + n_ds, \
        "eval must run every block and the stem fused"

    opts = [opt] + [torch.optim.SGD(m.parameters(), lr=0.02, momentum=0.9) for m in models[1:]]
    snapshot = model.fc.weight.detach().clone()
    train_compare(models, opts, lambda s: torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(s)),
                  steps)
    assert not torch.equal(model.fc.weight, snapshot), "the optimizer made before convert must still train"
    for m in models:
        m.eval()
    # eval after train, and fine-tuning through the fused eval path (frozen BN)
    compare_outputs_and_grads(models, x, "eval after train (autograd): ", grad=True)
    for n, t in tensors_of(model):
        assert t is dict(before)[n]


@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "channels_last"])
def test_converted_resnet18_channels_last_eval(fmt):
    torch.manual_seed(0)
    model = randomize_bn(R.resnet18(num_classes=10)).eval()
    ref = copy.deepcopy(model)
    rf.convert(model)
    x = torch.randn(2, 3, 64, 64).to(memory_format=fmt)
    with torch.no_grad():
        compare_outputs_and_grads((model, ref, copy.deepcopy(ref).double()), x, "eval: ", grad=False)
        feats = nn.Sequential(*list(model.children())[:-2])(x)
    if fmt == CL:
        assert feats.is_contiguous(memory_format=CL)
    else:
        assert feats.is_contiguous()


# ---------------------------------------------------------------- user, timm, unknown blocks
def test_user_and_timm_blocks_convert_and_unknown_ones_are_skipped():
    torch.manual_seed(0)
    model = randomize_bn(TinyNet())
    ref = copy.deepcopy(model)
    before = tensors_of(model)
    rf.convert(model)
    report = model.resnet_fused_report
    conv = {n: (a, b) for n, a, b in report.converted}
    assert conv.pop("conv1+bn1") == ("Conv2d+BatchNorm2d", "StemConv+StemBatchNorm")
    assert conv == TINY_CONVERTED
    skipped = dict(report.skipped)
    assert set(skipped) == set(TINY_SKIPPED)
    for n, why in TINY_SKIPPED.items():
        assert why in skipped[n], (n, skipped[n])
        assert type(model.get_submodule(n)) is type(ref.get_submodule(n))
    for n, (_, new) in TINY_CONVERTED.items():
        assert type(model.get_submodule(n)) is getattr(rf, new)
    assert "GELU" in str(report) and "layer3.2" in str(report)
    for (n, t0), (_, t1) in zip(before, tensors_of(model)):
        assert t0 is t1, n


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not INTERPRET, reason="CPU tensors: the Triton backend needs TRITON_INTERPRET=1"))])
def test_tiny_net_keeps_its_function(backend, fused_calls):
    torch.manual_seed(0)
    model = randomize_bn(TinyNet())
    ref = copy.deepcopy(model)
    ref64 = copy.deepcopy(model).double()
    rf.convert(model)
    models = (model, ref, ref64)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in models]
    train_compare(models, opts, tiny_input, steps=3)
    assert fused_calls == []
    for m in models:
        m.eval()
    with rf.use_backend(backend):
        for fmt in (torch.contiguous_format, CL):
            with torch.no_grad():
                compare_outputs_and_grads(models, tiny_input(7, fmt), f"eval {backend}: ", grad=False)
        compare_outputs_and_grads(models, tiny_input(8, CL), f"eval {backend} (autograd): ", grad=True)
    assert fused_calls and set(fused_calls) == {backend}


def test_frozen_batchnorm_blocks_convert_and_fuse(fused_calls):
    torch.manual_seed(0)
    block = MyBasic(6, 6, norm=FrozenBatchNorm2d)
    with torch.no_grad():
        for bn in (block.bn1, block.bn2):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2)
    ref = copy.deepcopy(block)
    new = rf.convert(block)
    assert type(new) is rf.BasicBlock, new.resnet_fused_report
    models = (new.eval(), ref.eval(), copy.deepcopy(ref).double().eval())
    with torch.no_grad():
        compare_outputs_and_grads(models, torch.randn(2, 6, 5, 5), "frozen BN eval: ", grad=False)
    assert len(fused_calls) == 2


@pytest.mark.parametrize("bad", ["gelu", "se-torchvision-style", "se-timm-style"])
def test_unrecognised_bare_block_is_left_alone(bad):
    block = {"gelu": lambda: GeluBasic(4, 4), "se-torchvision-style": lambda: SEBasic(4, 4),
             "se-timm-style": lambda: TimmBasic(4, 4, se=SE(4))}[bad]()
    out = rf.convert(block)
    assert out is block and type(out) is not rf.BasicBlock
    assert out.resnet_fused_report.converted == []
    assert len(out.resnet_fused_report.skipped) == 1 and out.resnet_fused_report.skipped[0][0] == ""


# ----------------------------------------------------------------------------- API behaviour
def test_backend_pin(fused_calls):
    torch.manual_seed(0)
    model = randomize_bn(TinyNet()).eval()
    rf.convert(model, backend="torch")
    fused = [m for m in model.modules() if isinstance(m, _base.FusedBlockMixin)]
    assert len(fused) == len(TINY_CONVERTED) + 1
    assert all(m.backend == "torch" for m in fused)
    with torch.no_grad(), rf.use_backend("triton" if INTERPRET else "torch"):
        model(tiny_input())
    assert fused_calls and set(fused_calls) == {"torch"}, "a pinned backend wins over the global choice"
    rf.convert(model, backend="auto")  # re-pins modules already converted
    assert all(m.backend == "auto" for m in fused)
    with pytest.raises(ValueError, match="backend"):
        rf.convert(model, backend="fastest")
    unpinned = rf.convert(TinyNet())
    assert all(m.backend is None for m in unpinned.modules() if isinstance(m, _base.FusedBlockMixin))


@pytest.mark.parametrize("kind", ["BasicBlock", "Bottleneck"])
def test_convert_bare_block_returns_the_new_block(kind):
    torch.manual_seed(0)
    old = getattr(R, kind)(8, 2 if kind == "Bottleneck" else 8, 2,
                           ds(8, 8, 2))
    randomize_bn(old)
    ref = copy.deepcopy(old)
    before = tensors_of(old)
    new = rf.convert(old)
    assert type(new) is getattr(rf, kind) and new is not old
    assert new.resnet_fused_report.converted == [("", kind, kind)]
    assert new.stride == 2 and new.downsample is old.downsample
    for (n, t0), (_, t1) in zip(before, tensors_of(new)):
        assert t0 is t1, n
    models = (new, ref, copy.deepcopy(ref).double())
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in models]
    train_compare(models, opts, lambda s: torch.randn(2, 8, 7, 7, generator=torch.Generator().manual_seed(s)), 2)
    for m in models:
        m.eval()
    compare_outputs_and_grads(models, torch.randn(1, 8, 7, 7), "eval: ")


@pytest.mark.parametrize("thing", [None, 3, torch.zeros(2), [nn.Conv2d(1, 1, 1)], "resnet18"])
def test_convert_non_module_raises_type_error(thing):
    with pytest.raises(TypeError, match="Module"):
        rf.convert(thing)


def test_convert_twice_is_harmless():
    torch.manual_seed(0)
    model = randomize_bn(R.resnet18(num_classes=10))
    ref = copy.deepcopy(model)
    rf.convert(model)
    mods = dict(model.named_modules())
    tensors = tensors_of(model)
    again = rf.convert(model)
    assert again is model
    assert [n for n, _, _ in again.resnet_fused_report.converted if n != "conv1+bn1"] == []
    assert dict(model.named_modules()).keys() == mods.keys()
    for n, m in model.named_modules():
        assert m is mods[n], f"{n} was replaced by the second convert"
    for (n, t0), (_, t1) in zip(tensors, tensors_of(model)):
        assert t0 is t1, n
    assert list(model.state_dict()) == list(ref.state_dict())
    models = (model.eval(), ref.eval(), copy.deepcopy(ref).double().eval())
    with torch.no_grad():
        compare_outputs_and_grads(models, torch.randn(1, 3, 32, 32), "eval after converting twice: ", grad=False)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copy_and_pickle_converted_model_after_eval_forward(how):
    torch.manual_seed(0)
    model = rf.convert(randomize_bn(TinyNet())).eval()
    x = tiny_input()
    with torch.no_grad():
        y = model(x)  # leaves fold caches and the stem's last-output marker behind
    twin = copy_via(how, model)
    assert type(twin.conv1) is StemConv and twin.conv1._stem_bn is twin.bn1
    with torch.no_grad():
        assert torch.equal(twin(x), y)
    # the copy is independent: training it leaves the original (and its caches) as they were
    twin.train()
    opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    twin(x).sum().backward()
    opt.step()
    with torch.no_grad():
        assert torch.equal(model(x), y)
        assert not torch.equal(twin.eval()(x), y)
