"""Shared test helpers: error measures against a float64 reference, and one mismatch explainer.

A fused kernel's error is judged against PyTorch's own error in the same dtype: both are measured
against a float64 reference, and the kernel may be at most ``factor`` times worse than PyTorch
(plus a small floor, for when PyTorch happens to be nearly exact).
"""
from __future__ import annotations

import os

import pytest

import torch

# Relative-error floors per dtype: a few units of rounding of the format (or of TF32 on GPU).
FLOOR = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

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
