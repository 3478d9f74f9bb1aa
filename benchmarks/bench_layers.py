"""Every layer shape of ResNet-50 and WRN-28-10 against the machine's own ceilings.

    python -m benchmarks.bench_layers [--out DIR] [--quick] [--device cuda|cpu] [--models ...]
                                      [--section conv memory] [--peaks FILE] [--deadline S]
                                      [--no-graph] [--no-compile]

Question: layer by layer, how close do our fused ops get to what the GPU can do? For each distinct
convolution of the two networks: our fused conv + BN (+ add) + ReLU vs cuDNN's conv *alone* vs the
separate ops eager PyTorch runs, as TFLOP/s and as a fraction of the matmul peak measured in the
same run; for each memory-bound BatchNorm / ReLU pass at each activation shape: GB/s as a fraction
of the copy bandwidth measured in the same run; and for both, the roofline floor.

Shapes, derived from the models (not a hand table): forward hooks on every ``nn.Conv2d`` and
``nn.BatchNorm2d`` of :func:`resnet_fused.models.reference.resnet50` at 224x224 and of
``reference.ref_wrn(28, 10)`` at 32x32, run on the meta device (shapes only, no arithmetic)
(:func:`trace_layers`). Conv geometries (C_in, C_out, k, stride, input size) are deduplicated; a
geometry is named by its first module (in ``named_modules`` order) and carries every module using
it (the ``note`` column) and their count (``uses``): ResNet-50 gives the 23 geometries of
:data:`benchmarks.bench_conv_epilogue.RESNET50_CONVS` (53 convs; the tests check they are equal),
WRN-28-10 gives 10 (28 convs: the 3->16 stem, the 160/320/640-wide 3x3s, the stride-2 3x3s entering
groups 2 and 3, the 1x1 shortcuts). Activation shapes for the memory-bound ops are the distinct
inputs of the BatchNorms: 12 in ResNet-50, 4 in WRN-28-10.

Conv rows (mode ``infer``, BN in eval mode with running statistics), for every geometry, without
and with a residual (an output-shaped tensor added before the ReLU), ``variant`` says which:

- ``eager`` / ``conv_alone``: ``F.conv2d(x, w)`` alone (cuDNN on a GPU): the yardstick, no BN, no
  ReLU (it serves both variants; run once per geometry and dtype);
- ``eager`` / ``conv_bn_relu``, ``conv_bn_add_relu``: ``F.conv2d``, ``F.batch_norm`` (eval, running
  statistics), ``add_``, ``relu_`` as separate ops: what eager PyTorch runs;
- ``cuda``: ``torch.ops.resnet_fused_C.conv_bias_act`` with the BN folded into the weight and a
  float32 bias (:func:`resnet_fused.ops.fold.bn_scale_shift` + ``fold_conv_bn``): CUTLASS implicit
  GEMM with our epilogue where a configuration fits, else cuDNN + our epilogue kernel; ``note``
  gives ``conv_kernel_name(...)``;
- ``triton``: ``resnet_fused.ops.conv_bias_act(..., backend="triton")`` on the same folded weights;
- ``cudnn_fused``: cuDNN's own fused op on the same folded weights (``torch.ops.aten.
  cudnn_convolution_relu`` / ``cudnn_convolution_add_relu``, as the dispatch's candidate
  ``resnet_fused.dispatch.candidates._cudnn_fused`` calls them, the float32 bias rounded to the
  input's dtype on each call as that candidate does): CUDA only, skipped elsewhere;
- ``auto``: ``resnet_fused.ops.conv_bias_act(..., backend="auto")`` on the same folded weights,
  what users get: the measured dispatch checks and times every candidate (torch, cudnn_fused,
  triton, cuda) on its first call and runs the fastest correct one. That first call is the check
  before timing, on the timed shapes, so no timed call measures. The dispatch forgets its
  decisions before each case (every case measures its own key) and reads and writes no decision
  file while the script runs (``RESNET_FUSED_CACHE_DIR=""``). ``note`` says what it chose, with
  each candidate's measured time; the JSON's ``"dispatch"`` holds the decision;
- ``compile``: ``torch.compile`` of the eager separate-op function (a fresh compile per case).

Which variant a model's convs really run: ResNet-50 (post-activation) runs conv + BN + ReLU (stem,
each block's first two convs), conv + BN + add + ReLU (each block's last conv) and conv + BN (the
downsample, no ReLU); WRN-28-10 (pre-activation, as our fused eval path runs it) runs conv + BN +
ReLU for each block's first conv (the next BN folded in), conv + add for the second (no BN or ReLU:
the sum is the next block's shortcut) and conv alone for the 1x1 shortcuts and the stem. Both
variants are measured for every geometry, so every geometry has its bare-conv cost and the cost of
the heaviest epilogue; the epilogue of the other fused forms moves no more bytes than these.

Memory-bound rows: the ops of :mod:`benchmarks.bench_bandwidth` (``variant`` = the op:
``bn_relu``, ``bn_add_relu``, ``dual_bn_add_relu``, ``bn_relu_mask``, ``bwd_reduce``,
``bwd_reduce_dual``, ``bwd_apply``, ``bwd_apply_dual``, ``channel_stats``, ``relu_mask_backward``),
run by its :func:`~benchmarks.bench_bandwidth.run_case` at each BN input shape, providers ``cuda``,
``triton`` (none for the two mask ops), ``eager`` and ``auto`` (``resnet_fused.ops.bn_act(...,
backend="auto")`` for ``bn_relu`` and ``bn_add_relu``, the ops it computes; measured, forgotten and
recorded as for the convs). ``mode``: ``infer`` for the three BN-apply
forwards without a mask (an inference forward runs them where a BN cannot be folded into a conv:
the first BN + ReLU of a pre-activation block; a training forward runs them too), ``train_step``
for the ops only a training step runs (the mask-saving forward, the backward passes, the batch
statistics).

Roofline (the ceilings measured in the same run by :func:`benchmarks.peaks.measure`: copy bandwidth
and the ``torch.mm`` peak per dtype, fp32 with TF32 as cuDNN's convs use it; or read from
``--peaks FILE``, a JSON of ``Peaks.as_dict()``, when a suite measured them once):

- flops of a conv: ``2 N Ho Wo K C R S`` (the multiply-adds; the epilogue's few ops per output are
  not counted). ``tflops`` = flops / median; ``frac_of_peak`` = tflops / the dtype's matmul peak.
- bytes of a conv: the least any implementation must move: input, weight and output once in the
  run's dtype, plus the residual and the float32 [K] bias for the fused variants (conv alone: none).
- bytes of a memory-bound op: bench_bandwidth's count (every tensor read or written once, the mask
  as numel / 8, float32 [C] vectors). ``gbps`` = bytes / median; ``frac_of_copy`` = gbps / the
  measured copy bandwidth (``note`` adds the same-size copy's rate, which small tensors reach less
  of); conv rows leave ``gbps`` / ``frac_of_copy`` null (``tflops`` / ``frac_of_peak`` are theirs;
  memory rows leave those null).
- ``floor_ms`` = :func:`benchmarks.peaks.roofline_floor_ms`: max(flops / matmul peak, bytes / copy
  bandwidth), for every row, timed or not.

Correctness before timing: each output against float64 computed from the same low-precision inputs
(the conv in float64, BN from its float64 scale and shift, residual, ReLU), relative error within
max(dtype floor, 4 x eager's error in the same dtype) (:func:`benchmarks.common.check_output`); the
fold's rounding of the weight counts against the fused providers. Conv alone is checked against the
float64 conv (shape, finiteness); memory ops as bench_bandwidth checks them. A wrong or failing
provider gets ``correct=false``, no time, and ``wrong: not timed`` / ``failed: ...`` in ``note``; one
that cannot run here is skipped with its reason (printed, and under ``"skipped"`` in the JSON).

Timing: CUDA-graph replay (``--no-graph``: plain launches; plain launches also where capture
fails, noted) over input copies larger than twice the L2, median and p20/p80 (bench_conv_epilogue's
and bench_bandwidth's harness, :func:`benchmarks.common.benchmark_graph_or_plain`);
``cudnn.benchmark`` on. Order: conv alone, eager, cuda and cudnn_fused for every conv case, then the
memory ops (cuda, eager), then triton (memory ops, then convs: each new conv shape is autotuned on
first call), then auto (convs, then memory ops: its triton candidate finds the kernels tuned), then
compile, so a run cut short keeps the headline numbers; ``--deadline`` (``--quick``:
75 s after start) starts nothing later (no compile case later than 15 s before it) and lists what
it left out under ``"not_run"``: on a cold Triton cache a quick run may leave out some triton and
compile rows; results are rewritten after every case.

Modes. GPU (full): batch 256 (ResNet-50) and 128 (WRN-28-10), fp16, bf16 and fp32 (TF32),
channels_last, every geometry and activation shape, every op. ``--quick`` (part of the suite's
one-call run, about a minute): batch 64 / 128, fp16, six ResNet-50 geometries
(:data:`benchmarks.bench_conv_epilogue.QUICK`) and four of WRN-28-10 (:data:`WRN_QUICK`), three ops
(:data:`QUICK_OPS`) at three activation shapes (:data:`QUICK_ACTS`). CPU (the default without
CUDA; CI): the quick subset at tiny sizes (bench_conv_epilogue's and bench_bandwidth's ``tiny``:
channels / 16, small spatial sizes), batch 2, fp32, providers eager, cuda (the library's C++
kernels), triton (through the interpreter, only with ``TRITON_INTERPRET=1`` set before Python
starts) and auto (on CPU tensors it measures torch against the C++ kernels: the interpreter is
never its candidate); cudnn_fused is skipped (CUDA only); compile is left out unless
``--compile``. CPU numbers prove the script, nothing else.

Outputs: a table per section on stdout; under ``--out`` (default ``benchmarks/results``)
``<date>_<device>_<commit>_layers.{json,csv,md}``: rows with :data:`benchmarks.common.ROW_KEYS` +
``variant layout tflops frac_of_peak gbps frac_of_copy floor_ms note`` (:data:`KEYS`); the JSON also
has ``peaks`` (the ceilings used), ``peaks_source``, ``timing``, ``tf32``, ``cudnn_benchmark``,
``not_run`` and ``dispatch`` (one entry per auto row, :func:`benchmarks.common.dispatch_entry`: the
row's ``model shape batch dtype mode layout variant``, the dispatch's ``env`` and its
``decisions``, each with ``op case chosen candidates source sites margin measure_ms``); the
markdown has the conv table and the memory table.

Pending: nothing of this has run on a GPU; the ``--quick`` time is an estimate.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import bench_bandwidth, common, peaks as peaks_mod
from .bench_conv_epilogue import QUICK as RESNET50_QUICK
from .bench_conv_epilogue import Case, ConvSpec, Job, kernel_name, make_case, measure, provider_fn, tiny

BENCH = "layers"
KEYS = common.row_keys("variant", "layout", "tflops", "frac_of_peak", "gbps", "frac_of_copy", "floor_ms", "note")
PROVIDERS = ("eager", "cuda", "cudnn_fused", "triton", "auto", "compile")
SECTIONS = ("conv", "memory")
LAYOUT = "channels_last"
FACTOR = 4.0
BN_EPS = 1e-5
QUICK_DEADLINE_S = 75.0
# a run cut short keeps the first phases: (section, providers)
# auto after triton: its measuring then finds Triton's kernels compiled and autotuned for the shape
PHASES = (("conv", ("eager", "cuda", "cudnn_fused")), ("memory", ("eager", "cuda")), ("memory", ("triton",)),
          ("conv", ("triton",)), ("conv", ("auto",)), ("memory", ("auto",)), ("conv", ("compile",)))
# with a deadline, no torch.compile case starts later than this many seconds before it (a cold
# compile of one case takes seconds to tens of seconds, and the suite kills the step at its cap)
COMPILE_MARGIN_S = 15.0
# WRN-28-10's quick geometries: the widest 3x3 at 32x32 (most of its flops), the stride-2 3x3
# entering group 2, the 640-wide 3x3 at 8x8, the stride-2 1x1 shortcut entering group 3
WRN_QUICK = ("layer1.0.conv2", "layer2.0.conv1", "layer3.0.conv2", "layer3.0.shortcut")
# one forward apply, one backward reduction, one backward apply
QUICK_OPS = ("bn_add_relu", "bwd_reduce", "bwd_apply")
# (channels, spatial) of BN inputs: ResNet-50's largest block output and a 14x14 one, WRN's widest at 32x32
QUICK_ACTS = {"resnet50": ((256, 56), (1024, 14)), "wrn28-10": ((160, 32),)}
INFER_OPS = ("bn_relu", "bn_add_relu", "dual_bn_add_relu")  # memory ops an inference forward runs
_T0 = time.monotonic()


@dataclass(frozen=True)
class ModelInfo:
    build: Callable[[], nn.Module]
    input_hw: int
    batch: int
    quick_batch: int
    quick_convs: Tuple[str, ...]


def _resnet50() -> nn.Module:
    from resnet_fused.models import reference

    return reference.resnet50()


def _wrn28_10() -> nn.Module:
    from resnet_fused.models import reference

    return reference.ref_wrn(28, 10)


MODELS: Dict[str, ModelInfo] = {
    "resnet50": ModelInfo(_resnet50, 224, 256, 64, tuple(RESNET50_QUICK)),
    "wrn28-10": ModelInfo(_wrn28_10, 32, 128, 128, WRN_QUICK),
}


# ----------------------------------------------------------------------------- shapes from models
@dataclass
class Layers:
    """What :func:`trace_layers` saw: each distinct conv geometry and BN input shape, with the
    names of the modules that have it (in ``named_modules`` order)."""

    convs: List[Tuple[ConvSpec, Tuple[str, ...]]]
    acts: List[Tuple[bench_bandwidth.Act, Tuple[str, ...]]]


def trace_layers(model: nn.Module, input_hw: int) -> Layers:
    """Run ``model`` once on a [1, 3, input_hw, input_hw] input on its own device (the meta device
    works: shapes only) with forward hooks on every ``nn.Conv2d`` and ``nn.BatchNorm2d``."""
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    convs: Dict[tuple, List[str]] = {}
    bns: Dict[tuple, List[str]] = {}

    def conv_hook(mod: nn.Conv2d, inp, _out, name: str) -> None:
        h, w = inp[0].shape[-2:]
        k, s, p = mod.kernel_size, mod.stride, mod.padding
        if h != w or k[0] != k[1] or s[0] != s[1] or p != (k[0] // 2, k[0] // 2) or mod.groups != 1 \
                or mod.dilation != (1, 1):
            raise ValueError(f"{name}: a conv ConvSpec cannot describe (input {h}x{w}, kernel {k}, stride {s}, "
                             f"padding {p}, groups {mod.groups}, dilation {mod.dilation})")
        convs.setdefault((mod.in_channels, mod.out_channels, k[0], s[0], int(h)), []).append(name)

    def bn_hook(_mod, inp, _out, name: str) -> None:
        c, h, w = inp[0].shape[1:]
        if h != w:
            raise ValueError(f"{name}: expected a square input, got {h}x{w}")
        bns.setdefault((int(c), int(h)), []).append(name)

    handles = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(lambda mod, i, o, name=name: conv_hook(mod, i, o, name)))
        elif isinstance(m, nn.BatchNorm2d):
            handles.append(m.register_forward_hook(lambda mod, i, o, name=name: bn_hook(mod, i, o, name)))
    try:
        param = next(model.parameters(), None)
        dev = param.device if param is not None else torch.device("cpu")
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, input_hw, input_hw, device=dev))
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()

    def ordered(d: Dict[tuple, List[str]]):
        items = [(key, tuple(sorted(names, key=order.__getitem__))) for key, names in d.items()]
        return sorted(items, key=lambda kv: order[kv[1][0]])

    return Layers(
        convs=[(ConvSpec(names[0], cin, cout, k, s, hw, len(names)), names)
               for (cin, cout, k, s, hw), names in ordered(convs)],
        acts=[(bench_bandwidth.Act(names[0], c, hw), names) for (c, hw), names in ordered(bns)])


def conv_geometries(model: nn.Module, input_hw: int) -> List[ConvSpec]:
    """Every distinct conv geometry of ``model`` at ``input_hw``, named by its first module, with
    the number of convs that have it (deduplicated, in ``named_modules`` order of first use)."""
    return [s for s, _ in trace_layers(model, input_hw).convs]


def bn_activations(model: nn.Module, input_hw: int) -> List[bench_bandwidth.Act]:
    """Every distinct BatchNorm input shape (C, H = W) of ``model`` at ``input_hw``."""
    return [a for a, _ in trace_layers(model, input_hw).acts]


def model_layers(name: str) -> Layers:
    """:func:`trace_layers` of model ``name`` (a key of :data:`MODELS`), built on the meta device."""
    info = MODELS[name]
    with torch.device("meta"):
        model = info.build()
    return trace_layers(model, info.input_hw)


# -------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class ConvJob:
    model: str
    job: Job                      # bench_conv_epilogue's: spec, batch, dtype, layout, residual
    modules: Tuple[str, ...]

    @property
    def variant(self) -> str:
        return "conv_bn_add_relu" if self.job.residual else "conv_bn_relu"

    @property
    def base_key(self) -> tuple:  # the conv-alone baseline of both variants
        return (self.model,) + self.job.base_key

    def label(self) -> str:
        return f"{self.model} {self.job.label()}"


@dataclass(frozen=True)
class MemJob:
    model: str
    act: bench_bandwidth.Act
    modules: Tuple[str, ...]
    batch: int
    dtype: str

    def label(self) -> str:
        return f"{self.model} {self.act.c}x{self.act.hw}x{self.act.hw} b{self.batch} {self.dtype}"


@dataclass
class Config:
    device: torch.device
    conv_jobs: List[ConvJob]
    mem_jobs: List[MemJob]
    ops: List[bench_bandwidth.Op]
    providers: List[str]
    cuda_graph: bool
    timing: dict
    deadline: Optional[float]
    peaks: Optional[peaks_mod.Peaks] = None
    skipped: Dict[str, str] = field(default_factory=dict)
    not_run: List[str] = field(default_factory=list)
    dispatch: List[dict] = field(default_factory=list)  # the JSON's "dispatch": one entry per auto row


def _past_deadline(cfg: Config, what: str, margin_s: float = 0.0) -> bool:
    if cfg.deadline is not None and time.monotonic() > cfg.deadline - margin_s:
        print(f"  SKIPPED {what}: past the deadline", file=sys.stderr)
        cfg.not_run.append(what)
        return True
    return False


# ------------------------------------------------------------------------------------ conv rows
def conv_bytes(job: Job, fused: bool) -> int:
    """Least bytes a conv must move: input, weight, output in the run's dtype; the fused variants
    also the residual (if any) and the float32 [K] bias."""
    s, esize = job.spec, common.DTYPES[job.dtype].itemsize
    out = job.batch * s.cout * s.out_hw ** 2
    n = (job.batch * s.cin * s.hw ** 2 + s.cout * s.cin * s.k * s.k + out) * esize
    if fused:
        n += (out * esize if job.residual else 0) + s.cout * 4
    return n


@dataclass
class BNCase:
    """A conv case with an eval BatchNorm after the conv: its parameters, the folded weight and
    bias, and the float64 reference of conv + BN (+ residual) + ReLU."""

    case: Case                    # bench_conv_epilogue's: the (x, r) input copies, w, the float64 conv
    folded: Case                  # the same with the folded weight and bias
    bn: Tuple[torch.Tensor, ...]  # running_mean, running_var, weight, bias (float32 [K])
    ref64: torch.Tensor
    eager_out: Optional[torch.Tensor] = None


def make_bn_case(job: Job, dev: torch.device) -> BNCase:
    from resnet_fused.ops.fold import bn_scale_shift, fold_conv_bn

    s, dt = job.spec, common.DTYPES[job.dtype]
    case = make_case(job, dev)
    case.ref64 = None  # its reference (conv + bias) is not this benchmark's: free the memory
    gen = torch.Generator(device=dev).manual_seed(7 * s.cin + 13 * s.cout + s.k + 3 * s.hw)
    K = s.cout
    # He-scaled weights give conv outputs of variance about 2: running statistics of that size
    bn = nn.BatchNorm2d(K, eps=BN_EPS).to(dev).eval()
    with torch.no_grad():
        bn.running_mean.copy_(0.1 * torch.randn(K, generator=gen, device=dev))
        bn.running_var.copy_(2.0 * (0.5 + torch.rand(K, generator=gen, device=dev)))
        bn.weight.copy_(0.5 + torch.rand(K, generator=gen, device=dev))
        bn.bias.copy_(0.3 * torch.randn(K, generator=gen, device=dev))
        scale, shift = bn_scale_shift(bn)
        w_f, b_f = fold_conv_bn(case.w, scale, shift, dtype=dt)
        # float64 reference from the same BN parameters (not from the float32 fold)
        scale64 = bn.weight.double() / torch.sqrt(bn.running_var.double() + BN_EPS)
        shift64 = bn.bias.double() - bn.running_mean.double() * scale64
        ref = case.conv64 * scale64.view(1, -1, 1, 1) + shift64.view(1, -1, 1, 1)
        r = case.inputs[0][1]
        if r is not None:
            ref = ref + r.double()
    fmt = torch.channels_last if job.layout == "cl" else torch.contiguous_format
    folded = dataclasses.replace(case, w=w_f.contiguous(memory_format=fmt), b32=b_f.float(),
                                 b_dt=b_f.to(dt))
    params = tuple(t.detach() for t in (bn.running_mean, bn.running_var, bn.weight, bn.bias))
    return BNCase(case, folded, params, torch.relu(ref))


def eager_fn(job: Job, bc: BNCase) -> Callable:
    """``fn(x, r)``: conv, eval BatchNorm, add, ReLU as separate ops (as torchvision's blocks)."""
    s = job.spec
    w, (rm, rv, g, b) = bc.case.w, bc.bn
    st, pd = [s.stride, s.stride], [s.padding, s.padding]

    def eager(x, r):
        y = F.conv2d(x, w, None, st, pd)
        y = F.batch_norm(y, rm, rv, g, b, False, 0.0, BN_EPS)
        if r is not None:
            y = y.add_(r)
        return y.relu_()

    return eager


def conv_provider_fn(provider: str, variant: str, job: Job, bc: BNCase, allow_tf32: bool) -> Callable:
    """``fn(x, r)`` of (provider, variant) on one conv case."""
    s = job.spec
    if variant == "conv_alone":
        return provider_fn("conv_alone", job, bc.case, allow_tf32)
    if provider == "eager":
        return eager_fn(job, bc)
    if provider in ("cuda", "triton"):
        return provider_fn(provider, job, bc.folded, allow_tf32)
    if provider == "auto":
        from resnet_fused.ops import conv_bias_act

        w, b32 = bc.folded.w, bc.folded.b32
        return lambda x, r: conv_bias_act(x, w, b32, r, stride=s.stride, padding=s.padding, relu=True,
                                          backend="auto")
    if provider == "cudnn_fused":
        from resnet_fused.dispatch.candidates import _cudnn_fused

        w, b32 = bc.folded.w, bc.folded.b32
        st, pd = (s.stride, s.stride), (s.padding, s.padding)
        return lambda x, r: _cudnn_fused(x, w, b32, r, st, pd, (1, 1), True, torch.channels_last)
    if provider == "compile":
        torch._dynamo.reset()  # a fresh compile per case (the recompile limit would fall back to eager)
        return torch.compile(eager_fn(job, bc), dynamic=False)
    raise ValueError(f"provider: expected one of {PROVIDERS}, got {provider!r}")


def _modules_note(modules: Sequence[str], what: str = "modules") -> str:
    return f"{what}: {' '.join(modules)}"


def conv_row(cj: ConvJob, provider: str, variant: str, t: Optional[common.Timing], mem: Optional[float], ok: bool,
             note: str, pk: peaks_mod.Peaks) -> dict:
    job = cj.job
    flops = job.spec.flops(job.batch)
    nbytes = conv_bytes(job, fused=variant != "conv_alone")
    tflops = None if t is None else flops / (t.median_ms * 1e-3) / 1e12
    peak = pk.matmul_tflops[job.dtype]
    extra = dict(variant=variant, layout=LAYOUT, tflops=tflops,
                 frac_of_peak=None if tflops is None else tflops / peak, gbps=None, frac_of_copy=None,
                 floor_ms=peaks_mod.roofline_floor_ms(flops, nbytes, pk, job.dtype), note=note)
    return common.make_row(bench=BENCH, model=cj.model, shape=job.spec.shape, batch=job.batch, dtype=job.dtype,
                           mode="infer", provider=provider, timing=t, peak_mem_mb=mem, correct=ok, extra=extra)


def run_conv_job(cj: ConvJob, pairs: Sequence[Tuple[str, str]], cfg: Config, rows: List[dict]) -> None:
    """Check, then time, each (provider, variant) of ``pairs`` on one conv case; a row each."""
    from resnet_fused.ops._common import conv_uses_tf32

    dev, job = cfg.device, cj.job
    if _past_deadline(cfg, f"{cj.label()} {[p for p, _ in pairs]}"):
        return
    allow_tf32 = dev.type == "cuda" and conv_uses_tf32()
    bc = make_bn_case(job, dev)
    with torch.no_grad():
        bc.eager_out = eager_fn(job, bc)(*bc.case.inputs[0])
    for prov, variant in pairs:
        what = f"{cj.label()} {prov} {variant}"
        if _past_deadline(cfg, what, COMPILE_MARGIN_S if prov == "compile" else 0.0):
            continue
        got = {"kernel": ""}

        def build(prov=prov, variant=variant, bc=bc):
            if prov == "cuda":
                got["kernel"] = kernel_name("cuda", job, bc.folded, allow_tf32)
            if prov == "auto":
                common.dispatch_fresh()  # the checked first call (the timed shapes) measures this case
            return conv_provider_fn(prov, variant, job, bc, allow_tf32)

        ref, eager_out = (bc.case.conv64, None) if variant == "conv_alone" else (bc.ref64, bc.eager_out)
        m = measure(build, bc.case.inputs, ref, eager_out, job.dtype, cfg, prov, what,
                    measure_mem=True)
        t, mem, ok, status, kernel = m.timing, m.peak_mb, m.ok, m.note, got["kernel"]
        record = common.dispatch_record() if prov == "auto" else None  # (also when it failed)
        chose = "" if record is None else common.auto_note(record["decisions"])
        note = "; ".join(x for x in (status, _modules_note(cj.modules), f"kernel: {kernel}" if kernel else "", chose)
                         if x)
        rows.append(conv_row(cj, prov, variant, t, mem, ok, note, cfg.peaks))
        r = rows[-1]
        if record is not None:
            cfg.dispatch.append(common.dispatch_entry(r, record))
        if r["median_ms"] is not None:
            print(f"  {what:<70} {r['median_ms']:.4f} ms  {r['tflops']:.3g} TFLOP/s  {r['frac_of_peak']:.2f} of peak"
                  f"  floor {r['floor_ms']:.4f} ms{'  [' + (kernel or chose) + ']' if kernel or chose else ''}",
                  flush=True)
        if prov == "compile":
            torch._dynamo.reset()
    del bc
    if dev.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------- memory rows
def mem_mode(op: str) -> str:
    """``infer`` for the BN-apply forwards an inference forward runs; ``train_step`` for the ops
    only training runs (mask-saving forward, backward passes, batch statistics)."""
    return "infer" if op in INFER_OPS else "train_step"


def mem_row(mj: MemJob, brow: dict, pk: peaks_mod.Peaks) -> dict:
    """A bench_bandwidth row -> ours: GB/s against the measured copy bandwidth, roofline floor."""
    t = None if brow["median_ms"] is None else common.Timing(brow["median_ms"], brow["p20_ms"], brow["p80_ms"], 0)
    gbps = brow["gbps"]
    parts = [brow["note"]] if brow["note"] else []
    parts.append(_modules_note(mj.modules, "bn inputs"))
    if brow["copy_gbps"]:
        same = "" if brow["frac_of_copy"] is None else f", {brow['frac_of_copy']:.2f} of it"
        parts.append(f"same-size copy {brow['copy_gbps']:.4g} GB/s{same}")
    extra = dict(variant=brow["op"], layout=LAYOUT, tflops=None, frac_of_peak=None, gbps=gbps,
                 frac_of_copy=None if gbps is None else gbps / pk.copy_gbps,
                 floor_ms=peaks_mod.roofline_floor_ms(0, brow["bytes"], pk, mj.dtype), note="; ".join(parts))
    return common.make_row(bench=BENCH, model=mj.model, shape=brow["shape"], batch=mj.batch, dtype=mj.dtype,
                           mode=mem_mode(brow["op"]), provider=brow["provider"], timing=t, peak_mem_mb=None,
                           correct=brow["correct"], extra=extra)


def run_mem_job(mj: MemJob, providers: Sequence[str], cfg: Config, rows: List[dict],
                copies: Dict[int, tuple]) -> None:
    """bench_bandwidth.run_case on one activation shape; its rows converted (the copies dropped:
    their rate goes into the ops' notes)."""
    if _past_deadline(cfg, f"{mj.label()} memory ops {list(providers)}"):
        return
    bcfg = bench_bandwidth.Config(cfg.device, mj.batch, [mj.act], ["cl"], [mj.dtype], cfg.ops, list(providers),
                                  cfg.cuda_graph, cfg.timing)
    brows: List[dict] = []
    try:
        bench_bandwidth.run_case(mj.act, "cl", mj.dtype, bcfg, brows, copies)
    except Exception as exc:  # inputs could not be made: nothing of this case ran
        print(f"  FAILED {mj.label()} memory ops: {type(exc).__name__}: {exc}", file=sys.stderr)
        traceback.print_exc(limit=3)
    for r in brows:
        if r["provider"] == "copy":
            continue
        rows.append(mem_row(mj, r, cfg.peaks))
        record = bcfg.dispatch.get((r["op"], r["shape"], "cl", mj.dtype)) if r["provider"] == "auto" else None
        if record is not None:
            cfg.dispatch.append(common.dispatch_entry(rows[-1], record))


# ------------------------------------------------------------------------------------- tables
def _cell(r: Optional[dict]) -> str:
    if not r:
        return ""
    if not r["correct"]:
        return "WRONG" if r["note"].startswith("wrong") else "FAILED"
    return common.fmt_ms(r["median_ms"])


def _ratio(a: Optional[dict], b: Optional[dict]) -> str:
    if not a or not b or a["median_ms"] is None or not b["median_ms"]:
        return "-"
    return f"{a['median_ms'] / b['median_ms']:.2f}"


def conv_table(rows: List[dict], providers: Sequence[str], info: Dict[tuple, Tuple[str, str]]
               ) -> Tuple[List[str], List[list]]:
    """One line per (model, geometry, variant, dtype): conv alone, eager separate ops and each
    fused provider in ms; fused / conv alone and eager / the faster of cuda and triton; the best
    fraction of the matmul peak; the roofline floor and which ceiling sets it. ``info``:
    conv_key + (variant,) -> (the geometry's first module, "math" | "memory")."""
    fused = [p for p in ("cuda", "cudnn_fused", "triton", "auto", "compile") if p in providers]
    headers = ["model", "conv", "shape", "batch", "dtype", "variant", "conv ms", "eager ms"]
    headers += [f"{p} ms" for p in fused]
    headers += [f"{p}/conv" for p in fused if p != "compile"] + ["eager/fused", "best of peak", "floor ms", "bound"]
    base: Dict[tuple, dict] = {}
    lines: "OrderedDict[tuple, Dict[str, dict]]" = OrderedDict()
    for r in rows:
        if r["variant"] in bench_bandwidth.OP_NAMES:
            continue
        key = (r["model"], r["shape"], r["batch"], r["dtype"])
        if r["variant"] == "conv_alone":
            base[key] = r
        else:
            lines.setdefault(key + (r["variant"],), {})[r["provider"]] = r
    out = []
    for key, by in lines.items():
        c = base.get(key[:4])
        name, bound = info.get(key, ("", ""))
        line = [key[0], name, *key[1:4], key[4], _cell(c), _cell(by.get("eager"))] + [_cell(by.get(p)) for p in fused]
        line += [_ratio(by.get(p), c) for p in fused if p != "compile"]
        timed_fused = [by[p] for p in ("cuda", "triton") if p in by and by[p]["median_ms"] is not None]
        best = min(timed_fused, key=lambda r: r["median_ms"]) if timed_fused else None
        line.append(_ratio(by.get("eager"), best))
        cands = [r for r in list(by.values()) + ([c] if c else []) if r["frac_of_peak"] is not None]
        top = max(cands, key=lambda r: r["frac_of_peak"]) if cands else None
        who = "" if top is None else "conv alone" if top["variant"] == "conv_alone" else top["provider"]
        line.append("-" if top is None else f"{top['frac_of_peak']:.2f} ({who})")
        any_row = next(iter(by.values()))
        line += [f"{any_row['floor_ms']:.4g}", bound]
        out.append(line)
    return headers, out


def conv_bound(cj: ConvJob, pk: peaks_mod.Peaks) -> str:
    """Which measured ceiling sets the fused op's roofline floor: "math" or "memory"."""
    job = cj.job
    t_math = job.spec.flops(job.batch) / (pk.matmul_tflops[job.dtype] * 1e12)
    t_mem = conv_bytes(job, fused=True) / (pk.copy_gbps * 1e9)
    return "math" if t_math >= t_mem else "memory"


def conv_key(model: str, job: Job) -> tuple:
    return (model, job.spec.shape, job.batch, job.dtype)


def mem_table(rows: List[dict], providers: Sequence[str]) -> Tuple[List[str], List[list]]:
    """One line per (model, op, shape, dtype): each provider's GB/s and fraction of the copy bandwidth."""
    provs = [p for p in ("cuda", "triton", "auto", "eager") if p in providers]
    headers = ["model", "op", "shape", "batch", "dtype", "mode", "floor ms"]
    for p in provs:
        headers += [f"{p} GB/s", f"{p}/copy"]
    lines: "OrderedDict[tuple, Dict[str, dict]]" = OrderedDict()
    for r in rows:
        if r["variant"] not in bench_bandwidth.OP_NAMES:
            continue
        key = (r["model"], r["variant"], r["shape"], r["batch"], r["dtype"], r["mode"])
        lines.setdefault(key, {})[r["provider"]] = r
    out = []
    for key, by in lines.items():
        line = [*key, f"{next(iter(by.values()))['floor_ms']:.4g}"]
        for p in provs:
            r = by.get(p)
            if r is None:
                line += ["n/a", ""]
            elif not r["correct"]:
                line += [_cell(r), ""]
            else:
                line += [f"{r['gbps']:.4g}", f"{r['frac_of_copy']:.2f}"]
        out.append(line)
    return headers, out


# -------------------------------------------------------------------------------------------- CLI
def parse_args(argv: Optional[Sequence[str]] = None):
    p = common.base_parser("python -m benchmarks.bench_layers", __doc__, providers=PROVIDERS,
                           quick_help="GPU: batch 64 / 128, fp16, 6 + 4 conv geometries, 3 memory ops at 3 "
                                      f"shapes, nothing started after {QUICK_DEADLINE_S:.0f} s (about a minute)")
    p.add_argument("--models", nargs="+", choices=tuple(MODELS), default=None, help="default: both")
    p.add_argument("--section", nargs="+", choices=SECTIONS, default=None, help="default: both")
    p.add_argument("--convs", nargs="+", default=None,
                   help="only the conv geometries whose first module has one of these names (e.g. layer1.0.conv2)")
    p.add_argument("--acts", nargs="+", default=None,
                   help="only these BN input shapes, full-size CxH (e.g. 256x56), also in the CPU mode")
    p.add_argument("--ops", nargs="+", choices=bench_bandwidth.OP_NAMES, default=None,
                   help=f"memory ops (default: all; --quick and CPU: {' '.join(QUICK_OPS)})")
    p.add_argument("--batch", type=int, default=None, help="override both models' batch size")
    p.add_argument("--peaks", default=None, metavar="FILE",
                   help="a JSON of peaks.measure(...).as_dict() to use instead of measuring the ceilings here")
    p.add_argument("--deadline", type=float, default=None,
                   help=f"seconds after start past which nothing starts (--quick: {QUICK_DEADLINE_S:.0f})")
    p.add_argument("--no-graph", action="store_true", help="GPU: time plain launches, not CUDA-graph replays")
    p.add_argument("--compile", action="store_true", help="CPU: include torch.compile (slow to compile)")
    p.add_argument("--no-compile", action="store_true", help="leave out torch.compile")
    return p.parse_args(argv)


def make_config(args) -> Config:
    dev = common.pick_device(args.device)
    gpu = dev.type == "cuda"
    small = args.quick or not gpu
    sections = args.section or list(SECTIONS)
    dtypes = args.dtypes or (["fp16"] if args.quick and gpu else (["fp16", "bf16", "fp32"] if gpu else ["fp32"]))
    skipped: Dict[str, str] = {}
    providers = common.order_providers(args.providers, PROVIDERS, "eager")
    if "compile" in providers:
        if args.no_compile:
            providers.remove("compile")
        elif not gpu and not args.compile and not args.providers:
            providers.remove("compile")
            skipped["compile"] = "CPU: torch.compile's C++ code generation takes tens of seconds per case (--compile)"
    providers = common.drop_unavailable(providers, dev, skipped)
    conv_jobs: List[ConvJob] = []
    mem_jobs: List[MemJob] = []
    for name in args.models or list(MODELS):
        info = MODELS[name]
        layers = model_layers(name)
        batch = args.batch or (2 if not gpu else (info.quick_batch if args.quick else info.batch))
        if "conv" in sections:
            want = args.convs or (info.quick_convs if small else None)
            specs = [(s, mods) for s, mods in layers.convs if want is None or s.name in want]
            for d in dtypes:
                for s, mods in specs:
                    for res in (False, True):
                        conv_jobs.append(ConvJob(name, Job(s if gpu else tiny(s), batch, d, "cl", res), mods))
        if "memory" in sections:
            if args.acts:
                acts = [(a, mods) for a, mods in layers.acts if f"{a.c}x{a.hw}" in args.acts]
            elif small:
                acts = [(a, mods) for a, mods in layers.acts if (a.c, a.hw) in QUICK_ACTS[name]]
            else:
                acts = list(layers.acts)
            for d in dtypes:
                for a, mods in acts:
                    mem_jobs.append(MemJob(name, a if gpu else bench_bandwidth.tiny(a), mods, batch, d))
    if args.convs or args.acts:  # a name that matches nothing is a typo, not an empty run
        known_convs = {s.name for n in args.models or MODELS for s, _ in model_layers(n).convs}
        known_acts = {f"{a.c}x{a.hw}" for n in args.models or MODELS for a, _ in model_layers(n).acts}
        bad = sorted(set(args.convs or ()) - known_convs) + sorted(set(args.acts or ()) - known_acts)
        if bad:
            raise SystemExit(f"--convs / --acts: {bad} match no layer of {args.models or list(MODELS)} "
                             f"(convs: {sorted(known_convs)}; acts: {sorted(known_acts)})")
    op_names = args.ops or (QUICK_OPS if small else bench_bandwidth.OP_NAMES)
    ops = [o for o in bench_bandwidth.OPS if o.name in op_names]
    deadline_s = args.deadline if args.deadline is not None else (QUICK_DEADLINE_S if args.quick else None)
    return Config(dev, conv_jobs, mem_jobs, ops, providers, cuda_graph=gpu and not args.no_graph,
                  timing=common.op_timing(dev, args.quick), deadline=None if deadline_s is None else _T0 + deadline_s,
                  skipped=skipped)


def load_peaks(path: str, dtypes: Sequence[str], dev: torch.device) -> peaks_mod.Peaks:
    """The ceilings a previous ``peaks.measure(...).as_dict()`` wrote (or a result file's
    ``"peaks"``); they must cover every dtype of the run."""
    with open(path) as f:
        d = json.load(f)
    pk = peaks_mod.Peaks.from_dict(d["peaks"] if "peaks" in d and "copy_gbps" not in d else d)
    missing = [x for x in dtypes if x not in pk.matmul_tflops]
    if missing:
        raise SystemExit(f"--peaks {path}: no matmul peak for {missing} (it has {sorted(pk.matmul_tflops)})")
    here = common.device_name(dev)
    if pk.device != here:
        print(f"note: --peaks {path} was measured on {pk.device!r}, this run is on {here!r}", file=sys.stderr)
    return pk


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    cfg = make_config(args)
    dev = cfg.device
    env = common.env_info(dev)
    from resnet_fused.ops._common import conv_uses_tf32

    print(common.banner("bench_layers", env))
    dtypes = sorted({j.job.dtype for j in cfg.conv_jobs} | {j.dtype for j in cfg.mem_jobs},
                    key=list(common.DTYPES).index)
    if args.peaks:
        cfg.peaks, source = load_peaks(args.peaks, dtypes, dev), f"file: {args.peaks}"
    else:
        cfg.peaks, source = peaks_mod.measure(dev, dtypes or ["fp32"], quick=args.quick or dev.type != "cuda"), \
            "measured in this run"
    print(f"ceilings ({source}): {peaks_mod.describe(cfg.peaks)}")
    print(f"providers {cfg.providers}; {len(cfg.conv_jobs)} conv cases, {len(cfg.mem_jobs)} activation shapes x "
          f"{len(cfg.ops)} memory ops; {'CUDA graphs' if cfg.cuda_graph else 'no graphs'}"
          + common.settings_suffix(dev, None, cfg.deadline, _T0), flush=True)
    common.print_skipped(cfg.skipped)
    rows: List[dict] = []
    extra = {"peaks": cfg.peaks.as_dict(), "peaks_source": source,
             "timing": "CUDA-graph replay" if cfg.cuda_graph else
             ("CUDA events, plain launches" if dev.type == "cuda" else "perf_counter (CPU)"),
             "tf32": dev.type == "cuda" and conv_uses_tf32(), "cudnn_benchmark": dev.type == "cuda",
             "not_run": cfg.not_run, "dispatch": cfg.dispatch}

    def save() -> None:
        if not args.no_write and rows:
            common.write_results(args.out, BENCH, env, rows, keys=KEYS, extra={"skipped": cfg.skipped, **extra})

    baselines = set()
    copies: Dict[int, tuple] = {}
    with common.dispatch_isolated(), common.cudnn_benchmark(dev, True):
        for section, phase in PHASES:
            provs = [p for p in cfg.providers if p in phase]
            if not provs:
                continue
            if section == "conv":
                for cj in cfg.conv_jobs:
                    pairs = []
                    for p in provs:
                        if p == "eager" and cj.base_key not in baselines:
                            baselines.add(cj.base_key)
                            pairs.append(("eager", "conv_alone"))
                        pairs.append((p, cj.variant))
                    run_conv_job(cj, pairs, cfg, rows)
                    save()
            else:
                mem_provs = [p for p in provs if p in bench_bandwidth.RUNNERS]
                for mj in cfg.mem_jobs if mem_provs else ():
                    run_mem_job(mj, mem_provs, cfg, rows, copies)
                    save()
    rows = _sorted(rows, cfg)
    tables = []
    if cfg.conv_jobs:
        info = {conv_key(cj.model, cj.job) + (cj.variant,): (cj.job.spec.name, conv_bound(cj, cfg.peaks))
                for cj in cfg.conv_jobs}
        h, lines = conv_table(rows, cfg.providers, info)
        tables.append((f"bench_layers: convolutions vs cuDNN's conv alone, {env['gpu']}", h, lines))
    if cfg.mem_jobs:
        h, lines = mem_table(rows, cfg.providers)
        tables.append((f"bench_layers: memory-bound ops vs copy bandwidth, {env['gpu']}", h, lines))
    for title, h, lines in tables:
        print(common.format_table(h, lines, title=title))
    notes = [f"ceilings ({source}): {peaks_mod.describe(cfg.peaks)}",
             "fused = conv with the BN folded + bias (+ residual) + ReLU in one op; conv = F.conv2d alone; eager = "
             "conv, batch_norm, add, relu as separate ops; floor = max(flops / matmul peak, bytes / copy bandwidth)"]
    if cfg.not_run:
        notes.append(f"past the deadline, not run: {len(cfg.not_run)} case(s)/provider(s) (JSON: not_run)")
    for n in notes:
        print(n)
    common.print_skipped(cfg.skipped)
    write = not args.no_write and bool(rows)
    rc = common.finish(rows, args.out, BENCH, env, write=write, keys=KEYS, skipped=cfg.skipped, extra=extra,
                       markdown=tables[0] if tables and write else None, notes=notes)
    if write and len(tables) > 1:  # finish() writes one table: the memory table goes under it
        md = Path(args.out) / f"{common.result_stem(env, BENCH)}.md"
        title, h, lines = tables[1]
        with open(md, "a") as f:
            f.write(f"\n## {title}\n\n{common.markdown_table(h, lines)}\n")
    return rc


def _sorted(rows: List[dict], cfg: Config) -> List[dict]:
    """Rows in case order (conv cases, then memory ops; conv alone first, then the providers in
    the order eager, cuda, triton, compile), not in the order the phases ran them."""
    conv_idx: Dict[tuple, int] = {}
    for cj in cfg.conv_jobs:
        conv_idx.setdefault(conv_key(cj.model, cj.job), len(conv_idx))
    mem_idx: Dict[tuple, int] = {}
    for mj in cfg.mem_jobs:
        mem_idx.setdefault((mj.model, f"{mj.act.c}x{mj.act.hw}x{mj.act.hw}", mj.batch, mj.dtype), len(mem_idx))
    variants = ("conv_alone", "conv_bn_relu", "conv_bn_add_relu") + bench_bandwidth.OP_NAMES
    prov = {p: i for i, p in enumerate(PROVIDERS)}

    def key(r: dict) -> tuple:
        k = (r["model"], r["shape"], r["batch"], r["dtype"])
        mem = r["variant"] in bench_bandwidth.OP_NAMES
        return (int(mem), (mem_idx if mem else conv_idx).get(k, 1 << 30), variants.index(r["variant"]),
                prov.get(r["provider"], 99))

    return sorted(rows, key=key)


if __name__ == "__main__":
    sys.exit(main())
