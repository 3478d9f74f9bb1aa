"""Fused block training on a real GPU (``-m gpu``; skipped without CUDA).

- fp16 / bf16 (``torch.autocast("cuda")``, float32 parameters and input, as AMP training runs) and
  float32 (IEEE: TF32 off for cuDNN, which our fp32 kernels follow too) training of ResNet-50 /
  ResNet-18 block shapes, channels_last and NCHW, several steps; judged as the rest of the suite
  (``utils.assert_close``): within 4x eager PyTorch's own error in the same precision, both measured
  from a float64 reference, plus the dtype's floor.
- CUDA graph capture of a whole training step (forward + backward) of a fused Bottleneck, replayed
  against the same step uncaptured.
- Peak memory of one AMP training step of ``resnet_fused.models.resnet50()`` vs the plain PyTorch
  ``resnet_fused.models.reference.resnet50()``.
- ``torch.compile(fullgraph=True)`` (Inductor) of fused blocks on CUDA.

Multi-step runs: before each step every model takes the float64 reference's parameters (rounded),
and only the reference takes the optimizer step. Each step is then judged from one state; models
stepped independently drift apart by rounding, and a gradient dominated by cancellation magnifies
the drift past any per-step bound. Buffers are never copied: each model's running statistics and
``num_batches_tracked`` accumulate its own updates over the steps.

Everything here is skipped on a machine without CUDA; nothing touches CUDA at import.
"""
from __future__ import annotations

import contextlib
import copy
import gc

import pytest
import torch
import torch.nn.functional as F

import resnet_fused as rf
from resnet_fused.models import reference as R
from builders import compile_for_training, load_params
from utils import assert_close, check_graph_capture, cudnn_tf32, downsample, randomize_bn, rel_err

pytestmark = pytest.mark.gpu

DEV = "cuda"
CL = torch.channels_last
NCHW = torch.contiguous_format
FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32
DTYPES = [pytest.param(FP16, id="fp16"), pytest.param(BF16, id="bf16"), pytest.param(FP32, id="fp32")]
FORMATS = [pytest.param(CL, id="channels_last"), pytest.param(NCHW, id="nchw")]


# name: (make(module namespace) -> block, input shape). Real ResNet-50 / ResNet-18 blocks, batch 8.
BLOCKS = {
    "r50-layer1-bottleneck-256-64-56x56": (lambda m: m.Bottleneck(256, 64), (8, 256, 56, 56)),
    "r50-layer4.0-bottleneck-1024-512-s2-ds-14x14": (lambda m: m.Bottleneck(1024, 512, 2, downsample(1024, 2048, 2)),
                                                     (8, 1024, 14, 14)),
    "r18-layer1-basic-64-64-56x56": (lambda m: m.BasicBlock(64, 64), (8, 64, 56, 56)),
}


def _pair(name):
    """(ours, reference) on the GPU, train mode, one state (random BN affine and running stats)."""
    make, _ = BLOCKS[name]
    torch.manual_seed(0)
    ref = randomize_bn(make(R))
    ours = make(rf)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours.to(DEV).train(), ref.to(DEV).train()


def _precision(dtype):
    """float32: nothing more; fp16 / bf16: autocast, as AMP training runs."""
    return contextlib.nullcontext() if dtype in (FP32, torch.float64) else torch.autocast("cuda", dtype=dtype)


def _fwd_bwd(model, x, g, dtype):
    """``(out, x.grad)`` of one forward + backward of ``sum(out * g)`` in ``dtype``'s precision."""
    xi = x.detach().to(torch.float64 if dtype == torch.float64 else FP32).requires_grad_()
    with _precision(dtype):
        out = model(xi)
    (out * g.to(torch.promote_types(out.dtype, FP32))).sum().backward()
    return out.detach(), xi.grad


def _train_and_compare(ours, ref, shape, fmt, dtype, steps, tag=""):
    """``steps`` training steps of ``ours`` (fused) vs eager ``ref`` in ``dtype`` vs float64."""
    ours.to(memory_format=fmt)
    eager = copy.deepcopy(ref).to(memory_format=fmt)
    ref64 = copy.deepcopy(ref).double()
    opt = torch.optim.SGD(ref64.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator(device=DEV).manual_seed(1)
    for step in range(steps):
        t = f"{tag}step {step}: "
        load_params((ours, eager), dict(ref64.named_parameters()))
        ref64.zero_grad(set_to_none=True)
        x = torch.randn(shape, device=DEV, generator=gen).contiguous(memory_format=fmt)
        with cudnn_tf32(False):
            xi = x.clone().requires_grad_()
            with _precision(dtype):
                out = ours(xi)
            g = torch.randn(out.shape, device=DEV, generator=gen)
            (out * g.to(torch.promote_types(out.dtype, FP32))).sum().backward()
            dx = xi.grad
            out_e, dx_e = _fwd_bwd(eager, x, g, dtype)
            out_64, dx_64 = _fwd_bwd(ref64, x, g, torch.float64)
        # torchvision's blocks end with ``out += identity``: the output keeps the conv / BN dtype
        # (the autocast dtype) even when the identity is float32. (The reference blocks here write
        # ``out + identity``, which promotes; so the dtype is checked against torchvision's rule.)
        assert out.dtype == dtype, f"{t}output dtype {out.dtype}, torchvision's block gives {dtype}"
        assert out.is_contiguous(memory_format=fmt), f"{t}output lost the input's memory format: {out.stride()}"
        assert_close(out, out_64, out_e, name=t + "output", dtype=dtype)
        assert_close(dx, dx_64, dx_e, name=t + "x.grad", dtype=dtype)
        p_e, p_64 = dict(eager.named_parameters()), dict(ref64.named_parameters())
        for n, p in ours.named_parameters():
            assert p.grad is not None and p.grad.dtype == p.dtype, f"{t}{n}.grad"
            assert_close(p.grad, p_64[n].grad, p_e[n].grad, name=f"{t}{n}.grad", dtype=dtype)
        b_e, b_64 = dict(eager.named_buffers()), dict(ref64.named_buffers())
        for n, b in ours.named_buffers():
            if n.endswith("num_batches_tracked"):
                assert int(b) == int(b_e[n]) == step + 1, f"{t}{n} = {int(b)}, eager {int(b_e[n])}"
            else:
                assert_close(b, b_64[n], b_e[n], name=f"{t}{n}", dtype=dtype)
        opt.step()


# ============================================================ precision: fused vs eager vs fp64
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", list(BLOCKS))
def test_train_block_matches_eager_precision(block, dtype, fmt, fused_train_calls):
    ours, ref = _pair(block)
    ours.backend = "triton"
    steps = 3
    _train_and_compare(ours, ref, BLOCKS[block][1], fmt, dtype, steps)
    assert fused_train_calls == [False] * steps, "the block did not train through the fused path"


# ===================================================================== CUDA graph capture
def test_cuda_graph_capture_training_step(fused_train_calls):
    """Forward + backward of a fused Bottleneck (ResNet-50 layer1.0: 64 -> 256 with downsample,
    channels_last) captured once, replayed twice on new data; each replay equals the same step run
    uncaptured from the same state (see :func:`utils.check_graph_capture`)."""
    check_graph_capture("triton", fused_train_calls)


# ============================================================================= peak memory
def _amp_step(model, opt, x, y):
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=FP16):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()


@pytest.fixture(scope="module")
def resnet50_peak_memory():
    """Peak bytes (``torch.cuda.max_memory_allocated`` after a reset) of one AMP fp16 training step
    (forward, cross-entropy, backward, SGD step), batch 64, 224x224, channels_last: fused
    ``resnet_fused.models.resnet50()`` (default and low-memory mode) and plain
    ``models.reference.resnet50()``, one state.
    Each model takes one unmeasured step first (Triton compiles and autotunes, cuDNN picks
    algorithms), so the measured step is steady state. Parameters and the batch are allocated
    before the reset, so they count in both peaks alike."""
    torch.manual_seed(0)
    state = {k: v.clone() for k, v in rf.models.resnet50().state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    x_cpu = torch.randn(64, 3, 224, 224, generator=gen)
    y_cpu = torch.randint(0, 1000, (64,), generator=gen)
    peaks = {}
    for name in ("fused", "fused-low-memory", "eager"):
        model = rf.models.resnet50(backend="triton") if name.startswith("fused") else R.resnet50()
        model.load_state_dict(state, strict=True)
        model = model.to(DEV).to(memory_format=CL).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        x = x_cpu.to(DEV).contiguous(memory_format=CL)
        y = y_cpu.to(DEV)
        with rf.use_low_memory(name == "fused-low-memory"):
            _amp_step(model, opt, x, y)  # warm-up, unmeasured
            opt.zero_grad(set_to_none=True)
            gc.collect()
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            _amp_step(model, opt, x, y)
            torch.cuda.synchronize()
            peaks[name] = (torch.cuda.max_memory_allocated(), base)
        del model, opt, x, y
        gc.collect()
        torch.cuda.empty_cache()
    return peaks


def _peak_message(peaks, fused="fused"):
    (f, fb), (e, eb) = peaks[fused], peaks["eager"]
    gib = 2.0 ** 30
    return (f"peak {fused} {f / gib:.2f} GiB, eager {e / gib:.2f} GiB: {f / e:.3f}x "
            f"(above the parameters + batch: fused {(f - fb) / gib:.2f} GiB, eager {(e - eb) / gib:.2f} GiB, "
            f"{(f - fb) / (e - eb):.3f}x)")


def test_resnet50_amp_training_peak_memory_below_eager(resnet50_peak_memory, record_property):
    """Default mode. Saved activations, counted exactly on CPU (python -m benchmarks.memory):
    0.845x eager's at this size; parameters, gradients and workspaces come on top of both, so the
    peak ratio must be at most 0.9x."""
    (f, _), (e, _) = resnet50_peak_memory["fused"], resnet50_peak_memory["eager"]
    record_property("peak_bytes_fused", f)
    record_property("peak_bytes_eager", e)
    print(_peak_message(resnet50_peak_memory))
    assert f <= 0.9 * e, _peak_message(resnet50_peak_memory)


def test_resnet50_amp_training_peak_memory_low_memory_goal_07x(resnet50_peak_memory, record_property):
    """The issue's goal (at most 0.7x eager), in low-memory mode (saved activations 0.593x eager's
    by the CPU count)."""
    (f, _), (e, _) = resnet50_peak_memory["fused-low-memory"], resnet50_peak_memory["eager"]
    record_property("peak_bytes_fused_low_memory", f)
    print(_peak_message(resnet50_peak_memory, "fused-low-memory"))
    assert f <= 0.7 * e, _peak_message(resnet50_peak_memory, "fused-low-memory")


# ============================================================================ torch.compile
COMPILE_BLOCKS = {
    "bottleneck-256-64-56x56": (lambda m: m.Bottleneck(256, 64), lambda: R.Bottleneck(256, 64), (4, 256, 56, 56)),
    # the pre-activation path also gathers x's statistics (the resnet_fused::channel_stats op)
    "preact-bottleneck-256-64-s2-proj-28x28": (
        lambda m: m.PreActBottleneck(256, 64, 2, R.conv1x1(256, 256, 2)),
        lambda: R.RefPreActBottleneck(256, 64, 2, R.conv1x1(256, 256, 2)), (4, 256, 28, 28)),
}


@pytest.mark.parametrize("block", list(COMPILE_BLOCKS))
def test_compile_fullgraph_inductor_cuda(block):
    """``torch.compile(fullgraph=True)`` (Inductor) of a fused training block on CUDA: two steps,
    the compiled block against the float64 reference (eager fp32's error as the bound), against the
    uncompiled fused block, and its running statistics / ``num_batches_tracked``."""
    make_ours, make_ref, shape = COMPILE_BLOCKS[block]
    torch.manual_seed(0)
    ref = randomize_bn(make_ref())
    ours = make_ours(rf)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ours, ref = ours.to(DEV).to(memory_format=CL).train(), ref.to(DEV).to(memory_format=CL).train()
    ours.backend = "triton"
    compiled, uncompiled, eager, ref64, opt = compile_for_training(ours, ref)
    gen = torch.Generator(device=DEV).manual_seed(1)
    try:
        with cudnn_tf32(False):
            for step in range(2):
                t = f"step {step}: "
                load_params((ours, uncompiled, eager), dict(ref64.named_parameters()))
                ref64.zero_grad(set_to_none=True)
                x = torch.randn(shape, device=DEV, generator=gen).contiguous(memory_format=CL)
                xi = x.clone().requires_grad_()
                out = compiled(xi)
                g = torch.randn(out.shape, device=DEV, generator=gen)
                (out * g).sum().backward()
                out_u, dx_u = _fwd_bwd(uncompiled, x, g, FP32)
                out_e, dx_e = _fwd_bwd(eager, x, g, FP32)
                out_64, dx_64 = _fwd_bwd(ref64, x, g, torch.float64)
                assert out.is_contiguous(memory_format=CL), f"{t}compiled output layout {out.stride()}"
                for what, c, u, e, r64 in (("output", out, out_u, out_e, out_64), ("x.grad", xi.grad, dx_u, dx_e, dx_64)):
                    assert_close(c, r64, e, name=t + "compiled " + what)
                    assert rel_err(c, u) <= 1e-5, f"{t}{what}: compiled vs uncompiled fused {rel_err(c, u):.3e}"
                pu, pe, p64 = (dict(m.named_parameters()) for m in (uncompiled, eager, ref64))
                for n, p in ours.named_parameters():
                    assert p.grad is not None, f"{t}{n}: no gradient through the compiled block"
                    assert_close(p.grad, p64[n].grad, pe[n].grad, name=f"{t}compiled {n}.grad")
                    assert rel_err(p.grad, pu[n].grad) <= 1e-5, f"{t}{n}.grad: compiled vs uncompiled"
                bu, be, b64 = (dict(m.named_buffers()) for m in (uncompiled, eager, ref64))
                for n, b in ours.named_buffers():
                    if n.endswith("num_batches_tracked"):
                        assert int(b) == int(bu[n]) == int(be[n]) == step + 1, f"{t}{n} = {int(b)}"
                    else:
                        assert_close(b, b64[n], be[n], name=f"{t}compiled {n}")
                opt.step()
    finally:
        torch._dynamo.reset()
