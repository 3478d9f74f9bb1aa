"""Shared test helpers: error measures against a float64 reference, one mismatch explainer, the
per-channel statistics check, and (last section) the builders and references of the GPU tests.
The block, input and three-copy builders of the CPU tests are in tests/builders.py.

A fused kernel's error is judged against PyTorch's own error in the same dtype: both are measured
against a float64 reference, and the kernel may be at most ``factor`` times worse than PyTorch
(plus a small floor, for when PyTorch happens to be nearly exact).
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
from dataclasses import dataclass
from typing import Dict, List

import pytest

import torch
import torch.nn.functional as F
from torch import nn

import resnet_fused as rf
from resnet_fused.models import reference as R
from resnet_fused.ops import conv_bias_act_reference

# Relative-error floors per dtype: a few units of rounding of the format (or of TF32 on GPU).
FLOOR = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DIMS = (0, 2, 3)  # the dimensions a per-channel statistic of an [N, C, H, W] tensor reduces

# Triton backend availability for CPU tensors (interpreter) - tests that need it use this.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(actual: torch.Tensor, ref: torch.Tensor) -> float:
    """||actual - ref|| / ||ref|| in float64 over finite entries (NaN/Inf checked separately)."""
    a, r = actual.detach().double(), ref.detach().double()
    finite = torch.isfinite(r) & torch.isfinite(a)
    denom = r[finite].norm().item()
    num = (a[finite] - r[finite]).norm().item()
    return num / denom if denom > 0 else num


def explain_mismatch(actual: torch.Tensor, ref: torch.Tensor, name: str = "tensor") -> str:
    """Count, worst index and NaN/Inf pattern of a mismatch, for assertion messages."""
    a, r = actual.detach().double().cpu(), ref.detach().double().cpu()
    lines = [f"{name}: shape {list(a.shape)} vs reference {list(r.shape)}"]
    if a.shape != r.shape:
        return lines[0]
    nan_a, nan_r = torch.isnan(a), torch.isnan(r)
    inf_a, inf_r = torch.isinf(a), torch.isinf(r)
    if not torch.equal(nan_a, nan_r):
        lines.append(f"  NaN pattern differs: {int(nan_a.sum())} NaN in output, {int(nan_r.sum())} in reference")
    if not torch.equal(inf_a, inf_r) or not torch.equal(a[inf_a], r[inf_a] if inf_a.any() else a[inf_a]):
        lines.append(f"  Inf pattern differs: {int(inf_a.sum())} Inf in output, {int(inf_r.sum())} in reference")
    diff = (a - r).abs()
    diff[~(torch.isfinite(a) & torch.isfinite(r))] = 0
    if diff.numel():
        worst = int(diff.argmax())
        idx = list(torch.unravel_index(torch.tensor(worst), a.shape)) if a.dim() else []
        lines.append(f"  worst |diff| {diff.max().item():.3e} at {[int(i) for i in idx]}: "
                     f"got {a.flatten()[worst].item():.6g}, expected {r.flatten()[worst].item():.6g}")
        lines.append(f"  {int((diff > 1e-3 * (r.abs() + 1)).sum())} of {diff.numel()} entries off by more than 1e-3 rel")
    lines.append(f"  relative error {rel_err(a, r):.3e}")
    return "\n".join(lines)


def assert_nonfinite_match(actual: torch.Tensor, ref: torch.Tensor, name: str = "tensor") -> None:
    """NaN where the reference has NaN, the same signed Inf where it has Inf."""
    a, r = actual.detach().double().cpu(), ref.detach().double().cpu()
    ok = torch.equal(torch.isnan(a), torch.isnan(r)) and torch.equal(torch.isinf(a), torch.isinf(r))
    if ok and torch.isinf(r).any():
        ok = torch.equal(a[torch.isinf(r)], r[torch.isinf(r)])
    assert ok, explain_mismatch(actual, ref, name)


def assert_close(actual: torch.Tensor, ref64: torch.Tensor, torch_same_dtype=None,
                 name: str = "tensor", factor: float = 4.0, dtype: torch.dtype | None = None) -> None:
    """``actual`` within ``factor`` x PyTorch's own error (``torch_same_dtype``) of ``ref64``.

    ``torch_same_dtype`` may be one tensor or several (PyTorch's result by different legitimate
    algorithms, e.g. NCHW and channels_last): PyTorch's error is then the largest of theirs, since
    which summation order happens to round luckier on one sample is not a property of our kernel.
    Without it the bound is the dtype floor alone. Shapes must match exactly and the NaN/Inf
    patterns must equal the reference's.
    """
    assert tuple(actual.shape) == tuple(ref64.shape), explain_mismatch(actual, ref64, name)
    assert_nonfinite_match(actual, ref64, name)
    dtype = dtype or actual.dtype
    bound = FLOOR.get(dtype, 1e-5)
    if isinstance(torch_same_dtype, torch.Tensor):
        torch_same_dtype = (torch_same_dtype,)
    for same in torch_same_dtype or ():
        bound = max(bound, factor * rel_err(same, ref64))
    err = rel_err(actual, ref64)
    assert err <= bound, f"relative error {err:.3e} > bound {bound:.3e}\n" + explain_mismatch(actual, ref64, name)


def bn_modules(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def randomize_bn(model, generator=None):
    """Give every BatchNorm non-trivial affine parameters and running statistics."""
    with torch.no_grad():
        for m in bn_modules(model):
            if m.weight is not None:
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.5)
            if m.running_mean is not None:
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


def copy_via(how: str, module):
    """A copy of ``module`` by ``copy.deepcopy`` (``how="deepcopy"``) or a torch.save/torch.load
    round trip (``how="pickle"``): the two ways users duplicate whole modules."""
    import copy
    import io

    if how == "deepcopy":
        return copy.deepcopy(module)
    buf = io.BytesIO()
    torch.save(module, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _ext_error():
    from resnet_fused import _ext

    return _ext.load_error()


EXT_ERROR = _ext_error()  # None where the compiled library (backend "cuda") builds and loads here
NEEDS_EXT = pytest.mark.skipif(EXT_ERROR is not None, reason=f"the compiled library is unavailable: {EXT_ERROR}")
CUDA_BACKEND = pytest.param("cuda", marks=NEEDS_EXT)  # the "cuda" backend: C++ kernels on CPU tensors


def run_bench_cpu(module: str, out_dir, *args: str, timeout: float = 240, interpret: bool = True):
    """``python -m <module> --device cpu --out <out_dir> *args`` as a subprocess from the repository
    tree (benchmarks/ is not installed), one intra-op thread, Triton's interpreter on (``interpret``);
    asserts exit code 0 and returns the CompletedProcess."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    env = dict(os.environ)
    env["PYTHONPATH"] = str(repo) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["OMP_NUM_THREADS"] = "1"
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-m", module, "--device", "cpu", "--out", str(out_dir), *args], cwd=out_dir,
                       env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def vec_stats(x):
    """(mean, biased var) per channel of a float64 copy: the exact statistics of ``x`` as stored."""
    xd = x.double()
    return xd.mean(dim=DIMS), xd.var(dim=DIMS, unbiased=False)


def check_stats(x, count, anchor, off, m2, name="x"):
    """The statistics outputs of a fused op (``channel_stats``, a conv's ``stats``): count, mean =
    anchor + offset and biased var = m2 / count of ``x`` as stored, against float64, PyTorch's
    float32 statistics as the yardstick."""
    c = x.shape[1]
    assert count.shape == (1,) and count.dtype == torch.float32, (count.shape, count.dtype)
    assert count.item() == x.numel() // c, (count.item(), x.numel() // c)
    for t in (anchor, off, m2):
        assert t.shape == (c,) and t.dtype == torch.float32 and t.device == x.device
    mean64, var64 = vec_stats(x)
    xf = x.float()
    assert_close(anchor + off, mean64, xf.mean(dim=DIMS), name=f"{name} mean")
    assert_close(m2 / count, var64, xf.var(dim=DIMS, unbiased=False), name=f"{name} var")


def bn_relu_train_grads(g, y, params, r, rparams, res, eps, dtype):
    """The reference gradients of the fused BN training ops: relu(batch_norm(y) + R) by autograd in
    ``dtype`` (training-mode BN: the batch statistics' own dependence on y is part of it), R = 0
    (``res`` 0), the residual r (1) or r's own batch_norm (2): the grads of y, gamma, beta[, r[, r's
    gamma, beta]]."""
    y = y.detach().to(dtype).requires_grad_()
    gamma, beta = (t.detach().to(dtype).requires_grad_() for t in params)
    inputs = [y, gamma, beta]
    z = F.batch_norm(y, None, None, gamma, beta, True, 0.0, eps)
    if res:
        r = r.detach().to(dtype).requires_grad_()
        inputs.append(r)
        if res == 2:
            rgamma, rbeta = (t.detach().to(dtype).requires_grad_() for t in rparams)
            inputs += [rgamma, rbeta]
            z = z + F.batch_norm(r, None, None, rgamma, rbeta, True, 0.0, eps)
        else:
            z = z + r
    return torch.autograd.grad(torch.relu(z), inputs, g.to(dtype))


BN_SHAPE = (2, 37, 9, 9)  # 162 pixels: two pixel blocks; 37 channels: two channel blocks


def make_bn_case(res, dtype=torch.float32, fmt=torch.contiguous_format, shape=BN_SHAPE, r_dtype=None, center=(3.0, -2.0),
                 spread=(2.0, 3.0)):
    """For the fused BN training ops: y with its batch (mean, scale, shift), and the residual with its own BN for res == 2
    (``center``/``spread``: of y and r)."""
    c = shape[1]

    def bn_of(t):
        mean, var = vec_stats(t)
        gamma = torch.randn(c, device=DEVICE)  # mixed signs
        return mean.float(), (gamma / (var + 1e-5).sqrt()).float(), 0.5 * torch.randn(c, device=DEVICE)

    y = (center[0] + spread[0] * torch.randn(shape, device=DEVICE)).to(dtype).contiguous(memory_format=fmt)
    vecs = bn_of(y)
    r, rvecs = None, (None, None, None)
    if res:
        r = (center[1] + spread[1] * torch.randn(shape, device=DEVICE)).to(r_dtype or dtype)
        r = r.contiguous(memory_format=fmt)
        if res == 2:
            rvecs = bn_of(r)
    return y, vecs, r, rvecs


def downsample(cin, cout, stride):
    """torchvision's downsample branch: 1x1 conv (no bias) + BatchNorm."""
    return nn.Sequential(R.conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))


# =========================================================== GPU tests (tests/test_gpu*.py)
GPU_DEV = "cuda"
CL = torch.channels_last
NCHW = torch.contiguous_format
FP16, BF16, FP32, FP64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
DTYPE_PARAMS = [pytest.param(FP16, id="fp16"), pytest.param(BF16, id="bf16"), pytest.param(FP32, id="fp32")]
FORMAT_PARAMS = [pytest.param(CL, id="cl"), pytest.param(NCHW, id="nchw")]
# precision modes: the compute dtype; "tf32" is float32 with TF32 convolutions on
PRECISION = {"fp16": FP16, "bf16": BF16, "fp32": FP32, "tf32": FP32}


# ------------------------------------------------------------------------------ ResNet-50's convs
# ------------------------------------------------------------------------------ ResNet-50's convs
@dataclass(frozen=True)
class ConvSpec:
    """One distinct conv of ResNet-50 (eval, BN folded) at 224x224: named where it first occurs."""

    name: str
    cin: int
    cout: int
    k: int
    stride: int
    hw: int  # input height = width
    res: bool  # the block's last conv: residual added in the epilogue
    relu: bool  # False only for the downsample conv (+ BN)

    @property
    def padding(self) -> int:
        return self.k // 2  # 7x7: 3, 3x3: 1, 1x1: 0, as torchvision

    @property
    def out_hw(self) -> int:
        return (self.hw + 2 * self.padding - self.k) // self.stride + 1


def resnet50_convs(size: int = 224) -> List[ConvSpec]:
    """Every distinct (geometry, epilogue) of ResNet-50's convs, in the order the network meets them."""
    seen: Dict[tuple, ConvSpec] = {}

    def add(name, *geometry):
        seen.setdefault(geometry, ConvSpec(name, *geometry))

    add("conv1", 3, 64, 7, 2, size, False, True)
    hw, inplanes = size // 4, 64  # after the stride-2 stem and the stride-2 max-pool
    for layer, (planes, blocks, stride) in enumerate(((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)), 1):
        for i in range(blocks):
            s = stride if i == 0 else 1
            out_hw = (hw - 1) // s + 1
            p = f"layer{layer}.{i}"
            if i == 0:
                add(f"{p}.downsample", inplanes, planes * 4, 1, s, hw, False, False)
            add(f"{p}.conv1", inplanes, planes, 1, 1, hw, False, True)
            add(f"{p}.conv2", planes, planes, 3, s, hw, False, True)
            add(f"{p}.conv3", planes, planes * 4, 1, 1, out_hw, True, True)
            inplanes, hw = planes * 4, out_hw
    return list(seen.values())


R50 = {s.name: s for s in resnet50_convs()}
assert len(R50) == 24  # stem + 5 in layer1 + 6 in each of layers 2-4 (pure Python: checked at collection)


# ------------------------------------------------------------------------------------- helpers
def is_cl(t: torch.Tensor) -> bool:
    """channels_last and not also plain contiguous: the layout an op's output must then keep."""
    return t.is_contiguous(memory_format=CL) and not t.is_contiguous()


def tf32(t: torch.Tensor) -> torch.Tensor:
    """float32 values truncated to TF32's 10-bit mantissa (the coarser of the GPUs' two roundings)."""
    t32 = t.detach().float().contiguous()
    return (t32.view(torch.int32) & -(1 << 13)).view(torch.float32)


@contextlib.contextmanager
def cudnn_tf32(enabled: bool):
    """Set ``torch.backends.cudnn.allow_tf32`` (cuDNN's and our fp32 kernels' switch) for a block."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = before


def make_conv(n, cin, hw, cout, k, stride=1, padding=0, dilation=1, *, dtype, fmt=CL, w_fmt=CL, bias=True,
              residual=False, res_fmt=None, res_dtype=None):
    """[x, weight, bias, residual] on the GPU and the conv keyword arguments.

    weight ~ N(0, 1/fan_in) so outputs are O(1); bias a folded-BN shift in float32.
    """
    h, w = hw if isinstance(hw, tuple) else (hw, hw)
    oh = (h + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    ow = (w + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    x = torch.randn(n, cin, h, w, device=GPU_DEV).to(dtype).contiguous(memory_format=fmt)
    wt = (torch.randn(cout, cin, k, k, device=GPU_DEV) / math.sqrt(cin * k * k)).to(dtype)
    wt = wt.contiguous(memory_format=w_fmt)
    b = 0.5 * torch.randn(cout, device=GPU_DEV) if bias else None
    r = None
    if residual:
        r = torch.randn(n, cout, oh, ow, device=GPU_DEV).to(res_dtype or dtype)
        r = r.contiguous(memory_format=res_fmt or fmt)
    return [x, wt, b, r], dict(stride=stride, padding=padding, dilation=dilation)


def spec_case(spec: ConvSpec, dtype, batch=2, **kw):
    """A ResNet-50 conv as the network runs it: ([x, w, b, r], conv kwargs, relu)."""
    kw.setdefault("residual", spec.res)
    tensors, conv = make_conv(batch, spec.cin, spec.hw, spec.cout, spec.k, spec.stride, spec.padding,
                              dtype=dtype, **kw)
    return tensors, conv, spec.relu


def torch_side(x, w, b, r, relu, conv, ref64):
    """PyTorch's own result in x's dtype; for TF32-allowed float32, the worse of cuDNN and TF32 emulation."""
    same = conv_bias_act_reference(x, w, b, r, relu=relu, **conv)
    if x.dtype == FP32 and torch.backends.cudnn.allow_tf32:
        emu = conv_bias_act_reference(tf32(x), tf32(w), b, r, relu=relu, upcast=True, **conv)
        if rel_err(emu, ref64) > rel_err(same, ref64):
            return emu
    return same


def check_conv(out, x, w, b, r, relu, conv, name="out"):
    """dtype, layout and values of a conv_bias_act output against float64 and PyTorch's same-dtype run."""
    assert out.device == x.device
    assert out.dtype == (x.dtype if r is None else torch.promote_types(x.dtype, r.dtype)), out.dtype
    assert out.is_contiguous(memory_format=CL if is_cl(x) else NCHW), f"{name}: lost x's memory format"
    ref64 = conv_bias_act_reference(x, w, b, r, relu=relu, upcast=True, **conv)
    assert_close(out, ref64, torch_side(x, w, b, r, relu, conv, ref64), name=name, dtype=x.dtype)


# --------------------------------------------------------------------- model-level helpers
def calibrate(model: nn.Module, size: int, batch: int = 2, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Random BN affine parameters and running statistics of one random train batch; the CPU state_dict.

    Random running statistics in a deep network blow activations up (fp16 overflows); statistics
    measured on data keep them O(1) while folding stays far from an identity.
    """
    gen = torch.Generator().manual_seed(seed)
    bns = bn_modules(model)
    with torch.no_grad():
        for m in bns:
            m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.copy_(0.2 * torch.randn(m.num_features, generator=gen))
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 1.0
    model.to(GPU_DEV).train()
    with torch.no_grad():
        model(torch.randn(batch, 3, size, size, generator=gen).to(GPU_DEV))
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    model.eval()
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def tf32_emulated(model64: nn.Module) -> nn.Module:
    """A float64 copy whose convs see TF32-truncated weights and inputs (exact accumulation)."""
    m = copy.deepcopy(model64)
    for conv in (c for c in m.modules() if isinstance(c, nn.Conv2d)):
        with torch.no_grad():
            conv.weight.copy_(tf32(conv.weight).double())
        conv.register_forward_pre_hook(lambda _mod, args: (tf32(args[0]).double(),) + tuple(args[1:]))
    return m


def compare_models(ours: nn.Module, ref: nn.Module, x64: torch.Tensor, dtype, fmt=CL, name="logits"):
    """ours (fused, ``dtype``) vs ref in float64 and ref in ``dtype`` (eager PyTorch), eval mode."""
    ref64 = copy.deepcopy(ref).to(GPU_DEV, torch.float64).eval()
    eager = copy.deepcopy(ref).to(GPU_DEV, dtype).to(memory_format=fmt).eval()
    fused = ours.to(GPU_DEV, dtype).to(memory_format=fmt).eval()
    x = x64.to(GPU_DEV, dtype).contiguous(memory_format=fmt)
    with torch.no_grad():
        y64 = ref64(x64.to(GPU_DEV))
        y_eager = eager(x.clone())
        y = fused(x.clone())
        same = y_eager
        if dtype == FP32 and torch.backends.cudnn.allow_tf32:
            y_emu = tf32_emulated(ref64)(x64.to(GPU_DEV))
            if rel_err(y_emu, y64) > rel_err(y_eager, y64):
                same = y_emu
    assert torch.isfinite(y64).all()
    assert_close(y, y64, same, name=name)
    return y


# ------------------------------------------------------------- the cuda backend's library tests
def gen(seed: int) -> torch.Generator:
    return torch.Generator(device=GPU_DEV).manual_seed(seed)


def poison_next(*nbytes: int) -> None:
    """Leave freed blocks of these sizes, every byte 0xFF (NaN in float32, float16 and bfloat16, all
    bits set in a mask), in PyTorch's caching allocator: the op's outputs most likely reuse them, so
    an element an op never writes stays NaN (or a set bit) and fails the checks."""
    blocks = [torch.full((max(int(n), 1),), 255, dtype=torch.uint8, device=GPU_DEV) for n in nbytes]
    del blocks


def fmt_of(t: torch.Tensor):
    return CL if is_cl(t) else NCHW


def at_offset(t: torch.Tensor, offset: int) -> torch.Tensor:
    """A copy of ``t`` with t's strides whose data starts ``offset`` elements into a fresh storage
    (what a view into a flat buffer is): for an odd offset, not 16-byte aligned."""
    buf = torch.empty(t.numel() + offset + 16, dtype=t.dtype, device=t.device)
    v = buf.as_strided(t.shape, t.stride(), storage_offset=offset)
    v.copy_(t)
    return v


def worse(ref64: torch.Tensor, *candidates: torch.Tensor) -> torch.Tensor:
    """The candidate furthest from the float64 reference: the fairest yardstick among them."""
    return max(candidates, key=lambda t: rel_err(t, ref64))


def bound_of(yardstick, ref64, floor_dtype, factor=4.0) -> float:
    """The error ``assert_close`` allows: ``factor`` x the yardstick's error, at least the floor."""
    return max(FLOOR[floor_dtype], factor * rel_err(yardstick, ref64))


CUTLASS_TAG = {FP16: "f16", BF16: "bf16", FP32: "tf32"}


def cutlass_prefix(x, w, r, allow_tf32):
    """The kernel-name prefix CUTLASS must run under, by the support csrc/cuda/conv_fprop.cu
    documents (and CUTLASS's can_implement checks): a channels_last CUDA x, C and K multiples of
    the 16-byte vector (8 elements of 16 bits, 4 of float32), float32 only with TF32, a residual in
    x's dtype. None: the fallback (cuDNN + our epilogue kernel) must run."""
    if not x.is_cuda or not is_cl(x) or x.numel() == 0:
        return None
    if (x.dtype == FP32 and not allow_tf32) or (r is not None and r.dtype != x.dtype):
        return None
    align = 4 if x.dtype == FP32 else 8
    if x.shape[1] % align or w.shape[0] % align:
        return None
    return f"cutlass_sm80_{CUTLASS_TAG[x.dtype]}_"


def assert_kernel(name: str, prefix, what: str) -> None:
    if prefix is None:
        assert name.startswith("fallback"), f"{what}: expected the fallback, got kernel {name!r}"
    else:
        assert name.startswith(prefix), f"{what}: expected a CUTLASS {prefix}* kernel, got {name!r}"


def check_graph_capture(backend, fused_train_calls, dtype=torch.float32, tol=1e-5, after_capture=None):
    """Capture one training step of a fused Bottleneck on ``backend`` in a CUDA graph, replay it
    twice on new data, and compare each replay with the same step run uncaptured from the same
    state: outputs, x.grad, every parameter gradient, running statistics, ``num_batches_tracked``
    advancing by one per replay. ``after_capture()`` runs right after the capture (for checks of
    what was captured). Used by the triton and the cuda backend's tests."""
    torch.manual_seed(0)
    ours = randomize_bn(rf.Bottleneck(64, 64, downsample=downsample(64, 256, 1)))
    ours = ours.to(GPU_DEV, dtype).to(memory_format=CL).train()
    ours.backend = backend
    twin = copy.deepcopy(ours)  # the uncaptured run
    state0 = {k: v.detach().clone() for k, v in ours.state_dict().items()}
    shape, out_shape = (4, 64, 56, 56), (4, 256, 56, 56)
    static_x = torch.randn(shape, device=GPU_DEV).to(dtype).contiguous(memory_format=CL).requires_grad_()
    static_g = torch.randn(out_shape, device=GPU_DEV).to(dtype).contiguous(memory_format=CL)
    with cudnn_tf32(False):
        # warm up on a side stream (compiles and autotunes every kernel), as PyTorch's docs say
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                ours.zero_grad(set_to_none=True)
                static_x.grad = None
                ours(static_x).backward(static_g)
        torch.cuda.current_stream().wait_stream(side)
        ours.zero_grad(set_to_none=True)
        static_x.grad = None  # gradients allocated inside the graph's pool, overwritten on replay
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = ours(static_x)
            static_out.backward(static_g)
        n_traced = len(fused_train_calls)
        if after_capture is not None:
            after_capture()
        # back to the initial state, in place: the graph reads and writes these very tensors
        with torch.no_grad():
            for k, v in ours.state_dict().items():
                v.copy_(state0[k])
        gen = torch.Generator(device=GPU_DEV).manual_seed(5)
        for step in range(2):
            x = torch.randn(shape, device=GPU_DEV, generator=gen).to(dtype).contiguous(memory_format=CL)
            g = torch.randn(out_shape, device=GPU_DEV, generator=gen).to(dtype).contiguous(memory_format=CL)
            with torch.no_grad():
                static_x.copy_(x)
                static_g.copy_(g)
            graph.replay()
            twin.zero_grad(set_to_none=True)
            xt = x.clone().requires_grad_()
            out_t = twin(xt)
            out_t.backward(g)
            torch.cuda.synchronize()
            t = f"replay {step}: "
            pairs = [("output", static_out, out_t), ("x.grad", static_x.grad, xt.grad)]
            pt = dict(twin.named_parameters())
            pairs += [(f"{n}.grad", p.grad, pt[n].grad) for n, p in ours.named_parameters()]
            bt = dict(twin.named_buffers())
            for n, b in ours.named_buffers():
                if n.endswith("num_batches_tracked"):
                    assert int(b) == int(bt[n]) == step + 1, f"{t}{n} = {int(b)}, uncaptured {int(bt[n])}"
                else:
                    pairs.append((n, b, bt[n]))
            for what, a, b in pairs:
                assert a is not None, f"{t}{what} missing after replay"
                # the same kernels on the same data; cuDNN's weight-gradient algorithm may sum in
                # another order, so to rounding (tol) rather than bitwise
                assert torch.isfinite(a).all(), f"{t}{what} not finite"
                assert rel_err(a, b) <= tol, f"{t}{what}: captured vs uncaptured differ by {rel_err(a, b):.3e}"
    # the capture itself went through the fused path; replays add no Python-level calls
    assert n_traced == 4 and len(fused_train_calls) == 4 + 2, fused_train_calls
