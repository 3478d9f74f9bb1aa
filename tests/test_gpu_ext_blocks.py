"""The ``"cuda"`` backend in the modules: ``rf.convert`` of torchvision-structured blocks and
ResNet-50, and the pre-activation blocks and networks, pinned to ``backend="cuda"``, in eval (fp16,
bf16, fp32, TF32; both layouts); training, 3 SGD steps of every block kind against eager and float64,
with running statistics and ``num_batches_tracked`` (AMP fp16 / bf16, TF32, float32); the low-memory
mode; agreement with the Triton backend within the two backends' combined error;
``torch.compile(fullgraph=True)`` (Inductor) of an AMP training Bottleneck; CUDA graph capture of a
training step; bad inputs raise before any running statistic changes.

GPU only and judged as every tests/test_gpu_ext_*.py file (see tests/test_gpu_ext_bn.py): skipped
with the library loader's reason where it cannot run CUDA tensors; helpers in tests/utils.py.

ReLU masks (see tests/test_gpu_ext_bn.py): a pre-activation within rounding of 0 may flip, so block
training uses tiny float32 tensors or, in 16-bit / TF32, tensors large enough that flips are many on
both sides and errors compare as statistics.

A spy on the library (``conv_calls``) records the kernel ``conv_kernel_name`` reports for every conv
the package runs, and each must match the documented CUTLASS support (``utils.cutlass_prefix``).
Cost: Triton compiles and autotunes only for the cross-checks against it (two training blocks), and
Inductor for one block.
"""
from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch
from torch import nn

import resnet_fused as rf
from resnet_fused import _ext
from resnet_fused.models import reference as R
from resnet_fused.ops import _ext_ops
from builders import build, compile_for_training, is_preact, load_params, make_x, saved_activations
from utils import (BF16, CL, FORMAT_PARAMS, FP16, FP32, FP64, GPU_DEV, NCHW, PRECISION, assert_close,
                   assert_kernel, bound_of, calibrate, check_graph_capture, compare_models, cudnn_tf32, cutlass_prefix,
                   downsample, gen, randomize_bn, rel_err, tf32_emulated, worse)

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("cuda_library")]

DEV, FORMATS = GPU_DEV, FORMAT_PARAMS
C = torch.ops.resnet_fused_C  # C: the library, loaded by the cuda_library fixture before any test uses it


# ========================================================================== modules
@pytest.fixture
def conv_calls(monkeypatch):
    """``(kernel name, expected CUTLASS prefix or None)`` of every library conv the package runs (eval
    and training), the name from ``conv_kernel_name`` on the very arguments."""
    calls = []
    real = torch.ops.resnet_fused_C

    class Spy:
        def __getattr__(self, name):
            return getattr(real, name)

        @staticmethod
        def _record(x, w, r, stride, padding, dilation, allow_tf32):
            calls.append((real.conv_kernel_name(x, w, r, stride, padding, dilation, allow_tf32),
                          cutlass_prefix(x, w, r, allow_tf32)))

        def conv_bias_act(self, x, w, b, r, stride, padding, dilation, relu, allow_tf32):
            self._record(x, w, r, stride, padding, dilation, allow_tf32)
            return real.conv_bias_act(x, w, b, r, stride, padding, dilation, relu, allow_tf32)

        def conv_bias_act_stats(self, x, w, b, r, stride, padding, dilation, relu, allow_tf32):
            self._record(x, w, r, stride, padding, dilation, allow_tf32)
            return real.conv_bias_act_stats(x, w, b, r, stride, padding, dilation, relu, allow_tf32)

    spy = Spy()
    monkeypatch.setattr(_ext, "extension", lambda: spy)
    monkeypatch.setattr(_ext_ops, "ops", lambda: spy)
    return calls


def assert_conv_calls(calls, tag=""):
    assert calls, f"{tag}no library conv ran"
    for i, (name, prefix) in enumerate(calls):
        assert_kernel(name, prefix, f"{tag}conv call {i}")


# name: (pre-activation, reference block, our block (pre-activation only; post-activation blocks go
# through rf.convert), training input shape). Channels multiples of 8 (CUTLASS in 16-bit and TF32),
# tensors of 10^5..10^6 elements per layer (see the module docstring on ReLU masks).
BIG = {
    "basic-s2-ds": (False, lambda: R.BasicBlock(64, 128, 2, downsample(64, 128, 2)), None, (16, 64, 28, 28)),
    "bottleneck-identity": (False, lambda: R.Bottleneck(256, 64), None, (16, 256, 28, 28)),
    "bottleneck-s2-ds": (False, lambda: R.Bottleneck(256, 128, 2, downsample(256, 512, 2)), None, (16, 256, 28, 28)),
    "wide-s2-proj": (True, lambda: R.RefWideBasic(64, 128, 2), lambda: rf.WideBasic(64, 128, 2), (16, 64, 28, 28)),
    "preact-identity": (True, lambda: R.RefPreActBottleneck(256, 64), lambda: rf.PreActBottleneck(256, 64),
                        (16, 256, 14, 14)),
    "preact-s2-proj": (True, lambda: R.RefPreActBottleneck(256, 64, 2, R.conv1x1(256, 256, 2)),
                       lambda: rf.PreActBottleneck(256, 64, 2, R.conv1x1(256, 256, 2)), (16, 256, 28, 28)),
}
# tiny float32 cases of tests/builders.py (as in tests/test_train_blocks.py): odd channels, batch 1,
# 7x7 and 5x6 inputs, stride 2, dilation 2 (all on the fallback conv: odd channels, or IEEE float32)
SMALL = ["basic-s2-ds-batch1", "basic-ds-5x6", "bottle-s2-ds-batch1", "bottle-dilation2", "wide-proj-s2-batch1",
         "preact-proj-s2-batch1"]


def build_block(name, seed=0):
    """(ours pinned to "cuda", reference, preact, training input shape), one state, on the GPU.
    Post-activation blocks are torchvision-structured reference blocks put through rf.convert."""
    if name in SMALL:
        ours, ref = build(name, backend="cuda", seed=seed)
        return ours.to(DEV), ref.to(DEV), is_preact(name), tuple(make_x(name).shape)
    preact, make_ref, make_ours, shape = BIG[name]
    torch.manual_seed(seed)
    ref = randomize_bn(make_ref())
    if preact:
        ours = make_ours()
        ours.load_state_dict(ref.state_dict(), strict=True)
        ours.backend = "cuda"
    else:
        ours = rf.convert(copy.deepcopy(ref), backend="cuda")
        assert type(ours) in (rf.BasicBlock, rf.Bottleneck) and ours.backend == "cuda"
    return ours.to(DEV).train(), ref.to(DEV).train(), preact, shape


# ---------------------------------------------------------------------------------- eval
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("mode", ["fp16", "bf16", "fp32", "tf32"])
@pytest.mark.parametrize("block", list(BIG) + ["basic-s2-ds-batch1", "bottle-dilation2", "preact-proj-s2-batch1"])
def test_eval_block(block, mode, fmt, fused_calls, conv_calls):
    """Eval with BatchNorm folded: every conv one fused library call (CUTLASS where supported), the
    block against eager in the same precision and float64."""
    ours, ref, _, shape = build_block(block)
    x64 = torch.randn((4,) + shape[1:], dtype=FP64, device=DEV, generator=gen(2))
    with cudnn_tf32(mode == "tf32"):
        compare_models(ours, ref, x64, PRECISION[mode], fmt=fmt, name=f"{block} eval output")
    n_convs = sum(isinstance(m, nn.Conv2d) for m in ours.modules())
    assert fused_calls == ["cuda"] * n_convs, fused_calls
    assert len(conv_calls) == n_convs
    assert_conv_calls(conv_calls)


@pytest.mark.parametrize("mode", ["fp16", "bf16", "tf32"])
def test_convert_resnet50_eval(mode, fused_calls, conv_calls):
    """rf.convert(ResNet-50, backend="cuda"): same state_dict keys; 53 fused convs, CUTLASS but for
    the C = 3 stem; the model within 4x eager's same-precision error of float64, 2x3x224x224."""
    torch.manual_seed(0)
    state = calibrate(R.resnet50(), 224)
    ref = R.resnet50()
    ref.load_state_dict(state, strict=True)
    ours = rf.convert(copy.deepcopy(ref), backend="cuda")
    assert sum(type(m) is rf.Bottleneck for m in ours.modules()) == 16
    assert list(ours.state_dict()) == list(state)
    x64 = torch.randn(2, 3, 224, 224, dtype=FP64, device=DEV, generator=gen(3))
    with cudnn_tf32(mode == "tf32"):
        compare_models(ours, ref, x64, PRECISION[mode])
    assert fused_calls == ["cuda"] * 53
    assert len(conv_calls) == 53 and conv_calls[0][0].startswith("fallback"), conv_calls[:2]
    assert sum(name.startswith("cutlass_") for name, _ in conv_calls) == 52
    assert_conv_calls(conv_calls)


@pytest.mark.parametrize("net", ["wrn-16-4-fp16", "preact-resnet164-bf16"])
def test_cifar_networks_eval(net, fused_calls, conv_calls):
    """The pre-activation networks pinned to "cuda" (bn_act for the first BN + ReLU of each block,
    fused convs for the rest) vs their plain references, 2x3x32x32."""
    torch.manual_seed(0)
    if net.startswith("wrn"):
        ref, ours, dtype = R.ref_wrn(16, 4), rf.models.wrn(16, 4, backend="cuda"), FP16
    else:
        ref, ours, dtype = R.ref_preact_resnet(164), rf.models.preact_resnet(164, backend="cuda"), BF16
    state = calibrate(ref, 32)
    ours.load_state_dict(state, strict=True)
    compare_models(ours, ref, torch.randn(2, 3, 32, 32, dtype=FP64, device=DEV, generator=gen(4)), dtype)
    assert fused_calls and set(fused_calls) == {"cuda"}
    assert_conv_calls(conv_calls)


# ------------------------------------------------------------------------------ training
def autocast_for(mode):
    return torch.autocast(DEV, dtype=PRECISION[mode]) if mode in ("fp16", "bf16") else contextlib.nullcontext()


def fwd_bwd(model, x, g, mode, dtype=FP32):
    """``(out, x.grad)`` of one forward + backward of ``sum(out * g)`` in ``mode``'s precision."""
    xi = x.detach().to(dtype).requires_grad_()
    with autocast_for(mode):
        out = model(xi)
    (out * g.to(torch.promote_types(out.dtype, FP32))).sum().backward()
    return out.detach(), xi.grad


def loss_grad(shape, rng):
    """The gradient of the loss ``sum(out * g)``: random, scaled by 1/sqrt(values per channel) so
    that a BN beta's gradient (a sum over the batch) is O(1) and an SGD step moves it by O(lr)
    whatever the batch (unscaled, a block whose output has no BN after it blows up within steps)."""
    return torch.randn(shape, device=DEV, generator=rng) * (shape[1] / math.prod(shape)) ** 0.5


def train_steps(ours, ref, preact, shape, fmt, mode, steps=3, twin=None, calls=None, tag=""):
    """``steps`` training steps of ``ours`` (and of ``twin``, the same block on the Triton backend)
    against eager ``ref`` in ``mode``'s precision and a float64 copy: output (dtype, layout, values),
    x.grad, every parameter gradient, running statistics, ``num_batches_tracked``.

    Before each step every model takes the float64 reference's parameters (rounded), and only the
    reference takes the SGD step: each step is judged from one state (models stepped on their own
    drift apart by rounding). Buffers are never copied: each model's running statistics and
    ``num_batches_tracked`` are its own updates. TF32: the forward yardstick is the worse of eager
    TF32 and a TF32-emulated float64 model, the gradients' the worse of eager TF32 and eager fp16 AMP.
    """
    tf32_on = mode == "tf32"
    floor_dt = {"fp16": FP16, "bf16": BF16, "fp32": FP32, "tf32": FP16}[mode]
    fused = [("cuda", ours.to(memory_format=fmt))]
    if twin is not None:
        fused.append(("triton", twin.to(memory_format=fmt)))
    eager = copy.deepcopy(ref).to(memory_format=fmt)
    amp = copy.deepcopy(ref).to(memory_format=fmt) if tf32_on else None
    ref64 = copy.deepcopy(ref).double()
    opt = torch.optim.SGD(ref64.parameters(), lr=0.05, momentum=0.9)
    rng = gen(1)
    for step in range(steps):
        t = f"{tag}step {step}: "
        truth = dict(ref64.named_parameters())
        load_params([m for _, m in fused] + [eager] + ([amp] if amp is not None else []), truth)
        ref64.zero_grad(set_to_none=True)
        emu = tf32_emulated(ref64) if tf32_on else None  # copied before ref64's forward moves its buffers
        x = torch.randn(shape, device=DEV, generator=rng).contiguous(memory_format=fmt)
        first_call = len(calls) if calls is not None else 0
        results, g = {}, None
        with cudnn_tf32(tf32_on):
            for name, m in fused:
                xi = x.clone().requires_grad_()
                with autocast_for(mode):
                    out = m(xi)
                if g is None:
                    g = loss_grad(out.shape, rng)
                (out * g.to(torch.promote_types(out.dtype, FP32))).sum().backward()
                results[name] = (out.detach(), xi.grad)
                if name == "cuda" and calls is not None:
                    assert_conv_calls(calls[first_call:], tag=t)
            out_e, dx_e = fwd_bwd(eager, x, g, mode)
            out_64, dx_64 = fwd_bwd(ref64, x, g, "fp32", FP64)
            if tf32_on:
                out_a, dx_a = fwd_bwd(amp, x, g, "fp16")
                with torch.no_grad():
                    out_emu = emu(x.double())
        p_e, p_64 = dict(eager.named_parameters()), dict(ref64.named_parameters())
        b_e, b_64 = dict(eager.named_buffers()), dict(ref64.named_buffers())
        p_a = dict(amp.named_parameters()) if tf32_on else {}
        b_emu = dict(emu.named_buffers()) if tf32_on else {}
        yard_out = worse(out_64, out_e, out_emu) if tf32_on else out_e
        yard_dx = worse(dx_64, dx_e, dx_a) if tf32_on else dx_e

        def yard_p(n):
            return worse(p_64[n].grad, p_e[n].grad, p_a[n].grad) if tf32_on else p_e[n].grad

        def yard_b(n):
            return worse(b_64[n], b_e[n], b_emu[n]) if tf32_on else b_e[n]

        # torchvision's post-activation blocks end with ``out += identity``: the autocast dtype
        want_dtype = out_e.dtype if preact else PRECISION[mode]
        for name, m in fused:
            tn = f"{t}{name}: "
            out, dx = results[name]
            assert out.dtype == want_dtype, f"{tn}output dtype {out.dtype}, eager's rule gives {want_dtype}"
            assert out.is_contiguous(memory_format=fmt), f"{tn}output lost the input's layout: {out.stride()}"
            assert_close(out, out_64, yard_out, name=tn + "output", dtype=floor_dt)
            assert dx.dtype == FP32
            assert_close(dx, dx_64, yard_dx, name=tn + "x.grad", dtype=floor_dt)
            for n, p in m.named_parameters():
                assert p.grad is not None and p.grad.dtype == p.dtype, f"{tn}{n}.grad"
                assert_close(p.grad, p_64[n].grad, yard_p(n), name=f"{tn}{n}.grad", dtype=floor_dt)
            for n, b in m.named_buffers():
                if n.endswith("num_batches_tracked"):
                    assert int(b) == int(b_e[n]) == step + 1, f"{tn}{n} = {int(b)}, eager {int(b_e[n])}"
                else:
                    assert_close(b, b_64[n], yard_b(n), name=f"{tn}{n}", dtype=floor_dt)
        if twin is not None:  # the two backends within their combined error of each other
            (oc, dc), (ot, dt_) = results["cuda"], results["triton"]
            pairs_ = [("output", oc, ot, yard_out, out_64), ("x.grad", dc, dt_, yard_dx, dx_64)]
            pt = dict(twin.named_parameters())
            pairs_ += [(f"{n}.grad", p.grad, pt[n].grad, yard_p(n), p_64[n].grad) for n, p in ours.named_parameters()]
            bt = dict(twin.named_buffers())
            pairs_ += [(n, b, bt[n], yard_b(n), b_64[n]) for n, b in ours.named_buffers()
                       if not n.endswith("num_batches_tracked")]
            for what, a, b, yard, r64 in pairs_:
                combined = 2 * bound_of(yard, r64, floor_dt)
                assert rel_err(a, b) <= combined, \
                    f"{t}{what}: cuda vs triton differ by {rel_err(a, b):.3e} > {combined:.3e}"
        opt.step()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("mode", ["fp16", "bf16", "tf32"])
@pytest.mark.parametrize("block", list(BIG))
def test_train_block(block, mode, fmt, fused_train_calls, conv_calls):
    """3 SGD steps of every block kind, fused on the cuda backend, against eager and float64: AMP
    fp16 / bf16 (autocast, float32 parameters and input) and float32 with TF32, both layouts
    (channels_last: CUTLASS; NCHW: the fallback)."""
    ours, ref, preact, shape = build_block(block)
    train_steps(ours, ref, preact, shape, fmt, mode, calls=conv_calls)
    assert fused_train_calls == [preact] * 3, "the block did not train through the fused path"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", SMALL)
def test_train_small_block_fp32(case, fmt, fused_train_calls, conv_calls):
    """IEEE float32 (TF32 off) on tiny awkward blocks: odd channels, batch 1, 7x7 / 5x6 inputs,
    stride 2, dilation 2."""
    ours, ref, preact, shape = build_block(case)
    train_steps(ours, ref, preact, shape, fmt, "fp32", calls=conv_calls)
    assert fused_train_calls == [preact] * 3


@pytest.mark.parametrize("block", ["bottleneck-s2-ds", "preact-s2-proj"])
def test_train_cuda_and_triton_agree(block, fused_train_calls):
    """The same block on both backends, AMP fp16 channels_last: each against eager and float64, and
    the two within their combined error (twice the bound each must meet) of each other."""
    ours, ref, preact, shape = build_block(block)
    twin = copy.deepcopy(ours)
    twin.backend = "triton"
    train_steps(ours, ref, preact, shape, CL, "fp16", twin=twin)
    assert fused_train_calls == [preact] * 6


@pytest.mark.parametrize("block,mode,fmt", [("bottleneck-s2-ds", "fp16", CL), ("bottle-s2-ds-batch1", "fp32", NCHW)],
                         ids=["big-fp16-cl", "small-fp32-nchw"])
def test_low_memory_mode(block, mode, fmt, fused_train_calls, conv_calls):
    """Low-memory mode on the cuda backend: conv3's output is not kept (exactly its bytes fewer
    saved) but recomputed in the backward (one more library conv); the same forward bit for bit and
    the same gradients as the default mode; 3 SGD steps against eager and float64."""
    ours, ref, preact, shape = build_block(block)
    low = copy.deepcopy(ours)
    x = torch.randn(shape, device=DEV, generator=gen(5)).contiguous(memory_format=fmt)
    ours.to(memory_format=fmt)
    low.to(memory_format=fmt)
    runs = {}
    with cudnn_tf32(False):
        for name, m, enabled in (("default", ours, False), ("low", low, True)):
            first = len(conv_calls)
            xi = x.clone().requires_grad_()
            with rf.use_low_memory(enabled), autocast_for(mode):
                seen, out = saved_activations(m, xi)
                saved = sum(seen.values())
            g = torch.randn(out.shape, device=DEV, generator=gen(6))
            (out * g.to(torch.promote_types(out.dtype, FP32))).sum().backward()
            runs[name] = (saved, out.detach(), xi.grad, len(conv_calls) - first)
    (s_d, o_d, dx_d, n_d), (s_l, o_l, dx_l, n_l) = runs["default"], runs["low"]
    assert n_l == n_d + 1, f"library convs: {n_d} default, {n_l} low-memory (conv3 recomputed once)"
    assert s_d - s_l == o_d.numel() * o_d.element_size(), f"saved bytes: default {s_d}, low-memory {s_l}"
    assert torch.equal(o_l, o_d), "low-memory mode changed the forward"
    for (n, b), (_, b_l) in zip(ours.named_buffers(), low.named_buffers()):
        assert torch.equal(b, b_l), f"{n} differs between the modes"
    tol = 1e-5 if mode == "fp32" else 1e-3  # cuDNN's weight gradient may sum in another order
    assert rel_err(dx_l, dx_d) <= tol
    for (n, p), (_, p_l) in zip(ours.named_parameters(), low.named_parameters()):
        assert rel_err(p_l.grad, p.grad) <= tol, f"{n}.grad: low-memory vs default {rel_err(p_l.grad, p.grad):.3e}"
    assert fused_train_calls == [preact] * 2
    fresh, ref2, _, _ = build_block(block, seed=1)
    with rf.use_low_memory(True):
        train_steps(fresh, ref2, preact, shape, fmt, mode, calls=conv_calls, tag="low-memory ")
    assert fused_train_calls == [preact] * 5


# ============================================================= torch.compile, CUDA graphs
def test_compile_inductor_fullgraph_amp_bottleneck():
    """``torch.compile(fullgraph=True)`` (Inductor) of an AMP fp16 channels_last training Bottleneck
    on the cuda backend (CUTLASS convs with statistics, the ops' fakes): two steps, against eager
    and float64, against the uncompiled block (Inductor may fuse the glue between the library's ops
    differently: to fp16 rounding), and its running statistics / ``num_batches_tracked``."""
    ours, ref, _, shape = build_block("bottleneck-s2-ds")
    ours.to(memory_format=CL)
    ref.to(memory_format=CL)
    compiled, uncompiled, eager, ref64, opt = compile_for_training(ours, ref)
    rng = gen(1)
    tight = 1e-3
    try:
        with cudnn_tf32(False):
            for step in range(2):
                t = f"step {step}: "
                load_params((ours, uncompiled, eager), dict(ref64.named_parameters()))
                ref64.zero_grad(set_to_none=True)
                x = torch.randn(shape, device=DEV, generator=rng).contiguous(memory_format=CL)
                xi = x.clone().requires_grad_()
                with autocast_for("fp16"):
                    out = compiled(xi)
                g = loss_grad(out.shape, rng)
                (out * g.to(FP32)).sum().backward()
                out_u, dx_u = fwd_bwd(uncompiled, x, g, "fp16")
                out_e, dx_e = fwd_bwd(eager, x, g, "fp16")
                out_64, dx_64 = fwd_bwd(ref64, x, g, "fp32", FP64)
                assert out.dtype == FP16 and out.is_contiguous(memory_format=CL), (out.dtype, out.stride())
                for what, c_, u, e, r64 in (("output", out, out_u, out_e, out_64),
                                            ("x.grad", xi.grad, dx_u, dx_e, dx_64)):
                    assert_close(c_, r64, e, name=t + "compiled " + what, dtype=FP16)
                    assert rel_err(c_, u) <= tight, f"{t}{what}: compiled vs uncompiled {rel_err(c_, u):.3e}"
                pu, pe, p64 = (dict(m.named_parameters()) for m in (uncompiled, eager, ref64))
                for n, p in ours.named_parameters():
                    assert p.grad is not None, f"{t}{n}: no gradient through the compiled block"
                    assert_close(p.grad, p64[n].grad, pe[n].grad, name=f"{t}compiled {n}.grad", dtype=FP16)
                    assert rel_err(p.grad, pu[n].grad) <= tight, f"{t}{n}.grad: compiled vs uncompiled"
                bu, be, b64 = (dict(m.named_buffers()) for m in (uncompiled, eager, ref64))
                for n, b in ours.named_buffers():
                    if n.endswith("num_batches_tracked"):
                        assert int(b) == int(bu[n]) == int(be[n]) == step + 1, f"{t}{n} = {int(b)}"
                    else:
                        assert_close(b, b64[n], be[n], name=f"{t}compiled {n}", dtype=FP16)
                        assert rel_err(b, bu[n]) <= tight, f"{t}{n}: compiled vs uncompiled"
                opt.step()
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("dtype", [FP32, FP16], ids=["fp32-fallback", "fp16-cutlass"])
def test_cuda_graph_capture_training_step(dtype, fused_train_calls, conv_calls):
    """Forward + backward of a fused Bottleneck (ResNet-50 layer1.0: 64 -> 256 with downsample,
    channels_last) on the cuda backend captured once, replayed twice on new data; each replay equals
    the same step run uncaptured from the same state (outputs, x.grad, every parameter gradient,
    running statistics, ``num_batches_tracked`` advancing by one per replay). float32 (TF32 off)
    runs the fallback conv, float16 (a half model, no autocast) CUTLASS."""
    want = "cutlass_sm80_f16_" if dtype == FP16 else "fallback: float32 without TF32"

    def captured_the_expected_conv():
        assert conv_calls and all(name.startswith(want) for name, _ in conv_calls), conv_calls[:4]

    tol = 1e-5 if dtype == FP32 else 1e-3  # cuDNN's weight gradient may sum in another order
    check_graph_capture("cuda", fused_train_calls, dtype=dtype, tol=tol, after_capture=captured_the_expected_conv)


# ============================================================== bad input, no side effects
@pytest.mark.parametrize("block", ["bottleneck-s2-ds", "preact-s2-proj", "wide-s2-proj"])
def test_bad_input_raises_before_any_statistic_moves(block, fused_train_calls):
    """Wrong channels, dtype, rank, device, a batch a BatchNorm cannot normalise: ValueError /
    TypeError naming the input, and not one running statistic or counter changed."""
    ours, _, preact, shape = build_block(block)
    n, c = 2, shape[1]
    x = torch.randn(n, c, 8, 8, device=DEV, generator=gen(7))
    bad = {
        "wrong-channels": (ValueError, torch.randn(n, c + 1, 8, 8, device=DEV)),
        "float64": (TypeError, x.double()),
        "float16-no-autocast": (TypeError, x.half()),
        "int": (TypeError, x.long()),
        "3-D": (ValueError, x[0]),
        "batch1-1x1": (ValueError, torch.randn(1, c, 1, 1, device=DEV)),
        "batch1-2x2-stride2": (ValueError, torch.randn(1, c, 2, 2, device=DEV)),  # the BN after the stride
        "on-the-cpu": (ValueError, x.cpu()),
        "not-a-tensor": (TypeError, x.cpu().numpy()),
    }
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    for what, (exc, bad_x) in bad.items():
        with pytest.raises(exc, match="input x"):
            ours(bad_x)
        for k, v in ours.state_dict().items():
            assert torch.equal(v, before[k]), f"{what}: {k} changed before the error"
        assert fused_train_calls == [], what
    ours(x)  # a good input trains through the fused path and moves the counters by one
    assert fused_train_calls == [preact]
    assert int(ours.bn1.num_batches_tracked) == int(before["bn1.num_batches_tracked"]) + 1
