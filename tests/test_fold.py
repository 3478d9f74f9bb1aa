"""BatchNorm folding: bn_scale_shift / fold_conv_bn against float64 unfused BN, is_foldable_bn, FoldCache."""
import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from resnet_fused.ops import FoldCache, bn_scale_shift, fold_conv_bn, is_foldable_bn
from utils import assert_close


def make_bn(c=6, affine=True, dtype=torch.float32, eps=1e-5):
    bn = nn.BatchNorm2d(c, affine=affine, eps=eps)
    with torch.no_grad():
        if affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.5)
        bn.running_mean.normal_(0, 0.5)
        bn.running_var.uniform_(0.3, 2.0)
    return bn.to(dtype).eval()


def make_conv_bn(cin=5, cout=6, bias=False, dtype=torch.float32):
    torch.manual_seed(1)
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=bias).to(dtype)
    return conv, make_bn(cout, dtype=dtype)


def unfused64(conv, bn, x):
    """bn(conv(x)) in float64, module parameters upcast."""
    y = F.conv2d(x.double(), conv.weight.double(), None if conv.bias is None else conv.bias.double(),
                 conv.stride, conv.padding)
    return F.batch_norm(y, bn.running_mean.double(), bn.running_var.double(),
                        None if bn.weight is None else bn.weight.double(),
                        None if bn.bias is None else bn.bias.double(), False, 0.0, bn.eps)


class FrozenBatchNorm2d(nn.Module):
    """A look-alike of torchvision.ops.misc.FrozenBatchNorm2d: buffers only, always eval maths."""

    def __init__(self, c, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.rand(c) + 0.5)
        self.register_buffer("bias", torch.randn(c))
        self.register_buffer("running_mean", torch.randn(c))
        self.register_buffer("running_var", torch.rand(c) + 0.5)

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return x * scale.view(1, -1, 1, 1) + (self.bias - self.running_mean * scale).view(1, -1, 1, 1)


# ---------------------------------------------------------------------------- scale/shift, fold
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
def test_bn_scale_shift_equals_bn(dtype, affine):
    bn = make_bn(7, affine=affine, dtype=dtype, eps=1e-3)
    scale, shift = bn_scale_shift(bn)
    assert scale.dtype == shift.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert scale.shape == shift.shape == (7,)
    x = torch.randn(2, 7, 5, 3, dtype=torch.float64)
    ref64 = make_bn(7, affine=affine, eps=1e-3).double()
    ref64.load_state_dict(bn.state_dict())  # the same (rounded) parameters, in float64
    with torch.no_grad():
        want = ref64(x)
        got = x * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1)
        # PyTorch's own eval BN with these parameters, in the precision scale/shift are computed in
        # (float32 for a float16 BN: the fold adds no half-precision rounding of its own)
        same = copy.deepcopy(bn).to(scale.dtype)(x.to(scale.dtype))
    assert_close(got, want, same, name="bn(x)", dtype=scale.dtype)


def test_bn_scale_shift_frozen_lookalike():
    bn = FrozenBatchNorm2d(6, eps=1e-4)
    scale, shift = bn_scale_shift(bn)
    x = torch.randn(2, 6, 3, 3)
    want = bn.double()(x.double())
    got = x.double() * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1)
    assert_close(got, want, bn.float()(x), name="frozen bn(x)")


def test_bn_scale_shift_is_differentiable_in_weight_and_bias():
    bn = make_bn(4)
    scale, shift = bn_scale_shift(bn)
    (scale.sum() + 2 * shift.sum()).backward()
    inv_std = (bn.running_var.double() + bn.eps).rsqrt()
    assert_close(bn.weight.grad, inv_std - 2 * bn.running_mean.double() * inv_std, name="d/dweight")
    assert torch.equal(bn.bias.grad, torch.full((4,), 2.0))


@pytest.mark.parametrize("conv_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("w_fmt", [torch.contiguous_format, torch.channels_last], ids=["w_nchw", "w_cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
def test_fold_conv_bn_equals_conv_then_bn(dtype, w_fmt, conv_bias):
    conv, bn = make_conv_bn(bias=conv_bias, dtype=dtype)
    conv.weight.data = conv.weight.data.contiguous(memory_format=w_fmt)
    scale, shift = bn_scale_shift(bn)
    w, b = fold_conv_bn(conv.weight, scale, shift, conv.bias)
    assert w.dtype == dtype and b.dtype == scale.dtype
    assert w.is_contiguous(memory_format=w_fmt)
    x = torch.randn(2, 5, 6, 7, dtype=dtype)
    want = unfused64(conv, bn, x)
    got = F.conv2d(x.double(), w.double(), b.double(), padding=1)  # folded weights, exact conv
    with torch.no_grad():
        same = bn(conv(x))  # PyTorch's own conv -> BN in ``dtype``
    # the folded weight is rounded once to ``dtype``, as PyTorch rounds its conv output to it
    assert_close(got, want, same, name="folded conv", dtype=dtype)
    # and with an explicit output dtype (fp32 stats, fp16 weights: the mixed-precision case)
    w16, b16 = fold_conv_bn(conv.weight, scale, shift, conv.bias, dtype=torch.float16)
    assert w16.dtype == torch.float16 and b16.dtype == scale.dtype
    torch.testing.assert_close(w16, w.to(torch.float16), rtol=0, atol=0)


# ------------------------------------------------------------------------------- is_foldable_bn
def test_is_foldable_bn():
    bn = nn.BatchNorm2d(4)
    assert not is_foldable_bn(bn)  # training mode: batch statistics
    assert is_foldable_bn(bn.eval())
    assert not is_foldable_bn(nn.BatchNorm2d(4, track_running_stats=False).eval())  # batch stats even in eval
    assert is_foldable_bn(nn.BatchNorm2d(4, affine=False).eval())
    assert is_foldable_bn(nn.SyncBatchNorm(4).eval())
    assert not is_foldable_bn(nn.SyncBatchNorm(4))
    assert is_foldable_bn(FrozenBatchNorm2d(4))
    assert is_foldable_bn(FrozenBatchNorm2d(4).train())  # frozen: eval maths whatever the mode
    broken = FrozenBatchNorm2d(4)
    del broken.running_var
    assert not is_foldable_bn(broken)
    for other in (nn.Identity(), nn.LayerNorm(4), nn.GroupNorm(2, 4), nn.InstanceNorm2d(4, track_running_stats=True)):
        assert not is_foldable_bn(other.eval()), other


# ------------------------------------------------------------------------------------ FoldCache
def fresh_fold(conv, bn, dtype=None, fmt=torch.contiguous_format):
    """What the cache must return: the fold computed from scratch."""
    with torch.no_grad():
        w, b = fold_conv_bn(conv.weight, *bn_scale_shift(bn), conv.bias, dtype)
    return w.contiguous(memory_format=fmt), b


def assert_fold_equals(got, want):
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)


def refold(conv, bn, change):
    """A fresh cache's fold of (conv, bn), then ``change()``, then its fold again, which must equal
    a fold from scratch of the changed modules: (old, new)."""
    cache = FoldCache()
    with torch.no_grad():
        old = cache.get("k", conv, bn)
    change()
    with torch.no_grad():
        new = cache.get("k", conv, bn)
    assert_fold_equals(new, fresh_fold(conv, bn))
    return old, new


def test_cache_hit_returns_the_same_tensors():
    conv, bn = make_conv_bn(bias=True)
    cache = FoldCache()
    with torch.no_grad():
        w1, b1 = cache.get("k", conv, bn)
        w2, b2 = cache.get("k", conv, bn)
    assert w1 is w2 and b1 is b2
    assert_fold_equals((w1, b1), fresh_fold(conv, bn))
    # no grad needed at all (parameters frozen) also hits, even with grad mode on
    for p in list(conv.parameters()) + list(bn.parameters()):
        p.requires_grad_(False)
    w3, _ = cache.get("k", conv, bn)
    assert w3 is w1
    # another key, dtype or memory format is another entry
    with torch.no_grad():
        w4, _ = cache.get("other", conv, bn)
        w5, _ = cache.get("k", conv, bn, dtype=torch.float16)
        w6, _ = cache.get("k", conv, bn, memory_format=torch.channels_last)
    assert w4 is not w1 and w5.dtype == torch.float16 and w6.is_contiguous(memory_format=torch.channels_last)
    assert_fold_equals((w6, _), fresh_fold(conv, bn, fmt=torch.channels_last))


@pytest.mark.parametrize("which", ["conv.weight", "conv.bias", "bn.weight", "bn.bias", "bn.running_mean",
                                   "bn.running_var"])
def test_cache_sees_in_place_changes(which):
    conv, bn = make_conv_bn(bias=True)
    mod, attr = which.split(".")
    with torch.no_grad():
        old, new = refold(conv, bn, lambda: getattr({"conv": conv, "bn": bn}[mod], attr).mul_(1.5).add_(0.25))
    assert not (torch.equal(new[0], old[0]) and torch.equal(new[1], old[1]))


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_cache_after_training_forward(grad):
    """A train-mode BN forward updates running_mean/var in place without bumping their version
    counters (the native kernel writes them); eval -> train -> eval must still refold."""
    conv, bn = make_conv_bn()

    def train_forward():
        bn.train()
        with torch.set_grad_enabled(grad):
            bn(conv(torch.randn(2, 5, 4, 4) + 3.0))
        bn.eval()

    old, new = refold(conv, bn, train_forward)
    assert not torch.equal(new[1], old[1])


def test_cache_sees_eps_change():
    conv, bn = make_conv_bn()
    old, new = refold(conv, bn, lambda: setattr(bn, "eps", 0.5))
    assert not torch.equal(new[0], old[0])


def test_cache_after_optimizer_step():
    conv, bn = make_conv_bn()
    opt = torch.optim.SGD(list(conv.parameters()) + list(bn.parameters()), lr=0.1)

    def step():
        bn(conv(torch.randn(2, 5, 4, 4))).square().sum().backward()
        opt.step()

    old, new = refold(conv, bn, step)
    assert not torch.equal(new[0], old[0])


def test_cache_after_load_state_dict():
    conv, bn = make_conv_bn()
    conv2, bn2 = make_conv_bn()
    with torch.no_grad():
        conv2.weight.normal_()
        bn2.running_var.uniform_(2, 3)
    with torch.no_grad():
        old, new = refold(conv, bn, lambda: (conv.load_state_dict(conv2.state_dict()),
                                             bn.load_state_dict(bn2.state_dict())))
    assert_fold_equals(new, fresh_fold(conv2, bn2))
    assert not torch.equal(new[0], old[0])


def test_cache_after_replacing_tensors():
    conv, bn = make_conv_bn()
    bn.running_mean = torch.full((6,), 0.5)  # version 0, like the replacements below
    cache = FoldCache()
    with torch.no_grad():
        cache.get("k", conv, bn)
        # Two replacements in a row: the second new tensor often reuses the first one's id()
        # (and has the same version, 0), so an id()-keyed cache would hand back a stale fold.
        bn.running_mean = torch.full((6,), 1.0)
        bn.running_mean = torch.full((6,), 2.0)
        assert_fold_equals(cache.get("k", conv, bn), fresh_fold(conv, bn))
        conv.weight = nn.Parameter(torch.randn_like(conv.weight))
        assert_fold_equals(cache.get("k", conv, bn), fresh_fold(conv, bn))
        # ``.data =`` keeps the Parameter object and its version counter; only its storage changes
        bn.weight.data = torch.full((6,), 3.0)
        assert_fold_equals(cache.get("k", conv, bn), fresh_fold(conv, bn))
        bn.bias = None  # a parameter removed
        assert_fold_equals(cache.get("k", conv, bn), fresh_fold(conv, bn))


def test_cache_after_module_to():
    conv, bn = make_conv_bn()
    old, new = refold(conv, bn, lambda: (conv.double(), bn.double()))
    assert new[0].dtype == torch.float64 and new[1].dtype == torch.float64
    assert old[0].dtype == torch.float32


def test_cache_with_inference_tensors():
    """Tensors made under inference_mode keep no version counter: the cache must not rely on one."""
    with torch.inference_mode():
        conv, bn = make_conv_bn()
        cache = FoldCache()
        first = cache.get("k", conv, bn)
        assert_fold_equals(first, fresh_fold(conv, bn))
        bn.running_var.add_(1.0)  # in place, unseen by any version counter
        assert_fold_equals(cache.get("k", conv, bn), fresh_fold(conv, bn))


def test_cache_bypassed_when_autograd_must_see_the_fold():
    conv, bn = make_conv_bn(bias=True)
    cache = FoldCache()
    with torch.no_grad():
        cached = cache.get("k", conv, bn)
    w, b = cache.get("k", conv, bn)  # grad enabled, parameters require grad
    assert w is not cached[0] and w.requires_grad and b.requires_grad
    x = torch.randn(2, 5, 4, 3)
    F.conv2d(x, w, b, padding=1).square().sum().backward()
    got = {n: p.grad.clone() for n, p in [("conv.weight", conv.weight), ("conv.bias", conv.bias),
                                          ("bn.weight", bn.weight), ("bn.bias", bn.bias)]}
    # the same gradients from autograd through the unfused float64 conv -> BN
    params64 = {n: p.detach().double().requires_grad_() for n, p in [
        ("conv.weight", conv.weight), ("conv.bias", conv.bias), ("bn.weight", bn.weight), ("bn.bias", bn.bias)]}
    y = F.conv2d(x.double(), params64["conv.weight"], params64["conv.bias"], padding=1)
    y = F.batch_norm(y, bn.running_mean.double(), bn.running_var.double(), params64["bn.weight"],
                     params64["bn.bias"], False, 0.0, bn.eps)
    y.square().sum().backward()
    for name, g in got.items():
        assert_close(g, params64[name].grad, name=f"grad {name}")
    # the bypass did not disturb the cached entry
    with torch.no_grad():
        assert cache.get("k", conv, bn)[0] is cached[0]


def test_cache_conv_only_and_bn_only():
    conv, bn = make_conv_bn(bias=True)
    cache = FoldCache()
    with torch.no_grad():
        scale, shift = cache.get("bn", None, bn)
        assert cache.get("bn", None, bn)[0] is scale
        want = bn_scale_shift(bn)
        assert_fold_equals((scale, shift), want)
        w, b = cache.get("conv", conv, None, memory_format=torch.channels_last)
        assert w.is_contiguous(memory_format=torch.channels_last) and torch.equal(w, conv.weight)
        assert b is conv.bias
        assert cache.get("conv", conv, None, memory_format=torch.channels_last)[0] is w
        bn.running_mean.add_(1.0)
        assert_fold_equals(cache.get("bn", None, bn), bn_scale_shift(bn))


def test_deepcopy_and_pickle_give_an_empty_cache():
    conv, bn = make_conv_bn()
    holder = nn.Module()
    holder.conv, holder.bn = conv, bn
    holder.cache = FoldCache()
    with torch.no_grad():
        w, _ = holder.cache.get("k", conv, bn)
    clone = copy.deepcopy(holder)
    assert isinstance(clone.cache, FoldCache) and clone.cache._entries == {}
    assert holder.cache._entries  # the original keeps its entry
    with torch.no_grad():
        clone.bn.running_var.fill_(4.0)
        w2, _ = clone.cache.get("k", clone.conv, clone.bn)
    assert w2 is not w
    assert_fold_equals((w2, _), fresh_fold(clone.conv, clone.bn))
    restored = pickle.loads(pickle.dumps(holder.cache))
    assert isinstance(restored, FoldCache) and restored._entries == {}
