"""WideBasic and PreActBottleneck against an independent reference written from the papers.

Wide ResNet (Zagoruyko & Komodakis 2016) block: BN-ReLU-conv3x3-BN-ReLU-[dropout]-conv3x3, plus the
shortcut; pre-activation bottleneck (He et al. 2016): [BN-ReLU-1x1][BN-ReLU-3x3, stride]
[BN-ReLU-1x1, x4]. A 1x1 projection shortcut takes the pre-activated input, the identity shortcut
the raw input. The reference (``RefWideBasic``, ``RefPreActBottleneck`` in tests/builders.py, with
the builders) is module by module with no code from resnet_fused.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import resnet_fused as rf
from resnet_fused.modules import _base
from builders import (BACKENDS, CL, NCHW, PREACT_CASES, assert_state_close, build_preact_pair,
                      check_eval_low_precision, make_preact_input, run_step, train_steps)
from utils import INTERPRET, assert_close


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
@pytest.mark.parametrize("case", list(PREACT_CASES))
def test_train_three_sgd_steps(case, fmt, fused_calls):
    ours, ref = build_preact_pair(case)
    train_steps(ours, ref, case, fmt, dropout_seed=123)
    assert fused_calls == [], "training must run the eager path"


@pytest.mark.parametrize("fmt", [NCHW, CL], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(PREACT_CASES))
def test_eval_matches_reference(case, backend, fmt, fused_calls):
    ours, ref = build_preact_pair(case)
    ref64 = copy.deepcopy(ref).double()
    models = (ours.eval(), ref.eval(), ref64.eval())
    with rf.use_backend(backend):
        run_step(models, make_preact_input(case, fmt), grad=False, tag=f"eval {backend}: ")
    if PREACT_CASES[case][2] == "seq":
        assert fused_calls == [], "a shortcut that is not a bare conv runs eagerly"
    else:
        n_convs = 2 if PREACT_CASES[case][0] == "wide" else 3
        has_proj = ours._shortcut_module() is not None
        assert [c[0] for c in fused_calls].count("bn_act") == 1
        assert [c[0] for c in fused_calls].count("conv_bias_act") == n_convs + has_proj
        assert {c[1] for c in fused_calls} == {backend}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["wide-proj-s2-batch1", "preact-identity", "preact-proj-s2-batch1"])
def test_eval_autograd_through_fused_path(case, backend, fused_calls):
    ours, ref = build_preact_pair(case)
    models = (ours.eval(), ref.eval(), copy.deepcopy(ref).double().eval())
    with rf.use_backend(backend):
        run_step(models, make_preact_input(case, CL if backend == "triton" else NCHW), grad=True, tag=f"eval {backend}: ")
    assert fused_calls


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["wide-proj-s2-batch1", "wide-dropout", "preact-proj-s2-batch1"])
def test_eval_after_train(case, backend):
    ours, ref = build_preact_pair(case)
    ref64 = train_steps(ours, ref, case, dropout_seed=5)
    models = (ours.eval(), ref.eval(), ref64.eval())
    with rf.use_backend(backend):
        for fmt in (NCHW, CL):
            run_step(models, make_preact_input(case, fmt, seed=9), grad=False, tag=f"eval after train ({backend}): ")


def test_momentum_none_cumulative_average():
    norm = lambda c: nn.BatchNorm2d(c, momentum=None)  # noqa: E731
    for case in ("wide-proj-s2-batch1", "preact-proj-s2-batch1"):
        ours, ref = build_preact_pair(case, norm=norm)
        train_steps(ours, ref, case, steps=4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_is_identity_in_eval(backend):
    ours, ref = build_preact_pair("wide-dropout", dropout=0.5)
    plain, _ = build_preact_pair("wide-dropout", dropout=0.0)
    x = make_preact_input("wide-dropout")
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
    ours, ref = build_preact_pair("wide-dropout", dropout=p)
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
    ours, ref = build_preact_pair("wide-proj-s2-batch1")
    assert set(ours.state_dict()) == set(ref.state_dict())
    assert ours.shortcut is not None and ours.stride == 2 and ours.dropout == 0.0
    ours, ref = build_preact_pair("wide-identity-7x7")
    assert ours.shortcut is None
    ours, ref = build_preact_pair("preact-proj-s2-batch1")
    assert set(ours.state_dict()) == set(ref.state_dict())
    assert rf.PreActBottleneck.expansion == 4 and ours.stride == 2


@pytest.mark.parametrize("case", ["wide-proj-s2-batch1", "preact-proj-s2-batch1"])
def test_non_batchnorm_norm_runs_eager(case, fused_calls):
    norm = lambda c: nn.GroupNorm(1, c)  # noqa: E731
    ours, ref = build_preact_pair(case, norm=norm)
    train_steps(ours, ref, case, steps=2)
    models = (ours.eval(), ref.eval(), copy.deepcopy(ref).double().eval())
    for backend in ("torch", "triton") if INTERPRET else ("torch",):
        with rf.use_backend(backend):
            run_step(models, make_preact_input(case, CL), grad=True)
    assert fused_calls == []


@pytest.mark.parametrize("how", ["cast", "autocast"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["wide-proj-s2-batch1", "preact-proj-s2-batch1"])
def test_eval_low_precision(case, backend, dtype, how):
    """Half-precision blocks and float32 blocks under autocast, vs PyTorch in the same dtype."""
    ours, ref = build_preact_pair(case)
    check_eval_low_precision(ours, ref, make_preact_input(case), backend, dtype, how)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_train_eval_follows_running_stats(backend):
    """Running stats move in place in training (no version bump): the next eval must not reuse old folds."""
    case = "preact-proj-s2-batch1"
    ours, ref = build_preact_pair(case)
    ref64 = copy.deepcopy(ref).double()
    x = make_preact_input(case, seed=9)
    with rf.use_backend(backend):
        run_step((ours.eval(), ref.eval(), ref64.eval()), x, grad=False, tag="first eval: ")
        with torch.no_grad():
            for m, xi in zip((ours, ref, ref64), (make_preact_input(case, seed=3),) * 2 + (make_preact_input(case, seed=3).double(),)):
                m.train()(xi)
        assert_state_close(ours, ref, ref64)
        run_step((ours.eval(), ref.eval(), ref64.eval()), x, grad=False, tag="eval after a train forward: ")
