"""Fused training of the drop-in blocks (``BasicBlock``, ``Bottleneck``, ``WideBasic``,
``PreActBottleneck``): one ``BlockTrainFn`` per block when the backend resolves to "triton" or
"cuda". Every test runs twice, once per fused backend (the ``train_backend`` fixture): "triton"
(the Triton kernels; on CPU through the interpreter) and "cuda" (the compiled library: on CPU its
C++ kernels around oneDNN convs). Tests that name a backend themselves keep it.

Every numerical comparison runs ours (float32, fused), the plain reference in float32 (PyTorch's
own error) and the reference in float64 (the truth): ours may be at most a few times further from
the truth than PyTorch (tests/utils.py ``assert_close``). The ``fused_train_calls`` fixture proves
which path ran (empty: the block trained module by module).

Builders (tests/builders.py): the torchvision-structured blocks vs ``resnet_fused.models.reference``
and the pre-activation blocks vs a reference written from the papers, as in tests/test_blocks.py and
tests/test_preact_blocks.py.
"""
from __future__ import annotations

import copy
import functools
import statistics

import pytest
import torch
from torch import nn

import resnet_fused as rf
from builders import (BLOCK_CASES, CL, NCHW, PREACT_CASES, TRAIN, build, build_preact_pair, eval_compare, is_preact,
                      make_x, run_step, sgd_steps, train_steps)
from utils import FLOOR, INTERPRET, assert_close, assert_nonfinite_match, fmt_of, rel_err

pytestmark = [pytest.mark.skipif(not INTERPRET and not torch.cuda.is_available(),
                                 reason="the fused training path needs Triton (TRITON_INTERPRET=1 on CPU)"),
              pytest.mark.usefixtures("train_backend")]  # tests/conftest.py: every test on each fused backend

FMTS = dict(argnames="fmt", argvalues=[NCHW, CL], ids=["nchw", "channels_last"])

# Cases the fused training path takes (names from builders.BLOCK_CASES / PREACT_CASES):
# identity and projection shortcuts, stride 2, odd channel counts, 7x7 and 5x6 inputs, batch 1 with
# spatial > 1, dilation 2 (Bottleneck).
FUSED_CASES = ["basic-identity-7x7", "basic-s2-ds-batch1", "basic-ds-5x6", "bottle-identity",
               "bottle-s2-ds-batch1", "bottle-dilation2", "wide-identity-7x7", "wide-proj-s2-batch1",
               "wide-proj-samech-s2", "preact-identity", "preact-proj-s2-batch1"]
# One per block kind, for the more expensive variations.
ONE_PER_KIND = ["basic-s2-ds-batch1", "bottle-s2-ds-batch1", "wide-proj-s2-batch1", "preact-identity"]


def bn_names(block):
    return [n for n, m in block.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


# ------------------------------------------------------------------ 1. fused training, SGD steps
@pytest.mark.parametrize(**FMTS)
@pytest.mark.parametrize("case", FUSED_CASES)
def test_fused_train_three_sgd_steps(case, fmt, fused_train_calls):
    ours, ref = build(case)
    sgd_steps(ours, ref, lambda step: make_x(case, fmt, seed=step))  # output layout follows x's
    assert fused_train_calls == [is_preact(case)] * 3, "each training forward must be one fused block"


def test_backend_choice_decides_the_training_path(fused_train_calls, monkeypatch):
    """Global "auto" with measuring off (its static default) and "torch" train eagerly; "triton"
    (global or pinned) fuses; a block pinned to "torch" stays eager inside
    ``use_backend("triton")``. (The measured "auto", whose trials run the fused chain, is
    tests/test_dispatch_train.py's subject.)"""
    from resnet_fused import dispatch

    monkeypatch.setenv("RESNET_FUSED_TUNE", "0")
    dispatch.forget()
    case = "bottle-s2-ds-batch1"
    ours, ref = build(case, backend=None)
    rf.set_backend("auto")  # the conftest fixture restores the previous global choice
    x = make_x(case)
    ours(x)
    with rf.use_backend("torch"):
        ours(x)
    assert fused_train_calls == []
    with rf.use_backend("triton"):
        ours(x)
    assert fused_train_calls == [False]
    ours.backend = "torch"
    with rf.use_backend("triton"):
        ours(x)
    assert fused_train_calls == [False]
    # the global route trains correctly too
    ours, ref = build(case, backend=None)
    with rf.use_backend("triton"):
        sgd_steps(ours, ref, lambda step: make_x(case, CL, seed=step), steps=2)
    assert fused_train_calls == [False] * 3


@pytest.mark.parametrize("case", ["basic-ds-5x6", "wide-proj-s2-batch1", "bottle-identity", "preact-proj-s2-batch1"])
def test_channels_last_weights_nchw_input_layout_follows_eager(case, fused_train_calls):
    """PyTorch's conv gives channels_last when the input *or the weight* is: a block converted with
    ``.to(memory_format=channels_last)`` fed NCHW input must answer in eager's layout. (Regression:
    a Bottleneck / PreActBottleneck, whose first weight is 1x1 and so looks NCHW-contiguous too,
    answered NCHW.)"""
    ours, ref = build(case)
    ours.to(memory_format=CL)
    ref.to(memory_format=CL)
    x = make_x(case, NCHW)
    ref64 = copy.deepcopy(ref).double()
    y, y_ref, y64 = ours(x), ref(x), ref64(x.double())
    assert fused_train_calls == [is_preact(case)]
    assert fmt_of(y) == fmt_of(y_ref), f"strides {y.stride()} vs eager's {y_ref.stride()}"
    assert_close(y, y64, y_ref, name="output")


# --------------------------------------------- 2. momentum=None, affine=False, no running stats
NORMS = {
    "momentum-none": functools.partial(nn.BatchNorm2d, momentum=None),
    "affine-false": functools.partial(nn.BatchNorm2d, affine=False),
    "no-running-stats": functools.partial(nn.BatchNorm2d, track_running_stats=False),
    "syncbn-one-process": nn.SyncBatchNorm,  # no process group: plain BatchNorm semantics
}


# The running-statistic update (momentum=None, no running stats, SyncBatchNorm without a group)
# is shared by every block: two kinds each. affine=False changes the kernels' arguments: all four.
POST_PRE = ["bottle-s2-ds-batch1", "preact-proj-s2-batch1"]
VARIANTS = ([(c, "momentum-none", 4) for c in POST_PRE] + [(c, "affine-false", 2) for c in ONE_PER_KIND]
            + [(c, n, 2) for c in POST_PRE for n in ("no-running-stats", "syncbn-one-process")])


@pytest.mark.parametrize("case,norm,steps", [pytest.param(*v, id=f"{v[0]}-{v[1]}") for v in VARIANTS])
def test_batchnorm_variants(case, norm, steps, fused_train_calls):
    ours, ref = build(case, norm=NORMS[norm])
    bns = [m for m in ours.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert all(type(m) is (nn.SyncBatchNorm if norm.startswith("syncbn") else nn.BatchNorm2d) for m in bns)
    if norm == "affine-false":
        assert all(m.weight is None and m.bias is None for m in bns)
    if norm == "no-running-stats":
        assert all(m.running_mean is None and m.num_batches_tracked is None for m in bns)
        assert not list(ours.buffers())
    # momentum=None: the factor 1/num_batches_tracked changes every step
    sgd_steps(ours, ref, lambda step: make_x(case, seed=step), steps=steps)
    assert fused_train_calls == [is_preact(case)] * steps
    if norm == "momentum-none":
        assert all(m.momentum is None and int(m.num_batches_tracked) == steps for m in bns)


# ------------------------------------------------------------------------ 3. zero_init_residual
@pytest.mark.parametrize("case", ["basic-s2-ds-batch1", "bottle-identity"])
def test_zero_init_residual_trains(case, fused_train_calls):
    """Last BN's gamma = 0 (``zero_init_residual=True``): the block starts as relu(shortcut + beta),
    yet that gamma gets a non-zero gradient equal to the reference's, and learns."""
    ours, ref = build(case)
    last = "bn3" if ours.expansion == 4 else "bn2"
    for m in (ours, ref):
        nn.init.zeros_(getattr(m, last).weight)
    # what resnet_fused.models.resnet18/50(zero_init_residual=True) does to its blocks
    model = rf.models.resnet18(zero_init_residual=True) if last == "bn2" else None
    if model is not None:
        assert all(float(b.bn2.weight.abs().sum()) == 0 for b in model.modules() if isinstance(b, rf.BasicBlock))
    ref64 = copy.deepcopy(ref).double()
    x = make_x(case, seed=0)
    run_step((ours, ref, ref64), x, tag="zero-init step: ")  # output, x.grad, every grad
    g = getattr(ours, last).weight.grad
    assert g is not None and float(g.abs().max()) > 1e-3, f"{last}.weight.grad must not vanish: {g}"
    # the rest of the residual branch gets exactly nothing through gamma = 0, as in eager
    assert float(ours.conv1.weight.grad.abs().max()) == 0.0 == float(ref.conv1.weight.grad.abs().max())
    for m in (ours, ref, ref64):
        m.zero_grad()
    ref.load_state_dict(ours.state_dict())  # same starting point (running stats moved once in all)
    sgd_steps(ours, ref, lambda step: make_x(case, seed=step))
    assert float(getattr(ours, last).weight.abs().min()) > 0, "the zero-initialised gamma must learn"
    assert fused_train_calls == [False] * 4


# ---------------------------------------------------------------- 4. eval after fused training
@pytest.mark.parametrize("case", ["basic-identity-7x7", "bottle-dilation2", "wide-proj-s2-batch1",
                                  "preact-proj-s2-batch1"])
def test_eval_after_fused_training(case, fused_train_calls):
    ours, ref = build(case)
    ref64 = sgd_steps(ours, ref, lambda step: make_x(case, seed=step), steps=2)
    assert fused_train_calls == [is_preact(case)] * 2
    ours.backend = None  # follow the global choice, so both eval backends run
    fused = TRAIN["backend"]
    for backend, fmt in (("torch", NCHW), (fused, CL), (fused, NCHW)):
        x = make_x(case, fmt, seed=9)
        if is_preact(case):
            with rf.use_backend(backend):
                run_step((ours.eval(), ref.eval(), ref64.eval()), x, grad=False,
                             tag=f"eval after train ({backend}): ")
        else:
            eval_compare(ours, ref, x, backend, ref64=ref64)
    assert fused_train_calls == [is_preact(case)] * 2, "eval must not take the training path"
    # and back to fused training: the eval fold cache must not leak into it
    ours.backend = fused
    sgd_steps(ours.train(), ref.train(), lambda step: make_x(case, seed=10 + step), steps=1)
    assert fused_train_calls == [is_preact(case)] * 3


# ------------------------------------------------------------------- 5. the cancellation trap
# (case, how the trap is set, the BatchNorms whose input has |mean| >> std, frozen parameters)
TRAPS = {
    # x = 1000 + 0.01 randn: a 1x1 conv (Bottleneck conv1, the downsample) keeps x's offset; a
    # pre-activation block normalises x itself. (A zero-padded 3x3 conv does not: its border
    # outputs miss part of the offset, so its output spreads widely.)
    "basic-input": ("basic-s2-ds-batch1", "input", ["downsample.1"], []),
    "bottle-input": ("bottle-s2-ds-batch1", "input", ["bn1", "downsample.1"], []),
    "wide-input": ("wide-proj-s2-batch1", "input", ["bn1"], []),
    "preact-input": ("preact-identity", "input", ["bn1"], []),
    # beta = 1000 on the BN before a 1x1 conv: that conv's output (statistics from the fused
    # epilogue, input through the BN+ReLU prologue) has a mean thousands of times its spread.
    # Bottleneck: bn2's beta then has an exactly zero gradient (the ReLU after it never cuts, and
    # bn3 removes any shift of conv3's output), so its fp32 value is rounding noise around 0 in
    # PyTorch as in ours, no measure of accuracy: it is frozen. (In the pre-activation block the
    # projection shortcut reads the shifted activation, so bn1's beta has a real gradient.)
    "bottle-hidden": ("bottle-s2-ds-batch1", "bn2", ["bn3"], ["bn2.bias"]),
    "preact-hidden": ("preact-proj-s2-batch1", "bn1", ["bn2"], []),
}


@pytest.mark.parametrize("trap", list(TRAPS))
def test_large_mean_small_spread(trap, fused_train_calls):
    """|mean| >> std in a BatchNorm's input, where sum(y^2)/n - mean^2 loses every digit: running
    stats, output and every gradient still within 4x PyTorch's own fp32 error."""
    case, how, trapped, frozen = TRAPS[trap]
    ours, ref = build(case)
    with torch.no_grad():
        for m in (ours, ref):
            if how != "input":
                m.get_submodule(how).bias.add_(1000.0)
            for name in frozen:
                m.get_parameter(name).requires_grad_(False)

    def make(step):
        x = make_x(case, seed=step)
        return 1000.0 + 0.01 * x if how == "input" else x

    # the trap is real: in float64, every trapped BN's input has |mean| / std > 1000 somewhere
    probe, seen = copy.deepcopy(ref).double(), {}
    for name in trapped:
        probe.get_submodule(name).register_forward_pre_hook(
            lambda m, i, name=name: seen.__setitem__(name, i[0].detach()))
    with torch.no_grad():
        probe(make(0).double())
    for name in trapped:
        y = seen[name]
        ratio = float((y.mean(dim=(0, 2, 3)).abs() / y.std(dim=(0, 2, 3))).max())
        assert ratio > 1e3, f"{name}: |mean|/std = {ratio:.3g}, no trap"

    sgd_steps(ours, ref, make, steps=2, lr=0.01)  # frozen parameters are left out
    assert fused_train_calls == [is_preact(case)] * 2


# -------------------------------------------------------------------------------- 6. AMP on CPU
AMP_DRAWS = 5


@pytest.mark.parametrize("case", ["basic-identity-7x7", "bottle-s2-ds-batch1", "wide-identity-7x7",
                                  "preact-proj-s2-batch1"])
def test_autocast_bfloat16(case, fused_train_calls):
    """float32 blocks trained under CPU autocast (bfloat16), fused vs eager under the same autocast
    (torchvision's own forward: the block with ``backend="torch"``) vs float64.

    Output: eager's dtype and layout, within 4x eager-bf16's error, every draw. Parameter grads
    and x.grad float32, running stats float32 (the latter within 4x eager's error every draw).
    Gradients: the *median* over independent draws within 4x eager's median. A single draw is no
    measure there: a pre-activation within bf16 rounding of 0 flips its ReLU mask, an O(1) change
    of that element's gradient that BN's backward spreads over the channel. That happens to eager
    and fused alike (about one flip per ReLU layer at these sizes), so one draw's error is either
    ~4e-3 or several times that, by luck; a systematic precision loss would raise every draw's
    error, and so the median.
    """
    dt = torch.bfloat16
    grad_errs = {}
    for draw in range(AMP_DRAWS):
        ours, ref = build(case, seed=draw)
        eager = copy.deepcopy(ours)
        eager.backend = "torch"
        ref64 = copy.deepcopy(ref).double()
        models = (ours, eager, ref64)
        x = make_x(case, seed=10 + draw)
        xs = [x.clone().requires_grad_(), x.clone().requires_grad_(), x.double().requires_grad_()]
        with torch.autocast("cpu", dtype=dt):
            y, y_eager = ours(xs[0]), eager(xs[1])
        y64 = ref64(xs[2])
        tag = f"draw {draw}: "
        assert y.dtype == y_eager.dtype, f"{tag}output dtype {y.dtype}, eager gives {y_eager.dtype}"
        assert fmt_of(y) == fmt_of(y_eager)
        assert_close(y, y64, y_eager, name=tag + "output", dtype=dt)
        g = torch.randn(y64.shape, generator=torch.Generator().manual_seed(50 + draw))
        for o in (y, y_eager, y64):
            (o * g.to(o.dtype)).sum().backward()
        assert xs[0].grad.dtype == xs[1].grad.dtype == torch.float32
        grads = [("x.grad", xs[0].grad, xs[1].grad, xs[2].grad)]
        for (n, p), (_, pe), (_, p64) in zip(*(m.named_parameters() for m in models)):
            assert p.grad is not None and p.grad.dtype == torch.float32 == pe.grad.dtype, f"{tag}{n}.grad"
            grads.append((n + ".grad", p.grad, pe.grad, p64.grad))
        for n, a, e, r in grads:
            grad_errs.setdefault(n, []).append((rel_err(a, r), rel_err(e, r)))
        for (n, b), (_, be), (_, b64) in zip(*(m.named_buffers() for m in models)):
            if n.endswith("num_batches_tracked"):
                assert torch.equal(b, be) and int(b) == 1, f"{tag}{n}"
            else:
                assert b.dtype == torch.float32, f"{tag}{n} is {b.dtype}"
                assert_close(b, b64, be, name=tag + n, dtype=dt)
    assert fused_train_calls == [is_preact(case)] * AMP_DRAWS
    for n, errs in grad_errs.items():
        ours_med = statistics.median(e for e, _ in errs)
        eager_med = statistics.median(e for _, e in errs)
        bound = max(FLOOR[dt], 4 * eager_med)
        assert ours_med <= bound, (f"{n}: median relative error {ours_med:.3e} over {AMP_DRAWS} draws > "
                                   f"{bound:.3e} (4x eager's median {eager_med:.3e}); per draw (ours, eager): {errs}")


# -------------------------------------------------------------------------------- 7. fallbacks
@pytest.mark.parametrize("case", ["bottle-groups2-s2", "bottle-resnext-bw32", "preact-proj-seq", "wide-dropout"])
def test_unfusable_blocks_train_eagerly(case, fused_train_calls):
    """groups > 1, a shortcut that is not a bare conv, active dropout: eager, still exact."""
    ours, ref = build(case)
    if case == "wide-dropout":
        assert ours.dropout == 0.3
        train_steps(ours, ref, case, dropout_seed=123)  # the same dropout mask in every copy
    else:
        sgd_steps(ours, ref, lambda step: make_x(case, seed=step))
    assert fused_train_calls == []
    if case == "wide-dropout":  # the same block without dropout fuses: dropout was the reason
        ours, ref = build_preact_pair(case, dropout=0.0)
        ours.backend = TRAIN["backend"]
        sgd_steps(ours.train(), ref.train(), lambda step: make_x(case, seed=step), steps=1)
        assert fused_train_calls == [True]


@pytest.mark.parametrize("case,frozen", [("bottle-s2-ds-batch1", "bn1"), ("bottle-s2-ds-batch1", "bn3"),
                                          ("bottle-s2-ds-batch1", "downsample.1"), ("basic-ds-5x6", "bn2"),
                                          ("preact-proj-s2-batch1", "bn1"), ("wide-proj-s2-batch1", "bn2")])
def test_frozen_batchnorm_inside_training_block(case, frozen, fused_train_calls):
    """One BN in eval inside a training block (fine-tuning): eager, that BN's statistics untouched."""
    ours, ref = build(case)
    assert frozen in bn_names(ours)
    sgd_steps(ours, ref, lambda step: make_x(case, seed=step), steps=1)  # all BNs training: fused
    assert fused_train_calls == [is_preact(case)]
    for m in (ours, ref):
        m.get_submodule(frozen).eval()
    before = {k: v.clone() for k, v in ours.get_submodule(frozen).state_dict().items() if "running" in k or "num" in k}
    sgd_steps(ours, ref, lambda step: make_x(case, seed=5 + step), steps=1)
    assert fused_train_calls == [is_preact(case)], "a frozen BN must send the block down the eager path"
    for k, v in ours.get_submodule(frozen).state_dict().items():
        if k in before:
            assert torch.equal(v, before[k]), f"frozen {frozen}.{k} changed"


def test_float64_block_trains_eagerly(fused_train_calls):
    """No float64 Triton kernel: a double block pinned to "triton" trains on the PyTorch path."""
    case = "bottle-s2-ds-batch1"
    ours, ref = build(case)
    ours.double()
    ref64 = copy.deepcopy(ref).double()
    x = make_x(case).double().requires_grad_()
    x64 = x.detach().clone().requires_grad_()
    y, y64 = ours(x), ref64(x64)
    (y * y64.detach()).sum().backward()
    (y64 * y64.detach()).sum().backward()
    assert fused_train_calls == []
    assert_close(y, y64, name="float64 output")
    assert_close(x.grad, x64.grad, name="float64 x.grad")


@pytest.mark.parametrize(**FMTS)
@pytest.mark.parametrize("case", ONE_PER_KIND)
def test_empty_batch_matches_eager(case, fmt, fused_train_calls):
    """Batch 0: an empty output, and running stats / num_batches_tracked / grads exactly eager's."""
    ours, ref = build(case)
    x = make_x(case, fmt)[:0]
    assert x.shape[0] == 0
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    y, y_ref = ours(xs[0]), ref(xs[1])
    assert fused_train_calls == []
    assert y.shape == y_ref.shape and y.numel() == 0 and y.dtype == y_ref.dtype
    y.sum().backward()
    y_ref.sum().backward()
    assert xs[0].grad.shape == x.shape
    for (n, b), (_, b_ref) in zip(ours.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(b, b_ref, rtol=0, atol=0, equal_nan=True, msg=f"buffer {n}")
    for (n, p), (_, p_ref) in zip(ours.named_parameters(), ref.named_parameters()):
        assert (p.grad is None) == (p_ref.grad is None), n
        if p.grad is not None:
            torch.testing.assert_close(p.grad, p_ref.grad, rtol=0, atol=0, equal_nan=True, msg=f"{n}.grad")
    # a non-empty batch afterwards still fuses and matches
    sgd_steps(ours, ref, lambda step: make_x(case, fmt, seed=step), steps=1)
    assert fused_train_calls == [is_preact(case)]


# ------------------------------------------------------------------------ 8. bad input, no side effects
def _bad_inputs(case):
    x = make_x(case)
    n, c, h, w = x.shape
    bad = {
        "wrong-channels": (ValueError, torch.randn(n, c + 1, h, w)),
        "float64": (TypeError, x.double()),
        "float16-no-autocast": (TypeError, x.half()),
        "int": (TypeError, x.to(torch.int64)),
        "3-D": (ValueError, x[0]),
        "batch1-1x1": (ValueError, torch.randn(1, c, 1, 1)),
        "not-a-tensor": (TypeError, x.numpy()),
    }
    if (PREACT_CASES if is_preact(case) else BLOCK_CASES)[case][1].get("stride", 1) == 2:
        # only a BN after the stride-2 conv sees a single value: the first BNs would have run
        bad["batch1-2x2-stride2"] = (ValueError, torch.randn(1, c, 2, 2))
    return bad


@pytest.mark.parametrize("case", ONE_PER_KIND + ["preact-proj-s2-batch1"])
def test_bad_input_raises_before_any_statistic_moves(case, fused_train_calls):
    ours, _ = build(case)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    for what, (exc, x) in _bad_inputs(case).items():
        with pytest.raises(exc, match="input x"):
            ours(x)
        for k, v in ours.state_dict().items():
            assert torch.equal(v, before[k]), f"{what}: {k} changed before the error"
        assert fused_train_calls == [], what
    ours(make_x(case))  # the block is on the fused path for a good input
    assert fused_train_calls == [is_preact(case)]
    assert int(ours.bn1.num_batches_tracked) == int(before["bn1.num_batches_tracked"]) + 1


# ------------------------------------------------------------------------- 9. NaN / Inf propagation
def _nonfinite_run(case, value):
    ours, ref = build(case)
    x = make_x(case)
    x[0, 0, 1, 1] = value
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    y, y_ref = ours(xs[0]), ref(xs[1])
    g = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(3))
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    return ours, ref, xs, y, y_ref


def _bn_biases(block):
    return {f"{n}.bias" for n in bn_names(block)}


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("case", ONE_PER_KIND + ["bottle-identity"])
def test_nonfinite_input_propagates_like_eager(case, value, fused_train_calls):
    """One NaN/Inf in x: the output, x.grad, the conv and gamma grads and the running statistics
    have eager's NaN/Inf pattern (BN betas: see the xfail test below)."""
    ours, ref, xs, y, y_ref = _nonfinite_run(case, value)
    assert fused_train_calls == [is_preact(case)]
    assert not torch.isfinite(y_ref).all()  # the reference really goes non-finite
    assert_nonfinite_match(y, y_ref, "output")
    assert_nonfinite_match(xs[0].grad, xs[1].grad, "x.grad")
    betas = _bn_biases(ours)
    for (n, p), (_, p_ref) in zip(ours.named_parameters(), ref.named_parameters()):
        if n not in betas:
            assert_nonfinite_match(p.grad, p_ref.grad, f"{n}.grad")
    for (n, b), (_, b_ref) in zip(ours.named_buffers(), ref.named_buffers()):
        assert_nonfinite_match(b, b_ref, n)


@pytest.mark.parametrize("case,value", [("bottle-identity", float("nan")), ("preact-identity", float("inf"))])
def test_nonfinite_input_beta_grads_like_eager(case, value):
    ours, ref, _, _, _ = _nonfinite_run(case, value)
    for (n, p), (_, p_ref) in zip(ours.named_parameters(), ref.named_parameters()):
        if n in _bn_biases(ours):
            assert_nonfinite_match(p.grad, p_ref.grad, f"{n}.grad")
