"""Whole ResNets: images/s and memory of inference and of a training step, fused vs eager vs torch.compile.

    python -m benchmarks.models --out DIR [--device cuda|cpu] [--quick] [--deadline S] [--models/--batches ...]

Question: how fast and how big are torchvision's ResNets (18 to 152, wide_resnet50_2; 3x224x224) with our
fused modules (triton; cuda, the compiled library; auto, the measured dispatch users get; "fused": the
faster of triton and cuda) against eager PyTorch and torch.compile, in inference and for a training step
(SGD momentum 0.9)? Goals (H100, ResNet-50, batch 256, channels_last): inference fp16 fused >= 1.5x eager
and >= 1.1x compile max-autotune+freezing; training step AMP fused >= 1.3x eager and >= 1.0x compile.

Method (:func:`run_case`, shared with :mod:`benchmarks.wrn_fig4`): eager and compile run the reference
network, ours its state_dict, channels_last. Inference: BN statistics calibrated on random data; fp16, or
fp32 with TF32 convs. Training: random BN state; AMP with a static loss scale of 1024, or fp32. Each
provider's first call is judged against a float64 reference (output; a step's loss, probed gradients and
BN buffers too): error <= max(dtype floor, 4 x eager's, for a step the larger of a channels_last and an
NCHW eager step); wrong or failing: correct=false, no time, exit code 1. Timing: CUDA events (graphs for
inference at batch <= 32; training: 20 timed steps); peak_mem_mb over what was allocated before. A
training batch is halved while its reference step would exceed 75% of the GPU, or after an OOM. auto
measures in its untimed first call (clean dispatch per case, no decision file). Order: the early
providers, then compile, then max-autotune; nothing starts after --deadline (--quick: 120 s, resnet50
only, goal rows first). Per-block times: benchmarks.layers.

CPU (CI, ~15 s on 2 cores): resnet18 and resnet50 inference at 32x32, batch 1 and 2; a resnet18 step at
64x64, batch 4 (resnet50's random-init gradients are too ill-conditioned there for the 4 x eager bound);
fp32; eager, cuda (C++ kernels), auto (resnet18 inference unless named); triton (the interpreter: minutes
per network; resnet18 only) and compile when named. Rows: common.row_keys("variant", "layout",
"compile_s"); JSON: skipped, goals, notes, dispatch (per auto row), rows.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import functools
import gc
import importlib
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

from . import common, settings

BENCH = "models"
KEYS = common.row_keys("variant", "layout", "compile_s")
MODELS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2")
STAGE_DEPTHS = {"resnet18": (2, 2), "resnet101": (23, 3), "resnet152": (36, 3)}  # (layer3, layer4); else (6, 3)
PROVIDERS, OURS = ("eager", "triton", "cuda", "auto", "compile", "torch"), ("triton", "cuda", "torch", "auto")
DEFAULT, MAX_AUTOTUNE, CL, CL_FMT = "default", "max-autotune+freezing", "channels_last", torch.channels_last
GRAPH_MAX_BATCH, MEM_FRACTION, MIN_TRAIN_BATCH = 32, 0.75, 8
QUICK_DEADLINE_S, DEFAULT_REPS, SEED = 120.0, 20, 100
MOMENTUM, LR, SCALE, FACTOR = 0.9, 1e-2, {"fp16": 1024.0}, 4.0  # SCALE: static loss scale
CPU_AUTO_CASES = (("infer", "resnet18"),)  # auto's CPU default: every kind of conv key, little CI time
# (title, model, mode, batch, dtype, ((baseline provider, variant, target), ...)): channels_last, 3x224x224
GOALS = (("ResNet-50 inference, batch 256, fp16, channels_last", "resnet50", "infer", 256, "fp16",
          (("eager", "", 1.5), ("compile", MAX_AUTOTUNE, 1.1))),
         ("ResNet-50 training step, batch 256, AMP, channels_last", "resnet50", "train_step", 256, "fp16",
          (("eager", "", 1.3), ("compile", DEFAULT, 1.0))))
FUSED, JUDGED, NULL, _T0 = ("triton", "cuda"), ("triton", "cuda", "auto"), contextlib.nullcontext(), time.monotonic()


# ------------------------------------------------------------------------------------------ cases
@dataclass(frozen=True)
class Case:
    """A network: the seeded reference with random BN state, ours per backend; a training step is
    judged by the gradients of ``probes`` and the BN ``buffers``."""

    name: str
    chw: Tuple[int, int, int]
    ref: Callable[[], nn.Module]
    build_ours: Callable[[str], nn.Module]
    probes: Tuple[str, ...]
    buffers: Tuple[str, ...]
    num_classes: int
    seed: int = SEED

    def build_ref(self) -> nn.Module:
        torch.manual_seed(self.seed)
        net = self.ref()
        randomize_bn(net, torch.Generator().manual_seed(self.seed))
        return net


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


def calibrate_bn(model: nn.Module, chw: Tuple[int, ...], gen: torch.Generator) -> nn.Module:
    """BN running statistics from 4 random images (O(1) activations, far from the identity); eval mode."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 1.0
    with torch.no_grad():
        model.train()(torch.randn(4, *chw, generator=gen))
    for m, mom in zip(bns, saved):
        m.momentum = mom
    return model.eval()


@functools.lru_cache(maxsize=None)
def model_case(model: str, size: int) -> Case:
    """A torchvision ResNet probed at the stem, layer1.0, a shortcut, the ends of stages 3 and 4, fc."""
    n3, n4 = STAGE_DEPTHS.get(model, (6, 3))
    last = 2 if model in ("resnet18", "resnet34") else 3
    return Case(model, (3, size, size), getattr(reference, model),
                lambda b: getattr(resnet_fused.models, model)(backend=b),
                ("conv1.weight", "layer1.0.conv1.weight", "layer2.0.downsample.0.weight",
                 f"layer3.{n3 - 1}.bn{last}.weight", f"layer4.{n4 - 1}.conv{last}.weight", "fc.weight"),
                ("bn1.running_mean", "layer1.0.bn2.running_var", f"layer4.{n4 - 1}.bn{last}.running_var"), 1000)


# -------------------------------------------------------------------------------------- numerics
@contextlib.contextmanager
def strict_fp32():
    """TF32 off for convs and matmuls (the float32 reference; legacy switches or per-operator ones), restored after."""
    switches = [(torch.backends.cudnn, "allow_tf32", False), (torch.backends.cuda.matmul, "allow_tf32", False)]
    try:
        old = [getattr(o, a) for o, a, _ in switches]
    except RuntimeError:
        switches = [(torch.backends.cudnn.conv, "fp32_precision", "ieee"),
                    (torch.backends.cuda.matmul, "fp32_precision", "ieee")]
        old = [getattr(o, a) for o, a, _ in switches]
    try:
        for o, a, off in switches:
            setattr(o, a, off)
        yield
    finally:
        for (o, a, _), was in reversed(list(zip(switches, old))):
            setattr(o, a, was)


Verdict = collections.namedtuple("Verdict", "checks ok worst_key")  # checks: quantity -> common.Check


def judge(q: Dict[str, Optional[torch.Tensor]], ref: Dict[str, torch.Tensor], eager, dtype: str) -> Verdict:
    """Each quantity of ``q`` against ``ref`` within max(floor, FACTOR x eager's error); ``eager``:
    eager's quantities, or a list of eager samples (the largest error counts); None: the floor."""
    samples = [] if eager is None else ([eager] if isinstance(eager, dict) else list(eager))
    checks = {k: (common.Check(math.inf, math.nan, common.FLOOR[dtype], False) if q.get(k) is None else
                  common.check_output(q[k], r, [s.get(k) for s in samples] or None, dtype, factor=FACTOR))
              for k, r in ref.items()}
    ratio = {k: c.err / c.bound if c.bound > 0 else math.inf for k, c in checks.items()}
    return Verdict(checks, all(c.ok for c in checks.values()), max(ratio, key=ratio.get) if ratio else "")


def collect(case: Case, module: nn.Module, out, loss) -> Dict[str, Optional[torch.Tensor]]:
    """A training step's judged quantities: output, loss, probed gradients and BN buffers (None where missing)."""
    params, bufs = dict(module.named_parameters()), dict(module.named_buffers())
    grads = {f"grad {n}": params[n].grad if n in params else None for n in case.probes}
    q = {"out": out, "loss": loss, **grads, **{n: bufs.get(n) for n in case.buffers}}
    return {k: None if v is None else v.detach().clone() for k, v in q.items()}


# ------------------------------------------------------------------------------------ the harness
@dataclass
class Info:
    """What a row cannot hold: the verdict, first call seconds, the error, auto's decisions."""

    verdict: Optional[Verdict] = None
    first_s: Optional[float] = None
    error: Optional[str] = None
    dispatch: Optional[dict] = None
    timing: Optional[common.Timing] = None
    peak: Optional[float] = None


@dataclass
class Bench:
    """One run: device, providers, limits, and the rows (with their infos) measured so far."""

    device: torch.device
    providers: List[str]
    bench: str = BENCH
    keys: Tuple[str, ...] = KEYS
    reps: int = DEFAULT_REPS
    deadline: Optional[float] = None  # time.monotonic() after which no provider starts
    timing: dict = field(default_factory=dict)  # inference benchmark() options
    cuda_graph: bool = False
    paper_ms: Callable[[str], Optional[float]] = lambda model: None
    notes: List[str] = field(default_factory=list)
    skipped: Dict[str, str] = field(default_factory=dict)
    rows: List[dict] = field(default_factory=list)
    infos: Dict[tuple, Info] = field(default_factory=dict)

    def late(self, label: str) -> bool:
        if self.deadline is None or time.monotonic() <= self.deadline:
            return False
        print(f"  SKIPPED {label}: past the deadline", file=sys.stderr)
        return self.note(f"{label}: skipped (deadline)") or True

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"note: {text}")

    def dispatch(self) -> List[dict]:
        return [settings.dispatch_entry(r, self.infos[row_key(r)].dispatch) for r in self.rows
                if self.infos[row_key(r)].dispatch is not None]

    def add(self, case: Case, batch: int, dtype: str, mode: str, prov: str, variant: str, info: Info) -> None:
        extra = {"variant": variant, "layout": CL, "compile_s": info.first_s if prov == "compile" else None,
                 "paper_ms": self.paper_ms(case.name)}
        row = common.make_row(bench=self.bench, model=case.name, shape="x".join(map(str, case.chw)), batch=batch,
                              dtype=dtype, mode=mode, provider=prov, timing=info.timing, peak_mem_mb=info.peak,
                              correct=info.verdict is not None and info.verdict.ok,
                              extra={k: v for k, v in extra.items() if k in self.keys})
        self.rows.append(row)
        self.infos[row_key(row)] = info
        v, c = info.verdict, info.verdict and info.verdict.checks[info.verdict.worst_key]
        print("  " + "; ".join(p for p in (
            f"{case.name} {mode} b{batch} {dtype} {label_of(prov, variant)}", f"FAILED ({info.error})" if v is None
            else f"{'ok' if v.ok else 'WRONG'} (worst {v.worst_key}: err {c.err:.1e}, bound {c.bound:.1e})",
            info.first_s and f"first call {info.first_s:.2f} s",
            info.dispatch and settings.auto_note(info.dispatch["decisions"]),
            row["median_ms"] and f"{row['median_ms']:.3f} ms (p20 {row['p20_ms']:.3f}, p80 {row['p80_ms']:.3f}), "
                                 f"{row['images_per_s']:.1f} img/s",
            row["peak_mem_mb"] is not None and f"peak +{row['peak_mem_mb']:.0f} MiB") if p), flush=True)


def row_key(row: dict) -> tuple:
    return (row["model"], row["mode"], row["batch"], row["dtype"], row["provider"], row.get("variant") or "")


def label_of(prov: str, variant: str = "") -> str:
    return "compile-max" if prov == "compile" and variant == MAX_AUTOTUNE else prov


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _free(dev: torch.device) -> None:
    if dev.type == "cuda":  # what the last provider held goes back before the next one is built
        gc.collect(), torch.cuda.empty_cache()


def build_provider(prov: str, variant: str, case: Case, base: nn.Module, dev: torch.device, dtype: str, train: bool,
                   fmt: torch.memory_format = torch.channels_last):
    """(module, fn) of ``prov`` from ``base``'s state: ``fn(x)`` a no_grad forward in ``dtype``, or
    ``fn(x, target) -> (out, loss)`` one training step (autocast unless fp32, loss scale, SGD)."""
    if prov in OURS:
        module = case.build_ours(prov)
        module.load_state_dict(base.state_dict(), strict=True)
    else:
        module = copy.deepcopy(base)
    module = module.to(dev, torch.float32 if train else common.DTYPES[dtype]).to(memory_format=fmt).train(train)
    fwd = torch.compile(module, **({"mode": "max-autotune"} if variant == MAX_AUTOTUNE else {})) \
        if prov == "compile" else module
    if not train:
        return module, torch.no_grad()(lambda x: fwd(x))
    scale = SCALE.get(dtype, 1.0)
    opt = torch.optim.SGD(module.parameters(), lr=LR / scale, momentum=MOMENTUM)

    def step(x: torch.Tensor, target: torch.Tensor):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=common.DTYPES[dtype]) if dtype != "fp32" else NULL:
            out = fwd(x)
            loss = F.cross_entropy(out, target)
        (loss * scale).backward()
        opt.step()
        return out, loss

    return module, step


def measure(b: Bench, prov: str, fn: Callable, inputs: Sequence[tuple], train: bool, graph: bool, label: str):
    """(timing, peak MiB): inference per ``b.timing``; a step: GPU exactly ``b.reps`` timed steps, CPU a few."""
    dev = b.device
    if not train:
        opts = common.provider_timing(dev, prov, b.timing)
        return common.benchmark_graph_or_plain(fn, inputs, dev, graph, label, **opts)[0], \
            common.peak_mem_mb(fn, inputs[0], dev)
    _free(dev)
    if dev.type != "cuda":
        return common.benchmark(fn, inputs, dev, **(dict(warmup=0, min_reps=2, budget_s=0.0) if prov == "triton" else
                                                    dict(warmup=2, min_reps=10, budget_s=0.2))), None
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    t = common.benchmark(fn, inputs, dev, warmup_ms=0.0, rep_ms=0.0, min_reps=b.reps)
    _sync(dev)
    return t, (torch.cuda.max_memory_allocated(dev) - base) / 2**20


@functools.lru_cache(maxsize=2)
def _calibrated(case: Case) -> nn.Module:
    return calibrate_bn(case.build_ref(), case.chw, torch.Generator().manual_seed(SEED))


def run_case(b: Bench, case: Case, mode: str, batch: int, dtype: str, runs: Sequence[Tuple[str, str]]) -> None:
    """Each run ``(provider, variant)``: a first call on a timed input (auto measures here), judged against
    the reference (eager first, always: it sets the bounds); only if correct, timed. One row each."""
    dev, train = b.device, mode == "train_step"
    label = f"{case.name} {mode} b{batch} {dtype}"
    if any([b.late(f"{label} {label_of(*r)}") for r in runs]):
        return
    base = case.build_ref() if train else _calibrated(case)
    in_dt = torch.float32 if train else common.DTYPES[dtype]  # training: fp32 images (autocast)
    gen = torch.Generator(device=dev).manual_seed(1000 + batch)
    n = common.rotation_copies(batch * math.prod(case.chw) * in_dt.itemsize, common.cache_bytes(dev),
                               max_copies=(4 if train else 32) if dev.type == "cuda" else 2)
    inputs = [(torch.randn(batch, *case.chw, generator=gen, device=dev).to(in_dt).contiguous(memory_format=CL_FMT),)
              + ((torch.randint(0, case.num_classes, (batch,), generator=gen, device=dev),) if train else ())
              for _ in range(n)]
    x0, t0 = inputs[0][0], inputs[0][-1]
    rdt = torch.float32 if train and dev.type == "cuda" and dtype != "fp32" else torch.float64  # AMP: TF32 off
    ref_q = eager_q = None
    try:  # the reference: a forward, or a step without optimizer (the update is lr x the gradient)
        ref = copy.deepcopy(base).to(dev, rdt).to(memory_format=CL_FMT).train(train)
        with strict_fp32() if rdt == torch.float32 else NULL, torch.set_grad_enabled(train):
            out = ref(x0.to(rdt))
            loss = F.cross_entropy(out, t0) if train else None
            if train:
                (loss * SCALE.get(dtype, 1.0)).backward()
        ref_q = collect(case, ref, out, loss) if train else {"out": out}
        del ref, out, loss
    except Exception as exc:
        print(f"  FAILED {label} reference ({rdt}): {type(exc).__name__}: {exc}", file=sys.stderr)
    _free(dev)
    for prov, variant in ([("eager", "")] if ("eager", "") not in runs else []) + list(runs):
        timed, name = (prov, variant) in runs, f"{label} {label_of(prov, variant)}"
        if timed and b.late(name):
            continue
        info, module, fn = Info(), None, None
        freeze = variant == MAX_AUTOTUNE  # max-autotune compiles and runs with Inductor's freezing on
        try:
            with importlib.import_module("torch._inductor.config").patch(freezing=True) if freeze else NULL:
                if prov == "compile":
                    torch._dynamo.reset()
                if prov == "auto":
                    settings.dispatch_fresh()  # the first call below measures every key of the case
                if ref_q is None:
                    raise RuntimeError("no reference to check against")
                module, fn = build_provider(prov, variant, case, base, dev, dtype, train)
                tic = time.perf_counter()
                out = fn(*inputs[0])
                _sync(dev)
                info.first_s = time.perf_counter() - tic
                q = collect(case, module, *out) if train else {"out": out}
                if prov == "eager":  # a deep net's gradient error hangs on a few ReLU inputs near 0: an NCHW
                    eager_q = [q] + [collect(case, m, *s(x0.contiguous(), t0)) for m, s in  # step measures its spread
                                     [build_provider(prov, "", case, base, dev, dtype, True, torch.contiguous_format)]
                                     if train]
                for p in module.parameters():
                    p.grad = None
                info.verdict = v = judge(q, ref_q, eager_q, dtype)
                del out, q
                if not v.ok:
                    c = v.checks[v.worst_key]
                    print(f"  WRONG {name}: {v.worst_key} rel err {c.err:.3e} > bound {c.bound:.3e} (eager "
                          f"{c.eager_err:.1e}); not timed", file=sys.stderr)
                elif timed:
                    graph = b.cuda_graph and not train and batch <= GRAPH_MAX_BATCH and variant != MAX_AUTOTUNE
                    info.timing, info.peak = measure(b, prov, fn, inputs, train, graph, name)
        except Exception as exc:
            info.verdict = info.timing = info.peak = None
            info.error = f"{type(exc).__name__}: {exc}"
            print(f"  FAILED {name}: {info.error}", file=sys.stderr)
            traceback.print_exc(limit=3)
        finally:
            module = fn = None
            if prov == "auto":  # what the dispatch decided (before it failed, if it did)
                info.dispatch = settings.dispatch_record()
            if prov == "compile":
                torch._dynamo.reset()
            _free(dev)
        if timed:
            b.add(case, batch, dtype, mode, prov, variant, info)
    del base, inputs
    _free(dev)


# ------------------------------------------------------------------------------------------ plan
Task = collections.namedtuple("Task", "mode model size batch dtype runs")  # runs: ((provider, variant), ...)


def plan_tasks(gpu: bool, providers: Sequence[str], *, quick: bool = False, models: Optional[Sequence[str]] = None,
               modes: Sequence[str] = ("infer", "train"), batches: Optional[Sequence[int]] = None,
               dtypes: Optional[Sequence[str]] = None,
               cpu_auto_cases: Optional[Sequence[Tuple[str, str]]] = CPU_AUTO_CASES) -> List[Task]:
    """Every task in run order: the early providers, then compile, then max-autotune. GPU: all models
    (quick: resnet50, goal rows first, compile at 256 only); CPU: the docstring's; auto on ``cpu_auto_cases``."""
    models = list(models or ((("resnet50",) if quick else MODELS) if gpu else ("resnet18", "resnet50")))
    dtypes = list(dtypes or ((("fp16",) if quick else ("fp16", "fp32")) if gpu else ("fp32",)))
    infer_b = list(batches or (((256, 1) if quick else (256, 32, 1)) if gpu else (1, 2)))
    compile_b = infer_b[:1] if gpu and quick else infer_b
    skip = lambda p, m, mode: p == "compile" or not gpu and (p == "triton" and m != "resnet18" or p == "auto" and
                                                             cpu_auto_cases is not None and (mode, m) not in cpu_auto_cases)
    early = lambda m, mode: tuple((p, "") for p in providers if not skip(p, m, mode))
    order = []
    for m in models:
        mi = [Task("infer", m, 224 if gpu else 32, b, d, early(m, "infer")) for d in dtypes for b in infer_b] \
            if "infer" in modes else []
        mt = [Task("train_step", m, 224 if gpu else 64, b, d, early(m, "train_step")) for d in dtypes
              for b in (batches or ((256,) if gpu else (4,)))] if "train" in modes and (gpu or m != "resnet50") else []
        if gpu and quick:  # the goal rows first: the biggest inference batch, the training step, the rest
            mi, mt = [t for t in mi if t.batch == infer_b[0]], mt + [t for t in mi if t.batch != infer_b[0]]
        order += mi + mt
    again = lambda ts, run: [Task(t.mode, t.model, t.size, t.batch, t.dtype, (run,)) for t in ts]
    tasks = [t for t in order if t.runs]
    if "compile" in providers:
        tasks += again([t for t in order if t.mode == "train_step" or t.batch in compile_b], ("compile", DEFAULT))
        tasks += again([t for t in order if t.mode == "infer" and t.batch in compile_b], ("compile", MAX_AUTOTUNE))
    return tasks


# ------------------------------------------------------------------------------ training's batch
@functools.lru_cache(maxsize=None)
def activation_elems(model: str, size: int) -> int:
    """Elements the leaf modules output per image (meta device): what a step keeps for backward."""
    with torch.device("meta"):
        net = getattr(reference, model)()
    total = [0]
    for m in net.modules():
        if not list(m.children()):
            m.register_forward_hook(lambda _m, _i, out: total.__setitem__(0, total[0] + out.numel()))
    with torch.no_grad():
        net(torch.zeros(1, 3, size, size, device="meta"))
    return total[0]


def train_batch(model: str, size: int, dtype: str, want: int, total_bytes: Optional[int]) -> int:
    """``want``, halved (to MIN_TRAIN_BATCH) while the reference step would exceed MEM_FRACTION of the GPU."""
    per_image, b = activation_elems(model, size) * (8 if dtype == "fp32" else 4), want  # the reference's dtype
    while total_bytes is not None and b > MIN_TRAIN_BATCH and per_image * b > MEM_FRACTION * total_bytes:
        b //= 2
    return max(b, min(want, MIN_TRAIN_BATCH))


def num_ooms(dev: torch.device) -> int:
    return int(torch.cuda.memory_stats(dev).get("num_ooms", 0)) if dev.type == "cuda" else 0


def run_train(b: Bench, task: Task, batches: Dict[tuple, int]) -> None:
    """run_case at the batch memory allows; after an OOM, again at half the batch (eager included)."""
    dev, key = b.device, (task.model, task.dtype, task.batch)
    if key not in batches:
        total = torch.cuda.get_device_properties(dev).total_memory if dev.type == "cuda" else None
        batches[key] = train_batch(task.model, task.size, task.dtype, task.batch, total)
        if batches[key] != task.batch:
            b.note(f"{task.model} train_step b{task.batch} {task.dtype}: batch {batches[key]} (the reference step's "
                   f"estimated memory exceeds {MEM_FRACTION:.0%} of the GPU's {total / 2**30:.0f} GiB)")
    runs = list(task.runs)
    while True:
        batch, n0, ooms0 = batches[key], len(b.rows), num_ooms(dev)
        run_case(b, model_case(task.model, task.size), "train_step", batch, task.dtype, runs)
        if num_ooms(dev) == ooms0 or batch // 2 < MIN_TRAIN_BATCH:
            return
        del b.rows[n0:]
        batches[key], runs = batch // 2, list(dict.fromkeys([("eager", "")] + runs))
        b.note(f"{task.model} train_step b{batch} {task.dtype}: out of memory; re-run at batch {batch // 2}")
        _free(dev)


# ----------------------------------------------------------------------------------------- goals
def goals(rows: Sequence[dict]) -> List[dict]:
    """Per (goal, baseline): baseline ms; for fused (faster of triton, cuda), triton, cuda, auto: ms, ratio,
    verdict (met | missed | not measured: no correct 3x224x224 row); ``met`` (fused's); ``text``."""
    def find(model, mode, batch, dtype, prov, variant):
        return next((r for r in rows if (r["model"], r["mode"], r["batch"], r["dtype"], r["provider"],
                                          r.get("variant") or "", r["shape"]) ==
                     (model, mode, batch, dtype, prov, variant, "3x224x224") and r["correct"] and r["median_ms"]), None)

    def verdict(r: Optional[dict], prov: Optional[str], base: Optional[dict], target: float) -> dict:
        ratio = None if r is None or base is None else base["median_ms"] / r["median_ms"]
        return {"provider": prov, "ms": None if r is None else r["median_ms"],
                "ratio": None if ratio is None else round(ratio, 4),
                "verdict": "not measured" if ratio is None else ("met" if ratio >= target else "missed")}

    say = lambda n, d: f"{n} not measured" if d["ratio"] is None else f"{n} {d['ratio']:.2f}x: {d['verdict']}"
    out = []
    for title, model, mode, batch, dtype, targets in GOALS:
        timed = {p: find(model, mode, batch, dtype, p, "") for p in JUDGED}
        best = min([(p, r) for p, r in timed.items() if r is not None and p in FUSED], default=(None, None),
                   key=lambda pr: pr[1]["median_ms"])
        for base_p, base_v, target in targets:
            base = find(model, mode, batch, dtype, base_p, base_v)
            e = {"goal": f"{title}: fused >= {target:.1f}x {base_p}" + (f" ({base_v})" if base_v else ""),
                 "model": model, "mode": mode, "batch": batch, "dtype": dtype, "layout": CL, "baseline": base_p,
                 "baseline_variant": base_v, "target": target, "baseline_ms": base and base["median_ms"],
                 "fused": verdict(best[1], best[0], base, target),
                 **{p: verdict(timed[p], p, base, target) for p in JUDGED}}
            e["met"] = None if e["fused"]["ratio"] is None else e["fused"]["verdict"] == "met"
            e["text"] = (f"{e['goal']}: {say('fused' + (f' ({best[0]})' if best[0] else ''), e['fused'])} "
                         f"({'; '.join(say(p, e[p]) for p in JUDGED)})")
            out.append(e)
    return out


# ------------------------------------------------------------------------------------------ table
def summary_table(rows: Sequence[dict], infos: Dict[tuple, Info],
                  group: Sequence[str] = ("model", "mode", "shape", "batch", "dtype"),
                  lead: Sequence[Tuple[str, Callable[[dict], str]]] = ()) -> Tuple[List[str], List[list]]:
    """(headers, lines), a line per row: ``group`` and ``lead`` columns, provider, ms (WRONG or FAILED
    without a time), images/s, eager ms / its ms (eager's of the same ``group``), peak MiB, compile s."""
    eager = {tuple(r[k] for k in group): r["median_ms"] for r in rows if r["provider"] == "eager"}
    lines = [[r[k] for k in group] + [fn(r) for _, fn in lead] + [
        label_of(r["provider"], r.get("variant") or ""),
        common.fmt_ms(r["median_ms"]) if r["correct"] else
        "WRONG" if infos.get(row_key(r), Info()).verdict is not None else "FAILED",
        "-" if r["images_per_s"] is None else f"{r['images_per_s']:.1f}",
        f"{eager[k] / r['median_ms']:.2f}x" if r["median_ms"] and eager.get(k := tuple(r[g] for g in group)) else "-",
        "-" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}",
        "-" if r.get("compile_s") is None else f"{r['compile_s']:.1f}"] for r in rows]
    return list(group) + [h for h, _ in lead] + ["provider", "ms", "img/s", "eager/it", "MiB", "compile s"], lines


# ------------------------------------------------------------------------------------------- CLI
def parse_args(argv: Optional[Sequence[str]] = None):
    p = common.base_parser("python -m benchmarks.models", __doc__, providers=PROVIDERS, dtypes=("fp16", "fp32"),
                           quick_help="GPU: resnet50 only, inference at 256 and 1 and a training step at 256, "
                                      "fp16, compile at 256; deadline 120 s")
    p.add_argument("--models", nargs="+", choices=MODELS, default=None, help="override the models")
    p.add_argument("--modes", nargs="+", choices=("infer", "train"), default=("infer", "train"))
    p.add_argument("--batches", type=int, nargs="+", default=None, help="override the batch sizes")
    p.add_argument("--deadline", type=float, default=None, help="seconds after start past which no provider starts")
    p.add_argument("--reps", type=int, default=DEFAULT_REPS, help="GPU: timed training steps; fewest timed calls")
    p.add_argument("--no-compile", action="store_true", help="leave out torch.compile")
    p.add_argument("--compile", action="store_true", help="CPU: include torch.compile")
    return p.parse_args(argv)


def make_config(args) -> Tuple[Bench, List[Task]]:
    dev = common.pick_device(args.device)
    gpu, named = dev.type == "cuda", args.providers or ()
    if args.reps < 1 or min(args.batches or [1]) < 1:
        raise SystemExit(f"--reps / --batches: expected positive numbers, got {args.reps} / {args.batches}")
    providers = common.order_providers(args.providers, ["eager", "triton", "cuda", "auto", "compile"], "eager")
    providers = [p for p in providers + ["compile"] * args.compile if not (args.no_compile and p == "compile")]
    skipped: Dict[str, str] = {}
    providers = common.drop_unavailable(list(dict.fromkeys(providers)), dev, skipped)
    if not gpu and "compile" in providers and not args.compile:
        providers.remove("compile")
        skipped["compile"] = "left out on CPU (pass --compile to include it)"
    if not gpu and "triton" in providers and "triton" not in named:
        providers.remove("triton")
        skipped["triton"] = ("whole networks through Triton's interpreter are too slow for the CPU mode (2 cores: "
                             "resnet18 at 16x16 ~30 s per forward); name triton in --providers (resnet18 only)")
    tasks = plan_tasks(gpu, providers, quick=args.quick, models=args.models, modes=args.modes, batches=args.batches,
                       dtypes=args.dtypes,
                       cpu_auto_cases=None if "auto" in named else CPU_AUTO_CASES)
    notes = ["auto on CPU: resnet18 infer only (name auto in --providers for every case)"] \
        if not gpu and "auto" in providers and "auto" not in named else []
    timing = dict(warmup_ms=10.0 if args.quick else 25.0, rep_ms=50.0 if args.quick else 100.0,
                  min_reps=args.reps) if gpu else dict(warmup=2, min_reps=10, budget_s=0.1)
    deadline = args.deadline if args.deadline is not None else (QUICK_DEADLINE_S if args.quick else None)
    return Bench(dev, providers, reps=args.reps, deadline=None if deadline is None else _T0 + deadline,
                 timing=timing, cuda_graph=gpu, notes=notes, skipped=skipped), tasks


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    b, tasks = make_config(args)
    env = common.env_info(b.device)
    print(common.banner(BENCH, env))
    print("\n".join([f"providers {b.providers}" + settings.settings_suffix(b.device, True, b.deadline, _T0)] + [
        f"  task: {t.model} {t.mode} b{t.batch} {t.dtype} [{', '.join(label_of(*r) for r in t.runs)}]" for t in tasks]
        + [f"note: {p} skipped: {why}" for p, why in b.skipped.items()] + [f"note: {n}" for n in b.notes]), flush=True)
    batches: Dict[tuple, int] = {}
    extras = lambda: {"goals": goals(b.rows), "notes": list(b.notes), "dispatch": b.dispatch()}
    with settings.dispatch_isolated(), settings.cudnn_benchmark(b.device, True):
        for t in tasks:
            if t.mode == "infer":
                run_case(b, model_case(t.model, t.size), "infer", t.batch, t.dtype, t.runs)
            else:
                run_train(b, t, batches)
            if not args.no_write and b.rows:  # after every case: a run cut short keeps what it measured
                common.write_results(args.out, BENCH, env, b.rows, keys=KEYS, extra={"skipped": b.skipped, **extras()})
    headers, lines = summary_table(b.rows, b.infos)
    goal_lines = [f"goal: {g['text']}" for g in goals(b.rows)]
    print("\n".join([common.format_table(headers, lines)] + goal_lines + [f"note: {n}" for n in b.notes]))
    legend = ("compile: torch.compile, default mode; compile-max: max-autotune with Inductor freezing (inference "
              "only); compile s: the first call's wall time (compile included)")
    return common.finish(b.rows, args.out, BENCH, env, write=not args.no_write and bool(b.rows), keys=KEYS,
                         skipped=b.skipped, extra=extras(),
                         markdown=(f"models: images/s of whole ResNets, {env['gpu']}", headers, lines),
                         notes=[legend] + goal_lines + list(b.notes))


if __name__ == "__main__":
    sys.exit(main())
