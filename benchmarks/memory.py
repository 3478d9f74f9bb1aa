"""Activation memory autograd keeps for one training step: eager vs fused vs fused low-memory.

    python -m benchmarks.memory [--out DIR] [--quick] [--no-write]

Question: how many bytes of activations does a training forward leave saved for the backward,
with stock PyTorch blocks (``resnet_fused.models.reference``) and with our fused blocks (default
and :func:`resnet_fused.use_low_memory` mode)? That is most of a ResNet's peak training memory at
real batch sizes, and what the fused chain is designed to cut (normalised activations and ReLU
outputs are recomputed in the backward instead of kept).

Method: the forward runs under ``FakeTensorMode`` (shapes, dtypes and strides only: no kernel
runs, so this works on any machine and at full size), with ``torch.autograd.graph.
saved_tensors_hooks`` recording every tensor autograd saves. Distinct storages whose tensors carry
the batch dimension are summed (activations; weights and per-channel vectors excluded). The fused
blocks take their Triton training path (its custom ops have fake implementations). Under AMP the
CPU autocast runs in the chosen dtype, as CUDA autocast would.

What this is not: the GPU's peak allocation, which adds parameters, gradients, optimizer state,
workspaces and the backward's transient buffers. ``tests/test_gpu_train.py`` measures that peak on
the GPU. Results: a table on stdout, and JSON + CSV under ``--out`` (default ``benchmarks/results``)
named ``<date>_<device>_<commit>_memory``, rows
``{"model", "batch", "image", "dtype", "layout", "provider", "saved_activation_mib", "vs_eager"}``.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, List, Optional

os.environ.setdefault("TRITON_INTERPRET", "1")  # the fused path needs a Triton backend for CPU tensors;
                                                # no kernel runs under FakeTensorMode

import torch  # noqa: E402

import resnet_fused as rf  # noqa: E402
from resnet_fused.models import reference  # noqa: E402

from . import common  # noqa: E402

BENCH = "memory"
PROVIDERS = ("eager", "triton", "triton-low-memory")
KEYS = ("model", "batch", "image", "dtype", "layout", "provider", "saved_activation_mib", "vs_eager")

# name: (stock factory, fused factory, image size)
MODELS: Dict[str, tuple] = {
    "resnet50": (reference.resnet50, rf.models.resnet50, 224),
    "resnet18": (reference.resnet18, rf.models.resnet18, 224),
    "wrn-28-10": (lambda: reference.ref_wrn(28, 10), lambda: rf.models.wrn(28, 10), 32),
}
# (model, batch, dtype); the first is the fused-training memory goal's configuration
CASES = [("resnet50", 64, "fp16"), ("resnet50", 256, "fp16"), ("wrn-28-10", 128, "fp16"),
         ("wrn-28-10", 128, "fp32"), ("resnet18", 64, "fp16")]
QUICK = CASES[:1] + [("wrn-28-10", 128, "fp16")]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def saved_activation_bytes(model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype) -> int:
    """Bytes of distinct storages autograd saves, among tensors with x's batch dimension."""
    seen: Dict[int, int] = {}

    def pack(t):
        if t.dim() >= 1 and t.shape[0] == x.shape[0]:
            seen[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return t

    amp = torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)
    with amp, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(seen.values())


def measure(model_name: str, batch: int, dtype_name: str, layout: str = "channels_last") -> List[dict]:
    from torch._subclasses.fake_tensor import FakeTensorMode

    make_stock, make_fused, image = MODELS[model_name]
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    stock = make_stock().train().to(memory_format=fmt)
    fused = make_fused().train().to(memory_format=fmt)
    fused.load_state_dict(stock.state_dict())
    dtype = DTYPES[dtype_name]
    sizes: Dict[str, int] = {}
    # real (small) parameters, fake activations: nothing of batch size is ever allocated
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty(batch, 3, image, image).contiguous(memory_format=fmt)
        with rf.use_backend("torch"):
            sizes["eager"] = saved_activation_bytes(stock, x, dtype)
        with rf.use_backend("triton"):
            sizes["triton"] = saved_activation_bytes(fused, x, dtype)
            with rf.use_low_memory():
                sizes["triton-low-memory"] = saved_activation_bytes(fused, x, dtype)
    return [dict(zip(KEYS, (model_name, batch, image, dtype_name, layout, p, round(sizes[p] / 2**20, 1),
                            round(sizes[p] / sizes["eager"], 4)))) for p in PROVIDERS]


def main(argv: Optional[List[str]] = None, cases: Optional[list] = None,
         log: Callable[[str], None] = print) -> List[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(common.RESULTS_DIR))
    ap.add_argument("--quick", action="store_true", help="ResNet-50 b64 fp16 and WRN-28-10 b128 fp16 only")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    rows: List[dict] = []
    for case in cases if cases is not None else (QUICK if args.quick else CASES):
        rows += measure(*case)
    table = [[r["model"], r["batch"], r["dtype"], r["provider"], r["saved_activation_mib"], f'{r["vs_eager"]:.3f}x']
             for r in rows]
    log(common.format_table(["model", "batch", "dtype", "provider", "saved MiB", "vs eager"], table,
                            title="activations saved for the backward (channels_last, training mode)"))
    if not args.no_write:
        env = common.env_info(torch.device("cpu"))
        paths = common.write_results(args.out, BENCH, env, rows, keys=KEYS, extra={
            "method": "saved tensors under FakeTensorMode; see benchmarks/memory.py"})
        log("wrote " + ", ".join(str(p) for p in paths))
    return rows


if __name__ == "__main__":
    main()
    sys.exit(0)
