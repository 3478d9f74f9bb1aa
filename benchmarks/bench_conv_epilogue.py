"""Is the fused epilogue free? conv + bias (+ residual) + ReLU in one kernel vs cuDNN's conv alone.

    python -m benchmarks.bench_conv_epilogue [--out DIR] [--quick] [--device cuda|cpu] [--no-compile]

Question (the issue's goal): on ResNet-50's convolution shapes, does our fused
``relu(conv(x, w) + bias (+ residual))`` run at least as fast as cuDNN's convolution *alone*
(``F.conv2d(x, w)``, no bias, no activation), i.e. does the epilogue cost nothing? ``vs_conv`` =
a provider's median / conv alone's median on the same input; <= 1.0 meets the goal.

Shapes: every distinct convolution geometry of torchvision's ResNet-50 (v1.5: the stride on the
3x3) at 224x224 input, :data:`RESNET50_CONVS`: the 7x7/2 stem (C = 3), each stage's 1x1 and 3x3
convs including the stride-2 3x3 and the stride-2 1x1 downsample; 23 geometries covering all 53
convs (``uses`` says how many). Each runs without and with a residual (an output-shaped tensor
added before the ReLU, as the block's last conv does), batch 256, fp16 and bf16 and fp32 (TF32, as
cuDNN's default), channels_last (``--layouts nchw`` adds NCHW, where our library falls back).
``--quick``: batch 32, six geometries (:data:`QUICK`), fp16.

Providers, all on the same inputs (bias a float32 [K] vector; eager casts it to the dtype once):

- ``conv_alone``: ``F.conv2d(x, w)``, the baseline (cuDNN on a GPU, oneDNN on CPU);
- ``eager``: ``F.conv2d(x, w, bias)``, ``add_(r)``, ``relu_()`` (what a plain block does);
- ``cuda``: ``torch.ops.resnet_fused_C.conv_bias_act`` (CUTLASS implicit GEMM with our epilogue
  where a configuration fits; else cuDNN + our epilogue kernel): the ``kernel`` column is
  ``conv_kernel_name(...)``, the CUTLASS configuration or the fallback's reason;
- ``triton``: ``resnet_fused.ops.conv_bias_act(..., backend="triton")`` (autotuned on first call);
- ``compile``: ``torch.compile`` of the eager sequence (default mode, a fresh compile per case).

Correctness first: each output against float64 (conv, bias, residual and ReLU computed in float64
from the same low-precision inputs), relative error within max(dtype floor, 4 x eager's error in
the same dtype) (:func:`benchmarks.common.check_output`); conv alone against the float64 conv. A
wrong or failing provider gets ``correct=false`` and no time; one that cannot run here (``cuda``
without the library or without its CUDA kernels, ``triton`` on CPU without the interpreter) is
skipped with its reason (printed, and under ``"skipped"`` in the JSON).

Timing: CUDA-graph replay (``--no-graph``: plain launches) over input copies larger than twice the
L2, median and p20/p80 of many replays; ``cudnn.benchmark`` on (``--no-cudnn-benchmark``). Order:
conv alone, eager and cuda for every case first, then triton, then compile, so a run cut short
(``--quick`` starts nothing after 120 s: ``--deadline``) keeps the headline answer; results are
rewritten after every case.

CPU (CI): tiny shapes (channels / 16 except the stem's 3, spatial 56 -> 8, 28/14/7 -> 4, stem input
16), batch 2, fp32, the quick subset; ``cuda`` is the C++ path (oneDNN conv + our epilogue pass),
``triton`` runs through the interpreter only with ``TRITON_INTERPRET=1``, ``compile`` is left out
(``--compile`` adds it). Its numbers prove the script, not the goal.

Results: a table on stdout, JSON + CSV + markdown under ``--out`` (default ``benchmarks/results``)
with the columns of :data:`KEYS`.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from . import common

BENCH = "conv_epilogue"
KEYS = ("bench", "conv", "shape", "batch", "layout", "dtype", "residual", "provider", "kernel", "median_ms", "p20_ms",
        "p80_ms", "tflops", "vs_conv", "err", "bound", "correct", "note")
PROVIDERS = ("conv_alone", "eager", "cuda", "triton", "compile")
PHASES = (("conv_alone", "eager", "cuda"), ("triton",), ("compile",))  # a run cut short keeps the first
FACTOR = 4.0
QUICK_DEADLINE_S = 120.0
_T0 = time.monotonic()


@dataclass(frozen=True)
class ConvSpec:
    """A ResNet-50 conv geometry; ``name`` is the first module with it, ``uses`` how many have it."""

    name: str
    cin: int
    cout: int
    k: int
    stride: int
    hw: int
    uses: int

    @property
    def padding(self) -> int:
        return self.k // 2

    @property
    def out_hw(self) -> int:
        return (self.hw + 2 * self.padding - self.k) // self.stride + 1

    @property
    def shape(self) -> str:
        return f"{self.cin}x{self.hw}x{self.hw}->{self.cout}x{self.out_hw}x{self.out_hw} k{self.k}s{self.stride}"

    def flops(self, batch: int) -> int:
        return 2 * batch * self.out_hw ** 2 * self.cout * self.cin * self.k * self.k


RESNET50_CONVS: Tuple[ConvSpec, ...] = (
    ConvSpec("conv1", 3, 64, 7, 2, 224, 1),
    ConvSpec("layer1.0.conv1", 64, 64, 1, 1, 56, 1),
    ConvSpec("layer1.0.conv2", 64, 64, 3, 1, 56, 3),
    ConvSpec("layer1.0.conv3", 64, 256, 1, 1, 56, 4),  # and layer1.0.downsample.0 (stride 1)
    ConvSpec("layer1.1.conv1", 256, 64, 1, 1, 56, 2),
    ConvSpec("layer2.0.conv1", 256, 128, 1, 1, 56, 1),
    ConvSpec("layer2.0.conv2", 128, 128, 3, 2, 56, 1),
    ConvSpec("layer2.0.conv3", 128, 512, 1, 1, 28, 4),
    ConvSpec("layer2.0.downsample.0", 256, 512, 1, 2, 56, 1),
    ConvSpec("layer2.1.conv1", 512, 128, 1, 1, 28, 3),
    ConvSpec("layer2.1.conv2", 128, 128, 3, 1, 28, 3),
    ConvSpec("layer3.0.conv1", 512, 256, 1, 1, 28, 1),
    ConvSpec("layer3.0.conv2", 256, 256, 3, 2, 28, 1),
    ConvSpec("layer3.0.conv3", 256, 1024, 1, 1, 14, 6),
    ConvSpec("layer3.0.downsample.0", 512, 1024, 1, 2, 28, 1),
    ConvSpec("layer3.1.conv1", 1024, 256, 1, 1, 14, 5),
    ConvSpec("layer3.1.conv2", 256, 256, 3, 1, 14, 5),
    ConvSpec("layer4.0.conv1", 1024, 512, 1, 1, 14, 1),
    ConvSpec("layer4.0.conv2", 512, 512, 3, 2, 14, 1),
    ConvSpec("layer4.0.conv3", 512, 2048, 1, 1, 7, 3),
    ConvSpec("layer4.0.downsample.0", 1024, 2048, 1, 2, 14, 1),
    ConvSpec("layer4.1.conv1", 2048, 512, 1, 1, 7, 2),
    ConvSpec("layer4.1.conv2", 512, 512, 3, 1, 7, 2),
)
# stem, a 3x3 and the 1x1 expansion at 56x56, a stride-2 3x3, a 1x1 reduction at 14x14, the last 1x1
QUICK = ("conv1", "layer1.0.conv2", "layer1.0.conv3", "layer2.0.conv2", "layer3.1.conv1", "layer4.0.conv3")


def tiny(s: ConvSpec) -> ConvSpec:
    """CPU smoke size: channels / 16 (the stem keeps C = 3), spatial 224 -> 16, 56 -> 8, else 4."""
    hw = 16 if s.hw == 224 else max(4, s.hw // 7)
    cin = s.cin if s.cin == 3 else max(1, s.cin // 16)
    return ConvSpec(s.name, cin, max(1, s.cout // 16), s.k, s.stride, hw, s.uses)


@dataclass(frozen=True)
class Job:
    spec: ConvSpec
    batch: int
    dtype: str
    layout: str
    residual: bool

    def label(self) -> str:
        return (f"{self.spec.name} ({self.spec.shape}) b{self.batch} {self.layout} {self.dtype}"
                f"{' +res' if self.residual else ''}")

    @property
    def base_key(self) -> tuple:  # the conv-alone baseline this job is compared with
        return (self.spec.name, self.batch, self.dtype, self.layout)


@dataclass
class Config:
    device: torch.device
    jobs: Sequence[Job]
    providers: Sequence[str]
    cuda_graph: bool
    timing: dict
    deadline: Optional[float]
    skipped: Dict[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ a case
@dataclass
class Case:
    """One job's tensors: inputs to rotate over, parameters, float64 references, eager's output."""

    inputs: List[tuple]
    w: torch.Tensor
    b32: torch.Tensor
    b_dt: torch.Tensor
    conv64: torch.Tensor
    ref64: torch.Tensor
    eager_out: Optional[torch.Tensor] = None


def make_case(job: Job, dev: torch.device) -> Case:
    s, dt = job.spec, common.DTYPES[job.dtype]
    fmt = torch.channels_last if job.layout == "cl" else torch.contiguous_format
    gen = torch.Generator(device=dev).manual_seed(1000 * s.cin + s.cout + 7 * s.k + s.stride + s.hw)
    x_shape, out_shape = (job.batch, s.cin, s.hw, s.hw), (job.batch, s.cout, s.out_hw, s.out_hw)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, device=dev) * scale

    # He-scaled weights keep the output O(1) whatever the fan-in, as in a trained network
    w = rnd(s.cout, s.cin, s.k, s.k, scale=math.sqrt(2.0 / (s.cin * s.k * s.k))).to(dt)
    w = w.contiguous(memory_format=fmt)
    b32 = rnd(s.cout, scale=0.3)
    elems = job.batch * s.cin * s.hw ** 2 + (job.batch * s.cout * s.out_hw ** 2 if job.residual else 0)
    per = elems * w.element_size()
    k = common.rotation_copies(per, common.cache_bytes(dev), max_copies=8 if dev.type == "cuda" else 2)
    inputs = []
    for _ in range(k):
        x = rnd(*x_shape).to(dt).contiguous(memory_format=fmt)
        r = rnd(*out_shape).to(dt).contiguous(memory_format=fmt) if job.residual else None
        inputs.append((x, r))
    x, r = inputs[0]
    # float64 reference in NCHW (float64 convolutions need no special layout)
    conv64 = F.conv2d(x.double().contiguous(), w.double().contiguous(), None, s.stride, s.padding)
    ref = conv64 + b32.double().view(1, -1, 1, 1)
    if r is not None:
        ref = ref + r.double()
    return Case(inputs, w, b32, b32.to(dt), conv64, torch.relu(ref))


def provider_fn(name: str, job: Job, case: Case, allow_tf32: bool) -> Callable:
    """``fn(x, r)`` for provider ``name`` (``r`` is None without a residual)."""
    s = job.spec
    st, pd = [s.stride, s.stride], [s.padding, s.padding]
    w, b32, b_dt = case.w, case.b32, case.b_dt

    def eager(x, r):
        y = F.conv2d(x, w, b_dt, st, pd)
        if r is not None:
            y = y.add_(r)
        return y.relu_()

    if name == "conv_alone":
        return lambda x, r: F.conv2d(x, w, None, st, pd)
    if name == "eager":
        return eager
    if name == "cuda":
        op = torch.ops.resnet_fused_C.conv_bias_act
        return lambda x, r: op(x, w, b32, r, st, pd, [1, 1], True, allow_tf32)
    if name == "triton":
        from resnet_fused.ops import conv_bias_act

        return lambda x, r: conv_bias_act(x, w, b32, r, stride=s.stride, padding=s.padding, relu=True,
                                          backend="triton")
    if name == "compile":
        torch._dynamo.reset()  # a fresh compile per case (the recompile limit would fall back to eager)
        return torch.compile(eager, dynamic=False)
    raise ValueError(f"provider: expected one of {PROVIDERS}, got {name!r}")


def kernel_name(name: str, job: Job, case: Case, allow_tf32: bool) -> str:
    if name != "cuda":
        return ""
    s = job.spec
    x, r = case.inputs[0]
    return torch.ops.resnet_fused_C.conv_kernel_name(x, case.w, r, [s.stride] * 2, [s.padding] * 2, [1, 1],
                                                     allow_tf32)



def _past_deadline(cfg: Config) -> bool:
    return cfg.deadline is not None and time.monotonic() > cfg.deadline


def run_job(job: Job, providers: Sequence[str], cfg: Config, rows: List[dict], conv_ms: Dict[tuple, float]) -> None:
    """Check, then time, each of ``providers`` on one job; append a row per provider."""
    dev = cfg.device
    if _past_deadline(cfg):
        print(f"  SKIPPED {job.label()} {list(providers)}: past the deadline", file=sys.stderr)
        return
    from resnet_fused.ops._common import conv_uses_tf32

    allow_tf32 = dev.type == "cuda" and conv_uses_tf32()
    case = make_case(job, dev)
    with torch.no_grad():
        case.eager_out = provider_fn("eager", job, case, allow_tf32)(*case.inputs[0])
    for prov in providers:
        if _past_deadline(cfg):
            print(f"  SKIPPED {job.label()} {prov}: past the deadline", file=sys.stderr)
            continue
        got = {"kernel": ""}

        def build(prov=prov, case=case):
            got["kernel"] = kernel_name(prov, job, case, allow_tf32)
            return provider_fn(prov, job, case, allow_tf32)

        ref, eager_out = (case.conv64, None) if prov == "conv_alone" else (case.ref64, case.eager_out)
        m = measure(build, case.inputs, ref, eager_out, job.dtype, cfg, prov, f"{job.label()} {prov}")
        t, chk, ok, note, kernel = m.timing, m.check, m.ok, m.note, got["kernel"]
        if prov == "conv_alone" and t is not None:
            conv_ms[job.base_key] = t.median_ms
        rows.append(make_row(job, prov, kernel, t, conv_ms.get(job.base_key), chk, ok, note))
        r = rows[-1]
        if r["median_ms"] is not None:
            vs = "" if r["vs_conv"] is None else f"  {r['vs_conv']:.3f}x conv alone"
            print(f"  {job.label()} {prov:<10} {r['median_ms']:.4f} ms  {r['tflops']:.2f} TFLOP/s{vs}"
                  f"{'  [' + kernel + ']' if kernel else ''}", flush=True)
        if prov == "compile":
            torch._dynamo.reset()
    del case
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def measure(build: Callable[[], Callable], inputs, ref64, eager_out, dtype: str, cfg, prov: str, label: str,
            measure_mem: bool = False) -> common.Measured:
    """:func:`benchmarks.common.check_then_time` of one conv provider against ``ref64``
    (``eager_out`` None: the yardstick, conv alone, judged against its own error: shape, NaN/Inf)."""
    def judge(out):
        return common.check_output(out, ref64, out if eager_out is None else eager_out, dtype, factor=FACTOR)

    return common.check_then_time(build, inputs, judge, cfg.device, cuda_graph=cfg.cuda_graph, label=label,
                                  timing=common.provider_timing(cfg.device, prov, cfg.timing),
                                  measure_mem=measure_mem)


def make_row(job: Job, prov: str, kernel: str, t: Optional[common.Timing], conv: Optional[float],
             chk: Optional[common.Check], ok: bool, note: str) -> dict:
    sig = common.sig
    med = None if t is None else t.median_ms
    tflops = None if med is None else job.spec.flops(job.batch) / (med * 1e-3) / 1e12
    vs = None if med is None or not conv else med / conv
    # conv alone has no residual: it is the baseline of both variants
    residual = False if prov == "conv_alone" else job.residual
    return dict(zip(KEYS, (
        BENCH, job.spec.name, job.spec.shape, job.batch, job.layout, job.dtype, residual, prov, kernel, sig(med),
        None if t is None else sig(t.p20_ms), None if t is None else sig(t.p80_ms), sig(tflops), sig(vs),
        None if chk is None else sig(chk.err), None if chk is None else sig(chk.bound), bool(ok), note)))


# ------------------------------------------------------------------------------------------ table
def summary_table(rows: List[dict], providers: Sequence[str]) -> Tuple[List[str], List[list]]:
    """(headers, lines): per (conv, batch, layout, dtype, residual), conv alone's ms and each
    fused provider's ms and ratio to it; the cuda kernel."""
    others = [p for p in providers if p != "conv_alone"]
    headers = ["conv", "shape", "batch", "layout", "dtype", "res", "conv ms"]
    for p in others:
        headers += [f"{p} ms", f"{p}/conv"]
    if "cuda" in others:
        headers.append("cuda kernel")
    conv: Dict[tuple, dict] = {}
    by_key: Dict[tuple, Dict[str, dict]] = {}
    for r in rows:
        base = (r["conv"], r["shape"], r["batch"], r["layout"], r["dtype"])
        if r["provider"] == "conv_alone":
            conv[base] = r
        else:
            by_key.setdefault(base + (r["residual"],), {})[r["provider"]] = r
    lines = []
    for key, prov in by_key.items():
        c = conv.get(key[:5], {})
        line = [*key[:5], "yes" if key[5] else "no", _cell(c)]
        for p in others:
            r = prov.get(p)
            line += ["", ""] if r is None else [_cell(r), "-" if r["vs_conv"] is None else f"{r['vs_conv']:.3f}"]
        if "cuda" in others:
            line.append(prov.get("cuda", {}).get("kernel", ""))
        lines.append(line)
    return headers, lines


def _cell(r: dict) -> str:
    if not r:
        return ""
    if not r["correct"]:
        return "WRONG" if r["note"].startswith("wrong") else "FAILED"
    return common.fmt_ms(r["median_ms"])


def goal_lines(rows: List[dict], device: torch.device) -> List[str]:
    out = []
    where = "" if device.type == "cuda" else " (CPU run: says nothing about the GPU goal)"
    for res in (False, True):
        timed = [r for r in rows if r["provider"] == "cuda" and r["residual"] == res and r["vs_conv"] is not None]
        what = "conv + bias + residual + ReLU" if res else "conv + bias + ReLU"
        if not timed:
            out.append(f"goal ({what} <= conv alone): no cuda rows timed")
            continue
        met = [r for r in timed if r["vs_conv"] <= 1.0]
        worst = max(timed, key=lambda r: r["vs_conv"])
        out.append(f"goal (cuda {what} <= conv alone): met in {len(met)} of {len(timed)} cases; worst "
                   f"{worst['vs_conv']:.3f}x ({worst['conv']} {worst['dtype']} {worst['layout']}){where}")
    return out


# -------------------------------------------------------------------------------------------- CLI
def parse_args(argv: Optional[Sequence[str]] = None):
    p = common.base_parser("python -m benchmarks.bench_conv_epilogue", __doc__, providers=PROVIDERS,
                           quick_help="GPU: batch 32, six conv shapes, fp16 (a few minutes on an H100)")
    p.add_argument("--batch", type=int, default=None, help="override the batch size")
    p.add_argument("--convs", nargs="+", choices=[s.name for s in RESNET50_CONVS], default=None,
                   help="only these conv geometries (default: all 23; --quick and CPU: six)")
    p.add_argument("--layouts", nargs="+", choices=("cl", "nchw"), default=None, help="default: cl")
    p.add_argument("--residual", choices=("no", "yes", "both"), default="both")
    p.add_argument("--compile", action="store_true", help="CPU: include torch.compile (slow to compile)")
    p.add_argument("--no-compile", action="store_true", help="leave out torch.compile")
    p.add_argument("--no-graph", action="store_true", help="GPU: time plain launches, not CUDA-graph replays")
    p.add_argument("--no-cudnn-benchmark", action="store_true", help="GPU: leave torch.backends.cudnn.benchmark off")
    p.add_argument("--deadline", type=float, default=None,
                   help=f"seconds after start past which no provider starts (--quick: {QUICK_DEADLINE_S:.0f})")
    return p.parse_args(argv)


def make_config(args) -> Config:
    dev = common.pick_device(args.device)
    names = args.convs or (QUICK if (args.quick or dev.type == "cpu") else [s.name for s in RESNET50_CONVS])
    specs = [s for s in RESNET50_CONVS if s.name in names]
    skipped: Dict[str, str] = {}
    providers = common.order_providers(args.providers, PROVIDERS, "conv_alone")
    if dev.type == "cuda":
        batch = 32 if args.quick else 256
        dtypes = ["fp16"] if args.quick else ["fp16", "bf16", "fp32"]
    else:
        batch, dtypes = 2, ["fp32"]
        specs = [tiny(s) for s in specs]
        if "compile" in providers and not args.compile and not args.providers:
            providers.remove("compile")
            skipped["compile"] = "CPU: torch.compile's C++ code generation takes tens of seconds per case (--compile)"
    if args.no_compile and "compile" in providers:
        providers.remove("compile")
    providers = common.drop_unavailable(providers, dev, skipped)
    residuals = {"no": [False], "yes": [True], "both": [False, True]}[args.residual]
    jobs = [Job(s, args.batch or batch, d, lay, res) for d in (args.dtypes or dtypes) for s in specs
            for lay in (args.layouts or ["cl"]) for res in residuals]
    deadline_s = args.deadline if args.deadline is not None else (QUICK_DEADLINE_S if args.quick else None)
    return Config(dev, jobs, providers, cuda_graph=dev.type == "cuda" and not args.no_graph,
                  timing=common.op_timing(dev, args.quick),
                  deadline=None if deadline_s is None else _T0 + deadline_s, skipped=skipped)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    cfg = make_config(args)
    dev = cfg.device
    env = common.env_info(dev)
    from resnet_fused.ops._common import conv_uses_tf32

    print(common.banner("bench_conv_epilogue", env))
    print(f"providers {list(cfg.providers)}; {len(cfg.jobs)} cases; "
          f"{'CUDA graphs' if cfg.cuda_graph else 'no graphs'}"
          f"{'; fp32 convs use TF32 ' + str(conv_uses_tf32()) if dev.type == 'cuda' else ''}"
          + common.settings_suffix(dev, not args.no_cudnn_benchmark, cfg.deadline, _T0), flush=True)
    common.print_skipped(cfg.skipped)
    rows: List[dict] = []
    conv_ms: Dict[tuple, float] = {}
    extra = {"timing": "CUDA-graph replay" if cfg.cuda_graph else
             ("CUDA events, plain launches" if dev.type == "cuda" else "perf_counter (CPU)"),
             "tf32": dev.type == "cuda" and conv_uses_tf32(),
             "cudnn_benchmark": dev.type == "cuda" and not args.no_cudnn_benchmark}

    def save() -> None:
        if not args.no_write and rows:
            common.write_results(args.out, BENCH, env, rows, keys=KEYS, extra={"skipped": cfg.skipped, **extra})

    baselines_done = set()
    with common.cudnn_benchmark(dev, not args.no_cudnn_benchmark):
        for phase in PHASES:
            providers = [p for p in cfg.providers if p in phase]
            for job in cfg.jobs:
                todo = [p for p in providers if p != "conv_alone" or job.base_key not in baselines_done]
                if "conv_alone" in todo:
                    baselines_done.add(job.base_key)
                if todo:
                    run_job(job, todo, cfg, rows, conv_ms)
                    save()  # after every case: a run cut short keeps what it measured
    headers, lines = summary_table(rows, cfg.providers)
    print(common.format_table(headers, lines))
    goals = goal_lines(rows, dev)
    print("\n".join(goals))
    common.print_skipped(cfg.skipped)
    return common.finish(rows, args.out, BENCH, env, write=not args.no_write and bool(rows), keys=KEYS,
                         skipped=cfg.skipped, extra={**extra, "goal": goals},
                         markdown=(f"bench_conv_epilogue: fused conv epilogue vs conv alone, {env['gpu']}",
                                   headers, lines), notes=goals)


if __name__ == "__main__":
    sys.exit(main())
