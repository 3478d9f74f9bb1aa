"""The measured dispatch in training, across threads, and its cuDNN candidate and public API.

Training trials must be invisible: after one step under ``"auto"`` every running statistic,
``num_batches_tracked`` and parameter ``.grad`` is exactly what one step of the chosen path alone
leaves (a trial that ran on the real block would have moved the statistics twice, or doubled the
first gradient).
"""
from __future__ import annotations

import copy
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import resnet_fused as rf
from resnet_fused import dispatch
from resnet_fused.dispatch import candidates

from builders import conv_inputs, torch_conv, use_timer
from utils import assert_close

pytestmark = pytest.mark.usefixtures("isolated_dispatch")  # tests/conftest.py


def make_block(kind: str):
    torch.manual_seed(3)
    if kind == "basic_down":
        down = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
        block = rf.BasicBlock(8, 16, stride=2, downsample=down)
    elif kind == "bottleneck":
        block = rf.Bottleneck(16, 4)
    else:
        block = rf.WideBasic(8, 16, stride=2)
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None if kind == "bottleneck" else 0.1  # also the cumulative average
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
    in_ch = block.conv1.in_channels
    return block.train(), torch.randn(3, in_ch, 6, 6)


def state(block):
    bufs = {n: b.clone() for n, b in block.named_buffers()}
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in block.named_parameters()}
    return bufs, grads


def one_step(block, x, backend):
    block.backend = backend
    x = x.clone().requires_grad_(True)
    out = block(x)
    g = torch.Generator().manual_seed(5)
    out.backward(torch.randn(out.shape, generator=g))
    return out.detach(), x.grad


@pytest.mark.parametrize("kind", ["basic_down", "bottleneck", "wide"])
def test_trials_leave_training_state_as_one_eager_step(kind):
    """torch wins the trial: the step that follows is the eager one, and nothing the trials did
    (forward + backward of every candidate, several times) shows in the block."""
    timer = use_timer(torch=0.5)
    block, x = make_block(kind)
    eager = copy.deepcopy(block)
    y, dx = one_step(block, x, "auto")
    assert len(timer.calls) == 1 and "cuda" in timer.calls[0]  # the fused candidate did run in a trial
    row = [d for d in rf.dispatch_report() if d.op == "block_train"][0]
    assert row.chosen == "torch" and row.source == "measured"
    y_e, dx_e = one_step(eager, x, "torch")
    (bufs, grads), (bufs_e, grads_e) = state(block), state(eager)
    assert torch.equal(y, y_e) and torch.equal(dx, dx_e)
    for n in bufs_e:
        assert torch.equal(bufs[n], bufs_e[n]), n
    assert int(bufs["bn1.num_batches_tracked"]) == 1
    for n in grads_e:
        assert grads[n] is not None and torch.equal(grads[n], grads_e[n]), n


def test_fused_winner_updates_state_once():
    """The fused chain wins: statistics moved once, gradients those of one step (not doubled)."""
    use_timer(cuda=0.1)
    block, x = make_block("basic_down")
    eager = copy.deepcopy(block)
    y, dx = one_step(block, x, "auto")
    assert [d.chosen for d in rf.dispatch_report() if d.op == "block_train"] == ["cuda"]
    y_e, dx_e = one_step(eager, x, "torch")
    (bufs, grads), (bufs_e, grads_e) = state(block), state(eager)
    assert int(bufs["bn1.num_batches_tracked"]) == 1 == int(bufs["downsample.1.num_batches_tracked"])
    assert_close(y, y_e.double(), name="out")
    for n in bufs_e:
        if bufs_e[n].is_floating_point():
            assert_close(bufs[n], bufs_e[n].double(), name=n)
    for n in grads_e:
        assert_close(grads[n], grads_e[n].double(), name=n)


def excluded_training_candidate(name, fn, kind, warning):
    """Register ``fn`` as the fastest "block_train" candidate, take one "auto" step of a ``kind``
    block (one ``warning`` about it), and return its report entry, which must not have won."""
    rf.register_candidate("block_train", name, fn)
    use_timer(**{name: 0.01})
    block, x = make_block(kind)
    with pytest.warns(RuntimeWarning, match=warning):
        one_step(block, x, "auto")
    row = [d for d in rf.dispatch_report() if d.op == "block_train"][0]
    assert row.chosen != name
    return row.candidates[name]


def test_wrong_training_candidate_excluded():
    def wrong(block, x):
        return block._forward_eager(x) * 1.5

    note = excluded_training_candidate("wrong", wrong, "bottleneck", "'wrong' of block_train excluded")
    assert note.startswith("excluded: output 0")


def test_gradient_mismatch_excludes():
    """Right output, wrong backward (the gradient of x scaled): caught on the gradients."""
    class Scale(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.clone()

        @staticmethod
        def backward(ctx, g):
            return 3 * g

    def bad_backward(block, x):
        return block._forward_eager(Scale.apply(x))

    note = excluded_training_candidate("badgrad", bad_backward, "basic_down", "badgrad")
    assert "output 1" in note  # output 1: the gradient of x


def test_syncbn_blocks_are_not_measured():
    """SyncBatchNorm trials would need every rank to measure in step: the static default runs (here
    without a process group, where SyncBatchNorm normalises locally)."""
    timer = use_timer(cuda=0.1)
    block, x = make_block("basic_down")
    block = nn.SyncBatchNorm.convert_sync_batchnorm(block)
    eager = copy.deepcopy(block)
    y, _ = one_step(block, x, "auto")
    y_e, _ = one_step(eager, x, "torch")
    assert timer.calls == [] and torch.equal(y, y_e)
    (row,) = [d for d in rf.dispatch_report() if d.op == "block_train"]
    assert row.source == "static" and "SyncBatchNorm" in row.candidates["torch"]


# ------------------------------------------------------------------------------------- threads
def test_two_threads_converting_and_running_agree():
    """Two threads each convert a model and run it at once (measuring the same keys): outputs agree
    with each other and with the stock model, and the process holds one decision per key."""
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)  # restored below; two busy threads on a small machine otherwise crawl
    try:
        stock = rf.models.reference.build("resnet18", num_classes=10).eval()
        x = torch.randn(2, 3, 32, 32)
        results, errors = {}, []
        start = threading.Barrier(2)

        def work(i):
            try:
                model = rf.convert(copy.deepcopy(stock)).eval()
                start.wait()
                with torch.no_grad():
                    results[i] = model(x)
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        with torch.no_grad():
            ref = stock.double()(x.double())
        for i in range(2):
            assert_close(results[i], ref, name=f"thread {i}", dtype=torch.float32)
        keys_ = [d.key for d in rf.dispatch_report()]
        assert len(keys_) == len(set(keys_)) > 0
        assert {d.source for d in rf.dispatch_report()} == {"measured"}
    finally:
        torch.set_num_threads(threads_before)


# ------------------------------------------------------------------------------ cuDNN candidate
def test_cudnn_fused_schema_order():
    """Our call passes (input, weight, z, alpha, bias, stride, padding, dilation, groups) by
    position: the ATen schemas must have exactly that order."""
    relu = [a.name for a in torch.ops.aten.cudnn_convolution_relu.default._schema.arguments]
    add = [a.name for a in torch.ops.aten.cudnn_convolution_add_relu.default._schema.arguments]
    assert relu == ["self", "weight", "bias", "stride", "padding", "dilation", "groups"]
    assert add == ["self", "weight", "z", "alpha", "bias", "stride", "padding", "dilation", "groups"]


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("cl", [False, True])
def test_cudnn_fused_marshalling(monkeypatch, residual, cl):
    """With the two ATen ops replaced by their documented semantics (relu(conv + bias + alpha*z),
    output in the conv's suggested layout), our candidate computes the op: bias cast to x's dtype,
    the residual as z with alpha 1, the output in the requested layout."""
    seen = {}

    class FakeOps:
        @staticmethod
        def cudnn_convolution_relu(x, w, b, s, p, d, g):
            seen["bias_dtype"] = b.dtype
            return torch.relu(F.conv2d(x, w, b, s, p, d, g)).contiguous(memory_format=torch.channels_last)

        @staticmethod
        def cudnn_convolution_add_relu(x, w, z, alpha, b, s, p, d, g):
            seen["bias_dtype"], seen["alpha"] = b.dtype, alpha
            return torch.relu(F.conv2d(x, w, b, s, p, d, g) + alpha * z).contiguous(
                memory_format=torch.channels_last)

    monkeypatch.setattr(torch.ops, "aten", FakeOps)
    x, w, b, r = conv_inputs(torch.float32, residual=residual, cl=cl)
    fmt = torch.channels_last if cl else torch.contiguous_format
    y = candidates._cudnn_fused(x, w, b.double(), r, (1, 1), (1, 1), (1, 1), True, fmt)
    assert y.is_contiguous(memory_format=fmt) and seen["bias_dtype"] == x.dtype
    if residual:
        assert seen["alpha"] == 1.0
    assert_close(y, torch_conv(x.double(), w.double(), b.double(), None if r is None else r.double(), (1, 1),
                               (1, 1), (1, 1), True, fmt), name="y")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("residual", [False, True])
def test_cudnn_fused_semantics_gpu(dtype, residual):
    """cuDNN's own fused ops against float64, judged against PyTorch's eager error."""
    x, w, b, r = (t if t is None else t.cuda() for t in conv_inputs(dtype, residual=residual, cl=True,
                                                                       shape=(4, 64, 14, 14), cout=64))
    w = w.contiguous(memory_format=torch.channels_last)
    fmt = torch.channels_last
    y = candidates._cudnn_fused(x, w, b, r, (1, 1), (1, 1), (1, 1), True, fmt)
    ref = torch_conv(x.double(), w.double(), b.double(), None if r is None else r.double(), (1, 1), (1, 1), (1, 1),
                     True, fmt)
    eager = torch_conv(x, w, b, r, (1, 1), (1, 1), (1, 1), True, fmt)
    assert_close(y, ref, eager, name="cudnn_fused")


# ---------------------------------------------------------------------------------- public API
def test_register_candidate_checks_its_arguments():
    with pytest.raises(ValueError, match="op: expected one of"):
        rf.register_candidate("conv", "x", torch_conv)
    with pytest.raises(ValueError, match="built-in candidate"):
        rf.register_candidate("conv_bias_act", "triton", torch_conv)
    with pytest.raises(TypeError, match="fn: expected a callable"):
        rf.register_candidate("conv_bias_act", "x", 3)
    with pytest.raises(ValueError, match="name: expected a non-empty str"):
        rf.register_candidate("conv_bias_act", "", torch_conv)
    with pytest.raises(ValueError, match="cannot be removed"):
        rf.unregister_candidate("conv_bias_act", "torch")
    with pytest.raises(ValueError, match="no registered candidate"):
        rf.unregister_candidate("bn_act", "nope")


def test_report_rows_and_table():
    rf.register_candidate("conv_bias_act", "fast", torch_conv)
    use_timer(fast=0.25)
    rf.ops.conv_bias_act(*conv_inputs(), padding=1, backend="auto")
    report = rf.dispatch_report()
    (row,) = report.as_dicts()
    assert set(row) >= {"op", "key", "chosen", "candidates", "source", "sites", "measure_ms"}
    assert row["chosen"] == "fast" and row["candidates"]["fast"] == 0.25
    text = str(report)
    assert "conv_bias_act" in text and "fast 0.250" in text and "measured" in text
    dispatch.forget()
    assert "no decisions yet" in str(rf.dispatch_report())
