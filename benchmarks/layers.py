"""Every layer of ResNet-50 and WRN-28-10 against the machine's own measured ceilings.

    python -m benchmarks.layers [--out DIR] [--device cuda|cpu] [--quick] [--deadline S] [--peaks FILE]
                                [--models ...] [--convs MODULE ...] [--acts CxH ...] [--ops ...]

Question: layer by layer, how close do our fused ops get to what the GPU can do? Is the fused conv
epilogue free (conv + BN (+ add) + ReLU no slower than cuDNN's conv alone: the ``<provider>/conv``
columns and the goal lines)? How close to a copy do the memory-bound BN / ReLU passes run?

Shapes are traced from the models on the meta device (:func:`trace_layers`): ResNet-50 at 224
gives 23 conv geometries (53 convs), WRN-28-10 at 32 gives 10 (28), each named by its first module
(``note`` lists all); the memory ops run at the BN input shapes (12, 4).
Conv rows (``variant`` conv_bn_relu / conv_bn_add_relu, BN eval): ``eager`` ``conv_alone``
(F.conv2d: the yardstick), ``eager`` (separate ops), and on the BN folded into weight + float32
bias ``cuda`` (``note`` names the kernel), ``cudnn_fused``, ``triton``, ``auto`` (the measured
dispatch, its decision in ``note`` and the JSON's ``"dispatch"``), ``compile``. Memory rows
(``variant`` = the op): ``cuda``, ``triton``, ``eager``, ``auto`` (bn_relu, bn_add_relu).

Roofline (:func:`benchmarks.peaks.measure` in the same run, or ``--peaks FILE``): ``tflops`` =
2 N Ho Wo K C R S / median against the dtype's matmul peak (``frac_of_peak``; fp32: TF32), ``gbps``
= least bytes / median against the copy bandwidth (``frac_of_copy``; ``note`` adds a same-size
copy's rate), ``floor_ms`` = max(flops / peak, bytes / copy bandwidth).

Outputs are checked against float64 before timing; a wrong or failing provider gets
``correct=false``, no time, ``wrong: not timed`` / ``failed: ...`` in ``note`` and exit code 1; one
that cannot run here is skipped with its reason. CUDA-graph replay over input copies larger than
twice the L2. Phases run headline first; past ``--deadline`` (``--quick``: 75 s) nothing starts
(listed in ``"not_run"``). GPU: batch 256 / 128, fp16, bf16, fp32, channels_last; ``--quick``:
batch 64 / 128, fp16, 6 + 4 geometries, 3 ops at 3 shapes. CPU (CI): the quick subset at tiny
sizes, batch 2, fp32, compile only if asked for: it proves the script, nothing more.
"""
from __future__ import annotations

import functools
import json
import math
import sys
import time
from collections import namedtuple
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import common, layer_ops, peaks as peaks_mod, settings

BENCH = "layers"
KEYS = common.row_keys("variant", "layout", "tflops", "frac_of_peak", "gbps", "frac_of_copy", "floor_ms", "note")
PROVIDERS = ("eager", "cuda", "cudnn_fused", "triton", "auto", "compile")
CONV_VARIANTS = ("conv_alone", "conv_bn_relu", "conv_bn_add_relu")
LAYOUT = "channels_last"
QUICK_DEADLINE_S = 75.0
COMPILE_MARGIN_S = 15.0  # no torch.compile case starts later than this before the deadline
# a run cut short keeps the first phases; auto after triton finds Triton's kernels tuned
PHASES = (("conv", ("eager", "cuda", "cudnn_fused")), ("memory", ("eager", "cuda")), ("memory", ("triton",)),
          ("conv", ("triton",)), ("conv", ("auto",)), ("memory", ("auto",)), ("conv", ("compile",)))
QUICK_OPS = ("bn_add_relu", "bwd_reduce", "bwd_apply")  # a forward apply, a backward reduction and apply
INFER_OPS = ("bn_relu", "bn_add_relu", "dual_bn_add_relu")
EPILOGUE_GOAL, COPY_GOAL = 1.0, 0.85  # fused <= conv alone; cuda >= 85% of the copy bandwidth
_T0 = time.monotonic()


@dataclass(frozen=True)
class ConvSpec:
    """A conv geometry and the modules that have it (the first names it)."""

    cin: int
    cout: int
    k: int
    stride: int
    hw: int
    modules: Tuple[str, ...]

    name = property(lambda self: self.modules[0])
    uses = property(lambda self: len(self.modules))
    padding = property(lambda self: self.k // 2)
    out_hw = property(lambda self: (self.hw + 2 * self.padding - self.k) // self.stride + 1)
    shape = property(lambda s: f"{s.cin}x{s.hw}x{s.hw}->{s.cout}x{s.out_hw}x{s.out_hw} k{s.k}s{s.stride}")

    def flops(self, batch: int) -> int:  # the multiply-adds (the epilogue's few ops are not counted)
        return 2 * batch * self.out_hw ** 2 * self.cout * self.cin * self.k * self.k


@dataclass(frozen=True)
class Act:
    """A BatchNorm input shape (C, H = W) and the BatchNorms that see it."""

    c: int
    hw: int
    modules: Tuple[str, ...]

    shape = property(lambda self: f"{self.c}x{self.hw}x{self.hw}")


# build: reference.<build>(*args); quick_acts: (C, H) of BN inputs
Model = namedtuple("Model", "build args input_hw batch quick_batch quick_convs quick_acts")


MODELS = {
    # stem, a 3x3 and the 1x1 expansion at 56, a stride-2 3x3, a 1x1 reduction at 14, the last 1x1
    "resnet50": Model("resnet50", (), 224, 256, 64, ("conv1", "layer1.0.conv2", "layer1.0.conv3", "layer2.0.conv2",
                                                      "layer3.1.conv1", "layer4.0.conv3"), ((256, 56), (1024, 14))),
    # the widest 3x3 at 32, the stride-2 3x3 into group 2, the 640-wide 3x3, the stride-2 1x1 shortcut
    "wrn28-10": Model("ref_wrn", (28, 10), 32, 128, 128, ("layer1.0.conv2", "layer2.0.conv1", "layer3.0.conv2",
                                                          "layer3.0.shortcut"), ((160, 32),)),
}


# ----------------------------------------------------------------------------- shapes from models
def trace_layers(model: nn.Module, input_hw: int) -> Tuple[List[ConvSpec], List[Act]]:
    """The distinct conv geometries and BN input shapes of one forward of a [1, 3, hw, hw] input
    (on the model's device: meta works), in ``named_modules`` order of first use."""
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    convs: Dict[tuple, List[str]] = {}
    bns: Dict[tuple, List[str]] = {}

    def hook(mod, inp, _out, name: str) -> None:
        _, c, h, w = inp[0].shape
        if isinstance(mod, nn.BatchNorm2d) and h == w:
            bns.setdefault((int(c), int(h)), []).append(name)
            return
        k, s, p = getattr(mod, "kernel_size", 0), getattr(mod, "stride", 0), getattr(mod, "padding", 0)
        if h != w or k[0] != k[1] or s[0] != s[1] or p != (k[0] // 2,) * 2 or mod.groups != 1 or mod.dilation != (1, 1):
            raise ValueError(f"{name}: not a square conv / BN input this benchmark describes ({h}x{w}, {mod})")
        convs.setdefault((mod.in_channels, mod.out_channels, k[0], s[0], int(h)), []).append(name)

    handles = [m.register_forward_hook(functools.partial(hook, name=name)) for name, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    param = next(model.parameters(), None)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, input_hw, input_hw, device=param.device if param is not None else "cpu"))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()

    def ordered(d):
        items = [(key, tuple(sorted(names, key=order.__getitem__))) for key, names in d.items()]
        return sorted(items, key=lambda kv: order[kv[1][0]])

    return ([ConvSpec(*key, names) for key, names in ordered(convs)],
            [Act(*key, names) for key, names in ordered(bns)])


@functools.lru_cache(maxsize=None)
def model_layers(name: str) -> Tuple[List[ConvSpec], List[Act]]:
    """:func:`trace_layers` of model ``name`` built on the meta device."""
    from resnet_fused.models import reference

    info = MODELS[name]
    with torch.device("meta"):
        model = getattr(reference, info.build)(*info.args)
    return trace_layers(model, info.input_hw)


def tiny_conv(s: ConvSpec) -> ConvSpec:
    """CPU size: channels / 16 (the stem keeps C = 3), spatial 224 -> 16, 56 -> 8, 32 -> 4, else 4."""
    return replace(s, cin=s.cin if s.cin == 3 else max(1, s.cin // 16), cout=max(1, s.cout // 16),
                   hw=16 if s.hw == 224 else max(4, s.hw // 7))


def tiny_act(a: Act) -> Act:
    """CPU size: channels / 16, spatial / 4 (at least 4)."""
    return replace(a, c=max(1, a.c // 16), hw=max(4, a.hw // 4))


# -------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class Job:
    """One case: a conv geometry (with or without a residual) or a BN input shape (memory ops)."""

    model: str
    spec: Union[ConvSpec, Act]
    batch: int
    dtype: str
    residual: bool = False

    variant = property(lambda self: "conv_bn_add_relu" if self.residual else "conv_bn_relu")
    key = property(lambda self: (self.model, self.spec.shape, self.batch, self.dtype))  # conv alone's too

    def label(self) -> str:
        conv = isinstance(self.spec, ConvSpec)
        return (f"{self.model} {f'{self.spec.name} ({self.spec.shape})' if conv else self.spec.shape} b{self.batch} "
                f"{self.dtype}{' +res' if self.residual else ''}")


@dataclass
class Config:
    device: torch.device
    conv_jobs: List[Job]
    mem_jobs: List[Job]
    ops: List[layer_ops.Op]
    providers: List[str]
    timing: dict
    deadline: Optional[float]
    peaks: Optional[peaks_mod.Peaks] = None
    skipped: Dict[str, str] = field(default_factory=dict)
    not_run: List[str] = field(default_factory=list)
    dispatch: List[dict] = field(default_factory=list)  # one entry per auto row
    copies: Dict[int, Tuple[float, common.Timing]] = field(default_factory=dict)  # same-size copy, per bytes

    cuda_graph = property(lambda self: self.device.type == "cuda")


def past_deadline(cfg: Config, what: str, margin_s: float = 0.0) -> bool:
    if cfg.deadline is not None and time.monotonic() > cfg.deadline - margin_s:
        print(f"  SKIPPED {what}: past the deadline", file=sys.stderr)
        cfg.not_run.append(what)
        return True
    return False


def measure(build: Callable[[], Callable], inputs, judge, cfg: Config, prov: str, label: str,
            mem: bool) -> common.Measured:
    if prov == "auto":
        settings.dispatch_fresh()  # the checked first call (the timed shapes) measures this case
    return common.check_then_time(build, inputs, judge, cfg.device, cuda_graph=cfg.cuda_graph, label=label,
                                  timing=common.provider_timing(cfg.device, prov, cfg.timing), measure_mem=mem)


def add_row(rows: List[dict], cfg: Config, job: Job, provider: str, variant: str, m: common.Measured, flops: int,
            nbytes: int, note: Sequence[str], label: str) -> None:
    """A result row: TFLOP/s against the matmul peak (convs), GB/s against the copy bandwidth
    (memory ops, ``flops`` 0), the roofline floor; auto's decisions (also when it failed)."""
    pk, t = cfg.peaks, m.timing
    sec = None if t is None else t.median_ms * 1e-3
    tflops = None if sec is None or not flops else flops / sec / 1e12
    gbps = None if sec is None or flops else nbytes / sec / 1e9
    extra = dict(variant=variant, layout=LAYOUT, tflops=tflops,
                 frac_of_peak=None if tflops is None else tflops / pk.matmul_tflops[job.dtype], gbps=gbps,
                 frac_of_copy=None if gbps is None else gbps / pk.copy_gbps,
                 floor_ms=peaks_mod.roofline_floor_ms(flops, nbytes, pk, job.dtype),
                 note="; ".join(x for x in (m.note, *note) if x))
    mode = "train_step" if variant in layer_ops.OP_NAMES and variant not in INFER_OPS else "infer"
    r = common.make_row(bench=BENCH, model=job.model, shape=job.spec.shape, batch=job.batch, dtype=job.dtype,
                        mode=mode, provider=provider, timing=t, peak_mem_mb=m.peak_mb, correct=m.ok, extra=extra)
    if provider == "auto":
        rec = settings.dispatch_record()
        r["note"] = "; ".join(x for x in (r["note"], settings.auto_note(rec["decisions"])) if x)
        cfg.dispatch.append(settings.dispatch_entry(r, rec))
    rows.append(r)
    if t is not None:
        rate = (f"{r['tflops']:.3g} TFLOP/s  {r['frac_of_peak']:.2f} of peak" if flops else
                f"{r['gbps']:.4g} GB/s  {r['frac_of_copy']:.2f} of copy")
        print(f"  {label:<70} {r['median_ms']:.4f} ms  {rate}  floor {r['floor_ms']:.4f} ms", flush=True)


# ------------------------------------------------------------------------------------ conv rows
def run_conv_job(job: Job, pairs: Sequence[Tuple[str, str]], cfg: Config, rows: List[dict]) -> None:
    """Check, then time, each (provider, variant) of ``pairs`` on one conv case; a row each."""
    from resnet_fused.ops._common import conv_uses_tf32

    dev, s = cfg.device, job.spec
    st = [s.stride] * 2
    if past_deadline(cfg, f"{job.label()} {[p for p, _ in pairs]}"):
        return
    allow_tf32 = dev.type == "cuda" and conv_uses_tf32()
    case = layer_ops.make_conv_case(job, dev)
    with torch.no_grad():
        case.eager_out = layer_ops.conv_fn("eager", job.variant, job, case, allow_tf32)(*case.inputs[0])
    for prov, variant in pairs:
        what = f"{job.label()} {prov} {variant}"
        if past_deadline(cfg, what, COMPILE_MARGIN_S if prov == "compile" else 0.0):
            continue
        alone = variant == "conv_alone"
        ref, eager_out = (case.conv64, None) if alone else (case.ref64, case.eager_out)
        # conv alone (eager_out None) is judged against its own error: shape and finiteness
        m = measure(lambda p=prov, v=variant: layer_ops.conv_fn(p, v, job, case, allow_tf32), case.inputs,
                    lambda out: common.check_output(out, ref, out if eager_out is None else eager_out, job.dtype,
                                                    factor=layer_ops.FACTOR), cfg, prov, what, mem=True)
        kernel = ""
        if prov == "cuda" and m.check is not None:  # it ran: the library is there
            try:  # a label only: its failure must not end the run
                kernel = "kernel: " + torch.ops.resnet_fused_C.conv_kernel_name(
                    case.inputs[0][0], case.w_f, case.inputs[0][1], st, [s.padding] * 2, [1, 1], allow_tf32)
            except Exception as exc:
                kernel = f"kernel: unknown ({type(exc).__name__}: {str(exc)[:80]})"
        add_row(rows, cfg, job, prov, variant, m, s.flops(job.batch), layer_ops.conv_bytes(job, not alone),
                [f"modules: {' '.join(s.modules)}", kernel], what)
        if prov == "compile":
            torch._dynamo.reset()
    del case
    if dev.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------- memory rows
def copy_gbps(nbytes: int, cfg: Config) -> float:
    """GB/s of ``dst.copy_(src)`` moving ``nbytes`` in all (read + write), once per size."""
    if nbytes not in cfg.copies:
        half, dev = max(1, nbytes // 2), cfg.device
        pairs = [(torch.empty(half, dtype=torch.uint8, device=dev).random_(0, 256),
                  torch.empty(half, dtype=torch.uint8, device=dev)) for _ in range(layer_ops.rotation(nbytes, dev))]
        t, _ = common.benchmark_graph_or_plain(lambda src, dst: dst.copy_(src), pairs, dev, cfg.cuda_graph,
                                               f"copy {nbytes} B", **cfg.timing)
        cfg.copies[nbytes] = (2 * half / (t.median_ms * 1e-3) / 1e9, t)
    return cfg.copies[nbytes][0]


def run_mem_job(job: Job, providers: Sequence[str], cfg: Config, rows: List[dict]) -> None:
    """Each op of ``cfg.ops`` at one activation shape: check, then time, each provider; a row each."""
    if past_deadline(cfg, f"{job.label()} memory ops {list(providers)}"):
        return
    dev, dt, a = cfg.device, common.DTYPES[job.dtype], job.spec
    gen = torch.Generator(device=dev).manual_seed(a.c * 1000 + a.hw * 10 + 100000 * dt.itemsize)
    try:
        base = layer_ops.make_inputs(job.batch, a.c, a.hw, dt, dev, gen)
        # copies to rotate over, sized for the op that reads least (channel_stats: one activation)
        k = layer_ops.rotation(base.y.numel() * base.y.element_size(), dev)
        sets = [(base,)] + [(layer_ops.make_inputs(job.batch, a.c, a.hw, dt, dev, gen),) for _ in range(k - 1)]
    except Exception as exc:  # nothing of this case can run
        print(f"  FAILED {job.label()} memory ops: {type(exc).__name__}: {exc}", file=sys.stderr)
        return
    for op in cfg.ops:
        provs = [p for p in providers if p in op.providers]
        if not provs:
            continue
        nbytes = op.traffic(base.y.numel(), a.c, base.y.element_size())
        copy = copy_gbps(nbytes, cfg)
        ref = layer_ops.run_eager(op, base, up=True)
        try:
            eager = layer_ops.run_eager(op, base)
        except Exception as exc:  # eager is the yardstick of the bounds; without it the floors bound
            eager = None
            print(f"  FAILED {op.name} {job.label()} eager: {type(exc).__name__}: {exc}", file=sys.stderr)
        for prov in provs:
            label = f"{op.name} {job.label()} {prov}"
            m = measure(lambda p=prov, o=op: (lambda d: layer_ops.RUNNERS[p](o, d)), sets,
                        lambda outs, o=op: layer_ops.judge(o, outs, ref, eager, job.dtype, base), cfg, prov, label,
                        mem=False)
            same = "" if m.timing is None else f", {nbytes / (m.timing.median_ms * 1e-3) / 1e9 / copy:.2f} of it"
            note = [f"bn inputs: {' '.join(a.modules)}", f"same-size copy {copy:.4g} GB/s{same}"]
            add_row(rows, cfg, job, prov, op.name, m, 0, nbytes, note, label)
    del sets, base
    if dev.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------- tables
def _cell(r: Optional[dict]) -> str:
    if not r:
        return ""
    if not r["correct"]:
        return "WRONG" if r["note"].startswith("wrong") else "FAILED"
    return common.fmt_ms(r["median_ms"])


def _ratio(a: Optional[dict], b: Optional[dict]) -> Optional[float]:
    if not a or not b or a["median_ms"] is None or not b["median_ms"]:
        return None
    return a["median_ms"] / b["median_ms"]


def _fmt(v: Optional[float], digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _group(rows: List[dict], mem: bool, key: Callable[[dict], tuple]) -> Dict[tuple, Dict[str, dict]]:
    out: Dict[tuple, Dict[str, dict]] = {}
    for r in rows:
        if (r["variant"] in layer_ops.OP_NAMES) == mem:
            out.setdefault(key(r), {})[r["provider"]] = r
    return out


def conv_table(rows: List[dict], providers: Sequence[str], info: Dict[tuple, Tuple[str, str]]
               ) -> Tuple[List[str], List[list]]:
    """Per (model, geometry, dtype, variant): conv alone, eager and each fused provider in ms; fused /
    conv alone (the epilogue question); eager / the faster of cuda and triton; the best fraction of
    the matmul peak; the roofline floor and which ceiling sets it. ``info``: a job's key -> (its
    geometry's first module, "math" | "memory")."""
    fused = [p for p in ("cuda", "cudnn_fused", "triton", "auto", "compile") if p in providers]
    headers = ["model", "conv", "shape", "batch", "dtype", "variant", "conv ms", "eager ms"]
    headers += [f"{p} ms" for p in fused] + [f"{p}/conv" for p in fused if p != "compile"]
    headers += ["eager/fused", "best of peak", "floor ms", "bound"]
    groups = _group(rows, False, lambda r: (r["model"], r["shape"], r["batch"], r["dtype"], r["variant"]))
    out = []
    for key, by in groups.items():
        if key[4] == "conv_alone":
            continue
        c = groups.get(key[:4] + ("conv_alone",), {}).get("eager")
        any_row = next(iter(by.values()))
        name, bound = info.get(key[:4], ("", ""))
        line = [key[0], name, *key[1:], _cell(c), _cell(by.get("eager"))]
        line += [_cell(by.get(p)) for p in fused] + [_fmt(_ratio(by.get(p), c)) for p in fused if p != "compile"]
        timed = [by[p] for p in ("cuda", "triton") if p in by and by[p]["median_ms"] is not None]
        line.append(_fmt(_ratio(by.get("eager"), min(timed, key=lambda r: r["median_ms"]) if timed else None)))
        cands = [r for r in list(by.values()) + ([c] if c else []) if r["frac_of_peak"] is not None]
        top = max(cands, key=lambda r: r["frac_of_peak"]) if cands else None
        who = "" if top is None else "conv alone" if top["variant"] == "conv_alone" else top["provider"]
        line += ["-" if top is None else f"{top['frac_of_peak']:.2f} ({who})", f"{any_row['floor_ms']:.4g}", bound]
        out.append(line)
    return headers, out


def conv_bound(job: Job, pk: peaks_mod.Peaks) -> str:
    """Which measured ceiling sets the fused op's roofline floor."""
    t_math = job.spec.flops(job.batch) / (pk.matmul_tflops[job.dtype] * 1e12)
    return "math" if t_math >= layer_ops.conv_bytes(job, fused=True) / (pk.copy_gbps * 1e9) else "memory"


def mem_table(rows: List[dict], providers: Sequence[str]) -> Tuple[List[str], List[list]]:
    """Per (model, op, shape, dtype): each provider's GB/s and fraction of the copy bandwidth."""
    provs = [p for p in ("cuda", "triton", "auto", "eager") if p in providers]
    headers = ["model", "op", "shape", "batch", "dtype", "mode", "floor ms"]
    headers += [h for p in provs for h in (f"{p} GB/s", f"{p}/copy")]
    out = []
    for key, by in _group(rows, True, lambda r: (r["model"], r["variant"], r["shape"], r["batch"], r["dtype"],
                                                 r["mode"])).items():
        line = [*key, f"{next(iter(by.values()))['floor_ms']:.4g}"]
        for p in provs:
            r = by.get(p)
            line += ["n/a", ""] if r is None else [_cell(r), ""] if not r["correct"] else \
                [f"{r['gbps']:.4g}", f"{r['frac_of_copy']:.2f}"]
        out.append(line)
    return headers, out


def goal_lines(rows: List[dict], device: torch.device) -> List[str]:
    """The goals: cuda's fused conv no slower than conv alone; its memory ops >= 85% of the copy."""
    where = "" if device.type == "cuda" else " (CPU run: says nothing about the GPU goal)"
    alone = {(r["model"], r["shape"], r["batch"], r["dtype"]): r for r in rows if r["variant"] == "conv_alone"}
    cuda = [r for r in rows if r["provider"] == "cuda" and r["median_ms"] is not None]

    def line(what: str, got: List[Tuple[float, dict]], met: Callable[[float], bool], worst) -> List[str]:
        if not got:
            return []
        x, w = worst(got, key=lambda p: p[0])
        return [f"goal ({what}): met in {sum(met(y) for y, _ in got)} of {len(got)} cases; worst {x:.3f} "
                f"({w['model']} {w['variant']} {w['shape']} {w['dtype']}){where}"]

    out = []
    for v in ("conv_bn_relu", "conv_bn_add_relu"):
        got = [(_ratio(r, alone.get((r["model"], r["shape"], r["batch"], r["dtype"]))), r) for r in cuda
               if r["variant"] == v]
        out += line(f"cuda {v} <= conv alone", [p for p in got if p[0] is not None], lambda y: y <= EPILOGUE_GOAL, max)
    got = [(r["frac_of_copy"], r) for r in cuda if r["frac_of_copy"] is not None]
    return out + line(f"cuda memory ops >= {COPY_GOAL:.0%} of copy bandwidth", got, lambda y: y >= COPY_GOAL, min)


# -------------------------------------------------------------------------------------------- CLI
def parse_args(argv: Optional[Sequence[str]] = None):
    p = common.base_parser("python -m benchmarks.layers", __doc__, providers=PROVIDERS,
                           quick_help="GPU: batch 64 / 128, fp16, 6 + 4 conv geometries, 3 memory ops at 3 "
                                      f"shapes, nothing started after {QUICK_DEADLINE_S:.0f} s")
    p.add_argument("--models", nargs="+", choices=tuple(MODELS), default=None, help="default: both")
    p.add_argument("--convs", nargs="+", default=None, help="only the conv geometries named by these modules")
    p.add_argument("--acts", nargs="+", default=None, help="only these BN input shapes, full-size CxH (256x56)")
    p.add_argument("--ops", nargs="+", choices=layer_ops.OP_NAMES, default=None,
                   help=f"memory ops (default: all; --quick and CPU: {' '.join(QUICK_OPS)})")
    p.add_argument("--peaks", default=None, metavar="FILE", help="a JSON of peaks.measure(...).as_dict() to use")
    p.add_argument("--deadline", type=float, default=None,
                   help=f"seconds after start past which nothing starts (--quick: {QUICK_DEADLINE_S:.0f})")
    return p.parse_args(argv)


def make_config(args) -> Config:
    dev = common.pick_device(args.device)
    gpu = dev.type == "cuda"
    small = args.quick or not gpu
    dtypes = args.dtypes or (["fp16"] if args.quick and gpu else (["fp16", "bf16", "fp32"] if gpu else ["fp32"]))
    skipped: Dict[str, str] = {}
    providers = common.order_providers(args.providers, PROVIDERS, "eager")
    if not gpu and not args.providers:
        providers.remove("compile")
        skipped["compile"] = "CPU: torch.compile's C++ code generation takes tens of seconds per case (--providers)"
    providers = common.drop_unavailable(providers, dev, skipped)
    models = args.models or list(MODELS)
    layers = {name: model_layers(name) for name in models}
    known_convs = {s.name for convs, _ in layers.values() for s in convs}
    known_acts = {f"{a.c}x{a.hw}" for _, acts in layers.values() for a in acts}
    bad = sorted(set(args.convs or ()) - known_convs) + sorted(set(args.acts or ()) - known_acts)
    if bad:  # a name that matches nothing is a typo, not an empty run
        raise SystemExit(f"--convs / --acts: {bad} match no layer of {models} "
                         f"(convs: {sorted(known_convs)}; acts: {sorted(known_acts)})")
    conv_jobs: List[Job] = []
    mem_jobs: List[Job] = []
    for name in models:
        info, (convs, acts) = MODELS[name], layers[name]
        batch = 2 if not gpu else (info.quick_batch if args.quick else info.batch)
        want = args.convs or (info.quick_convs if small else None)
        specs = [s if gpu else tiny_conv(s) for s in convs if want is None or s.name in want]
        if args.acts:
            acts = [a for a in acts if f"{a.c}x{a.hw}" in args.acts]
        elif small:
            acts = [a for a in acts if (a.c, a.hw) in info.quick_acts]
        conv_jobs += [Job(name, s, batch, d, res) for d in dtypes for s in specs for res in (False, True)]
        mem_jobs += [Job(name, a if gpu else tiny_act(a), batch, d) for d in dtypes for a in acts]
    op_names = args.ops or (QUICK_OPS if small else layer_ops.OP_NAMES)
    deadline_s = args.deadline if args.deadline is not None else (QUICK_DEADLINE_S if args.quick else None)
    return Config(dev, conv_jobs, mem_jobs, [o for o in layer_ops.OPS if o.name in op_names], providers,
                  timing=common.op_timing(dev, args.quick), deadline=None if deadline_s is None else _T0 + deadline_s,
                  skipped=skipped)


def load_peaks(path: str, dtypes: Sequence[str], dev: torch.device) -> peaks_mod.Peaks:
    """A ``peaks.measure(...).as_dict()`` JSON (or a result file's ``"peaks"``) covering ``dtypes``."""
    with open(path) as f:
        d = json.load(f)
    pk = peaks_mod.Peaks.from_dict(d["peaks"] if "peaks" in d and "copy_gbps" not in d else d)
    missing = [x for x in dtypes if x not in pk.matmul_tflops]
    if missing:
        raise SystemExit(f"--peaks {path}: no matmul peak for {missing} (it has {sorted(pk.matmul_tflops)})")
    if pk.device != common.device_name(dev):
        print(f"note: --peaks {path} was measured on {pk.device!r}, this run is on {common.device_name(dev)!r}",
              file=sys.stderr)
    return pk


def main(argv: Optional[Sequence[str]] = None) -> int:
    from resnet_fused.ops._common import conv_uses_tf32

    args = parse_args(argv)
    cfg = make_config(args)
    dev = cfg.device
    env = common.env_info(dev)
    print(common.banner("layers", env))
    dtypes = sorted({j.dtype for j in cfg.conv_jobs + cfg.mem_jobs}, key=list(common.DTYPES).index)
    if args.peaks:
        cfg.peaks, source = load_peaks(args.peaks, dtypes, dev), f"file: {args.peaks}"
    else:
        cfg.peaks = peaks_mod.measure(dev, dtypes or ["fp32"], quick=args.quick or dev.type != "cuda")
        source = "measured in this run"
    print(f"ceilings ({source}): {peaks_mod.describe(cfg.peaks)}")
    print(f"providers {cfg.providers}; {len(cfg.conv_jobs)} conv cases, {len(cfg.mem_jobs)} activation shapes x "
          f"{len(cfg.ops)} memory ops" + settings.settings_suffix(dev, True, cfg.deadline, _T0), flush=True)
    common.print_skipped(cfg.skipped)
    rows: List[dict] = []
    extra = {"peaks": cfg.peaks.as_dict(), "peaks_source": source,
             "timing": "CUDA-graph replay" if cfg.cuda_graph else "perf_counter (CPU)",
             "tf32": dev.type == "cuda" and conv_uses_tf32(), "cudnn_benchmark": dev.type == "cuda",
             "not_run": cfg.not_run, "dispatch": cfg.dispatch}
    baselines = set()
    with settings.dispatch_isolated(), settings.cudnn_benchmark(dev, True):
        for section, phase in PHASES:
            provs = [p for p in cfg.providers if p in phase]
            for job in (cfg.conv_jobs if section == "conv" else cfg.mem_jobs) if provs else ():
                if section == "conv":
                    pairs = [("eager", "conv_alone")] if "eager" in provs and job.key not in baselines else []
                    baselines.update([job.key] if pairs else [])
                    run_conv_job(job, pairs + [(p, job.variant) for p in provs], cfg, rows)
                else:
                    run_mem_job(job, provs, cfg, rows)
                if not args.no_write and rows:  # after every case: a run cut short keeps what it measured
                    common.write_results(args.out, BENCH, env, rows, keys=KEYS, extra={"skipped": cfg.skipped, **extra})
    rows = _sorted(rows, cfg)
    info = {j.key: (j.spec.name, conv_bound(j, cfg.peaks)) for j in cfg.conv_jobs}
    tables = [(f"layers: convolutions vs cuDNN's conv alone, {env['gpu']}", *conv_table(rows, cfg.providers, info)),
              (f"layers: memory-bound ops vs copy bandwidth, {env['gpu']}", *mem_table(rows, cfg.providers))]
    tables = [t for t in tables if t[2]]
    for title, h, lines in tables:
        print(common.format_table(h, lines, title=title))
    notes = [f"ceilings ({source}): {peaks_mod.describe(cfg.peaks)}",
             "fused = conv with the BN folded + bias (+ residual) + ReLU in one op; conv = F.conv2d alone; eager = "
             "conv, batch_norm, add, relu as separate ops; floor = max(flops / matmul peak, bytes / copy bandwidth)"]
    extra["goal"] = goal_lines(rows, dev)
    notes += extra["goal"]
    if cfg.not_run:
        notes.append(f"past the deadline, not run: {len(cfg.not_run)} case(s)/provider(s) (JSON: not_run)")
    print("\n".join(notes))
    common.print_skipped(cfg.skipped)
    write = not args.no_write and bool(rows)
    rc = common.finish(rows, args.out, BENCH, env, write=write, keys=KEYS, skipped=cfg.skipped, extra=extra,
                       markdown=tables[0] if tables and write else None, notes=notes)
    if write and len(tables) > 1:  # finish() writes one table: the memory table goes under it
        title, h, lines = tables[1]
        with open(Path(args.out) / f"{common.result_stem(env, BENCH)}.md", "a") as f:
            f.write(f"\n## {title}\n\n{common.markdown_table(h, lines)}\n")
    return rc


def _sorted(rows: List[dict], cfg: Config) -> List[dict]:
    """Rows in case order (convs, then memory ops), not in the order the phases ran them."""
    idx: Dict[tuple, int] = {}
    for j in cfg.conv_jobs + cfg.mem_jobs:
        idx.setdefault(j.key, len(idx))
    variants = CONV_VARIANTS + layer_ops.OP_NAMES

    def key(r: dict) -> tuple:
        k = (r["model"], r["shape"], r["batch"], r["dtype"])
        return (idx.get(k, 1 << 30), variants.index(r["variant"]), PROVIDERS.index(r["provider"]))

    return sorted(rows, key=key)


if __name__ == "__main__":
    sys.exit(main())
