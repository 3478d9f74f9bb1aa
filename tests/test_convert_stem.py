"""``convert()`` of a network's stem (conv1 + bn1 + relu): eval is the fused conv + BN + ReLU,
training a plain conv then BatchNorm, a stem that is not conv + BN is left alone, a conv with a bias
converts (odd padding is skipped), and the rebound stem shares tensors and hooks but not registries.

The comparisons are against an unconverted deep copy made before ``convert`` (float32: PyTorch's
own error) and its float64 twin (the truth), as in tests/test_convert.py.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import resnet_fused as rf
from resnet_fused.models import reference as R
from builders import MyBasic, compare_outputs_and_grads
from utils import INTERPRET, assert_close, randomize_bn


# --------------------------------------------------------------------------------- the stem
def stem_pair():
    torch.manual_seed(0)
    model = randomize_bn(R.resnet18(num_classes=10))
    ref = copy.deepcopy(model)
    rf.convert(model)
    return model, ref


def test_stem_eval_is_conv_bn_relu():
    model, ref = stem_pair()
    model.eval()
    ref.eval()
    ref64 = copy.deepcopy(ref).double()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        y = model.conv1(x)
        expect32 = F.relu(ref.bn1(ref.conv1(x)))
        expect64 = F.relu(ref64.bn1(ref64.conv1(x.double())))
        assert_close(y, expect64, expect32, name="StemConv eval output")
        assert model.bn1(y) is y, "bn1 must pass its own conv's fused output through"
        # a tensor that did not come from its conv is normalised as usual
        other = torch.randn(2, 64, 5, 5)
        assert_close(model.bn1(other), ref64.bn1(other.double()), ref.bn1(other), name="bn1(other) eval")
        y64 = F.relu(ref64.bn1(ref64.conv1(x.double())))
        assert_close(model.bn1(y.clone()), ref64.bn1(y64), ref.bn1(expect32), name="bn1(copy of fused output)")
    # with autograd recording: the model-level stem (conv1 -> bn1 -> in-place relu) stays right
    models = (Stem(model), Stem(ref), Stem(ref64))
    compare_outputs_and_grads(models, x, "stem eval (autograd): ", grad=True)


class Stem(nn.Module):
    """The stem of a ResNet, as its forward runs it (the in-place ReLU included)."""

    def __init__(self, model):
        super().__init__()
        self.conv1, self.bn1, self.relu = model.conv1, model.bn1, model.relu

    def forward(self, x):
        return self.relu(self.bn1(self.conv1(x)))


def test_stem_train_is_plain_conv_then_batchnorm():
    model, ref = stem_pair()
    model.train()
    ref.train()
    ref64 = copy.deepcopy(ref).double()
    for step in range(2):
        x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(step))
        y = model.conv1(x)
        assert_close(y, ref64.conv1(x.double()), ref.conv1(x), name="StemConv train output")
        z = model.bn1(y)
        assert z is not y
        assert_close(z, ref64.bn1(ref64.conv1(x.double())), ref.bn1(ref.conv1(x)), name="stem bn train")
        other = torch.randn(2, 64, 3, 3, generator=torch.Generator().manual_seed(10 + step))
        assert_close(model.bn1(other), ref64.bn1(other.double()), ref.bn1(other), name="bn1(other) train")
    for n in ("running_mean", "running_var"):
        assert_close(getattr(model.bn1, n), getattr(ref64.bn1, n), getattr(ref.bn1, n), name="bn1." + n)
    assert int(model.bn1.num_batches_tracked) == int(ref.bn1.num_batches_tracked) == 4


def test_stem_left_alone_when_not_conv_bn():
    class NoBN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
            self.bn1 = nn.GroupNorm(1, 4)
            self.layer1 = nn.Sequential(MyBasic(4, 4))

        def forward(self, x):
            return self.layer1(self.bn1(self.conv1(x)))

    m = rf.convert(NoBN())
    assert type(m.conv1) is nn.Conv2d and type(m.bn1) is nn.GroupNorm
    assert type(m.layer1[0]) is rf.BasicBlock


def test_conv_bias_converts_and_odd_padding_is_skipped():
    torch.manual_seed(0)
    block = MyBasic(4, 4)
    block.conv1, block.conv2 = (nn.Conv2d(4, 4, 3, 1, 1, bias=True) for _ in range(2))
    randomize_bn(block)
    ref = copy.deepcopy(block)
    new = rf.convert(block)
    assert type(new) is rf.BasicBlock
    models = (new.eval(), ref.eval(), copy.deepcopy(ref).double().eval())
    for backend in ("torch", "triton") if INTERPRET else ("torch",):
        with rf.use_backend(backend):
            compare_outputs_and_grads(models, torch.randn(2, 4, 5, 5), f"conv bias ({backend}): ")
    for odd in (dict(padding=1, padding_mode="reflect"), dict(padding="same")):
        block = MyBasic(4, 4)
        block.conv1 = nn.Conv2d(4, 4, 3, 1, bias=False, **odd)
        out = rf.convert(block)
        assert out is block
        assert out.resnet_fused_report.skipped == [("", "conv1 is not a zero-padded nn.Conv2d")]


def test_stem_rebind_shares_tensors_and_hooks_but_not_registries():
    from resnet_fused.modules.stem import rebind

    conv = nn.Conv2d(3, 4, 3, bias=False)
    seen = []
    conv.register_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
    new = rebind(type("Sub", (nn.Conv2d,), {}), conv)
    assert new.weight is conv.weight
    new(torch.randn(1, 3, 5, 5))
    assert seen == ["Sub"]  # the existing hook came along
    new.register_forward_hook(lambda m, i, o: seen.append("new only"))
    new.register_buffer("extra", torch.zeros(1))
    conv(torch.randn(1, 3, 5, 5))
    assert seen == ["Sub", "Conv2d"] and "extra" not in conv._buffers
