"""The machine's own ceilings, measured in the same run as the benchmarks judged by them.

Copy bandwidth: ``dst.copy_(src)`` of a buffer far larger than the L2 (256 MiB on a GPU), bytes
read + written / median time. Matmul peak per dtype: ``torch.mm`` of square matrices (4096 and
8192 on a GPU; fp32 with TF32, as cuDNN's convs use it), ``2 n^3`` / median, the best size.
:func:`roofline_floor_ms` turns (flops, bytes) into the least time either ceiling allows. On CPU
the same code runs at tiny sizes: its numbers describe the VM only.
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from typing import Dict, Optional, Sequence

import torch

from . import common


@dataclass
class Peaks:
    """Measured ceilings: ``copy_gbps`` (GB/s, 1e9 bytes) and ``matmul_tflops`` per dtype name."""

    device: str
    copy_gbps: float
    matmul_tflops: Dict[str, float] = field(default_factory=dict)
    copy_bytes: int = 0
    matmul_n: Dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Peaks":
        return cls(**d)


@contextlib.contextmanager
def _tf32(on: bool):
    """cuBLAS TF32 for fp32 matmuls switched to ``on``, restored after (conv's switch untouched)."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def measure_copy_gbps(device: torch.device, nbytes: Optional[int] = None, quick: bool = False) -> tuple:
    """(GB/s, bytes per copy): device-to-device ``copy_`` of ``nbytes`` (default 256 MiB on a GPU,
    8 MiB on CPU), counting the read and the write."""
    device = torch.device(device)
    if nbytes is None:
        nbytes = 256 * 2**20 if device.type == "cuda" else 8 * 2**20
    n = nbytes // 2
    src = [torch.empty(n, dtype=torch.float16, device=device).fill_(1.0) for _ in range(2)]
    dst = torch.empty(n, dtype=torch.float16, device=device)
    t = common.benchmark(lambda s: dst.copy_(s), [(s,) for s in src], device, cuda_graph=False,
                         **common.op_timing(device, quick))
    return 2 * n * 2 / (t.median_ms * 1e-3) / 1e9, 2 * n * 2


def measure_matmul_tflops(device: torch.device, dtype: str, sizes: Optional[Sequence[int]] = None,
                          quick: bool = False) -> tuple:
    """(TFLOP/s, n): the best ``torch.mm`` rate of ``n x n`` matrices over ``sizes`` (GPU default
    4096 and 8192, CPU 256); fp32 with TF32 on (PyTorch's default for convolutions)."""
    device = torch.device(device)
    if sizes is None:
        sizes = (8192,) if device.type == "cuda" and quick else ((4096, 8192) if device.type == "cuda" else (256,))
    dt = common.DTYPES[dtype]
    best, best_n = 0.0, 0
    with _tf32(True) if device.type == "cuda" else contextlib.nullcontext():
        for n in sizes:
            gen = torch.Generator(device=device).manual_seed(n)
            a = torch.randn(n, n, generator=gen, device=device).to(dt)
            b = torch.randn(n, n, generator=gen, device=device).to(dt)
            out = torch.empty(n, n, device=device, dtype=dt)
            t = common.benchmark(lambda x, y, _o=out: torch.mm(x, y, out=_o), [(a, b)], device, cuda_graph=False,
                                 **common.op_timing(device, quick))
            rate = 2 * n ** 3 / (t.median_ms * 1e-3) / 1e12
            if rate > best:
                best, best_n = rate, n
            del a, b, out
    return best, best_n


def measure(device: torch.device, dtypes: Sequence[str] = ("fp16", "bf16", "fp32"), quick: bool = False) -> Peaks:
    """Copy bandwidth and the matmul peak of each of ``dtypes`` on ``device``."""
    device = torch.device(device)
    gbps, nbytes = measure_copy_gbps(device, quick=quick)
    peaks = Peaks(common.device_name(device), gbps, copy_bytes=nbytes)
    for d in dtypes:
        peaks.matmul_tflops[d], peaks.matmul_n[d] = measure_matmul_tflops(device, d, quick=quick)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return peaks


def roofline_floor_ms(flops: float, nbytes: float, peaks: Peaks, dtype: str) -> float:
    """The least time the measured ceilings allow: max(flops / matmul peak, bytes / copy bandwidth)."""
    t_math = flops / (peaks.matmul_tflops[dtype] * 1e12) if flops else 0.0
    t_mem = nbytes / (peaks.copy_gbps * 1e9) if nbytes else 0.0
    return max(t_math, t_mem) * 1e3


def describe(peaks: Peaks) -> str:
    """One line for a log: ``copy 3012 GB/s; matmul fp16 712, bf16 705, fp32 (TF32) 380 TFLOP/s``."""
    mm = ", ".join(f"{d}{' (TF32)' if d == 'fp32' and not peaks.device.startswith('cpu') else ''} {v:.3g}" for d, v in peaks.matmul_tflops.items())
    return f"measured on {peaks.device}: copy {peaks.copy_gbps:.4g} GB/s; matmul {mm} TFLOP/s"
