"""Inference latency of ResNet-50's block shapes and of the whole ResNet-50: eager vs fused.

    python -m benchmarks.bench_blocks [--out DIR] [--quick] [--device cuda|cpu] [--compile]

Question: how much faster is a fused block (conv + folded BN (+ residual) + ReLU per conv, one
kernel each) than the same block in eager PyTorch (cuDNN conv, BN, ReLU, add as separate kernels),
per distinct ResNet-50 block shape and for the whole network, in eval mode under ``torch.no_grad``?

GPU (full sizes): the first and a repeated block of each stage at 224x224 input (layer1 at 56x56,
layer2 entered from 56x56 with stride 2, layer3 from 28x28, layer4 from 14x14) and the whole
ResNet-50, batch 1 / 32 / 256, fp16 / bf16 / fp32 (fp32 with cuDNN's default TF32 on both sides),
channels_last. Providers: ``eager`` (the plain reference module), ``triton`` (the module converted
with ``resnet_fused.convert(backend="triton")``), ``cuda`` (converted with ``backend="cuda"``: the
compiled library, CUTLASS convs with our epilogue), ``compile`` (``torch.compile`` of the eager
module, with ``--compile``). ``--quick`` keeps batch 32 and 256 in fp16 only (about 3 minutes on an
H100 without the cuda provider; not yet measured with it).
Timing: CUDA events, CUDA-graph replay (``--no-graph`` for plain launches), rotation over input
copies larger than L2.

CPU (CI): TINY sizes so it finishes in seconds: channels / 16, 8x8 blocks, ResNet-50 at 32x32,
batch 1 and 2, fp32. Providers ``eager``, ``torch`` (our fused modules on the PyTorch path, BN
folded) and ``cuda`` (the compiled library's C++ kernels: oneDNN convs with our epilogue pass),
plus ``triton`` through Triton's interpreter for the blocks with ``--interpret`` (needs
``TRITON_INTERPRET=1`` in the environment before Python starts).

A backend provider that cannot run here (``cuda`` when the library is not built, failed to build
or has no CUDA kernels for a GPU run; see ``resnet_fused._ext``) is skipped with its reason:
printed, and recorded under ``"skipped"`` in the JSON and in the markdown notes.

Every provider is checked before it is timed: relative error against a float64 run of the same
module, bound by max(dtype floor, 4 x eager's error in the same dtype). A wrong (or failing)
provider is recorded with ``correct=false`` and no time. Results: a table on stdout and JSON + CSV
+ markdown under ``--out`` (default ``benchmarks/results``) via :mod:`benchmarks.common`.
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import traceback
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

import resnet_fused
from resnet_fused.models import reference

from . import common

BENCH = "blocks"


@dataclass(frozen=True)
class BlockSpec:
    """A Bottleneck as ResNet-50 builds it: ``name`` is its qualified name in the model."""

    name: str
    inplanes: int
    planes: int
    stride: int
    hw: int  # input height = width

    @property
    def has_downsample(self) -> bool:
        return self.stride != 1 or self.inplanes != self.planes * reference.Bottleneck.expansion


# First and a repeated block of each stage, input sizes at 224x224.
RESNET50_BLOCKS: Tuple[BlockSpec, ...] = (
    BlockSpec("layer1.0", 64, 64, 1, 56), BlockSpec("layer1.1", 256, 64, 1, 56),
    BlockSpec("layer2.0", 256, 128, 2, 56), BlockSpec("layer2.1", 512, 128, 1, 28),
    BlockSpec("layer3.0", 512, 256, 2, 28), BlockSpec("layer3.1", 1024, 256, 1, 14),
    BlockSpec("layer4.0", 1024, 512, 2, 14), BlockSpec("layer4.1", 2048, 512, 1, 7),
)


def tiny(spec: BlockSpec, div: int = 16, hw: int = 8) -> BlockSpec:
    """The same block with channels / ``div`` and an ``hw`` x ``hw`` input (CPU smoke runs)."""
    return BlockSpec(spec.name, max(1, spec.inplanes // div), max(1, spec.planes // div), spec.stride, hw)


@dataclass(frozen=True)
class Case:
    """One thing to time: a block or the whole model, its per-image input shape and label."""

    model: str  # "resnet50.layer1.0" or "resnet50"
    build: Callable[[], nn.Module]
    chw: Tuple[int, int, int]


def randomize_bn(module: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial BN affine parameters and running statistics (so folding is not an identity)."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                if m.weight is not None:
                    m.weight.copy_(torch.rand(c, generator=gen) * 0.5 + 0.5)
                    m.bias.copy_(torch.randn(c, generator=gen) * 0.2)
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)


def calibrate_bn(model: nn.Module, chw: Tuple[int, int, int], gen: torch.Generator, batch: int = 4) -> None:
    """Running statistics of a whole (randomly initialised) network from one train-mode batch.

    Random running statistics in a 16-block network blow activations up (fp16 overflows); stats
    measured on random data keep them O(1) and are still far from the identity. Affine
    parameters are randomised first.
    """
    randomize_bn(model, gen)
    saved = {}
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            saved[m] = m.momentum
            m.momentum = 1.0
    model.train()
    with torch.no_grad():
        model(torch.randn(batch, *chw, generator=gen))
    for m, mom in saved.items():
        m.momentum = mom
    model.eval()


def block_case(spec: BlockSpec, seed: int) -> Case:
    def build() -> nn.Module:
        torch.manual_seed(seed)
        down = None
        out = spec.planes * reference.Bottleneck.expansion
        if spec.has_downsample:
            down = nn.Sequential(reference.conv1x1(spec.inplanes, out, spec.stride), nn.BatchNorm2d(out))
        block = reference.Bottleneck(spec.inplanes, spec.planes, spec.stride, down)
        randomize_bn(block, torch.Generator().manual_seed(seed))
        return block.eval()

    return Case(f"resnet50.{spec.name}", build, (spec.inplanes, spec.hw, spec.hw))


def model_case(size: int, seed: int) -> Case:
    def build() -> nn.Module:
        torch.manual_seed(seed)
        model = reference.resnet50()
        calibrate_bn(model, (3, size, size), torch.Generator().manual_seed(seed))
        return model

    return Case("resnet50", build, (3, size, size))


# ------------------------------------------------------------------------------------- providers
def make_provider(name: str, eager: nn.Module) -> nn.Module:
    """The module ``name`` runs: eager itself, a converted deep copy, or torch.compile of a copy."""
    if name == "eager":
        return eager
    if name == "compile":
        return torch.compile(copy.deepcopy(eager))
    if name in ("triton", "torch", "cuda"):
        return resnet_fused.convert(copy.deepcopy(eager), backend=name)
    raise ValueError(f"provider: expected eager, compile, triton, torch or cuda, got {name!r}")


@dataclass
class Config:
    device: torch.device
    batches: Sequence[int]
    dtypes: Sequence[str]
    providers: Sequence[str]
    block_providers: Sequence[str]  # providers for blocks (the interpreter runs blocks only)
    cases: Sequence[Case]
    cuda_graph: bool
    timing: dict
    skipped: Dict[str, str] = field(default_factory=dict)  # provider -> why it cannot run here


def run_case(case: Case, batch: int, dtype: str, cfg: Config, rows: List[dict], errs: Dict) -> None:
    """Check, then time, every provider on one (case, batch, dtype); append rows and errors."""
    dev, dt = cfg.device, common.DTYPES[dtype]
    fmt = torch.channels_last
    base = case.build()
    gen = torch.Generator().manual_seed(1234 + batch)
    x64 = torch.randn(batch, *case.chw, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        ref64 = copy.deepcopy(base).to(dev).double()(x64.to(dev))
        eager = base.to(dev, dt).to(memory_format=fmt)
        x = x64.to(dev, dt).contiguous(memory_format=fmt)
        eager_out = eager(x.clone())
    providers = cfg.providers if case.model == "resnet50" else cfg.block_providers
    n_copies = common.rotation_copies(x.numel() * x.element_size(), common.cache_bytes(dev),
                                      max_copies=32 if dev.type == "cuda" else 2)
    inputs = [(torch.randn(x.shape, dtype=dt, device=dev).contiguous(memory_format=fmt),) for _ in range(n_copies)]
    shape = "x".join(str(s) for s in case.chw)
    for prov in providers:
        timing, peak, ok = None, None, False
        try:
            mod = make_provider(prov, eager)
            with torch.no_grad():
                out = mod(x.clone())
            chk = common.check_output(out, ref64, eager_out, dtype)
            ok = chk.ok
            errs[(case.model, batch, dtype, prov)] = chk
            if ok:
                def fn(inp, _m=mod):
                    with torch.no_grad():
                        return _m(inp)
                opts = cfg.timing
                if prov == "triton" and dev.type == "cpu":  # the interpreter: a few calls say enough
                    opts = dict(warmup=0, min_reps=3, max_reps=3, budget_s=0.0)
                timing, _ = common.benchmark_graph_or_plain(fn, inputs, dev, cfg.cuda_graph,
                                                            f"{case.model} b{batch} {dtype} {prov}", **opts)
                peak = common.peak_mem_mb(fn, inputs[0], dev)
            else:
                print(f"  WRONG {case.model} b{batch} {dtype} {prov}: rel err {chk.err:.3e} > bound "
                      f"{chk.bound:.3e}; not timed", file=sys.stderr)
        except Exception as exc:
            ok, timing = False, None
            errs[(case.model, batch, dtype, prov)] = None
            print(f"  FAILED {case.model} b{batch} {dtype} {prov}: {type(exc).__name__}: {exc}", file=sys.stderr)
            traceback.print_exc(limit=3)
        rows.append(common.make_row(bench=BENCH, model=case.model, shape=shape, batch=batch, dtype=dtype,
                                    mode="infer", provider=prov, timing=timing, peak_mem_mb=peak, correct=ok))
    del base, eager, ref64, inputs
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def summary_table(rows: List[dict], errs: Dict, providers: Sequence[str]) -> Tuple[List[str], List[list]]:
    """(headers, lines), one line per (model, batch, dtype): eager ms, then each provider's ms,
    speedup and error."""
    others = [p for p in providers if p != "eager"]
    headers = ["model", "shape", "batch", "dtype", "eager ms"]
    for p in others:
        headers += [f"{p} ms", f"eager/{p}", f"{p} err"]
    headers += ["eager err"]
    by_key: Dict[tuple, Dict[str, dict]] = {}
    for r in rows:
        by_key.setdefault((r["model"], r["shape"], r["batch"], r["dtype"]), {})[r["provider"]] = r
    lines = []
    for (model, shape, batch, dtype), prov in by_key.items():
        e = prov.get("eager", {})
        e_ms = e.get("median_ms")
        line = [model, shape, batch, dtype, common.fmt_ms(e_ms)]
        for p in others:
            r = prov.get(p)
            if r is None:
                line += ["", "", ""]
                continue
            chk = errs.get((model, batch, dtype, p))
            if not r["correct"]:
                line += ["-", "WRONG" if chk is not None else "FAILED", _err(chk.err if chk else None)]
                continue
            ratio = e_ms / r["median_ms"] if e_ms and r["median_ms"] else None
            line += [common.fmt_ms(r["median_ms"]), "" if ratio is None else f"{ratio:.2f}x",
                     _err(chk.err if chk else None)]
        chk_e = next((errs.get((model, batch, dtype, p)) for p in others if errs.get((model, batch, dtype, p))), None)
        line.append(_err(chk_e.eager_err if chk_e else None))
        lines.append(line)
    return headers, lines


def _err(v: Optional[float]) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.1e}"


# ------------------------------------------------------------------------------------------- CLI
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = common.base_parser("python -m benchmarks.bench_blocks", __doc__, providers=common.PROVIDERS,
                           quick_help="GPU: batch 32 and 256, fp16 only (~3 min on an H100)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile of the eager module")
    p.add_argument("--interpret", action="store_true",
                   help="CPU: also run the Triton kernels through the interpreter (needs TRITON_INTERPRET=1)")
    p.add_argument("--no-graph", action="store_true", help="GPU: time plain launches, not CUDA-graph replays")
    p.add_argument("--batches", type=int, nargs="+", default=None, help="override the batch sizes")
    p.add_argument("--blocks", nargs="+", choices=[b.name for b in RESNET50_BLOCKS], default=None,
                   help="only these blocks (default: all eight)")
    p.add_argument("--no-model", action="store_true", help="skip the whole ResNet-50")
    return p.parse_args(argv)


def make_config(args: argparse.Namespace) -> Config:
    dev = common.pick_device(args.device)
    if dev.type == "cuda":
        batches = [32, 256] if args.quick else [1, 32, 256]
        dtypes = ["fp16"] if args.quick else ["fp16", "bf16", "fp32"]
        providers = ["eager", "triton", "cuda"]
        cases = [block_case(s, seed=i) for i, s in enumerate(RESNET50_BLOCKS)]
        size = 224
        timing = dict(warmup_ms=10.0, rep_ms=50.0) if args.quick else dict(warmup_ms=25.0, rep_ms=100.0)
    else:
        batches, dtypes = [1, 2], ["fp32"]
        providers = ["eager", "torch", "cuda"]  # cuda: the library's C++ kernels, where it loads
        cases = [block_case(tiny(s), seed=i) for i, s in enumerate(RESNET50_BLOCKS)]
        size = 32
        timing = dict(warmup=2, min_reps=10, max_reps=200, budget_s=0.1)
    providers = common.order_providers(args.providers, providers, "eager")
    if args.compile and "compile" not in providers:
        providers.append("compile")
    skipped: Dict[str, str] = {}
    providers = common.drop_unavailable(providers, dev, skipped)
    if args.blocks:
        cases = [c for c in cases if c.model.split(".", 1)[-1] in args.blocks]
    block_providers = list(providers)
    if args.interpret:
        if dev.type != "cpu":
            raise SystemExit("--interpret: the Triton interpreter is for CPU runs (--device cpu)")
        if not common.env_flag("TRITON_INTERPRET"):
            raise SystemExit("--interpret: set TRITON_INTERPRET=1 in the environment before starting Python")
        if "triton" not in block_providers:
            block_providers.append("triton")
    if not args.no_model:
        cases.append(model_case(size, seed=100))
    return Config(dev, args.batches or batches, args.dtypes or dtypes, providers, block_providers, cases,
                  cuda_graph=dev.type == "cuda" and not args.no_graph, timing=timing, skipped=skipped)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    cfg = make_config(args)
    env = common.env_info(cfg.device)
    print(common.banner("bench_blocks", env))
    print(f"batches {list(cfg.batches)}, dtypes {list(cfg.dtypes)}, providers {list(cfg.block_providers)}"
          f"{' (model: ' + str(list(cfg.providers)) + ')' if cfg.block_providers != cfg.providers else ''}, "
          f"channels_last, {'CUDA graphs' if cfg.cuda_graph else 'no graphs'}", flush=True)
    common.print_skipped(cfg.skipped)
    rows: List[dict] = []
    errs: Dict = {}
    for case in cfg.cases:
        for dtype in cfg.dtypes:
            for batch in cfg.batches:
                run_case(case, batch, dtype, cfg, rows, errs)
    headers, lines = summary_table(rows, errs, cfg.block_providers)
    print(common.format_table(headers, lines))
    common.print_skipped(cfg.skipped)
    title = f"bench_blocks: eval latency, {env['gpu']}"
    return common.finish(rows, args.out, BENCH, env, write=not args.no_write, skipped=cfg.skipped,
                         markdown=(title, headers, lines))


if __name__ == "__main__":
    sys.exit(main())
