"""Fused training beyond one block, on each fused backend in turn (the ``train_backend`` fixture of
tests/conftest.py, as in tests/test_train_blocks.py, so every test runs once for "triton" and once
for "cuda"): SGD steps of whole models (a chain of every block kind, WRN-10-1) against the plain
reference in float32 and float64, and the activation bytes a fused block keeps for backward.

Builders: tests/builders.py (``build``, ``make_x``, ``sgd_steps``), tests/utils.py.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import resnet_fused as rf
from resnet_fused.models import reference as R
from resnet_fused.modules._base import FusedBlockMixin
from builders import TRAIN, assert_state_close, build, is_preact, make_x, saved_activations, sgd_steps
from utils import INTERPRET, downsample, randomize_bn

pytestmark = [pytest.mark.skipif(not INTERPRET and not torch.cuda.is_available(),
                                 reason="the fused training path needs Triton (TRITON_INTERPRET=1 on CPU)"),
              pytest.mark.usefixtures("train_backend")]  # tests/conftest.py: every test on each fused backend


# ------------------------------------------------------------------------------- 10. model level
def _pin(model, backend):
    for m in model.modules():
        if isinstance(m, FusedBlockMixin):
            m.backend = backend


def _mixed_chain(post, wide, pre):
    """Stem, then one block of each kind, each feeding the next one's x (and its x.grad back),
    BN-ReLU head: ``post`` the module holding BasicBlock/Bottleneck, ``wide``/``pre`` the
    pre-activation block classes."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        post.BasicBlock(8, 8), post.Bottleneck(8, 3, 2, downsample(8, 12, 2)), wide(12, 12),
        pre(12, 4, 2, R.conv1x1(12, 16, 2)), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))


# name: (ours, reference, input shape, SGD steps, preact flag of each fused block per forward)
MODELS = {
    "mixed-chain": (lambda: _mixed_chain(rf, rf.WideBasic, rf.PreActBottleneck),
                    lambda: _mixed_chain(R, R.RefWideBasic, R.RefPreActBottleneck), (2, 3, 8, 8), 2,
                    [False, False, True, True]),
    "wrn-10-1": (lambda: rf.models.wrn(10, 1), lambda: R.ref_wrn(10, 1), (2, 3, 8, 8), 1, [True] * 3),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_model_sgd_steps(name, fused_train_calls):
    build_ours, build_ref, shape, steps, per_forward = MODELS[name]
    torch.manual_seed(0)
    ref = randomize_bn(build_ref())
    ours = build_ours()
    ours.load_state_dict(ref.state_dict(), strict=True)
    _pin(ours, TRAIN["backend"])
    ref64 = sgd_steps(ours.train(), ref.train(),
                      lambda s: torch.randn(shape, generator=torch.Generator().manual_seed(s)), steps=steps)
    assert fused_train_calls == per_forward * steps
    assert_state_close(ours, ref, ref64, what=f"{name} after training: ")


# ---------------------------------------------------------------------- activation memory
@pytest.mark.parametrize("case", ["basic-identity-7x7", "basic-ds-5x6", "bottle-identity", "bottle-s2-ds-batch1",
                                  "wide-identity-7x7", "wide-proj-s2-batch1", "preact-identity",
                                  "preact-proj-s2-batch1"])
def test_fused_block_saves_fewer_activation_bytes(case, fused_train_calls):
    """Bytes of saved activations, derived from the shapes.

    Post-activation, convs 1..k with outputs y_i, optional downsample output yd, block output out:
      fused keeps x, y_1..y_k, yd (normalised activations and ReLU masks are recomputed);
      eager keeps x, each y_i (BN input) and for i < k its ReLU output (next conv's input), yd and
      the output (the final ReLU's result).
    Pre-activation, a = relu(bn1(x)), y_i (i < k) the inner conv outputs:
      fused keeps x, y_1..y_{k-1}; eager keeps x, a, each y_i and its ReLU output.
    """
    ours, ref = build(case)
    # a batch size no weight has as its first dimension, so the filter sees activations only
    n = next(n for n in (2, 3, 5, 7) if all(p.shape[0] != n for p in ours.parameters()))
    x = torch.randn(n, *make_x(case).shape[1:], generator=torch.Generator().manual_seed(0)).requires_grad_()
    with rf.use_low_memory(False):  # the default mode (an env var could switch it)
        fused, y = saved_activations(ours, x)
    assert fused_train_calls == [is_preact(case)]
    eager, _ = saved_activations(ref, x)

    # shapes of every intermediate, from an eager float64 run with hooks
    shapes = {}
    probe = copy.deepcopy(ref).double()
    for name, m in probe.named_modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(lambda m, i, o, name=name: shapes.__setitem__(name, o.numel() * 4))
    with torch.no_grad():
        probe(x.detach().double())
    xb, outb = x.numel() * 4, y.numel() * 4
    if is_preact(case):
        inner = [shapes[f"conv{i}"] for i in (1, 2, 3) if f"conv{i}" in shapes][:-1]
        want_fused = xb + sum(inner)
        want_eager = xb + xb + 2 * sum(inner)
    else:
        convs = [shapes[f"conv{i}"] for i in (1, 2, 3) if f"conv{i}" in shapes]
        yd = shapes.get("downsample.0", 0)
        want_fused = xb + sum(convs) + yd
        want_eager = xb + 2 * sum(convs[:-1]) + convs[-1] + yd + outb
    assert sum(eager.values()) == want_eager, "the accounting of eager's saved tensors is off"
    assert sum(fused.values()) <= want_fused, \
        f"fused keeps {sum(fused.values())} bytes, more than x and the raw conv outputs ({want_fused})"
    ratio = sum(fused.values()) / sum(eager.values())
    assert ratio <= want_fused / want_eager < 1, f"fused/eager saved bytes {ratio:.3f}"
