"""The model zoo end to end: inference and a training step of torchvision's ResNets, fused vs eager vs torch.compile.

    python -m benchmarks.bench_models [--out DIR] [--quick] [--device cuda|cpu] [--models ...]
                                      [--modes infer train] [--batches N ...] [--dtypes fp16 fp32]
                                      [--layouts channels_last nchw] [--deadline S] [--reps N]
                                      [--no-compile] [--no-max-autotune] [--no-graph] [--compile]

Question: how many images per second do whole torchvision ResNets process, and how much memory do
they take, with the fused modules of :mod:`resnet_fused.models` (Triton kernels, or the compiled
C++/CUDA library) compared with the same network in eager PyTorch (cuDNN convs, BN, ReLU, add as
separate kernels) and with ``torch.compile`` of the eager network: in inference (eval mode,
``torch.no_grad``) and for one training step (forward + backward + SGD update)? The issue's goals
(H100): ResNet-50 inference at batch 256, fp16, channels_last: fused >= 1.5x eager and >= 1.1x
torch.compile max-autotune with freezing; ResNet-50 training step at batch 256, AMP,
channels_last: fused >= 1.3x eager and >= torch.compile. "Fused" is the better of triton and cuda;
each is also judged alone, and so is auto (what users get). A number that misses is reported as it
is (log, markdown, JSON ``"goals"``).

Models: ``resnet18``, ``resnet34``, ``resnet50``, ``resnet101``, ``resnet152``,
``wide_resnet50_2``; 3x224x224 input (GPU), 1000 classes. Eager and compile run the plain network
of :mod:`resnet_fused.models.reference`; triton, cuda and auto run ours
(``resnet_fused.models.<name>(backend=...)``, the same state_dict loaded strictly). Inference: the
BN running statistics are measured on one random train-mode batch with random affine parameters
(:func:`benchmarks.bench_blocks.calibrate_bn`: random statistics blow a 50-layer network up in
fp16); training: random BN state (as bench_train).

Modes and precision:

- ``infer``: batch 1, 32, 256; ``fp16`` = fp16 weights and input, ``fp32`` = fp32 with
  PyTorch's default TF32 convolutions (both sides); channels_last (``--layouts nchw`` adds
  NCHW). Providers ``eager``, ``triton``, ``cuda``, ``auto``, then ``compile`` twice: ``variant="default"``
  (``torch.compile(model)``) and ``variant="max-autotune+freezing"`` (``torch.compile(model,
  mode="max-autotune")`` with ``torch._inductor.config.freezing = True`` while it compiles and
  runs, restored after; it brings Inductor's own CUDA graphs). A fresh ``torch._dynamo.reset()``
  before and after every compile.
- ``train_step``: batch 256 (or less where memory says, below); ``fp16`` = AMP
  (``torch.autocast`` float16, fp32 master weights, static loss scale 1024 with the learning rate
  divided by it, no GradScaler), ``fp32`` = TF32 convolutions; SGD momentum 0.9; channels_last
  only. Providers ``eager``, ``triton``, ``cuda``, ``auto``, ``compile`` (default mode). This is
  :func:`benchmarks.bench_train.run_job` (its step, its checks, its timing) with this script's
  model cases. The batch: 256 unless the estimated memory of the reference step (activations of
  every leaf module on the meta device x batch x the reference dtype's bytes: float32 for AMP runs,
  float64 for fp32 runs) exceeds 75% of the GPU's memory, halved until it fits (ResNet-152 AMP on
  an 80 GB H100: 128); an out-of-memory error in a job (the allocator's ``num_ooms`` grew) drops
  its rows and re-runs it at half the batch. The batch used is the row's ``batch``, and a note
  says why.
- ``auto``: our network with ``backend="auto"``, the measured dispatch (:mod:`resnet_fused.dispatch`):
  at its first call with a new key each conv site (inference) or block (training step) runs every
  candidate on the real inputs, checks and times it, and keeps the fastest correct one. That first
  call is this script's untimed warm-up, made with exactly the timed inputs' shape, dtype and layout
  (inference: the checked call; training: the checked step), so no timed call measures; a key first
  met later would be named in ``"notes"``. The dispatch forgets its decisions before each case's
  auto run (``resnet_fused.dispatch.forget``: every case measures its own keys, as a fresh process
  would, and its record is complete) and reads and writes no decision file while the script runs
  (``RESNET_FUSED_CACHE_DIR=""`` in this process). The JSON's ``"dispatch"`` holds each auto case's
  decisions (below); the log line says what was chosen.
- Order: eager, triton, cuda and auto of every case first; then ``compile`` (default) of every case;
  then ``max-autotune+freezing`` last (it autotunes for minutes). A run cut short keeps the
  fused-vs-eager answers; results are rewritten after every case; ``--deadline`` seconds after
  the start no provider starts (skips are listed in the JSON's ``"notes"``).
- ``--quick`` (a step of the benchmark suite, meant for ~120 s on an H100; an estimate): resnet50
  only, headline rows first: inference batch 256 fp16 (eager, triton, cuda, auto), training step
  batch 256 AMP (eager, triton, cuda, auto), inference batch 1 fp16 (eager, triton, cuda, auto), then compile
  (default) of the batch-256 inference and training step, then max-autotune+freezing of the
  batch-256 inference if time allows; no provider starts after 120 s (``--deadline``; the suite
  passes its own).

Correctness before timing. Inference: every provider's output on the same batch against a
float64 run of the same network on the device (as bench_blocks), relative error within
max(dtype floor, 4 x eager's error in the same dtype) (:func:`benchmarks.common.check_output`);
the log gives the fused convolutions per forward (20 for resnet18, 53 for resnet50: 0 would mean
the fused path did not run). Training: bench_train's rule: one step of each provider from the same
state on the same batch against a reference step (float64 on CPU and for fp32 runs, float32 with
TF32 off for AMP runs on the GPU): output, loss, six parameter gradients, three BN running
statistics, each within max(dtype floor, 4 x eager's error). A wrong or failing provider is
recorded ``correct=false`` with no time (exit code 1).

Timing. Inference: CUDA events, warm-up, at least ``--reps`` (20) samples, median with 20th /
80th percentiles, rotating over input copies that together exceed twice the L2 cache; at batch 1
and 32 (where launch gaps would dominate) each sample is a CUDA-graph replay
(``--no-graph``: plain launches; max-autotune has Inductor's own graphs and is never captured
again; at batch 256 plain launches). Training: CUDA events per step, 7 untimed steps, 20 timed
(``--reps``), no CUDA graphs. ``cudnn.benchmark`` is on for every provider
(``--no-cudnn-benchmark``). ``compile_s``: wall seconds of compile's first call (compile + one
call: cold on a fresh machine, shorter where Inductor's caches are warm); null for other rows.
``peak_mem_mb``: inference: the most memory one warmed-up forward allocates over what was
allocated before it (activations, workspace, output; weights and inputs excluded; for
max-autotune, whose graph pool is allocated before the call, it reads low); training: the most
allocated during the timed steps over what was allocated before them (activations, gradients,
workspaces; not parameters, momentum buffers or inputs). Null on CPU.

CPU (the default without CUDA; CI, ``tests/test_bench_models.py``): tiny sizes that prove the
script: inference of ``resnet18`` and ``resnet50`` at 3x32x32, batch 1 and 2; a training step of
``resnet18`` at 3x64x64, batch 4; fp32; providers ``eager``, ``cuda`` (the compiled library's
C++ kernels, where it loads) and ``auto`` (on CPU tensors it measures ``torch`` against the C++
kernels; the Triton interpreter is never a candidate), auto on resnet18's inference only unless
``--providers`` names it (it has every kind of conv key; measuring resnet50's 53 convs or the
training step's blocks as well would only add CI time, and bench_wrn's CPU mode runs auto's
training path through the same harness; a note says so). Not resnet50's training step, nor
smaller images or batch 2: the probed gradients of a randomly initialised ResNet-50 are
ill-conditioned (eager fp32's own relative error against float64 is 1e-2 to 1e-1 at every size tried, 32x32 to 224x224, batch 2 to
8, and moves by more than 4x between NCHW and channels_last or one and two threads; resnet18's
too at 32x32 or 64x64 with batch 2), so the 4 x eager bound passes or fails a correct provider by
luck (seen: cuda, resnet50 at 32x32, batch 8: 7.9e-3 against a bound of 1.3e-3; torch.compile,
resnet18 at 64x64, batch 2: 4.7e-3 against 3.5e-5); resnet18 at 64x64, batch 4 stays under 1e-5
in every variant. ``triton`` runs on CPU only through Triton's interpreter
(``TRITON_INTERPRET=1`` set before Python starts), which is far too slow for whole torchvision
networks (their 256-512-channel convs dominate whatever the input size; measured on 2 cores:
resnet18 at 16x16, batch 2, about 30 s per forward and 50 s per training step; resnet50 at 32x32
about 90 s and 200 s): it is left out of the CPU mode (recorded under ``"skipped"``) unless
``--providers`` names it, and then runs on resnet18 only. ``compile`` is left out on CPU unless
``--compile``. About 15 s on 2 cores.

Outputs (``--out``, default ``benchmarks/results``): ``<date>_<device>_<commit>_models.{json,csv,md}``
via :mod:`benchmarks.common`. Rows: :func:`benchmarks.common.row_keys` ``("variant", "layout",
"compile_s")``, ``bench="models"``, ``model`` the torchvision name, ``shape`` what ran
(``3x224x224``), ``mode`` infer | train_step, ``provider`` eager | triton | cuda | auto | compile,
``variant`` "" (compile: "default" | "max-autotune+freezing"), ``layout`` channels_last | nchw.
JSON: ``env``, ``skipped`` (provider -> why it cannot run here), ``goals`` (:func:`goals`: per goal
and baseline, fused / triton / cuda / auto ratio, target, verdict met | missed | not measured, and a
sentence), ``notes`` (deadline skips, batch reductions), ``dispatch`` (one entry per auto row:
:func:`benchmarks.common.dispatch_entry`, the row's ``model shape batch dtype mode layout variant``,
the dispatch's ``env`` and its ``decisions``, each with ``op case chosen candidates source sites
margin measure_ms``), ``rows``. Markdown and stdout: one line
per (model, mode, batch, dtype): eager ms and images/s, each provider's ms, speedup over eager and
peak MiB, compile seconds; the goal verdicts under it.

Pending: nothing has run on a GPU yet. The ``--quick`` time is an estimate, and so is the memory
rule for the training batch; a cold max-autotune compile of ResNet-50 may take minutes, so in
``--quick`` the deadline will usually leave it out. The ill-conditioning of ResNet-50's training
gradients (CPU paragraph) holds at 224x224 too: on the GPU the training check may call a correct
provider wrong (or pass a slightly wrong one); a WRONG training row there needs a second look.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import gc
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

import resnet_fused
from resnet_fused.models import reference

from . import bench_train, common
from .bench_blocks import calibrate_bn, randomize_bn

BENCH = "models"
KEYS = common.row_keys("variant", "layout", "compile_s")
MODELS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2")
# blocks per stage (torchvision); BasicBlock networks end a block with bn2/conv2, Bottlenecks with bn3/conv3
LAYERS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3), "resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3),
          "resnet152": (3, 8, 36, 3), "wide_resnet50_2": (3, 4, 6, 3)}
BASIC = ("resnet18", "resnet34")
MODEL_PROVIDERS = ("eager", "triton", "cuda", "auto", "compile", "torch")
LATE = ("compile",)
DEFAULT = "default"
MAX_AUTOTUNE = "max-autotune+freezing"
CL, NCHW = "channels_last", "nchw"
FORMATS = {CL: torch.channels_last, NCHW: torch.contiguous_format}
GPU_SIZE, CPU_SIZE = 224, 32
GPU_INFER_BATCHES, CPU_INFER_BATCHES = (256, 32, 1), (1, 2)
GPU_TRAIN_BATCH, CPU_TRAIN_BATCH = 256, 4
CPU_MODELS = ("resnet18", "resnet50")
# CPU training: resnet18 at 64x64, batch 4, where its probed gradients are well conditioned (fp32's own
# error under 1e-5 whatever the layout and thread count); resnet50's are not at any size tried
# (module docstring), so the 4 x eager bound would pass or fail a correct provider by luck
CPU_TRAIN_MODELS, CPU_TRAIN_SIZE = ("resnet18",), 64
CPU_TRITON_MODELS = ("resnet18",)  # the interpreter, if asked for at all
# auto's CPU default (CI): resnet18's inference, which has every kind of conv key (3x3 + ReLU,
# + add + ReLU, the 1x1 downsample without ReLU). Measuring resnet50's 53 convs, or the training
# step's blocks (bench_wrn's CPU mode runs auto's training path through the same harness), would
# only add CI time. --providers naming auto runs it on every case.
CPU_AUTO_CASES = (("infer", "resnet18"),)
GRAPH_MAX_BATCH = 32  # CUDA-graph replays at and below this inference batch
MEM_FRACTION = 0.75  # a training batch is halved while its reference step's estimate exceeds this share
MIN_TRAIN_BATCH = 8
QUICK_DEADLINE_S = 120.0
DEFAULT_REPS = 20
SEED = 100
_T0 = time.monotonic()

CPU_TRITON_REASON = ("whole torchvision networks through Triton's interpreter are too slow for the CPU mode "
                     "(2 cores: resnet18 at 16x16 ~30 s per forward, ~50 s per training step); name triton in "
                     "--providers to run it (resnet18 only)")
CPU_COMPILE_REASON = "left out on CPU (pass --compile to include it)"

# The goals: (title, model, mode, batch, dtype, layout, ((baseline provider, variant, target), ...))
GOALS = (
    ("ResNet-50 inference, batch 256, fp16, channels_last", "resnet50", "infer", 256, "fp16", CL,
     (("eager", "", 1.5), ("compile", MAX_AUTOTUNE, 1.1))),
    ("ResNet-50 training step, batch 256, AMP, channels_last", "resnet50", "train_step", 256, "fp16", CL,
     (("eager", "", 1.3), ("compile", DEFAULT, 1.0))),
)
GOAL_SHAPE = "3x224x224"
FUSED = ("triton", "cuda")
JUDGED = FUSED + ("auto",)  # each judged alone in the goals; "fused" is the faster of FUSED


# ------------------------------------------------------------------------------------------ plan
@dataclass(frozen=True)
class Task:
    """One case and the provider runs ((provider, variant), ...) it gets in one pass."""

    mode: str  # "infer" | "train_step"
    model: str
    size: int
    batch: int
    dtype: str
    layout: str
    runs: Tuple[Tuple[str, str], ...]

    @property
    def key(self) -> tuple:
        return (self.mode, self.model, self.size, self.batch, self.dtype, self.layout)

    def label(self, batch: Optional[int] = None) -> str:
        lay = "" if self.layout == CL else f" {self.layout}"
        return f"{self.model} {self.mode} b{self.batch if batch is None else batch} {self.dtype}{lay}"


def plan_tasks(gpu: bool, providers: Sequence[str], *, quick: bool = False, models: Optional[Sequence[str]] = None,
               modes: Sequence[str] = ("infer", "train"), batches: Optional[Sequence[int]] = None,
               dtypes: Optional[Sequence[str]] = None, layouts: Sequence[str] = (CL,), size: Optional[int] = None,
               max_autotune: bool = True, cpu_auto_cases: Optional[Sequence[Tuple[str, str]]] = CPU_AUTO_CASES
               ) -> List[Task]:
    """Every task in the order it runs: eager / triton / cuda (/ torch) of every case, then compile
    (default) of every case, then compile max-autotune+freezing of the inference cases.

    ``providers``: those that can run (eager first). GPU full: every model of ``models`` (default
    all six), inference at ``batches`` (256, 32, 1) in ``dtypes`` (fp16, fp32) and ``layouts``,
    training at 256 channels_last. GPU ``quick``: resnet50 unless ``models``; inference at the
    first batch (256) with every provider and at the last (1) without compile; training at 256;
    fp16. CPU: inference of resnet18 and resnet50 at 32x32, batch 1 and 2; training of resnet18
    at 64x64, batch 4 (``models`` / ``batches`` / ``size`` replace these); fp32; triton (if asked
    for) on resnet18 only; auto on the (mode, model) pairs of ``cpu_auto_cases`` (None: every
    case)."""
    train_size = size or (GPU_SIZE if gpu else CPU_TRAIN_SIZE)
    size = size or (GPU_SIZE if gpu else CPU_SIZE)
    if gpu:
        models = list(models or (("resnet50",) if quick else MODELS))
        train_models = models
        dtypes = list(dtypes or (("fp16",) if quick else ("fp16", "fp32")))
        if quick:
            infer_b = list(batches or (256, 1))
            compile_b = infer_b[:1]
        else:
            infer_b = list(batches or GPU_INFER_BATCHES)
            compile_b = infer_b
        train_b = list(batches or (GPU_TRAIN_BATCH,))
    else:
        train_models = list(models or CPU_TRAIN_MODELS)
        models = list(models or CPU_MODELS)
        dtypes = list(dtypes or ("fp32",))
        infer_b = list(batches or CPU_INFER_BATCHES)
        compile_b = infer_b
        train_b = list(batches or (CPU_TRAIN_BATCH,))
    early = [p for p in providers if p not in LATE]
    do_compile = "compile" in providers

    def early_runs(model: str, mode: str = "infer") -> Tuple[Tuple[str, str], ...]:
        cpu_ok = {"triton": model in CPU_TRITON_MODELS,
                  "auto": cpu_auto_cases is None or (mode, model) in cpu_auto_cases}
        keep = [p for p in early if gpu or cpu_ok.get(p, True)]
        return tuple((p, "") for p in keep)

    infer = [(m, b, d, lay) for m in models for d in dtypes for lay in layouts for b in infer_b] \
        if "infer" in modes else []
    train = [(m, b, d) for m in train_models for d in dtypes for b in train_b] if "train" in modes else []
    tasks: List[Task] = []
    if gpu and quick:  # headline rows first: each model's biggest inference batch, its training step, the rest
        for m in models:
            head = [x for x in infer if x[0] == m and x[1] == infer_b[0]]
            rest = [x for x in infer if x[0] == m and x[1] != infer_b[0]]
            tasks += [Task("infer", m, size, b, d, lay, early_runs(m)) for _, b, d, lay in head]
            tasks += [Task("train_step", m, train_size, b, d, CL, early_runs(m, "train_step"))
                      for mm, b, d in train if mm == m]
            tasks += [Task("infer", m, size, b, d, lay, early_runs(m)) for _, b, d, lay in rest]
    else:
        for m in models:
            tasks += [Task("infer", m, size, b, d, lay, early_runs(m)) for mm, b, d, lay in infer if mm == m]
            tasks += [Task("train_step", m, train_size, b, d, CL, early_runs(m, "train_step"))
                      for mm, b, d in train if mm == m]
    tasks = [t for t in tasks if t.runs]
    if do_compile:
        for m in models:
            tasks += [Task("infer", m, size, b, d, lay, (("compile", DEFAULT),))
                      for mm, b, d, lay in infer if mm == m and b in compile_b]
            tasks += [Task("train_step", m, train_size, b, d, CL, (("compile", DEFAULT),))
                      for mm, b, d in train if mm == m]
        if max_autotune:
            tasks += [Task("infer", m, size, b, d, lay, (("compile", MAX_AUTOTUNE),))
                      for m, b, d, lay in infer if b in compile_b]
    return tasks


# ------------------------------------------------------------------------------------ the models
@functools.lru_cache(maxsize=None)
def activation_elems(model: str, size: int) -> int:
    """Elements the leaf modules of ``model`` output for one 3 x size x size image (meta device,
    no arithmetic): an estimate of what a training step keeps for backward, per image."""
    with torch.device("meta"):
        net = getattr(reference, model)()
    total = [0]
    for m in net.modules():
        if not list(m.children()):
            m.register_forward_hook(lambda _m, _i, out: total.__setitem__(0, total[0] + out.numel()))
    with torch.no_grad():
        net(torch.zeros(1, 3, size, size, device="meta"))
    return total[0]


def train_batch(model: str, size: int, dtype: str, want: int, total_bytes: Optional[int],
                fraction: float = MEM_FRACTION, min_batch: int = MIN_TRAIN_BATCH) -> int:
    """``want``, halved (not below ``min_batch``) while the reference step's estimated memory,
    :func:`activation_elems` x batch x bytes of the reference dtype (GPU: float32 for AMP runs,
    float64 for fp32), exceeds ``fraction`` of ``total_bytes`` (None: no limit, CPU)."""
    if total_bytes is None:
        return want
    per_image = activation_elems(model, size) * bench_train.ref_dtype(torch.device("cuda"), dtype).itemsize
    b = want
    while b > min_batch and per_image * b > fraction * total_bytes:
        b //= 2
    return max(b, min(want, min_batch))


@functools.lru_cache(maxsize=2)
def _calibrated(model: str, size: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = getattr(reference, model)()
    calibrate_bn(net, (3, size, size), torch.Generator().manual_seed(seed))
    return net.eval()


def infer_base(model: str, size: int, seed: int = SEED) -> nn.Module:
    """The plain reference network, float32 on CPU, eval mode, BN statistics calibrated on random
    data (a copy of the same network on every call)."""
    return copy.deepcopy(_calibrated(model, size, seed))


def train_case(model: str, size: int, seed: int = SEED) -> bench_train.Case:
    """bench_train's whole-model case for any of :data:`MODELS` (its ``resnet50_case``,
    generalised): reference vs ours with the same state_dict, six probed gradients (stem, first
    block, a projection shortcut, last block of stage 3 and 4, fc) and three BN buffers."""
    _, _, n3, n4 = LAYERS[model]
    last = 2 if model in BASIC else 3

    def build_ref() -> nn.Module:
        torch.manual_seed(seed)
        net = getattr(reference, model)()
        randomize_bn(net, torch.Generator().manual_seed(seed))
        return net

    def build_ours(backend: str) -> nn.Module:
        return getattr(resnet_fused.models, model)(backend=backend)

    probes = ("conv1.weight", "layer1.0.conv1.weight", "layer2.0.downsample.0.weight",
              f"layer3.{n3 - 1}.bn{last}.weight", f"layer4.{n4 - 1}.conv{last}.weight", "fc.weight")
    buffers = ("bn1.running_mean", "layer1.0.bn2.running_var", f"layer4.{n4 - 1}.bn{last}.running_var")
    return bench_train.Case(model, "model", (3, size, size), build_ref, build_ours, probes, buffers, num_classes=1000)


@contextlib.contextmanager
def inductor_freezing(on: bool):
    """``torch._inductor.config.freezing = True`` inside (when ``on``), restored after."""
    if not on:
        yield
        return
    import torch._inductor.config as inductor_config

    old = inductor_config.freezing
    inductor_config.freezing = True
    try:
        yield
    finally:
        inductor_config.freezing = old


@contextlib.contextmanager
def count_fused_convs():
    """The backends of the fused convolutions (``FusedBlockMixin._conv``: every block's and the
    stem's conv + folded BN (+ residual) (+ ReLU)) run while the context is open."""
    from resnet_fused.modules import _base

    impls: List[str] = []
    real = _base.FusedBlockMixin._conv

    def spy(self, key, impl, *args, **kwargs):
        impls.append(impl)
        return real(self, key, impl, *args, **kwargs)

    _base.FusedBlockMixin._conv = spy
    try:
        yield impls
    finally:
        _base.FusedBlockMixin._conv = real


def make_infer_provider(prov: str, variant: str, eager: nn.Module, model: str, size: int, device: torch.device,
                        dtype: torch.dtype, fmt: torch.memory_format) -> nn.Module:
    """What ``prov`` runs: eager itself; our network (same state) pinned to a backend; or
    torch.compile of a copy of eager (``variant`` default or max-autotune+freezing: the caller holds
    the freezing flag while it compiles)."""
    if prov == "eager":
        return eager
    if prov in ("triton", "cuda", "torch", "auto"):
        net = getattr(resnet_fused.models, model)(backend=prov)
        net.load_state_dict(_calibrated(model, size, SEED).state_dict(), strict=True)
        return net.to(device, dtype).to(memory_format=fmt).eval()
    if prov == "compile":
        src = copy.deepcopy(eager)
        return torch.compile(src, mode="max-autotune") if variant == MAX_AUTOTUNE else torch.compile(src)
    raise ValueError(f"provider: expected one of {MODEL_PROVIDERS}, got {prov!r}")


# ----------------------------------------------------------------------------------------- state
@dataclass
class Config:
    device: torch.device
    tasks: List[Task]
    providers: List[str]
    reps: int
    deadline: Optional[float]  # time.monotonic() after which no provider starts
    cuda_graph: bool
    timing: dict  # benchmark() options for inference
    notes: List[str] = field(default_factory=list)
    skipped: Dict[str, str] = field(default_factory=dict)


@dataclass
class InferInfo:
    check: Optional[common.Check] = None
    first_s: Optional[float] = None
    fused: Optional[int] = None
    impls: Tuple[str, ...] = ()
    graph: Optional[bool] = None
    error: Optional[str] = None
    dispatch: Optional[dict] = None  # auto: common.dispatch_record() after the run


@dataclass
class State:
    """What the passes share: float64 reference and eager outputs per inference case (the late
    compile pass reuses them), training batches actually used, why rows are not correct."""

    refs: Dict[tuple, Tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    train_batches: Dict[tuple, int] = field(default_factory=dict)
    train_cases: Dict[tuple, bench_train.Case] = field(default_factory=dict)
    train_infos: Dict = field(default_factory=dict)
    status: Dict[tuple, str] = field(default_factory=dict)  # row key -> "WRONG" | "FAILED"
    dispatch: Dict[tuple, dict] = field(default_factory=dict)  # auto row key -> its dispatch record


def row_key(row: dict) -> tuple:
    return (row["model"], row["mode"], row["batch"], row["dtype"], row["layout"], row["provider"], row["variant"])


def _past_deadline(cfg: Config) -> bool:
    return cfg.deadline is not None and time.monotonic() > cfg.deadline


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _free(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def extra_cols(prov: str, variant: str, layout: str, first_s: Optional[float]) -> dict:
    return {"variant": variant, "layout": layout, "compile_s": first_s if prov == "compile" else None}


def label_of(prov: str, variant: str) -> str:
    """The table's name for a provider run: compile's default mode is "compile", max-autotune with
    freezing "compile-max"."""
    if prov == "compile":
        return "compile-max" if variant == MAX_AUTOTUNE else "compile"
    return prov


# ------------------------------------------------------------------------------------- inference
def run_infer(task: Task, cfg: Config, state: State, rows: List[dict]) -> None:
    """Check, then time, each of ``task.runs`` on one inference case; append one row per run."""
    dev, dt, fmt = cfg.device, common.DTYPES[task.dtype], FORMATS[task.layout]
    if _past_deadline(cfg):
        for prov, variant in task.runs:
            print(f"  SKIPPED {task.label()} {label_of(prov, variant)}: past the deadline", file=sys.stderr)
            cfg.notes.append(f"{task.label()} {label_of(prov, variant)}: skipped (deadline)")
        return
    shape = f"3x{task.size}x{task.size}"
    gen = torch.Generator().manual_seed(1234 + task.batch)
    x64 = torch.randn(task.batch, 3, task.size, task.size, generator=gen, dtype=torch.float64)
    eager = infer_base(task.model, task.size).to(dev, dt).to(memory_format=fmt)
    x = x64.to(dev, dt).contiguous(memory_format=fmt)
    if task.key not in state.refs:
        with torch.no_grad():
            ref = infer_base(task.model, task.size).to(dev).double()
            ref64 = ref(x64.to(dev)).cpu()
            del ref
            eager_out = eager(x.clone()).float().cpu()
        state.refs[task.key] = (ref64, eager_out)
        _free(dev)
    ref64, eager_out = state.refs[task.key]
    n_copies = common.rotation_copies(x.numel() * x.element_size(), common.cache_bytes(dev),
                                      max_copies=32 if dev.type == "cuda" else 2)
    dgen = torch.Generator(device=dev).manual_seed(4321 + task.batch)
    inputs = [(torch.randn(x.shape, generator=dgen, device=dev).to(dt).contiguous(memory_format=fmt),)
              for _ in range(n_copies)]
    for prov, variant in task.runs:
        name = label_of(prov, variant)
        if _past_deadline(cfg):
            print(f"  SKIPPED {task.label()} {name}: past the deadline", file=sys.stderr)
            cfg.notes.append(f"{task.label()} {name}: skipped (deadline)")
            continue
        info = InferInfo()
        timing, peak, ok = None, None, False
        mod = None
        max_mode = prov == "compile" and variant == MAX_AUTOTUNE
        try:
            with inductor_freezing(max_mode):
                if prov == "compile":
                    torch._dynamo.reset()
                if prov == "auto":
                    common.dispatch_fresh()  # the warm-up call below measures every conv of the case
                mod = make_infer_provider(prov, variant, eager, task.model, task.size, dev, dt, fmt)
                _sync(dev)
                with count_fused_convs() as impls, torch.no_grad():
                    tic = time.perf_counter()
                    out = mod(x.clone())  # the timed inputs' shape, dtype and layout: auto decides here
                    _sync(dev)
                    info.first_s = time.perf_counter() - tic
                if prov in ("triton", "cuda", "torch", "auto"):
                    info.fused, info.impls = len(impls), tuple(sorted(set(impls)))
                if prov == "auto":
                    info.dispatch = common.dispatch_record()
                info.check = common.check_output(out, ref64, eager_out, task.dtype)
                ok = info.check.ok
                del out
                if ok:
                    def fn(inp, _m=mod):
                        with torch.no_grad():
                            return _m(inp)

                    opts = common.provider_timing(dev, prov, cfg.timing)
                    graph = cfg.cuda_graph and task.batch <= GRAPH_MAX_BATCH and not max_mode
                    timing, info.graph = common.benchmark_graph_or_plain(fn, inputs, dev, graph,
                                                                         f"{task.label()} {name}", **opts)
                    peak = common.peak_mem_mb(fn, inputs[0], dev)
                    if prov == "auto":
                        warm, info.dispatch = info.dispatch, common.dispatch_record()
                        late = common.dispatch_late(warm, info.dispatch)
                        if late is not None:
                            print(f"  note: {task.label()} {late}", file=sys.stderr)
                            cfg.notes.append(f"{task.label()}: {late}")
                else:
                    c = info.check
                    print(f"  WRONG {task.label()} {name}: rel err {c.err:.3e} > bound {c.bound:.3e} "
                          f"(eager {c.eager_err:.1e}); not timed", file=sys.stderr)
        except Exception as exc:
            ok, timing, peak = False, None, None
            info.error = f"{type(exc).__name__}: {exc}"
            print(f"  FAILED {task.label()} {name}: {info.error}", file=sys.stderr)
            traceback.print_exc(limit=3)
            if prov == "auto":  # what the dispatch decided before it failed
                info.dispatch = common.dispatch_record()
        finally:
            mod = None
            if prov == "compile":
                torch._dynamo.reset()
            _free(dev)
        rows.append(common.make_row(bench=BENCH, model=task.model, shape=shape, batch=task.batch, dtype=task.dtype,
                                    mode="infer", provider=prov, timing=timing, peak_mem_mb=peak, correct=ok,
                                    extra=extra_cols(prov, variant, task.layout, info.first_s)))
        if not ok:
            state.status[row_key(rows[-1])] = "WRONG" if info.check is not None else "FAILED"
        if info.dispatch is not None:
            state.dispatch[row_key(rows[-1])] = info.dispatch
        print("  " + infer_line(task, name, rows[-1], info), flush=True)
    del eager, inputs
    _free(dev)


def infer_line(task: Task, name: str, row: dict, info: InferInfo) -> str:
    """One log line per provider run: verdict and error, fused convs, first call, time, memory."""
    parts = [f"{task.label()} {name:<11}"]
    if info.check is not None:
        c = info.check
        parts.append(f"{'ok' if c.ok else 'WRONG'} (err {c.err:.1e}, bound {c.bound:.1e})")
    else:
        parts.append(f"FAILED ({info.error})")
    if info.fused is not None:
        parts.append(f"fused convs/forward {info.fused} ({'/'.join(info.impls) or '-'})")
    if info.first_s is not None:
        parts.append(f"first call {info.first_s:.2f} s{' (dispatch measuring included)' if name == 'auto' else ''}")
    if info.dispatch is not None:
        parts.append(common.auto_note(info.dispatch["decisions"]))
    if row["median_ms"] is not None:
        parts.append(f"{row['median_ms']:.3f} ms (p20 {row['p20_ms']:.3f}, p80 {row['p80_ms']:.3f}), "
                     f"{row['images_per_s']:.1f} img/s{', CUDA graph' if info.graph else ''}")
    if row["peak_mem_mb"] is not None:
        parts.append(f"peak +{row['peak_mem_mb']:.0f} MiB")
    return "; ".join(parts)


# -------------------------------------------------------------------------------------- training
def _num_ooms(dev: torch.device) -> int:
    return int(torch.cuda.memory_stats(dev).get("num_ooms", 0)) if dev.type == "cuda" else 0


def run_train(task: Task, cfg: Config, state: State, rows: List[dict]) -> None:
    """One training case through :func:`benchmarks.bench_train.run_job` at the batch memory allows;
    an out-of-memory error drops the job's rows and re-runs it at half the batch."""
    dev = cfg.device
    case_key = (task.model, task.size)
    if case_key not in state.train_cases:
        state.train_cases[case_key] = train_case(task.model, task.size)
    case = state.train_cases[case_key]
    bkey = (task.model, task.size, task.dtype, task.batch)
    if bkey not in state.train_batches:
        total = torch.cuda.get_device_properties(dev).total_memory if dev.type == "cuda" else None
        b = train_batch(task.model, task.size, task.dtype, task.batch, total)
        if b != task.batch:
            note = (f"{task.label()}: batch {b} (the reference step's estimated memory at batch {task.batch} exceeds "
                    f"{MEM_FRACTION:.0%} of the GPU's {total / 2**30:.0f} GiB)")
            print(f"note: {note}")
            cfg.notes.append(note)
        state.train_batches[bkey] = b
    providers = [p for p, _ in task.runs]

    def row_extra(job: bench_train.Job, prov: str, info: bench_train.Info) -> dict:
        return extra_cols(prov, DEFAULT if prov == "compile" else "", CL, info.first_s)

    tcfg = bench_train.Config(dev, [], providers, cfg.reps, cfg.deadline, cfg.notes, cfg.skipped)
    while True:
        batch = state.train_batches[bkey]
        job = bench_train.Job(case, batch, task.dtype)
        n0, ooms0 = len(rows), _num_ooms(dev)
        bench_train.run_job(job, providers, tcfg, rows, state.train_infos, bench=BENCH, row_extra=row_extra)
        if _num_ooms(dev) > ooms0 and batch // 2 >= MIN_TRAIN_BATCH:
            del rows[n0:]
            state.train_batches[bkey] = batch // 2
            if "eager" not in providers:  # the retried batch gets its own eager time
                providers = ["eager"] + providers
            note = f"{task.label(batch)}: out of memory; re-run at batch {batch // 2}"
            print(f"note: {note}")
            cfg.notes.append(note)
            _free(dev)
            continue
        break
    for r in rows[n0:]:
        info = state.train_infos.get(job.key + (r["provider"],))
        if not r["correct"]:
            state.status[row_key(r)] = "WRONG" if info is not None and info.verdict is not None else "FAILED"
        if info is not None and info.dispatch is not None:
            state.dispatch[row_key(r)] = info.dispatch


# ----------------------------------------------------------------------------------------- goals
def _find(rows: Sequence[dict], model: str, mode: str, batch: int, dtype: str, layout: str, prov: str,
          variant: str) -> Optional[dict]:
    """The first correct, timed row of this case and provider run (None if there is none)."""
    for r in rows:
        if (r["model"], r["mode"], r["batch"], r["dtype"], r.get("layout"), r["provider"], r.get("variant") or "",
                r["shape"]) == (model, mode, batch, dtype, layout, prov, variant, GOAL_SHAPE) \
                and r["correct"] and r["median_ms"]:
            return r
    return None


def goals(rows: Sequence[dict]) -> List[dict]:
    """The issue's ResNet-50 goals judged on ``rows`` (a pure function): one entry per (goal,
    baseline) with the baseline's time, and for ``fused`` (the faster of triton and cuda),
    ``triton``, ``cuda`` and ``auto`` (the measured dispatch: what users get): provider, ms, ratio
    (baseline ms / provider ms), verdict ("met", "missed" or "not measured": no correct timed row
    at 3x224x224 for it or the baseline); ``met`` is fused's verdict as a bool (None when not
    measured); ``text`` says it in a sentence."""
    out = []
    for title, model, mode, batch, dtype, layout, targets in GOALS:
        timed = {p: _find(rows, model, mode, batch, dtype, layout, p, "") for p in JUDGED}
        for base_p, base_v, target in targets:
            base = _find(rows, model, mode, batch, dtype, layout, base_p, base_v)
            base_name = label_of(base_p, base_v) + (f" ({base_v})" if base_p == "compile" else "")
            entry = {"goal": f"{title}: fused >= {target:.1f}x {base_name}", "model": model, "mode": mode,
                     "batch": batch, "dtype": dtype, "layout": layout, "baseline": base_p,
                     "baseline_variant": base_v, "target": target,
                     "baseline_ms": None if base is None else base["median_ms"]}

            def verdict(r: Optional[dict], prov: Optional[str]) -> dict:
                if r is None or base is None:
                    return {"provider": prov, "ms": None if r is None else r["median_ms"], "ratio": None,
                            "verdict": "not measured"}
                ratio = base["median_ms"] / r["median_ms"]
                return {"provider": prov, "ms": r["median_ms"], "ratio": round(ratio, 4),
                        "verdict": "met" if ratio >= target else "missed"}

            have = [(p, r) for p, r in timed.items() if r is not None and p in FUSED]
            best = min(have, key=lambda pr: pr[1]["median_ms"]) if have else (None, None)
            entry["fused"] = verdict(best[1], best[0])
            for p in JUDGED:
                entry[p] = verdict(timed[p], p)
            v = entry["fused"]["verdict"]
            entry["met"] = None if v == "not measured" else v == "met"
            entry["text"] = goal_text(entry)
            out.append(entry)
    return out


def goal_text(entry: dict) -> str:
    def one(name: str, d: dict) -> str:
        if d["verdict"] == "not measured":
            return f"{name} not measured"
        return f"{name} {d['ratio']:.2f}x: {d['verdict']}"

    f = entry["fused"]
    head = one(f"fused ({f['provider']})" if f["provider"] else "fused", f)
    return f"{entry['goal']}: {head} ({'; '.join(one(p, entry[p]) for p in JUDGED)})"


# ------------------------------------------------------------------------------------------ table
def summary_table(rows: Sequence[dict], status: Dict[tuple, str]) -> Tuple[List[str], List[list]]:
    """(headers, lines), one line per (model, mode, batch, dtype[, layout]): eager ms, images/s and
    peak MiB; each other provider run's ms, speedup over eager and peak MiB; compile seconds."""
    order = ["eager", "triton", "cuda", "auto", "torch", "compile", "compile-max"]
    present = {label_of(r["provider"], r["variant"]) for r in rows}
    others = [p for p in order[1:] if p in present]
    layouts = len({r["layout"] for r in rows}) > 1
    headers = ["model", "mode", "shape", "batch", "dtype"] + (["layout"] if layouts else [])
    headers += ["eager ms", "eager img/s", "eager MiB"]
    for p in others:
        headers += [f"{p} ms", f"eager/{p}", f"{p} MiB"]
    compiles = [p for p in ("compile", "compile-max") if p in others]
    headers += [f"{p} s" for p in compiles]
    groups: Dict[tuple, Dict[str, dict]] = {}
    for r in rows:
        key = (r["model"], r["mode"], r["shape"], r["batch"], r["dtype"], r["layout"])
        groups.setdefault(key, {})[label_of(r["provider"], r["variant"])] = r
    lines = []
    for (model, mode, shape, batch, dtype, layout), by in groups.items():
        line: list = [model, mode, shape, batch, dtype] + ([layout] if layouts else [])
        e = by.get("eager")
        e_ms = e["median_ms"] if e is not None and e["correct"] else None
        if e is None:
            line += ["", "", ""]
        elif not e["correct"]:
            line += [status.get(row_key(e), "WRONG"), "-", "-"]
        else:
            line += [common.fmt_ms(e_ms), _num(e["images_per_s"]), _mb(e["peak_mem_mb"])]
        for p in others:
            r = by.get(p)
            if r is None:
                line += ["", "", ""]
            elif not r["correct"]:
                line += ["-", status.get(row_key(r), "WRONG"), "-"]
            else:
                ratio = e_ms / r["median_ms"] if e_ms and r["median_ms"] else None
                line += [common.fmt_ms(r["median_ms"]), "" if ratio is None else f"{ratio:.2f}x", _mb(r["peak_mem_mb"])]
        for p in compiles:
            r = by.get(p)
            line.append("" if r is None else ("-" if r["compile_s"] is None else f"{r['compile_s']:.1f}"))
        lines.append(line)
    return headers, lines


def _mb(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.0f}"


def _num(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.1f}"


# ------------------------------------------------------------------------------------------- CLI
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = common.base_parser("python -m benchmarks.bench_models", __doc__, providers=MODEL_PROVIDERS,
                           dtypes=("fp16", "fp32"),
                           quick_help="GPU: resnet50 only; inference batch 256 and 1 and a training step at 256, "
                                      "fp16; compile for batch 256; deadline 120 s")
    p.add_argument("--models", nargs="+", choices=MODELS, default=None, help="override the models")
    p.add_argument("--modes", nargs="+", choices=("infer", "train"), default=("infer", "train"),
                   help="inference, training step, or both (default)")
    p.add_argument("--batches", type=int, nargs="+", default=None,
                   help="override the batch sizes (inference and training; training may still be halved for memory)")
    p.add_argument("--layouts", nargs="+", choices=(CL, NCHW), default=(CL,),
                   help="inference memory layouts (training is channels_last only)")
    p.add_argument("--size", type=int, default=None, help=f"image size (default {GPU_SIZE} on GPU, {CPU_SIZE} on CPU)")
    p.add_argument("--deadline", type=float, default=None,
                   help=f"seconds after start past which no provider starts (--quick: {QUICK_DEADLINE_S:.0f})")
    p.add_argument("--reps", type=int, default=DEFAULT_REPS,
                   help="GPU: timed training steps; the fewest timed inference calls / graph replays")
    p.add_argument("--no-compile", action="store_true", help="leave out torch.compile")
    p.add_argument("--no-max-autotune", action="store_true", help="leave out compile max-autotune+freezing")
    p.add_argument("--compile", action="store_true", help="CPU: include torch.compile (left out by default)")
    p.add_argument("--no-graph", action="store_true", help="GPU inference: plain launches, no CUDA-graph replays")
    p.add_argument("--no-cudnn-benchmark", action="store_true", help="GPU: leave torch.backends.cudnn.benchmark off")
    return p.parse_args(argv)


def make_config(args: argparse.Namespace) -> Config:
    dev = common.pick_device(args.device)
    gpu = dev.type == "cuda"
    if args.reps < 1:
        raise SystemExit(f"--reps: expected at least 1, got {args.reps}")
    if args.batches and min(args.batches) < 1:
        raise SystemExit(f"--batches: expected positive sizes, got {args.batches}")
    skipped: Dict[str, str] = {}
    providers = common.order_providers(args.providers, ["eager", "triton", "cuda", "auto", "compile"], "eager")
    if args.compile and "compile" not in providers:
        providers.append("compile")
    if args.no_compile and "compile" in providers:
        providers.remove("compile")
    providers = common.drop_unavailable(providers, dev, skipped)
    if not gpu:
        if "compile" in providers and not args.compile:
            providers.remove("compile")
            skipped["compile"] = CPU_COMPILE_REASON
        if "triton" in providers and not (args.providers and "triton" in args.providers):
            providers.remove("triton")
            skipped["triton"] = CPU_TRITON_REASON
    modes = tuple(args.modes)
    auto_named = bool(args.providers and "auto" in args.providers)
    tasks = plan_tasks(gpu, providers, quick=args.quick, models=args.models, modes=modes, batches=args.batches,
                       dtypes=args.dtypes, layouts=tuple(dict.fromkeys(args.layouts)), size=args.size,
                       max_autotune=not args.no_max_autotune, cpu_auto_cases=None if auto_named else CPU_AUTO_CASES)
    notes: List[str] = []
    if not gpu and "triton" in providers:
        notes.append(f"triton on CPU (the interpreter): {', '.join(CPU_TRITON_MODELS)} only")
    if not gpu and "auto" in providers and not auto_named:
        notes.append("auto on CPU: " + ", ".join(f"{model} {mode}" for mode, model in CPU_AUTO_CASES)
                     + " only (name auto in --providers for every case)")
    if gpu:
        timing = dict(warmup_ms=10.0, rep_ms=50.0) if args.quick else dict(warmup_ms=25.0, rep_ms=100.0)
        timing["min_reps"] = args.reps
    else:
        timing = dict(warmup=2, min_reps=10, max_reps=200, budget_s=0.1)
    deadline_s = args.deadline if args.deadline is not None else (QUICK_DEADLINE_S if args.quick else None)
    deadline = None if deadline_s is None else _T0 + deadline_s
    return Config(dev, tasks, providers, args.reps, deadline, cuda_graph=gpu and not args.no_graph, timing=timing,
                  notes=notes, skipped=skipped)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    cfg = make_config(args)
    dev = cfg.device
    env = common.env_info(dev)
    print(common.banner("bench_models", env))
    print(f"providers {cfg.providers}; {len(cfg.tasks)} tasks; inference: float64 check, "
          f"{'CUDA graphs at batch <= ' + str(GRAPH_MAX_BATCH) if cfg.cuda_graph else 'no graphs'}; training: "
          f"bench_train's step (fp16 = autocast + static loss scale {bench_train.FP16_LOSS_SCALE:g}), "
          f"SGD momentum {bench_train.MOMENTUM}"
          + common.settings_suffix(dev, not args.no_cudnn_benchmark, cfg.deadline, _T0), flush=True)
    for t in cfg.tasks:
        print(f"  task: {t.label()} [{', '.join(label_of(p, v) for p, v in t.runs)}]")
    common.print_skipped(cfg.skipped)
    for note in cfg.notes:
        print(f"note: {note}")
    rows: List[dict] = []
    state = State()

    def extras() -> dict:
        return {"goals": goals(rows), "notes": list(cfg.notes),
                "dispatch": [common.dispatch_entry(r, state.dispatch[row_key(r)]) for r in rows
                             if row_key(r) in state.dispatch]}

    def save() -> None:
        if not args.no_write and rows:
            common.write_results(args.out, BENCH, env, rows, keys=KEYS, extra={"skipped": cfg.skipped, **extras()})

    with common.dispatch_isolated(), common.cudnn_benchmark(dev, not args.no_cudnn_benchmark):
        for task in cfg.tasks:
            if task.mode == "infer":
                run_infer(task, cfg, state, rows)
            else:
                run_train(task, cfg, state, rows)
            save()  # after every case: a run cut short keeps what it measured
    headers, lines = summary_table(rows, state.status)
    print(common.format_table(headers, lines))
    goal_entries = goals(rows)
    for g in goal_entries:
        print(f"goal: {g['text']}")
    for note in cfg.notes:
        print(f"note: {note}")
    title = f"bench_models: images/s of whole ResNets (inference and training step), {env['gpu']}"
    legend = ("compile: torch.compile, default mode; compile-max: mode max-autotune with Inductor freezing "
              "(inference only); compile s: the first call's wall time (compile included)")
    return common.finish(rows, args.out, BENCH, env, write=not args.no_write and bool(rows), keys=KEYS,
                         skipped=cfg.skipped, extra=extras(), markdown=(title, headers, lines),
                         notes=[legend] + [f"goal: {g['text']}" for g in goal_entries] + list(cfg.notes))


if __name__ == "__main__":
    sys.exit(main())
