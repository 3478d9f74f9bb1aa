"""Model zoo: torchvision's ResNets, WRN-d-k and pre-activation ResNet-164/1001 from fused blocks.

Checked against the plain references in ``resnet_fused.models.reference``: parameter counts (exact
for torchvision's, to the papers' precision for the CIFAR nets), state_dict keys, strict state_dict
round trips in both directions with equal outputs, running statistics and ``num_batches_tracked``,
torchvision's keyword arguments, and the model-level pre-flight check that refuses a training batch
some BatchNorm cannot normalise before any running statistic changes. Small inputs keep the file
fast on CPU; one tiny model runs the Triton kernels (interpreter on CPU).
"""
import copy

import pytest
import torch
from torch import nn

import resnet_fused as rf
from resnet_fused.models import reference as R

from utils import DEVICE, assert_close, bn_modules, randomize_bn

TORCHVISION_PARAMS = {
    "resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032, "resnet101": 44_549_160,
    "resnet152": 60_192_808, "wide_resnet50_2": 68_883_240, "wide_resnet101_2": 126_886_696,
}
STATE_DICT_KEYS = {"resnet18": 122, "resnet50": 320}

def n_params(model):
    return sum(p.numel() for p in model.parameters())


def n_weights(model):
    """Parameters outside BatchNorm layers (conv and fc weights and biases)."""
    bn = {id(p) for m in bn_modules(model) for p in m.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in bn)


def bn_state(model):
    """Every BatchNorm buffer (running_mean, running_var, num_batches_tracked), cloned, by name."""
    return {k: v.clone() for k, v in model.state_dict().items()
            if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


def assert_bn_state_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} changed: {a[k].flatten()[:4]} -> {b[k].flatten()[:4]}"


def assert_buffers_close(ours, ref, ref64):
    """Running statistics close to the float64 reference's; num_batches_tracked exactly equal."""
    sd, sd_ref, sd64 = ours.state_dict(), ref.state_dict(), ref64.state_dict()
    assert sd.keys() == sd_ref.keys()
    for k, v in sd.items():
        if k.endswith("num_batches_tracked"):
            assert torch.equal(v, sd_ref[k]), f"{k}: {v} vs reference {sd_ref[k]}"
        elif k.endswith(("running_mean", "running_var")):
            assert_close(v, sd64[k], sd_ref[k], name=k)


# ------------------------------------------------------------------------ torchvision architecture
@pytest.mark.parametrize("name", list(TORCHVISION_PARAMS))
def test_torchvision_param_counts_and_keys(name):
    model = getattr(rf.models, name)()  # built once in this file: the big ones cost seconds and GBs
    assert n_params(model) == TORCHVISION_PARAMS[name]
    with torch.device("meta"):  # the reference only for its key set: no memory, no init cost
        ref = getattr(R, name)()
    assert list(model.state_dict().keys()) == list(ref.state_dict().keys())
    if name in STATE_DICT_KEYS:
        assert len(model.state_dict()) == STATE_DICT_KEYS[name]
    assert isinstance(model.conv1, rf.modules.StemConv) and isinstance(model.bn1, rf.modules.StemBatchNorm)
    block = rf.BasicBlock if name in ("resnet18", "resnet34") else rf.Bottleneck
    assert all(type(b) is block for i in range(1, 5) for b in getattr(model, f"layer{i}"))


def test_exports():
    for name in ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2",
                 "wide_resnet101_2", "ResNet", "wrn", "WideResNet", "preact_resnet", "PreActResNet", "reference"]:
        assert name in rf.models.__all__ and hasattr(rf.models, name)
    assert rf.models.reference is R


def test_init_matches_torchvision_rules():
    model = rf.models.resnet18()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and torch.equal(m.bias, torch.zeros_like(m.bias))
    # kaiming_normal_(fan_out, relu): std = sqrt(2 / (out_channels * kh * kw))
    w = model.layer3[0].conv2.weight
    assert abs(w.std().item() / (2.0 / (w.shape[0] * 9)) ** 0.5 - 1) < 0.05


# -------------------------------------------------------------------------------- state_dict moves
def _train_pair(ours, ref, x):
    """Train-mode forward of ours, the float32 reference and a float64 copy; compare everything."""
    ref64 = copy.deepcopy(ref).double()
    ours.train(), ref.train(), ref64.train()
    out, out_ref, out64 = ours(x), ref(x), ref64(x.double())
    assert_close(out, out64, out_ref, name="train output")
    assert_buffers_close(ours, ref, ref64)


def _eval_pair(ours, ref, x):
    ours.eval(), ref.eval()
    ref64 = copy.deepcopy(ref).double()
    with torch.no_grad():
        assert_close(ours(x), ref64(x.double()), ref(x), name="eval output")


def test_resnet50_state_dict_round_trip():
    ours, ref = rf.models.resnet50(num_classes=10), randomize_bn(R.resnet50(num_classes=10))
    ours.load_state_dict(ref.state_dict(), strict=True)  # reference -> ours
    for k, v in ref.state_dict().items():
        assert torch.equal(v, ours.state_dict()[k]), k
    x = torch.randn(2, 3, 64, 64)
    _train_pair(ours, ref, x)
    with torch.no_grad():  # ours -> reference, after ours changed its weights and statistics
        for p in ours.parameters():
            p.mul_(1.01)
    ref.load_state_dict(ours.state_dict(), strict=True)
    _eval_pair(ours, ref, x)


def test_resnet18_state_dict_round_trip_train_and_eval():
    ref = randomize_bn(R.resnet18(num_classes=7))
    ours = rf.models.resnet18(num_classes=7)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64).to(memory_format=torch.channels_last)
    _train_pair(ours, ref, x)
    _eval_pair(ours, ref, x)


@pytest.mark.parametrize("build,ref_build,shape", [
    (lambda: rf.models.resnet18(num_classes=10), lambda: R.resnet18(num_classes=10), (2, 3, 32, 32)),
    (lambda: rf.models.wrn(10, 1), lambda: R.ref_wrn(10, 1), (2, 3, 16, 16)),
])
def test_eval_after_train_sees_updated_running_stats(build, ref_build, shape):
    ours, ref = build(), randomize_bn(ref_build())
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(shape)
    _eval_pair(ours, ref, x)  # fills the fold caches
    _train_pair(ours, ref, x)  # changes the running statistics in place
    _eval_pair(ours, ref, x)


def test_strict_load_rejects_foreign_keys():
    sd = R.resnet18().state_dict()
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="extra.weight"):
        rf.models.resnet18().load_state_dict(sd, strict=True)


# ---------------------------------------------------------------------------------- keyword args
def test_num_classes():
    model = rf.models.resnet18(num_classes=5).eval()
    assert model.fc.out_features == 5
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5)


@pytest.mark.parametrize("name,last", [("resnet18", "bn2"), ("resnet50", "bn3")])
def test_zero_init_residual(name, last):
    model = getattr(rf.models, name)(zero_init_residual=True)
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in layer:
            assert torch.count_nonzero(getattr(block, last).weight) == 0
            assert torch.all(block.bn1.weight == 1)
            if block.downsample is not None:
                assert torch.all(block.downsample[1].weight == 1)
    assert torch.all(model.bn1.weight == 1)
    # each block starts as identity + ReLU of its input
    model.eval()
    block = model.layer1[1]
    x = torch.randn(2, block.conv1.in_channels, 8, 8).relu()
    with torch.no_grad():
        torch.testing.assert_close(block(x), x)


def test_resnext_groups_width_per_group():
    # resnext50_32x4d's configuration: torchvision's count 25,028,904
    ours = rf.models.resnet50(groups=32, width_per_group=4)
    ref = randomize_bn(R.resnet50(groups=32, width_per_group=4))
    assert n_params(ours) == n_params(ref) == 25_028_904
    assert ours.layer1[0].conv2.groups == 32 and ours.layer1[0].conv2.out_channels == 128
    ours.load_state_dict(ref.state_dict(), strict=True)
    _eval_pair(ours, ref, torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="BasicBlock only supports groups=1"):
        rf.models.resnet18(groups=2)


def test_wide_resnet_width_fixed():
    with pytest.raises(ValueError, match="width_per_group"):
        rf.models.wide_resnet50_2(width_per_group=64)


def test_replace_stride_with_dilation():
    dil = [False, True, True]
    ours, ref = rf.models.resnet50(num_classes=10, replace_stride_with_dilation=dil), R.resnet50(
        num_classes=10, replace_stride_with_dilation=dil)
    assert [ours.layer3[1].conv2.dilation, ours.layer4[1].conv2.dilation] == [(2, 2), (4, 4)]
    assert ours.layer4[0].conv2.stride == (1, 1) and ours.layer4[0].downsample[0].stride == (1, 1)
    seen = []
    ours.layer4.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape[-2:])))
    ours.load_state_dict(randomize_bn(ref).state_dict(), strict=True)
    _eval_pair(ours, ref, torch.randn(1, 3, 32, 32))
    assert seen == [(4, 4)]  # output stride 8 instead of 32
    with pytest.raises(ValueError, match="replace_stride_with_dilation"):
        rf.models.resnet50(replace_stride_with_dilation=[True])
    with pytest.raises(NotImplementedError, match="Dilation > 1"):
        rf.models.resnet18(replace_stride_with_dilation=[False, False, True])


def test_norm_layer_momentum_none():
    norm = lambda c: nn.BatchNorm2d(c, momentum=None)  # noqa: E731  (the usual way it is passed)
    ours, ref = rf.models.resnet18(num_classes=10, norm_layer=norm), R.resnet18(num_classes=10, norm_layer=norm)
    assert all(m.momentum is None for m in bn_modules(ours)) and len(bn_modules(ours)) == 20
    ours.load_state_dict(ref.state_dict(), strict=True)
    for _ in range(2):  # cumulative averages over two batches
        _train_pair(ours, ref, torch.randn(2, 3, 32, 32))
        ref_state = bn_state(ref)
        assert all(int(v) == int(ref_state[k]) for k, v in bn_state(ours).items() if k.endswith("tracked"))
    _eval_pair(ours, ref, torch.randn(2, 3, 32, 32))


def test_weights_and_pretrained_refused():
    for kw in ({"weights": "IMAGENET1K_V1"}, {"pretrained": True}):
        with pytest.raises(ValueError, match="cannot download pretrained weights.*load_state_dict"):
            rf.models.resnet50(**kw)
    rf.models.resnet18(weights=None, progress=False)  # torchvision's defaults are fine


def test_backend_kwarg_pins_fused_modules():
    model = rf.models.resnet18(backend="torch")
    fused = [m for m in model.modules() if isinstance(m, rf.modules._base.FusedBlockMixin)]
    assert len(fused) == 9 and all(m.backend == "torch" for m in fused)  # stem + 8 blocks
    assert all(m.backend is None for m in rf.models.resnet18().modules()
               if isinstance(m, rf.modules._base.FusedBlockMixin))
    assert rf.models.wrn(10, 1, backend="torch").layer2[0].backend == "torch"
    assert rf.models.preact_resnet(11, backend="torch").layer3[0].backend == "torch"
    with pytest.raises(ValueError, match="backend"):
        rf.models.resnet18(backend="fast")


# ----------------------------------------------------------------------------- pre-flight checks
@pytest.mark.parametrize("build,shape,culprit", [
    (lambda: rf.models.resnet18(num_classes=10), (1, 3, 32, 32), "layer4.0.bn1"),
    (lambda: rf.models.resnet50(num_classes=10), (1, 3, 32, 32), "layer4.0.bn2"),
    (lambda: rf.models.resnet18(num_classes=10), (1, 3, 1, 1), "bn1"),
    (lambda: rf.models.wrn(10, 1), (1, 3, 4, 4), "layer3.0.bn2"),
    (lambda: rf.models.wrn(10, 1), (1, 3, 1, 1), "layer1.0.bn1"),
    (lambda: rf.models.preact_resnet(11), (1, 3, 4, 4), "layer3.0.bn3"),
])
def test_preflight_refuses_unnormalisable_batch_without_touching_state(build, shape, culprit):
    model = build().train()
    before = bn_state(model)
    with pytest.raises(ValueError, match=rf"{culprit} \(a BatchNorm in training mode\) needs more than 1 value"):
        model(torch.randn(shape))
    assert_bn_state_equal(before, bn_state(model))
    model.eval()  # eval mode normalises with running statistics: fine
    with torch.no_grad():
        assert model(torch.randn(shape)).shape == (1, model.fc.out_features)


def test_preflight_bad_inputs_leave_state_unchanged():
    model = rf.models.resnet18(num_classes=10).train()
    before = bn_state(model)
    with pytest.raises(ValueError, match="expected 3 channels"):
        model(torch.randn(2, 4, 32, 32))
    with pytest.raises(ValueError, match="4-D"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(2, 3, 32, 32, dtype=torch.int64))
    with pytest.raises(TypeError, match="dtype"):
        model(torch.randn(2, 3, 32, 32, dtype=torch.float64))
    assert_bn_state_equal(before, bn_state(model))
    model(torch.randn(2, 3, 32, 32))  # a batch of 2 at 1x1 in layer4 is fine, and counts
    assert all(int(v) == 1 for k, v in bn_state(model).items() if k.endswith("tracked"))


# --------------------------------------------------------------------------------- Wide ResNet
@pytest.mark.parametrize("depth,k,millions", [(40, 4, 8.95), (16, 8, 10.96), (16, 10, 17.12), (28, 10, 36.48)])
def test_wrn_param_counts(depth, k, millions):
    model = rf.models.wrn(depth, k)
    assert round(n_params(model) / 1e6, 2) == millions
    with torch.device("meta"):
        ref = R.ref_wrn(depth, k)
    assert n_params(ref) == n_params(model)
    assert list(ref.state_dict().keys()) == list(model.state_dict().keys())
    n = (depth - 4) // 6
    assert [len(model.layer1), len(model.layer2), len(model.layer3)] == [n, n, n]
    assert model.bn.num_features == 64 * k and model.fc.in_features == 64 * k
    assert all(c.bias is None for c in model.modules() if isinstance(c, nn.Conv2d))


@pytest.mark.parametrize("depth", [0, 9, 12, 27, 101])
def test_wrn_depth_validation(depth):
    with pytest.raises(ValueError, match=f"depth.*6n\\+4.*got {depth}"):
        rf.models.wrn(depth, 2)
    with pytest.raises(TypeError, match="depth"):
        rf.models.wrn(16.0, 2)


def test_wrn_round_trip_train_and_eval():
    ref = randomize_bn(R.ref_wrn(16, 2, num_classes=10))
    ours = rf.models.wrn(16, 2, num_classes=10)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    _train_pair(ours, ref, x)
    ref.load_state_dict(ours.state_dict(), strict=True)  # and back
    _eval_pair(ours, ref, x)
    _eval_pair(ours, ref, torch.randn(2, 3, 24, 24))  # adaptive pooling: other sizes work


def test_wrn_dropout_matches_reference():
    ours, ref = rf.models.wrn(10, 2, dropout=0.3), R.ref_wrn(10, 2, dropout=0.3)
    ref.load_state_dict(ours.state_dict(), strict=True)
    assert all(b.dropout == 0.3 for layer in (ours.layer1, ours.layer2, ours.layer3) for b in layer)
    x = torch.randn(2, 3, 16, 16)
    torch.manual_seed(1)
    out = ours.train()(x)
    torch.manual_seed(1)
    out_ref = ref.train()(x)
    torch.testing.assert_close(out, out_ref)  # same masks drawn in the same order
    _eval_pair(ours, ref, x)  # dropout is the identity in eval


# ------------------------------------------------------------------------- pre-activation ResNet
@pytest.mark.parametrize("depth,millions,total", [(164, 1.7, 1_703_258), (1001, 10.2, 10_327_706)])
def test_preact_param_counts(depth, millions, total):
    # The paper's figures (1.7M, 10.2M) round the conv + fc weights; BatchNorm's affine parameters
    # add 0.15M to ResNet-1001 (10,178,490 weights, 10,327,706 in all).
    model = rf.models.preact_resnet(depth)
    assert round(n_weights(model) / 1e6, 1) == millions
    assert n_params(model) == total
    with torch.device("meta"):
        ref = R.ref_preact_resnet(depth)
    assert list(ref.state_dict().keys()) == list(model.state_dict().keys())
    n = (depth - 2) // 9
    assert [len(model.layer1), len(model.layer2), len(model.layer3)] == [n, n, n]
    assert [model.layer1[0].downsample.weight.shape[:2], model.layer2[0].downsample.stride,
            model.layer3[0].conv2.stride] == [(64, 16), (2, 2), (2, 2)]
    assert all(b.downsample is None for layer in (model.layer1, model.layer2, model.layer3) for b in layer[1:])
    assert model.bn.num_features == 256 and model.fc.in_features == 256


@pytest.mark.parametrize("depth", [0, 10, 12, 163, 1000])
def test_preact_depth_validation(depth):
    with pytest.raises(ValueError, match=f"depth.*9n\\+2.*got {depth}"):
        rf.models.preact_resnet(depth)


def test_preact_round_trip_train_and_eval():
    ours = randomize_bn(rf.models.preact_resnet(20, num_classes=100))
    ref = R.ref_preact_resnet(20, num_classes=100)
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    _train_pair(ours, ref, x)
    ours.load_state_dict(ref.state_dict(), strict=True)  # and back
    _eval_pair(ours, ref, x)


# ------------------------------------------------------------------------ the Triton kernels, once
def test_wrn_eval_triton_matches_float64_reference(monkeypatch):
    device = torch.device(DEVICE)
    if "triton" not in rf.available_backends(device):
        pytest.skip(rf.unavailable_reason("triton", device))
    import resnet_fused.modules._base as base

    used = []
    real = base._conv_run

    def spy(*args, **kwargs):
        used.append(kwargs.get("backend"))
        return real(*args, **kwargs)

    monkeypatch.setattr(base, "_conv_run", spy)
    ref = randomize_bn(R.ref_wrn(10, 1)).eval()
    ours = rf.models.wrn(10, 1).to(device).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad(), rf.use_backend("triton"):
        out = ours(x.to(device))
    with torch.no_grad():
        out32 = ref(x)
        out64 = ref.double()(x.double())
    assert used and set(used) == {"triton"}, used
    assert_close(out.cpu(), out64, out32, name="wrn-10-1 triton eval")
