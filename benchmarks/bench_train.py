"""Training-step time and memory: fused blocks (Triton, CUDA library) vs eager cuDNN vs torch.compile.

    python -m benchmarks.bench_train [--out DIR] [--quick] [--device cuda|cpu] [--no-compile]

Question: how fast is one training step (forward + backward + SGD update, momentum 0.9) with the
fused training blocks (:mod:`resnet_fused.ops.block_train`: one autograd Function per residual
block) compared with the same network in eager PyTorch (cuDNN convs, BN, ReLU, add as separate
kernels) and with ``torch.compile`` of the eager network, and how much memory does the step take?

GPU (full sizes, channels_last): the first and a repeated Bottleneck of each ResNet-50 stage at
224x224 input (the eight shapes of bench_blocks) at batch 256; the whole ResNet-50 at 224x224,
batch 256; WRN-28-10 (``wrn(28, 10)``) at 32x32, batch 128. fp16 means AMP: ``torch.autocast``
float16 around the forward and the loss, fp32 master weights, and no GradScaler: the whole models
use a static loss scale of 1024 with the learning rate divided by 1024 (the same update as
unscaled SGD, no inf check, no host sync; the largest unscaled gradient, ResNet-50's stem conv
weight, measured about 8 at batch 16 and 224x224 on CPU: 8k scaled, under fp16's 65504, while the
activation gradients, ~1e-7 unscaled at batch 256, leave fp16's subnormal range); a block gets a
fixed random unit-variance output gradient instead of a loss. fp32 (WRN-28-10 only) runs without autocast, with PyTorch's default
TF32 convolutions. ``cudnn.benchmark`` is on for every provider (``--no-cudnn-benchmark``: off).
``--quick``: blocks layer1.1 and layer2.0, ResNet-50 and WRN-28-10, fp16 only (meant to finish in
under 3 minutes on an H100 including compile; not yet measured).

Providers: ``eager`` (the plain reference network of :mod:`resnet_fused.models.reference`),
``triton`` (our network with the same state_dict, backend pinned to "triton"), ``cuda`` (the same
with the backend pinned to "cuda": the compiled library's kernels in the fused training blocks;
skipped with its reason, printed and recorded under ``"skipped"`` in the JSON, where the library
is unavailable or has no CUDA kernels), ``compile``
(``torch.compile`` of a copy of the eager network, default mode; ``--no-compile`` drops it). Its
compile time (the wall time of its first step, compile included) cannot be a result-file column
(:data:`benchmarks.common.ROW_KEYS` is fixed) and is printed in the log and the summary table.
Optional: ``torch`` (our network on the PyTorch path: module by module when training) and
``auto`` (our network with ``backend="auto"``: the measured dispatch picks, per block, between the
block's own modules and the fused chains; its first step, the checked one, measures every block
shape, so the timed steps measure nothing; the dispatch starts clean for each case and reads and
writes no decision file; the JSON's ``"dispatch"`` holds each case's decisions,
:func:`dispatch_list`).
``eager`` and ``triton`` run first for every case; ``compile`` runs after all of them (whole models
first), so a run cut short by a timeout keeps the fused-vs-eager answer (results are rewritten after
every case; ``--quick`` starts no provider later than 150 s after the start: ``--deadline``).

Correctness before timing: every provider takes one step from the same state on the same batch;
its output, loss (whole models) or input gradient (blocks), a few parameter gradients and
BatchNorm running statistics are compared with a reference step: float64 on CPU and for fp32 runs,
float32 with TF32 off for fp16 runs on the GPU (a float64 ResNet-50 at batch 256 does not fit beside
the rest). Each relative error must be within max(dtype floor, 4 x eager's error in the same dtype)
(:func:`benchmarks.common.check_output`); for whole models eager's error is the larger of two
eager steps (channels_last and NCHW), since a deep network's gradient error is dominated by a few
ReLU inputs within rounding of 0 and one sample can sit far below its typical size. A wrong or
failing provider gets ``correct=false`` and no time. The log also says how many fused training blocks ran per step (0 for triton would mean the
fused path was not taken).

Timing: CUDA events per step after 7 untimed steps (the harness's first call, its 5-step estimate
and 1 warm-up), 20 timed steps (``--reps``), median with the 20th/80th percentiles, the same input copies
for every provider, providers one after another; no CUDA graphs. ``peak_mem_mb``: the most CUDA
memory allocated during the timed steps minus what was allocated just before them (parameters,
momentum buffers and inputs excluded: activations, gradients, workspaces and temporaries).

CPU (CI): tiny sizes: Bottlenecks layer1.1 and layer2.0 with channels / 16 at 8x8, and WRN-10-1 at
8x8 (through Triton's interpreter one WRN-10-1 step takes about 3 s at 8x8, 6 s at 16x16, 20 s at
32x32), batch 2, fp32, providers ``eager``, ``triton`` (the kernels through the interpreter:
needs ``TRITON_INTERPRET=1`` in the environment before Python starts, else triton is skipped with
a note) and ``cuda`` (the library's C++ kernels, where it loads). Results: a table on stdout and
JSON + CSV + markdown under ``--out`` (default ``benchmarks/results``) via
:func:`benchmarks.common.write_results`.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import math
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import resnet_fused
from resnet_fused.models import reference

from . import common
from .bench_blocks import RESNET50_BLOCKS, BlockSpec, randomize_bn, tiny

BENCH = "train"
TRAIN_PROVIDERS = ("eager", "triton", "cuda", "auto", "compile", "torch")
LATE_PROVIDERS = ("compile",)  # run after every other provider of every case
MOMENTUM = 0.9
LR_MODEL = 1e-2  # effective learning rate (before dividing by the loss scale)
LR_BLOCK = 1e-3
FP16_LOSS_SCALE = 1024.0
FACTOR = 4.0  # a provider's error may be this many times eager's (common.check_output)
QUICK_BLOCKS = ("layer1.1", "layer2.0")  # identity shortcut at 56x56; stride 2 with projection
QUICK_DEADLINE_S = 150.0  # --quick: no provider starts later than this after the process began
_T0 = time.monotonic()


# ------------------------------------------------------------------------------------------ cases
@dataclass(frozen=True)
class Case:
    """One network to train: a block or a whole model.

    ``build_ref()``: the plain reference module (float32, CPU, seeded: every call gives the same
    state). ``build_ours(backend)``: our module of the same architecture (state loaded from the
    reference by the caller). ``probes``: parameters whose gradients are checked; ``buffers``: BN
    buffers checked after the step. Blocks: ``out_chw`` is the output per image (the upstream
    gradient's shape); models: ``num_classes`` for the random targets.
    """

    name: str
    kind: str  # "block" | "model"
    chw: Tuple[int, int, int]
    build_ref: Callable[[], nn.Module]
    build_ours: Callable[[str], nn.Module]
    probes: Tuple[str, ...]
    buffers: Tuple[str, ...]
    out_chw: Optional[Tuple[int, int, int]] = None
    num_classes: int = 0


@dataclass(frozen=True)
class Job:
    case: Case
    batch: int
    dtype: str

    @property
    def key(self) -> tuple:
        return (self.case.name, self.batch, self.dtype)

    def label(self) -> str:
        return f"{self.case.name} b{self.batch} {self.dtype}"


def block_case(spec: BlockSpec, seed: int) -> Case:
    """A ResNet-50 Bottleneck (reference vs ``resnet_fused.Bottleneck``), random BN state."""
    out_c = spec.planes * reference.Bottleneck.expansion
    out_hw = (spec.hw - 1) // spec.stride + 1  # the 3x3, padding 1, carries the stride

    def make(cls) -> nn.Module:
        torch.manual_seed(seed)
        down = None
        if spec.has_downsample:
            down = nn.Sequential(reference.conv1x1(spec.inplanes, out_c, spec.stride), nn.BatchNorm2d(out_c))
        return cls(spec.inplanes, spec.planes, spec.stride, down)

    def build_ref() -> nn.Module:
        block = make(reference.Bottleneck)
        randomize_bn(block, torch.Generator().manual_seed(seed))
        return block

    def build_ours(backend: str) -> nn.Module:
        block = make(resnet_fused.Bottleneck)
        block.backend = backend
        return block

    probes = ("conv1.weight", "conv2.weight", "conv3.weight", "bn1.weight", "bn3.bias")
    if spec.has_downsample:
        probes += ("downsample.0.weight", "downsample.1.weight")
    return Case(f"resnet50.{spec.name}", "block", (spec.inplanes, spec.hw, spec.hw), build_ref, build_ours, probes,
                ("bn1.running_mean", "bn3.running_var"), out_chw=(out_c, out_hw, out_hw))


def resnet50_case(size: int, seed: int) -> Case:
    def build_ref() -> nn.Module:
        torch.manual_seed(seed)
        model = reference.resnet50()
        randomize_bn(model, torch.Generator().manual_seed(seed))
        return model

    return Case("resnet50", "model", (3, size, size), build_ref, lambda b: resnet_fused.models.resnet50(backend=b),
                ("conv1.weight", "layer1.0.conv1.weight", "layer2.0.downsample.0.weight", "layer3.5.bn3.weight",
                 "layer4.2.conv3.weight", "fc.weight"),
                ("bn1.running_mean", "layer1.0.bn2.running_var", "layer4.2.bn3.running_var"), num_classes=1000)


def wrn_case(depth: int, k: int, size: int, seed: int) -> Case:
    n = (depth - 4) // 6  # blocks per group

    def build_ref() -> nn.Module:
        torch.manual_seed(seed)
        model = reference.ref_wrn(depth, k)
        randomize_bn(model, torch.Generator().manual_seed(seed))
        return model

    return Case(f"wrn{depth}-{k}", "model", (3, size, size), build_ref,
                lambda b: resnet_fused.models.wrn(depth, k, backend=b),
                ("conv1.weight", "layer1.0.bn1.weight", "layer1.0.conv1.weight", "layer2.0.shortcut.weight",
                 f"layer3.{n - 1}.conv2.weight", "bn.weight", "fc.weight"),
                ("layer1.0.bn1.running_mean", "layer1.0.bn2.running_var", f"layer3.{n - 1}.bn2.running_var",
                 "bn.running_mean"),  # after the last block: a pre-activation net's next BN hides a block's scale error
                num_classes=10)


def _spec(name: str) -> BlockSpec:
    return next(s for s in RESNET50_BLOCKS if s.name == name)


def gpu_jobs(quick: bool) -> List[Job]:
    blocks = [_spec(n) for n in QUICK_BLOCKS] if quick else list(RESNET50_BLOCKS)
    jobs = [Job(block_case(s, seed=i), 256, "fp16") for i, s in enumerate(blocks)]
    jobs.append(Job(resnet50_case(224, seed=100), 256, "fp16"))
    wrn = wrn_case(28, 10, 32, seed=200)
    jobs += [Job(wrn, 128, d) for d in (("fp16",) if quick else ("fp16", "fp32"))]
    return jobs


def cpu_jobs() -> List[Job]:
    jobs = [Job(block_case(tiny(_spec(n), hw=8), seed=i), 2, "fp32") for i, n in enumerate(QUICK_BLOCKS)]
    jobs.append(Job(wrn_case(10, 1, 8, seed=200), 2, "fp32"))
    return jobs


# -------------------------------------------------------------------------------------- numerics
@contextlib.contextmanager
def strict_fp32():
    """TF32 off for cuDNN convolutions and cuBLAS matmuls (the float32 reference), restored after.

    Uses the legacy switches (they set cuDNN's conv and RNN flags together); only those that are on
    are changed. Where they cannot be read (the new per-operator API was used with different conv
    and RNN settings), the per-operator conv and matmul settings are switched instead.
    """
    changed = []
    try:
        try:
            switches = [(torch.backends.cudnn, "allow_tf32", False), (torch.backends.cuda.matmul, "allow_tf32", False)]
            old = [getattr(o, a) for o, a, _ in switches]
        except RuntimeError:
            switches = [(torch.backends.cudnn.conv, "fp32_precision", "ieee"),
                        (torch.backends.cuda.matmul, "fp32_precision", "ieee")]
            old = [getattr(o, a) for o, a, _ in switches]
        for (owner, attr, off), was in zip(switches, old):
            if was != off:
                setattr(owner, attr, off)
                changed.append((owner, attr, was))
        yield
    finally:
        for owner, attr, was in reversed(changed):
            setattr(owner, attr, was)


def ref_dtype(device: torch.device, dtype: str) -> torch.dtype:
    """float64 on CPU and for fp32 runs; float32 (TF32 off) for AMP runs on the GPU."""
    return torch.float32 if device.type == "cuda" and dtype != "fp32" else torch.float64


def loss_scale(dtype: str) -> float:
    return FP16_LOSS_SCALE if dtype == "fp16" else 1.0


def autocast(device: torch.device, dtype: str):
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=common.DTYPES[dtype])


def collect(case: Case, module: nn.Module, out: torch.Tensor, loss: Optional[torch.Tensor],
            x: torch.Tensor) -> Dict[str, Optional[torch.Tensor]]:
    """What a step is judged by: output, loss (models) or input gradient (blocks), the probe
    parameters' gradients and the probe BN buffers (None where missing)."""
    params = dict(module.named_parameters())
    bufs = dict(module.named_buffers())
    q: Dict[str, Optional[torch.Tensor]] = {"out": out.detach()}
    if case.kind == "model":
        q["loss"] = None if loss is None else loss.detach()
    else:
        q["dx"] = None if x.grad is None else x.grad.detach().clone()
    for name in case.probes:
        g = params[name].grad if name in params else None
        q[f"grad {name}"] = None if g is None else g.detach().clone()
    for name in case.buffers:
        b = bufs.get(name)
        q[name] = None if b is None else b.detach().clone()
    return q


@dataclass
class Verdict:
    """A provider's check: every quantity's Check, the worst err / bound and its quantity."""

    checks: Dict[str, common.Check]
    ok: bool
    worst: float
    worst_key: str


def judge(q: Dict[str, Optional[torch.Tensor]], ref: Dict[str, torch.Tensor], eager, dtype: str) -> Verdict:
    """Each quantity of ``q`` against ``ref`` within max(floor, FACTOR x eager's error); ``eager``:
    eager's quantities (a dict), or several eager samples (a list of dicts: the largest error)."""
    checks: Dict[str, common.Check] = {}
    samples = [] if eager is None else ([eager] if isinstance(eager, dict) else list(eager))
    for key, r in ref.items():
        got = q.get(key)
        e = [s.get(key) for s in samples] or None
        if got is None:
            checks[key] = common.Check(math.inf, math.nan, common.FLOOR[dtype], False)
        else:
            checks[key] = common.check_output(got, r, e, dtype, factor=FACTOR)
    ratios = {k: (c.err / c.bound if c.bound > 0 else math.inf) for k, c in checks.items()}
    worst_key = max(ratios, key=lambda k: ratios[k]) if ratios else ""
    return Verdict(checks, all(c.ok for c in checks.values()), ratios.get(worst_key, math.nan), worst_key)


@contextlib.contextmanager
def count_fused_blocks():
    """Counts the fused training block forwards (``resnet_fused.modules._base.run_block_train``,
    which every block calls through its module) while the context is open."""
    from resnet_fused.modules import _base

    calls: List[int] = []
    real = _base.run_block_train

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    _base.run_block_train = spy
    try:
        yield calls
    finally:
        _base.run_block_train = real


# ---------------------------------------------------------------------------------------- a step
def make_step(fwd: Callable, opt: torch.optim.Optimizer, case: Case, device: torch.device, dtype: str) -> Callable:
    """One training step ``step(x, target) -> (out, loss)``: zero grads, forward (under autocast
    for fp16/bf16), loss (models: cross-entropy, times the static loss scale) or the given output
    gradient (blocks), backward, SGD update."""
    scale = loss_scale(dtype)
    block = case.kind == "block"

    def step(x: torch.Tensor, target: torch.Tensor):
        opt.zero_grad(set_to_none=True)
        if block:
            x.grad = None
        with autocast(device, dtype):
            out = fwd(x)
            loss = None if block else F.cross_entropy(out, target)
        if block:
            out.backward(target)
        else:
            (loss * scale if scale != 1.0 else loss).backward()
        opt.step()
        return out, loss

    return step


def build_provider(name: str, case: Case, base: nn.Module, device: torch.device, dtype: str,
                   memory_format: torch.memory_format = torch.channels_last
                   ) -> Tuple[nn.Module, Callable, torch.optim.Optimizer]:
    """(module holding the parameters, callable to run, optimizer) for provider ``name``, from a
    copy of ``base``'s state; on ``device``, in ``memory_format``, training mode. The learning rate
    is divided by the loss scale of ``dtype`` (the same update as unscaled SGD)."""
    if name in ("eager", "compile"):
        module = copy.deepcopy(base)
    elif name in ("triton", "cuda", "torch", "auto"):
        module = case.build_ours(name)
        module.load_state_dict(base.state_dict(), strict=True)
    else:
        raise ValueError(f"provider: expected one of {TRAIN_PROVIDERS}, got {name!r}")
    module = module.to(device).to(memory_format=memory_format).train()
    fwd = torch.compile(module) if name == "compile" else module
    lr = LR_BLOCK if case.kind == "block" else LR_MODEL / loss_scale(dtype)  # blocks: no loss, no scale
    opt = torch.optim.SGD(module.parameters(), lr=lr, momentum=MOMENTUM)
    return module, fwd, opt


def eager_sample_nchw(case: Case, base: nn.Module, device: torch.device, dtype: str, x: torch.Tensor,
                      target: torch.Tensor) -> Dict[str, Optional[torch.Tensor]]:
    """What one eager step from ``base``'s state computes with the model and input in NCHW: a
    second sample of eager's error for :func:`judge` (models only)."""
    module, fwd, opt = build_provider("eager", case, base, device, dtype, memory_format=torch.contiguous_format)
    xc = x.detach().contiguous()
    out, loss = make_step(fwd, opt, case, device, dtype)(xc, target)
    q = collect(case, module, out, loss, xc)
    del module, fwd, opt, out, loss
    return q


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------ a job
@dataclass
class Config:
    device: torch.device
    jobs: Sequence[Job]
    providers: Sequence[str]
    reps: int
    deadline: Optional[float]  # time.monotonic() after which no provider starts
    notes: List[str] = field(default_factory=list)
    skipped: Dict[str, str] = field(default_factory=dict)  # provider -> why it cannot run here


@dataclass
class Info:
    """What a row cannot hold: the check verdict, first-step seconds, fused blocks per step; for
    ``auto``, the dispatch decisions of its run (:func:`benchmarks.common.dispatch_record`)."""

    verdict: Optional[Verdict]
    first_s: Optional[float]
    fused: Optional[int]
    error: Optional[str] = None
    dispatch: Optional[dict] = None


def _past_deadline(cfg: Config) -> bool:
    return cfg.deadline is not None and time.monotonic() > cfg.deadline


def timing_opts(cfg: Config, provider: str) -> dict:
    if cfg.device.type == "cuda":
        # first call + 5 estimate calls + 1 warm-up call untimed, then exactly cfg.reps timed steps
        return dict(warmup_ms=0.0, rep_ms=0.0, min_reps=cfg.reps, max_reps=cfg.reps)
    if provider == "triton":  # the interpreter: the check step warmed it up, two steps say enough
        return dict(warmup=0, min_reps=2, max_reps=2, budget_s=0.0)
    return dict(warmup=2, min_reps=10, max_reps=50, budget_s=0.2)


def run_job(job: Job, providers: Sequence[str], cfg: Config, rows: List[dict], infos: Dict, *, bench: str = BENCH,
            row_extra: Optional[Callable[[Job, str, "Info"], dict]] = None) -> None:
    """Reference step, eager's check (always: it sets the bounds), then check and time each of
    ``providers``; append one row per provider run.

    Other benchmarks reuse this step harness: ``bench`` names their rows, and ``row_extra(job,
    provider, info)`` gives each row's extra columns (:data:`benchmarks.common.EXTRA_KEYS`, the
    same names for every row of a benchmark; e.g. ``compile_s`` from ``info.first_s``)."""
    case, dev = job.case, cfg.device
    dt = common.DTYPES[job.dtype]
    in_dt = dt if case.kind == "block" else torch.float32  # blocks take activations, models images
    cl = torch.channels_last
    shape = "x".join(str(s) for s in case.chw)
    if _past_deadline(cfg):
        for p in providers:
            print(f"  SKIPPED {job.label()} {p}: past the deadline", file=sys.stderr)
            cfg.notes.append(f"{job.label()} {p}: skipped (deadline)")
        return

    base = case.build_ref()
    # inputs: the same copies for every provider (and again for the late providers: seeded)
    gen = torch.Generator(device=dev).manual_seed(1000 + job.batch)
    x_bytes = job.batch * math.prod(case.chw) * torch.tensor([], dtype=in_dt).element_size()
    n_copies = common.rotation_copies(x_bytes, common.cache_bytes(dev), max_copies=4 if dev.type == "cuda" else 2)
    inputs = []
    for _ in range(n_copies):
        x = torch.randn(job.batch, *case.chw, generator=gen, device=dev).to(in_dt).contiguous(memory_format=cl)
        if case.kind == "block":
            x.requires_grad_(True)
            t = torch.randn(job.batch, *case.out_chw, generator=gen, device=dev).to(in_dt).contiguous(memory_format=cl)
        else:
            t = torch.randint(0, case.num_classes, (job.batch,), generator=gen, device=dev)
        inputs.append((x, t))
    x0, t0 = inputs[0]

    # reference step (no optimizer: the update is lr x the gradient)
    rdt = ref_dtype(dev, job.dtype)
    ref_q = None
    try:
        ref = copy.deepcopy(base).to(dev, rdt).to(memory_format=cl).train()
        xr = x0.detach().to(rdt).requires_grad_(case.kind == "block")
        with strict_fp32() if dev.type == "cuda" and rdt == torch.float32 else contextlib.nullcontext():
            out = ref(xr)
            if case.kind == "block":
                loss = None
                out.backward(t0.to(rdt))
            else:
                loss = F.cross_entropy(out, t0)
                (loss * loss_scale(job.dtype)).backward()
        ref_q = collect(case, ref, out, loss, xr)
        del ref, xr, out, loss
    except Exception as exc:
        print(f"  FAILED {job.label()} reference step ({rdt}): {type(exc).__name__}: {exc}", file=sys.stderr)
        traceback.print_exc(limit=3)
    _free(dev)

    eager_q = None
    order = ["eager"] + [p for p in providers if p != "eager"]
    for prov in order:
        timed = prov in providers
        if _past_deadline(cfg) and timed:
            print(f"  SKIPPED {job.label()} {prov}: past the deadline", file=sys.stderr)
            cfg.notes.append(f"{job.label()} {prov}: skipped (deadline)")
            continue
        timing, peak, ok, info = None, None, False, Info(None, None, None)
        module = fwd = opt = step = None
        try:
            if prov == "auto":
                common.dispatch_fresh()  # the first step below measures every block of the case
            if ref_q is None:
                raise RuntimeError("no reference step to check against")
            module, fwd, opt = build_provider(prov, case, base, dev, job.dtype)
            step = make_step(fwd, opt, case, dev, job.dtype)
            _sync(dev)
            with count_fused_blocks() as calls:
                tic = time.perf_counter()
                out, loss = step(x0, t0)
                _sync(dev)
                info.first_s = time.perf_counter() - tic
            # auto: the dispatch's trials ran fused blocks on copies too, so the count would mislead
            info.fused = None if prov == "auto" else len(calls)
            if prov == "auto":
                info.dispatch = common.dispatch_record()
            q = collect(case, module, out, loss, x0)
            del out, loss
            # eager is the baseline: its own error sets its bound (as in bench_blocks)
            verdict = judge(q, ref_q, q if prov == "eager" else eager_q, job.dtype)
            info.verdict, ok = verdict, verdict.ok
            if prov == "eager":
                eager_q = q
                if case.kind == "model":
                    # a whole network's deep gradients carry eager's error from a few ReLU inputs
                    # within rounding of 0; one sample can sit far below its typical size, so a
                    # second eager step (NCHW: other summation orders) measures eager's spread
                    eager_q = [q, eager_sample_nchw(case, base, dev, job.dtype, x0, t0)]
                    verdict = judge(q, ref_q, eager_q, job.dtype)
                    info.verdict, ok = verdict, verdict.ok
            del q
            opt.zero_grad(set_to_none=True)
            for x, _ in inputs:
                x.grad = None
            if ok and timed:
                _free(dev)
                _sync(dev)
                base_mem = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                timing = common.benchmark(step, inputs, dev, cuda_graph=False, **timing_opts(cfg, prov))
                if dev.type == "cuda":
                    _sync(dev)
                    peak = (torch.cuda.max_memory_allocated(dev) - base_mem) / 2**20
                if prov == "auto":
                    warm, info.dispatch = info.dispatch, common.dispatch_record()
                    late = common.dispatch_late(warm, info.dispatch)
                    if late is not None:
                        print(f"  note: {job.label()} {late}", file=sys.stderr)
                        cfg.notes.append(f"{job.label()}: {late}")
            elif not ok:
                c = verdict.checks[verdict.worst_key]
                print(f"  WRONG {job.label()} {prov}: {verdict.worst_key} rel err {c.err:.3e} > bound {c.bound:.3e}"
                      f" (eager {c.eager_err:.1e}); not timed", file=sys.stderr)
        except Exception as exc:
            ok, timing, peak = False, None, None
            info.error = f"{type(exc).__name__}: {exc}"
            print(f"  FAILED {job.label()} {prov}: {info.error}", file=sys.stderr)
            traceback.print_exc(limit=3)
            if prov == "auto":  # what the dispatch decided before it failed
                info.dispatch = common.dispatch_record()
        finally:
            module = fwd = opt = step = None  # this provider's model is freed before the next one is built
            for x, _ in inputs:
                x.grad = None
        if timed:
            infos[job.key + (prov,)] = info
            rows.append(common.make_row(bench=bench, model=case.name, shape=shape, batch=job.batch, dtype=job.dtype,
                                        mode="train_step", provider=prov, timing=timing, peak_mem_mb=peak, correct=ok,
                                        extra=row_extra(job, prov, info) if row_extra is not None else None))
            print("  " + provider_line(job, prov, rows[-1], info), flush=True)
        if prov == "compile":
            torch._dynamo.reset()
        _free(dev)
    del base, inputs, ref_q, eager_q
    _free(dev)


def _free(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def dispatch_list(rows: Sequence[dict], infos: Dict) -> List[dict]:
    """A result file's ``"dispatch"``: for each ``auto`` row, :func:`benchmarks.common.dispatch_entry`
    of the decisions :func:`run_job` kept for it (the row's model, shape, batch, dtype, mode, layout)."""
    out = []
    for r in rows:
        info = infos.get((r["model"], r["batch"], r["dtype"], r["provider"]))
        if r["provider"] == "auto" and info is not None and info.dispatch is not None:
            out.append(common.dispatch_entry(r, info.dispatch))
    return out


def provider_line(job: Job, prov: str, row: dict, info: Info) -> str:
    """One log line per provider: verdict, worst error, fused blocks, first step, time, memory."""
    parts = [f"{job.label()} {prov:<7}"]
    v = info.verdict
    if v is not None:
        c = v.checks[v.worst_key]
        parts.append(f"{'ok' if v.ok else 'WRONG'} (worst {v.worst_key}: err {c.err:.1e}, bound {c.bound:.1e})")
    else:
        parts.append(f"FAILED ({info.error})")
    if info.fused is not None:
        parts.append(f"fused blocks/step {info.fused}")
    if info.first_s is not None:
        parts.append(f"first step {info.first_s:.2f} s{' (dispatch measuring included)' if prov == 'auto' else ''}")
    if info.dispatch is not None:
        parts.append(common.auto_note(info.dispatch["decisions"]))
    if row["median_ms"] is not None:
        parts.append(f"{row['median_ms']:.3f} ms/step (p20 {row['p20_ms']:.3f}, p80 {row['p80_ms']:.3f})")
    if row["peak_mem_mb"] is not None:
        parts.append(f"peak +{row['peak_mem_mb']:.0f} MiB")
    return "; ".join(parts)


# ------------------------------------------------------------------------------------------ table
def summary_table(rows: List[dict], infos: Dict, providers: Sequence[str]) -> Tuple[List[str], List[list]]:
    """(headers, lines), one line per (model, batch, dtype): each provider's ms/step, speedup over
    eager, peak MiB; compile's first-step seconds (compile included)."""
    others = [p for p in providers if p != "eager"]
    headers = ["model", "shape", "batch", "dtype", "eager ms", "eager MiB"]
    for p in others:
        headers += [f"{p} ms", f"eager/{p}", f"{p} MiB"]
    if "compile" in others:
        headers.append("compile s")
    by_key: Dict[tuple, Dict[str, dict]] = {}
    for r in rows:
        by_key.setdefault((r["model"], r["shape"], r["batch"], r["dtype"]), {})[r["provider"]] = r
    lines = []
    for (model, shape, batch, dtype), prov in by_key.items():
        e = prov.get("eager", {})
        e_ms = e.get("median_ms")
        line = [model, shape, batch, dtype, common.fmt_ms(e_ms) if e.get("correct", True) else "WRONG",
                _mb(e.get("peak_mem_mb"))]
        for p in others:
            r = prov.get(p)
            if r is None:
                line += ["", "", ""]
            elif not r["correct"]:
                info = infos.get((model, batch, dtype, p))
                line += ["-", "WRONG" if info is not None and info.verdict is not None else "FAILED", "-"]
            else:
                ratio = e_ms / r["median_ms"] if e_ms and r["median_ms"] else None
                line += [common.fmt_ms(r["median_ms"]), "" if ratio is None else f"{ratio:.2f}x", _mb(r["peak_mem_mb"])]
        if "compile" in others:
            info = infos.get((model, batch, dtype, "compile"))
            line.append("-" if info is None or info.first_s is None else f"{info.first_s:.1f}")
        lines.append(line)
    return headers, lines


def _mb(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.0f}"


# -------------------------------------------------------------------------------------------- CLI
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = common.base_parser("python -m benchmarks.bench_train", __doc__, providers=TRAIN_PROVIDERS,
                           quick_help="GPU: blocks layer1.1 and layer2.0, ResNet-50, WRN-28-10, fp16 only "
                                      "(meant for < 3 min on an H100)")
    p.add_argument("--no-compile", action="store_true", help="GPU: leave out torch.compile")
    p.add_argument("--cases", nargs="+", default=None, help="only these cases (names as in the table)")
    p.add_argument("--batch", type=int, default=None, help="override every case's batch size")
    p.add_argument("--reps", type=int, default=20, help="GPU: timed steps per provider (after 7 warm-up steps)")
    p.add_argument("--deadline", type=float, default=None,
                   help=f"seconds after start past which no provider starts (--quick: {QUICK_DEADLINE_S:.0f})")
    p.add_argument("--no-cudnn-benchmark", action="store_true", help="GPU: leave torch.backends.cudnn.benchmark off")
    return p.parse_args(argv)


def make_config(args: argparse.Namespace) -> Config:
    dev = common.pick_device(args.device)
    notes: List[str] = []
    if dev.type == "cuda":
        jobs = gpu_jobs(args.quick)
        providers = ["eager", "triton", "cuda"] + ([] if args.no_compile else ["compile"])
    else:
        jobs = cpu_jobs()
        providers = ["eager", "triton", "cuda"]  # cuda: the library's C++ kernels, where it loads
    providers = common.order_providers(args.providers, providers, "eager")
    if args.no_compile and "compile" in providers:
        providers.remove("compile")
    skipped: Dict[str, str] = {}
    providers = common.drop_unavailable(providers, dev, skipped)
    notes += [f"{p} skipped: {why}" for p, why in skipped.items()]
    if args.cases:
        names = {j.case.name for j in jobs}
        unknown = [c for c in args.cases if c not in names]
        if unknown:
            raise SystemExit(f"--cases: unknown {unknown}; this mode has {sorted(names)}")
        jobs = [j for j in jobs if j.case.name in args.cases]
    if args.batch:
        jobs = [Job(j.case, args.batch, j.dtype) for j in jobs]
    if args.dtypes:
        jobs = list(dict.fromkeys(Job(j.case, j.batch, d) for j in jobs for d in args.dtypes))
    if args.reps < 1:
        raise SystemExit(f"--reps: expected at least 1, got {args.reps}")
    deadline_s = args.deadline if args.deadline is not None else (QUICK_DEADLINE_S if args.quick else None)
    deadline = None if deadline_s is None else _T0 + deadline_s
    return Config(dev, jobs, providers, args.reps, deadline, notes, skipped)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    cfg = make_config(args)
    dev = cfg.device
    env = common.env_info(dev)
    print(common.banner("bench_train", env))
    print(f"providers {list(cfg.providers)}; cases {[j.label() for j in cfg.jobs]}; channels_last; "
          f"fp16 = autocast + static loss scale {FP16_LOSS_SCALE:g}, no GradScaler; SGD momentum {MOMENTUM}; "
          f"{cfg.reps if dev.type == 'cuda' else 'CPU'} timed steps"
          + common.settings_suffix(dev, not args.no_cudnn_benchmark, cfg.deadline, _T0), flush=True)
    for note in cfg.notes:
        print(f"note: {note}")
    rows: List[dict] = []
    infos: Dict = {}
    early = [p for p in cfg.providers if p not in LATE_PROVIDERS]
    late = [p for p in cfg.providers if p in LATE_PROVIDERS]

    def save() -> None:
        if not args.no_write and rows:
            common.write_results(args.out, BENCH, env, rows,
                                 extra={"skipped": cfg.skipped, "dispatch": dispatch_list(rows, infos)})

    with common.dispatch_isolated(), common.cudnn_benchmark(dev, not args.no_cudnn_benchmark):
        # late providers (compile) take the whole models first: the headline numbers before the blocks
        late_jobs = sorted(cfg.jobs, key=lambda j: j.case.kind != "model")
        for providers, jobs in ((early, cfg.jobs), (late, late_jobs)):
            if not providers:
                continue
            for job in jobs:
                run_job(job, providers, cfg, rows, infos)
                save()  # after every case: a run cut short keeps what it measured
    headers, lines = summary_table(rows, infos, cfg.providers)
    print(common.format_table(headers, lines))
    for note in cfg.notes:
        print(f"note: {note}")
    return common.finish(rows, args.out, BENCH, env, write=not args.no_write and bool(rows), skipped=cfg.skipped,
                         extra={"dispatch": dispatch_list(rows, infos)},
                         markdown=(f"bench_train: training step, {env['gpu']}", headers, lines))


if __name__ == "__main__":
    sys.exit(main())
