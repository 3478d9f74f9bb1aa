"""Whole ResNets: images/s and memory of inference and of a training step, fused vs eager vs torch.compile.

    python -m benchmarks.models [--out DIR] [--quick] [--device cuda|cpu] [--models ...]
                                [--modes infer train] [--batches N ...] [--dtypes fp16 fp32] [--deadline S]

Question: how fast and how big are torchvision's ResNets (18, 34, 50, 101, 152, wide_resnet50_2 at
3x224x224) with our fused modules (``triton``; ``cuda``: the compiled library; ``auto``: the measured
dispatch, what users get; "fused" = the faster of triton and cuda) against the same network in eager
PyTorch and under ``torch.compile``, in inference (eval, no_grad) and for one training step (forward,
backward, SGD momentum 0.9)? Goals (H100, ResNet-50, batch 256, channels_last): inference fp16 fused
>= 1.5x eager and >= 1.1x compile max-autotune+freezing; training step AMP fused >= 1.3x eager and
>= 1.0x compile. A miss is reported as it is (log, markdown, JSON "goals").

Method. Eager and compile run :mod:`resnet_fused.models.reference`; ours loads the same state_dict;
everything channels_last. Inference: BN statistics calibrated on a random batch (random ones
overflow fp16 in a deep net); fp16 = fp16 weights and input; fp32 = TF32 convs on both sides.
Training: random BN state; fp16 = autocast, fp32 master weights, static loss scale 1024 (lr / 1024,
no GradScaler). Correctness before timing (:func:`run_case`, the harness :mod:`benchmarks.wrn_fig4`
shares): every provider's first call on the same batch is judged against a reference (inference: a
float64 forward; training: a float64 step, float32 with TF32 off for AMP on a GPU: output, loss,
probed gradients, BN running statistics), error <= max(dtype floor, 4 x eager's error; for a
training step the larger of a channels_last and an NCHW eager step). Wrong or failing providers:
``correct=false``, no time, exit code 1. Timing: CUDA events; inference at batch <= 32 as CUDA-graph
replays; training: 7 untimed and 20 timed steps (``--reps``); ``cudnn.benchmark`` on;
``peak_mem_mb``: the most allocated over what was allocated before (a forward; the timed steps). A
training batch is halved while the reference step's estimated activations exceed 75% of the GPU,
and after an out-of-memory error (noted). ``auto`` measures its candidates in its untimed first
call on the timed shape, starting clean per case, with no decision file. Order: eager/triton/cuda/
auto of every case, then compile, then max-autotune+freezing; results rewritten after every case;
no provider starts after ``--deadline`` (``--quick``: 120 s; resnet50 only, the goal rows first).

CPU (CI, ~15 s on 2 cores): resnet18 and resnet50 inference at 3x32x32, batch 1 and 2; a resnet18
training step at 3x64x64, batch 4 (resnet50's random-init gradients are too ill-conditioned at CPU
sizes for the 4 x eager bound); fp32; eager, cuda (C++ kernels), auto (resnet18 inference unless
named). triton (the interpreter: minutes per network) and compile only when named
(``--providers triton``: resnet18 only; ``--compile``).

Output: ``<date>_<device>_<commit>_models.{json,csv,md}``; rows ``common.row_keys("variant",
"layout", "compile_s")``; JSON ``skipped``, ``goals``, ``notes``, ``dispatch`` (per auto row,
:func:`benchmarks.common.dispatch_entry`). Pending: nothing has run on a GPU yet.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import gc
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

BENCH = "models"
KEYS = common.row_keys("variant", "layout", "compile_s")
MODELS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2")
STAGE_DEPTHS = {"resnet18": (2, 2), "resnet34": (6, 3), "resnet101": (23, 3), "resnet152": (36, 3)}  # (3, 4): (6, 3)
PROVIDERS = ("eager", "triton", "cuda", "auto", "compile", "torch")
OURS = ("triton", "cuda", "torch", "auto")
DEFAULT, MAX_AUTOTUNE = "default", "max-autotune+freezing"
CL = "channels_last"
GRAPH_MAX_BATCH, MEM_FRACTION, MIN_TRAIN_BATCH = 32, 0.75, 8
QUICK_DEADLINE_S, DEFAULT_REPS, SEED = 120.0, 20, 100
MOMENTUM, LR, FP16_LOSS_SCALE, FACTOR = 0.9, 1e-2, 1024.0, 4.0
CPU_AUTO_CASES = (("infer", "resnet18"),)  # auto's CPU default: every kind of conv key, little CI time
CPU_TRITON_REASON = ("whole networks through Triton's interpreter are too slow for the CPU mode (2 cores: resnet18 "
                     "at 16x16 ~30 s per forward); name triton in --providers to run it (resnet18 only)")
CPU_COMPILE_REASON = "left out on CPU (pass --compile to include it)"
# (title, model, mode, batch, dtype, ((baseline provider, variant, target), ...)): channels_last, 3x224x224
GOALS = (("ResNet-50 inference, batch 256, fp16, channels_last", "resnet50", "infer", 256, "fp16",
          (("eager", "", 1.5), ("compile", MAX_AUTOTUNE, 1.1))),
         ("ResNet-50 training step, batch 256, AMP, channels_last", "resnet50", "train_step", 256, "fp16",
          (("eager", "", 1.3), ("compile", DEFAULT, 1.0))))
FUSED, JUDGED = ("triton", "cuda"), ("triton", "cuda", "auto")
_T0 = time.monotonic()


# ------------------------------------------------------------------------------------------ cases
@dataclass(frozen=True)
class Case:
    """A network: ``build_ref()`` the seeded reference with random BN state (float32, CPU),
    ``build_ours(backend)`` ours (the caller loads the state); ``probes`` / ``buffers``: the
    parameters whose gradients and the BN buffers a training step is judged by."""

    name: str
    chw: Tuple[int, int, int]
    build_ref: Callable[[], nn.Module]
    build_ours: Callable[[str], nn.Module]
    probes: Tuple[str, ...]
    buffers: Tuple[str, ...]
    num_classes: int


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


def calibrate_bn(model: nn.Module, chw: Tuple[int, ...], gen: torch.Generator, batch: int = 4) -> nn.Module:
    """BN running statistics from one train-mode batch of random data (O(1) activations in a deep
    net, still far from the identity); returns the model in eval mode."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 1.0
    with torch.no_grad():
        model.train()(torch.randn(batch, *chw, generator=gen))
    for m, mom in zip(bns, saved):
        m.momentum = mom
    return model.eval()


def make_case(name: str, size: int, ref: Callable[[], nn.Module], ours: Callable[[str], nn.Module],
              probes: Sequence[str], buffers: Sequence[str], num_classes: int, seed: int = SEED) -> Case:
    def build_ref() -> nn.Module:
        torch.manual_seed(seed)
        net = ref()
        randomize_bn(net, torch.Generator().manual_seed(seed))
        return net

    return Case(name, (3, size, size), build_ref, ours, tuple(probes), tuple(buffers), num_classes)


@functools.lru_cache(maxsize=None)
def model_case(model: str, size: int) -> Case:
    """A torchvision ResNet: six probed gradients (stem, first block, a projection shortcut, the
    last block of stages 3 and 4, fc) and three BN buffers."""
    n3, n4 = STAGE_DEPTHS.get(model, (6, 3))
    last = 2 if model in ("resnet18", "resnet34") else 3
    return make_case(model, size, getattr(reference, model), lambda b: getattr(resnet_fused.models, model)(backend=b),
                     ("conv1.weight", "layer1.0.conv1.weight", "layer2.0.downsample.0.weight",
                      f"layer3.{n3 - 1}.bn{last}.weight", f"layer4.{n4 - 1}.conv{last}.weight", "fc.weight"),
                     ("bn1.running_mean", "layer1.0.bn2.running_var", f"layer4.{n4 - 1}.bn{last}.running_var"), 1000)


# -------------------------------------------------------------------------------------- numerics
@contextlib.contextmanager
def strict_fp32():
    """TF32 off for cuDNN convs and cuBLAS matmuls (the float32 reference), restored after: the
    legacy switches, or the per-operator ones where the legacy ones cannot be read."""
    switches = [(torch.backends.cudnn, "allow_tf32", False), (torch.backends.cuda.matmul, "allow_tf32", False)]
    try:
        old = [getattr(o, a) for o, a, _ in switches]
    except RuntimeError:
        switches = [(torch.backends.cudnn.conv, "fp32_precision", "ieee"),
                    (torch.backends.cuda.matmul, "fp32_precision", "ieee")]
        old = [getattr(o, a) for o, a, _ in switches]
    changed = [(o, a, was) for (o, a, off), was in zip(switches, old) if was != off]
    try:
        for (o, a, off), was in zip(switches, old):
            if was != off:
                setattr(o, a, off)
        yield
    finally:
        for o, a, was in reversed(changed):
            setattr(o, a, was)


def ref_dtype(device: torch.device, dtype: str) -> torch.dtype:
    """The training reference: float64, except float32 (TF32 off) for AMP runs on a GPU."""
    return torch.float32 if device.type == "cuda" and dtype != "fp32" else torch.float64


def loss_scale(dtype: str) -> float:
    return FP16_LOSS_SCALE if dtype == "fp16" else 1.0


@dataclass
class Verdict:
    checks: Dict[str, common.Check]
    ok: bool
    worst_key: str


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


@contextlib.contextmanager
def count_fused(mode: str):
    """Inference: the backend of every fused conv (``FusedBlockMixin._conv``); training: one entry
    per fused training block (``run_block_train``) run while the context is open."""
    from resnet_fused.modules import _base

    seen: List[str] = []
    owner, name = (_base.FusedBlockMixin, "_conv") if mode == "infer" else (_base, "run_block_train")
    real = getattr(owner, name)

    def spy(*args, **kwargs):
        seen.append(args[2] if mode == "infer" else "block")  # _conv(self, key, impl, ...)
        return real(*args, **kwargs)

    setattr(owner, name, spy)
    try:
        yield seen
    finally:
        setattr(owner, name, real)


@contextlib.contextmanager
def inductor_freezing(on: bool):
    """``torch._inductor.config.freezing = True`` inside (when ``on``), restored after."""
    import torch._inductor.config as inductor_config

    old = inductor_config.freezing
    inductor_config.freezing = on or old
    try:
        yield
    finally:
        inductor_config.freezing = old


# ------------------------------------------------------------------------------------ the harness
@dataclass
class Info:
    """What a row cannot hold: the verdict, first call seconds, fused convs / blocks, the error;
    auto: its dispatch record."""

    verdict: Optional[Verdict] = None
    first_s: Optional[float] = None
    fused: Optional[int] = None
    impls: Tuple[str, ...] = ()
    graph: bool = False
    error: Optional[str] = None
    dispatch: Optional[dict] = None
    timing: Optional[common.Timing] = None
    peak: Optional[float] = None


@dataclass
class Bench:
    """One run: device, providers, limits, and the rows and infos measured so far."""

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
        """Past the deadline: say so (log, notes) and return True."""
        if self.deadline is None or time.monotonic() <= self.deadline:
            return False
        print(f"  SKIPPED {label}: past the deadline", file=sys.stderr)
        self.notes.append(f"{label}: skipped (deadline)")
        return True

    def dispatch(self) -> List[dict]:
        """The JSON's "dispatch": per auto row, its case fields and the decisions of its run."""
        return [common.dispatch_entry(r, self.infos[row_key(r)].dispatch) for r in self.rows
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
        print("  " + log_line(f"{case.name} {mode} b{batch} {dtype} {label_of(prov, variant)}", row, info), flush=True)

    def trial(self, label: str, prov: str, mode: str, build: Callable, inputs: Sequence[tuple], opts: dict,
              timed: bool = True, graph: bool = False) -> Info:
        """Every provider run's rule: ``fn, check = build()``; one counted first call
        ``fn(*inputs[0])`` (auto measures its dispatch keys here); ``check(out)`` judges it; only if
        correct (and ``timed``) time ``fn`` over ``inputs``. Failures are recorded, never raised."""
        info, dev, fn, check = Info(), self.device, None, None
        try:
            if prov == "compile":
                torch._dynamo.reset()
            if prov == "auto":
                common.dispatch_fresh()  # the first call below measures every key of the case
            fn, check = build()
            _sync(dev)
            with count_fused(mode) as seen:
                tic = time.perf_counter()
                out = fn(*inputs[0])
                _sync(dev)
                info.first_s = time.perf_counter() - tic
            if prov in OURS and not (prov == "auto" and mode != "infer"):  # auto's trials run blocks on copies
                info.fused, info.impls = len(seen), tuple(sorted(set(seen)))
            if prov == "auto":
                info.dispatch = common.dispatch_record()
            info.verdict = check(out)
            del out
            if not info.verdict.ok:
                c = info.verdict.checks[info.verdict.worst_key]
                print(f"  WRONG {label}: {info.verdict.worst_key} rel err {c.err:.3e} > bound {c.bound:.3e} "
                      f"(eager {c.eager_err:.1e}); not timed", file=sys.stderr)
            elif timed and mode == "infer":
                info.timing, info.graph = common.benchmark_graph_or_plain(fn, inputs, dev, graph, label, **opts)
                info.peak = common.peak_mem_mb(fn, inputs[0], dev)
            elif timed:  # the most allocated during the timed steps over what was allocated before them
                _free(dev)
                base = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                info.timing = common.benchmark(fn, inputs, dev, cuda_graph=False, **opts)
                if dev.type == "cuda":
                    _sync(dev)
                    info.peak = (torch.cuda.max_memory_allocated(dev) - base) / 2**20
            if prov == "auto" and info.timing is not None:
                warm, info.dispatch = info.dispatch, common.dispatch_record()
                late = common.dispatch_late(warm, info.dispatch)
                if late is not None:
                    print(f"  note: {label} {late}", file=sys.stderr)
                    self.notes.append(f"{label}: {late}")
        except Exception as exc:
            info.verdict = info.timing = info.peak = None
            info.error = f"{type(exc).__name__}: {exc}"
            print(f"  FAILED {label}: {info.error}", file=sys.stderr)
            traceback.print_exc(limit=3)
            if prov == "auto":  # what the dispatch decided before it failed
                info.dispatch = common.dispatch_record()
        finally:
            fn = check = None
            if prov == "compile":
                torch._dynamo.reset()
            _free(dev)
        return info


def row_key(row: dict) -> tuple:
    return (row["model"], row["mode"], row["batch"], row["dtype"], row["provider"], row.get("variant") or "")


def label_of(prov: str, variant: str = "") -> str:
    return "compile-max" if prov == "compile" and variant == MAX_AUTOTUNE else prov


def log_line(label: str, row: dict, info: Info) -> str:
    v, parts = info.verdict, [label]
    if v is not None:
        c = v.checks[v.worst_key]
        parts.append(f"{'ok' if v.ok else 'WRONG'} (worst {v.worst_key}: err {c.err:.1e}, bound {c.bound:.1e})")
    else:
        parts.append(f"FAILED ({info.error})")
    if info.fused is not None:
        parts.append(f"fused convs/forward {info.fused} ({'/'.join(info.impls) or '-'})" if row["mode"] == "infer"
                     else f"fused blocks/step {info.fused}")
    if info.first_s is not None:
        parts.append(f"first call {info.first_s:.2f} s")
    if info.dispatch is not None:
        parts.append(common.auto_note(info.dispatch["decisions"]))
    if row["median_ms"] is not None:
        parts.append(f"{row['median_ms']:.3f} ms (p20 {row['p20_ms']:.3f}, p80 {row['p80_ms']:.3f}), "
                     f"{row['images_per_s']:.1f} img/s{', CUDA graph' if info.graph else ''}")
    if row["peak_mem_mb"] is not None:
        parts.append(f"peak +{row['peak_mem_mb']:.0f} MiB")
    return "; ".join(parts)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _free(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ a case
def build_provider(prov: str, variant: str, case: Case, base: nn.Module, dev: torch.device, dtype: str, train: bool,
                   fmt: torch.memory_format = torch.channels_last):
    """(module, fn) of ``prov`` from ``base``'s state. Inference: ``fn(x)`` a no_grad forward in
    ``dtype``. Training: ``fn(x, target) -> (out, loss)`` one step: zero grads, forward (autocast
    unless fp32), cross-entropy times the loss scale, backward, SGD (lr / the loss scale)."""
    if prov in OURS:
        module = case.build_ours(prov)
        module.load_state_dict(base.state_dict(), strict=True)
    else:
        module = copy.deepcopy(base)
    module = module.to(dev, torch.float32 if train else common.DTYPES[dtype]).to(memory_format=fmt).train(train)
    fwd = module
    if prov == "compile":
        fwd = torch.compile(module, **({"mode": "max-autotune"} if variant == MAX_AUTOTUNE else {}))
    if not train:
        return module, torch.no_grad()(lambda x: fwd(x))
    opt, scale = torch.optim.SGD(module.parameters(), lr=LR / loss_scale(dtype), momentum=MOMENTUM), loss_scale(dtype)

    def step(x: torch.Tensor, target: torch.Tensor):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=common.DTYPES[dtype]) if dtype != "fp32" else contextlib.nullcontext():
            out = fwd(x)
            loss = F.cross_entropy(out, target)
        (loss * scale if scale != 1.0 else loss).backward()
        opt.step()
        return out, loss

    return module, step


def step_opts(b: Bench, prov: str, reps: int) -> dict:
    if b.device.type == "cuda":  # first call, 5 estimate calls, 1 warm-up untimed; then exactly reps
        return dict(warmup_ms=0.0, rep_ms=0.0, min_reps=reps, max_reps=reps)
    if prov == "triton":  # the interpreter: the first step warmed it up, two steps say enough
        return dict(warmup=0, min_reps=2, max_reps=2, budget_s=0.0)
    return dict(warmup=2, min_reps=10, max_reps=50, budget_s=0.2)


@functools.lru_cache(maxsize=2)
def _calibrated(case: Case) -> nn.Module:
    return calibrate_bn(case.build_ref(), case.chw, torch.Generator().manual_seed(SEED))


def run_case(b: Bench, case: Case, mode: str, batch: int, dtype: str, runs: Sequence[Tuple[str, str]],
             reps: Optional[int] = None) -> None:
    """Reference, eager's check (always first: it sets the bounds), then check and time each of
    ``runs`` ((provider, variant), ...); one row per run."""
    dev, train = b.device, mode == "train_step"
    label = f"{case.name} {mode} b{batch} {dtype}"
    if any([b.late(f"{label} {label_of(*r)}") for r in runs]):
        return
    base = case.build_ref() if train else _calibrated(case)
    in_dt = torch.float32 if train else common.DTYPES[dtype]  # training: fp32 images (autocast)
    gen = torch.Generator(device=dev).manual_seed(1000 + batch)
    n = common.rotation_copies(batch * math.prod(case.chw) * in_dt.itemsize, common.cache_bytes(dev),
                               max_copies=(4 if train else 32) if dev.type == "cuda" else 2)
    inputs = [(torch.randn(batch, *case.chw, generator=gen, device=dev).to(in_dt).contiguous(
        memory_format=torch.channels_last),) + ((torch.randint(0, case.num_classes, (batch,), generator=gen,
                                                               device=dev),) if train else ()) for _ in range(n)]
    rdt, ref_q, eager_q = ref_dtype(dev, dtype) if train else torch.float64, None, None
    try:  # the reference: a float64 forward, or a step without optimizer (the update is lr x the gradient)
        ref = copy.deepcopy(base).to(dev, rdt).to(memory_format=torch.channels_last).train(train)
        with strict_fp32() if rdt == torch.float32 else contextlib.nullcontext(), torch.set_grad_enabled(train):
            out = ref(inputs[0][0].to(rdt))
            loss = F.cross_entropy(out, inputs[0][1]) if train else None
            if train:
                (loss * loss_scale(dtype)).backward()
        ref_q = collect(case, ref, out, loss) if train else {"out": out}
        del ref, out, loss
    except Exception as exc:
        print(f"  FAILED {label} reference ({rdt}): {type(exc).__name__}: {exc}", file=sys.stderr)
    _free(dev)
    for prov, variant in ([("eager", "")] if ("eager", "") not in runs else []) + list(runs):
        timed = (prov, variant) in runs
        if timed and b.late(f"{label} {label_of(prov, variant)}"):
            continue

        def build(prov=prov, variant=variant):
            if ref_q is None:
                raise RuntimeError("no reference to check against")
            module, fn = build_provider(prov, variant, case, base, dev, dtype, train)

            def check(out):
                nonlocal eager_q
                q = collect(case, module, *out) if train else {"out": out}
                if prov == "eager":  # a deep net's gradient error hangs on a few ReLU inputs near 0:
                    eager_q = [q]    # an NCHW step (other summation orders) measures eager's spread
                    if train:
                        m2, s2 = build_provider("eager", "", case, base, dev, dtype, True, torch.contiguous_format)
                        eager_q.append(collect(case, m2, *s2(inputs[0][0].contiguous(), inputs[0][1])))
                for p in module.parameters():
                    p.grad = None
                return judge(q, ref_q, eager_q, dtype)

            return fn, check

        opts = step_opts(b, prov, reps or b.reps) if train else common.provider_timing(dev, prov, b.timing)
        with inductor_freezing(variant == MAX_AUTOTUNE):  # max-autotune compiles and runs with freezing on
            info = b.trial(f"{label} {label_of(prov, variant)}", prov, "train" if train else "infer", build, inputs,
                           opts, timed, graph=b.cuda_graph and not train and batch <= GRAPH_MAX_BATCH
                           and variant != MAX_AUTOTUNE)
        if timed:
            b.add(case, batch, dtype, mode, prov, variant, info)
    del base, inputs
    _free(dev)
# ------------------------------------------------------------------------------------------ plan
@dataclass(frozen=True)
class Task:
    """One case and the provider runs ((provider, variant), ...) it gets in one pass."""

    mode: str  # "infer" | "train_step"
    model: str
    size: int
    batch: int
    dtype: str
    runs: Tuple[Tuple[str, str], ...]


def plan_tasks(gpu: bool, providers: Sequence[str], *, quick: bool = False, models: Optional[Sequence[str]] = None,
               modes: Sequence[str] = ("infer", "train"), batches: Optional[Sequence[int]] = None,
               dtypes: Optional[Sequence[str]] = None, max_autotune: bool = True,
               cpu_auto_cases: Optional[Sequence[Tuple[str, str]]] = CPU_AUTO_CASES) -> List[Task]:
    """Every task in run order: eager/triton/cuda/auto (/torch) of every case, then compile (default),
    then max-autotune+freezing of the inference cases. GPU: ``models`` (default all six; quick:
    resnet50) at 224, inference batch 256, 32, 1 (quick: 256 and 1, compile at 256 only, the goal
    rows first), training 256, fp16 and fp32 (quick: fp16). CPU: resnet18 and resnet50 inference at
    32 (batch 1, 2), training at 64 (batch 4) but not resnet50's, fp32; triton on resnet18 only;
    auto on ``cpu_auto_cases`` (None: everywhere)."""
    models = list(models or ((("resnet50",) if quick else MODELS) if gpu else ("resnet18", "resnet50")))
    dtypes = list(dtypes or ((("fp16",) if quick else ("fp16", "fp32")) if gpu else ("fp32",)))
    infer_b = list(batches or (((256, 1) if quick else (256, 32, 1)) if gpu else (1, 2)))
    compile_b = infer_b[:1] if gpu and quick else infer_b
    ok = lambda p, m, mode: gpu or {"triton": m == "resnet18", "auto": cpu_auto_cases is None
                                    or (mode, m) in cpu_auto_cases}.get(p, True)
    early = lambda m, mode: tuple((p, "") for p in providers if p != "compile" and ok(p, m, mode))
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
        if max_autotune:
            tasks += again([t for t in order if t.mode == "infer" and t.batch in compile_b], ("compile", MAX_AUTOTUNE))
    return tasks


# ------------------------------------------------------------------------------ training's batch
@functools.lru_cache(maxsize=None)
def activation_elems(model: str, size: int) -> int:
    """Elements the leaf modules output for one 3 x size x size image (meta device): an estimate of
    what a training step keeps for backward, per image."""
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
    """``want``, halved (not below MIN_TRAIN_BATCH) while the reference step's activations (float32
    for AMP, float64 for fp32) exceed MEM_FRACTION of ``total_bytes`` (None: CPU, no limit)."""
    per_image = activation_elems(model, size) * ref_dtype(torch.device("cuda"), dtype).itemsize
    b = want
    while total_bytes is not None and b > MIN_TRAIN_BATCH and per_image * b > MEM_FRACTION * total_bytes:
        b //= 2
    return max(b, min(want, MIN_TRAIN_BATCH))


def num_ooms(dev: torch.device) -> int:
    return int(torch.cuda.memory_stats(dev).get("num_ooms", 0)) if dev.type == "cuda" else 0


def run_train(b: Bench, task: Task, batches: Dict[tuple, int]) -> None:
    """:func:`run_case` at the batch memory allows; an out-of-memory error drops the case's rows and
    re-runs it at half the batch (``batches`` keeps the batch for the compile pass)."""
    dev, key = b.device, (task.model, task.dtype, task.batch)
    if key not in batches:
        total = torch.cuda.get_device_properties(dev).total_memory if dev.type == "cuda" else None
        batches[key] = train_batch(task.model, task.size, task.dtype, task.batch, total)
        if batches[key] != task.batch:
            b.notes.append(f"{task.model} train_step b{task.batch} {task.dtype}: batch {batches[key]} (the reference "
                           f"step's estimated memory exceeds {MEM_FRACTION:.0%} of the GPU's {total / 2**30:.0f} GiB)")
            print(f"note: {b.notes[-1]}")
    runs = list(task.runs)
    while True:
        batch, n0, ooms0 = batches[key], len(b.rows), num_ooms(dev)
        run_case(b, model_case(task.model, task.size), "train_step", batch, task.dtype, runs)
        if num_ooms(dev) == ooms0 or batch // 2 < MIN_TRAIN_BATCH:
            return
        del b.rows[n0:]
        batches[key], runs = batch // 2, list(dict.fromkeys([("eager", "")] + runs))  # with its own eager time
        b.notes.append(f"{task.model} train_step b{batch} {task.dtype}: out of memory; re-run at batch {batch // 2}")
        print(f"note: {b.notes[-1]}")
        _free(dev)


# ----------------------------------------------------------------------------------------- goals
def goals(rows: Sequence[dict]) -> List[dict]:
    """The goals judged on ``rows``: per (goal, baseline) the baseline's ms; for ``fused`` (the
    faster of triton and cuda), triton, cuda and auto: ms, ratio (baseline / it) and verdict (met |
    missed | not measured: no correct timed 3x224x224 row); ``met`` (fused's; None: not measured); ``text``."""
    def find(model, mode, batch, dtype, prov, variant):
        return next((r for r in rows if (r["model"], r["mode"], r["batch"], r["dtype"], r["provider"],
                                          r.get("variant") or "", r["shape"]) ==
                     (model, mode, batch, dtype, prov, variant, "3x224x224") and r["correct"] and r["median_ms"]), None)

    out = []
    for title, model, mode, batch, dtype, targets in GOALS:
        timed = {p: find(model, mode, batch, dtype, p, "") for p in JUDGED}
        have = [(p, r) for p, r in timed.items() if r is not None and p in FUSED]
        best = min(have, key=lambda pr: pr[1]["median_ms"]) if have else (None, None)
        for base_p, base_v, target in targets:
            base = find(model, mode, batch, dtype, base_p, base_v)

            def verdict(r: Optional[dict], prov: Optional[str]) -> dict:
                ratio = None if r is None or base is None else base["median_ms"] / r["median_ms"]
                return {"provider": prov, "ms": None if r is None else r["median_ms"],
                        "ratio": None if ratio is None else round(ratio, 4),
                        "verdict": "not measured" if ratio is None else ("met" if ratio >= target else "missed")}

            e = {"goal": f"{title}: fused >= {target:.1f}x {base_p}" + (f" ({base_v})" if base_p == "compile" else ""),
                 "model": model, "mode": mode, "batch": batch, "dtype": dtype, "layout": CL, "baseline": base_p,
                 "baseline_variant": base_v, "target": target, "baseline_ms": None if base is None else base["median_ms"],
                 "fused": verdict(best[1], best[0]), **{p: verdict(timed[p], p) for p in JUDGED}}
            e["met"] = None if e["fused"]["ratio"] is None else e["fused"]["verdict"] == "met"
            say = lambda n, d: f"{n} not measured" if d["ratio"] is None else f"{n} {d['ratio']:.2f}x: {d['verdict']}"
            e["text"] = (f"{e['goal']}: {say('fused' + (f' ({best[0]})' if best[0] else ''), e['fused'])} "
                         f"({'; '.join(say(p, e[p]) for p in JUDGED)})")
            out.append(e)
    return out


# ------------------------------------------------------------------------------------------ table
def summary_table(rows: Sequence[dict], infos: Dict[tuple, Info],
                  group: Sequence[str] = ("model", "mode", "shape", "batch", "dtype"),
                  lead: Sequence[Tuple[str, Callable[[List[dict]], str]]] = ()) -> Tuple[List[str], List[list]]:
    """(headers, lines), one line per ``group``: ``lead`` columns; eager ms, images/s and MiB; each
    other provider run's ms, eager / it and MiB (WRONG or FAILED without a time); compile seconds."""
    name = lambda r: label_of(r["provider"], r.get("variant") or "")
    others = [p for p in dict.fromkeys(map(name, rows)) if p != "eager"]
    compiles = [p for p in others if p.startswith("compile")]
    headers = list(group) + [h for h, _ in lead] + ["eager ms", "eager img/s", "eager MiB"]
    headers += [h for p in others for h in (f"{p} ms", f"eager/{p}", f"{p} MiB")] + [f"{p} s" for p in compiles]
    groups: Dict[tuple, Dict[str, dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in group), {})[name(r)] = r
    mb = lambda v: "-" if v is None else f"{v:.0f}"
    bad = lambda r: "WRONG" if infos.get(row_key(r), Info()).verdict is not None else "FAILED"
    lines = []
    for key, by in groups.items():
        e = by.get("eager")
        e_ms = e["median_ms"] if e is not None and e["correct"] else None
        line = list(key) + [fn(list(by.values())) for _, fn in lead]
        line += ["", "", ""] if e is None else [bad(e), "-", "-"] if not e["correct"] else \
            [common.fmt_ms(e_ms), f"{e['images_per_s']:.1f}", mb(e["peak_mem_mb"])]
        for p in others:
            r = by.get(p)
            ratio = f"{e_ms / r['median_ms']:.2f}x" if r is not None and e_ms and r["median_ms"] else ""
            line += ["", "", ""] if r is None else ["-", bad(r), "-"] if not r["correct"] else \
                [common.fmt_ms(r["median_ms"]), ratio, mb(r["peak_mem_mb"])]
        line += ["" if p not in by else "-" if by[p]["compile_s"] is None else f"{by[p]['compile_s']:.1f}"
                 for p in compiles]
        lines.append(line)
    return headers, lines


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
    p.add_argument("--no-max-autotune", action="store_true", help="leave out compile max-autotune+freezing")
    p.add_argument("--compile", action="store_true", help="CPU: include torch.compile")
    return p.parse_args(argv)


def make_config(args) -> Tuple[Bench, List[Task]]:
    dev = common.pick_device(args.device)
    gpu = dev.type == "cuda"
    if args.reps < 1 or min(args.batches or [1]) < 1:
        raise SystemExit(f"--reps / --batches: expected positive numbers, got {args.reps} / {args.batches}")
    providers = common.order_providers(args.providers, ["eager", "triton", "cuda", "auto", "compile"], "eager")
    providers += ["compile"] if args.compile and "compile" not in providers else []
    skipped: Dict[str, str] = {}
    providers = common.drop_unavailable([p for p in providers if not (args.no_compile and p == "compile")], dev,
                                        skipped)
    for p, why, named in (("compile", CPU_COMPILE_REASON, args.compile),
                          ("triton", CPU_TRITON_REASON, "triton" in (args.providers or ()))):
        if not gpu and p in providers and not named:
            providers.remove(p)
            skipped[p] = why
    auto_named = "auto" in (args.providers or ())
    tasks = plan_tasks(gpu, providers, quick=args.quick, models=args.models, modes=args.modes, batches=args.batches,
                       dtypes=args.dtypes, max_autotune=not args.no_max_autotune,
                       cpu_auto_cases=None if auto_named else CPU_AUTO_CASES)
    notes = ["auto on CPU: resnet18 infer only (name auto in --providers for every case)"] \
        if not gpu and "auto" in providers and not auto_named else []
    timing = dict(warmup_ms=10.0 if args.quick else 25.0, rep_ms=50.0 if args.quick else 100.0,
                  min_reps=args.reps) if gpu else dict(warmup=2, min_reps=10, max_reps=200, budget_s=0.1)
    deadline = args.deadline if args.deadline is not None else (QUICK_DEADLINE_S if args.quick else None)
    return Bench(dev, providers, reps=args.reps, deadline=None if deadline is None else _T0 + deadline,
                 timing=timing, cuda_graph=gpu, notes=notes, skipped=skipped), tasks


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    b, tasks = make_config(args)
    env = common.env_info(b.device)
    print(common.banner(BENCH, env))
    print(f"providers {b.providers}; {len(tasks)} tasks; training: fp16 = autocast + loss scale {FP16_LOSS_SCALE:g}"
          f", SGD momentum {MOMENTUM}" + common.settings_suffix(b.device, True, b.deadline, _T0), flush=True)
    for t in tasks:
        print(f"  task: {t.model} {t.mode} b{t.batch} {t.dtype} [{', '.join(label_of(*r) for r in t.runs)}]")
    common.print_skipped(b.skipped)
    print("".join(f"note: {n}\n" for n in b.notes), end="")
    batches: Dict[tuple, int] = {}
    extras = lambda: {"goals": goals(b.rows), "notes": list(b.notes), "dispatch": b.dispatch()}
    with common.dispatch_isolated(), common.cudnn_benchmark(b.device, True):
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
