"""Launch configurations of the Triton implicit-GEMM conv (:mod:`resnet_fused.ops.conv_bias_act`):
one configuration per shape class, chosen by a pure function, so a first use compiles one kernel
per variant and times nothing.

GEMM view: M = N*OH*OW output pixels, N = Cout, K = KH*KW*Cin. :func:`conv_config` picks

=====================  =============================================================================
BLOCK_N                64 when Cout <= 64 (ResNet-50 layer1's 1x1/3x3, the stem) or the conv is NCHW,
                       else 128. Never 256: a 128x256 fp32 accumulator is 128 registers a thread at
                       8 warps (the old 128x256x32 spilled in 126 of 180 ResNet-50 variants).
BLOCK_K                filter row (Cin < 8 and KW*Cin <= 32, "FLAT_K"): next power of two >= KW*Cin,
                       at least 16 (the stem: 7*3 = 21 -> 32). Otherwise the largest of 64 / 32 / 16
                       that divides Cin (a K block never straddles two filter taps, which the
                       weight's TMA descriptor needs), capped at 64 for 16-bit and 32 for fp32 (a
                       128x128x64 fp32 stage is 64 KiB) and at 32 for NCHW; Cin that no block
                       divides takes 16 (Cin < 32) or 32.
BLOCK_M                128, or 64 when 128-row tiles would not fill one wave of 132 SMs (small
                       batches, 7x7 layers): a 64-row tile is still one warpgroup's wgmma (m64).
num_warps              8 for a 128-row tile (two warpgroups: 64 accumulator registers a thread at
                       128x128; at 4 warps a 128x64 tile reached 255 registers and spilled on
                       sm_80), 4 for a 64-row tile (one warpgroup).
num_stages             as many as fit ~100 KiB of operand buffers, 2..4: 3 for 32 KiB stages, 4 below
                       (two CTAs can share an H100 SM; within A100's 163 KiB with the epilogue's
                       scratch).
GROUP_M                8 (grouped program order: consecutive programs share a weight tile in L2).
=====================  =============================================================================

What ResNet-50 (batch 256) and WRN-28-10 (batch 128) get (fp16/bf16 | fp32):

=========================================  ==========================  ==========================
class                                      channels_last               NCHW
=========================================  ==========================  ==========================
stem 7x7, Cin 3 (and WRN's 3x3, Cin 3)      128x64x32 w8 (x16: 3x3)     same
Cout <= 64 (layer1 1x1 / 3x3)              128x64x64 w8 | 128x64x32    128x64x32 w8
Cout > 64, Cin % 64 == 0                   128x128x64 w8 s3 | x32 s3   128x64x32 w8
Cin 160 / Cin 16 (WRN)                     128x128x32 / x16 w8         128x64x32 / x16 w8
M / 128 x Cout / BLOCK_N < 132 tiles       BLOCK_M 64, 4 warps         BLOCK_M 64, 4 warps
fp32 with TF32 off ("ieee": FMA units)     64x64x16 w8 s4 (stem        same
                                           64x32x32), maxnreg 255
=========================================  ==========================  ==========================

Every configuration this function can return is in :data:`CONFIGS`; each was compiled
ahead of time (no GPU) for sm_90a and sm_80 over every variant ResNet-50 and WRN-28-10 reach
(eval and a training step, fp16/bf16/fp32, channels_last and NCHW) with no register spill, shared
memory within both targets' limits, and HGMMA (wgmma) in every sm_90a variant
(``benchmarks/results/codegen/conv_notes.md``). None of them has been timed on a GPU: the
classes are a judgement from the register/shared-memory budget, not a measurement.

Exhaustive autotuning over a class's :func:`candidates` is opt-in:
``RESNET_FUSED_AUTOTUNE=1`` in the environment. Then the first launch of every new shape (batch
size included) compiles and times each candidate, as the autotuner does.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from torch import Tensor

try:  # Triton is optional: the PyTorch path works without it.
    import triton
except Exception:  # pragma: no cover - exercised on machines without triton
    triton = None

AUTOTUNE_ENV = "RESNET_FUSED_AUTOTUNE"
FLAT_K_MAX_CIN = 8  # below this, a per-tap Cin block would be mostly padding: K runs over a filter row
FLAT_K_MAX_ROW = 32  # ... as long as one filter row (KW*Cin) fits one 32-wide K block
WAVE_SMS = 132  # H100/H200 SXM multiprocessors: the tile count below which 128-row tiles leave SMs idle
STAGE_BUDGET = 100 * 1024  # bytes of operand buffers (all stages) a configuration may use


@dataclass(frozen=True)
class ConvConfig:
    """One launch configuration of the conv kernel."""
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8
    maxnreg: Optional[int] = None  # a register cap for ptxas (see register_cap), when the class needs one

    def meta(self) -> Dict[str, int]:
        """The kernel's constexpr meta-parameters."""
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k, GROUP_M=self.group_m)

    def name(self) -> str:
        return f"{self.block_m}x{self.block_n}x{self.block_k}_w{self.num_warps}_s{self.num_stages}"


def flat_k(cin: int, kw: int) -> bool:
    """Whether the K loop runs over whole filter rows (KW*Cin elements) instead of (tap, Cin block)."""
    return cin < FLAT_K_MAX_CIN and kw * cin <= FLAT_K_MAX_ROW


def _pow2_at_least(v: int, least: int) -> int:
    p = least
    while p < v:
        p *= 2
    return p


def block_k_for(cin: int, kw: int, elem_bytes: int) -> int:
    """BLOCK_K of the class (see the table)."""
    if flat_k(cin, kw):
        return _pow2_at_least(kw * cin, 16)
    cap = 64 if elem_bytes == 2 else 32
    for bk in (64, 32, 16):
        if bk <= cap and cin % bk == 0:
            return bk
    return 16 if cin < 32 else 32


def _stages(bm: int, bn: int, bk: int, elem_bytes: int) -> int:
    stage = (bm + bn) * bk * elem_bytes
    return max(2, min(4, STAGE_BUDGET // stage))


def _make(bm: int, bn: int, bk: int, elem_bytes: int) -> ConvConfig:
    # 8 warps (two warpgroups) for every 128-row tile. At 4 warps a 128x64 tile sat at 255
    # registers on both targets and sm_80 spilled 8 B (128x64x64, ResNet-50 layer1 3x3,
    # fp16/bf16); tiles that gather element by element (a filter row, or NCHW pixels whose
    # contiguity the compiler cannot prove: one 64-bit address a value) needed 8 already (the
    # stem: 255 -> 166 registers).
    warps = 8 if bm == 128 else 4
    return ConvConfig(bm, bn, bk, warps, _stages(bm, bn, bk, elem_bytes))


def _fma_config(cin: int, kw: int) -> ConvConfig:
    # IEEE fp32 runs tl.dot on FMA units: each thread holds its rows' and columns' operands for a
    # whole K block in registers, so small tiles over 8 warps (128x128x32 spilled up to 10 KB).
    # ptxas then aims for occupancy even on sm_90 (80 registers and a 4-byte spill in four
    # NCHW training variants): allowed 255, it spills nothing.
    bk = block_k_for(cin, kw, 4) if flat_k(cin, kw) else 16
    if flat_k(cin, kw):  # the stem: a 32-wide filter-row K block doubles the operand registers;
        # 64x64x32 reached 255 and spilled 4 B on sm_80, 64x32x32 does not spill (255 on both)
        return ConvConfig(64, 32, bk, 8, _stages(64, 32, bk, 4), maxnreg=255)
    return ConvConfig(64, 64, bk, 8, _stages(64, 64, bk, 4), maxnreg=255)


def conv_config(m: int, cout: int, cin: int, kh: int, kw: int, elem_bytes: int,
                pixel_major: bool = False, fma: bool = False) -> ConvConfig:
    """The configuration of a conv whose GEMM is ``m`` x ``cout`` x ``kh*kw*cin`` on
    ``elem_bytes``-byte operands (2: fp16/bf16, 4: fp32); ``pixel_major``: x or out is NCHW
    (pixels adjacent); ``fma``: fp32 without TF32 (PyTorch's conv precision "ieee"), no tensor
    cores. Pure: the same for every GPU target and epilogue/prologue variant (each checked to
    compile without spills)."""
    if fma:
        return _fma_config(cin, kw)
    flat = flat_k(cin, kw)
    bn = 64 if cout <= 64 or pixel_major else 128
    bk = block_k_for(cin, kw, elem_bytes)
    if pixel_major and not flat:
        bk = min(bk, 32)
    tiles = -(-m // 128) * -(-cout // bn)
    bm = 128 if tiles >= WAVE_SMS else 64
    return _make(bm, bn, bk, elem_bytes)


def pixel_major_strides(channel_stride: int, w_stride: int) -> bool:
    """An NCHW-like tensor (pixels, not channels, adjacent): the NCHW configuration class."""
    return channel_stride != 1 and w_stride == 1


def register_cap(arch: int) -> Optional[int]:
    """``maxnreg`` for the launch: 255 on sm_8x. Left to itself, sm_80's ptxas aims for two or
    three resident CTAs (128 registers at 8 warps, 168 at 4) and spills 4-16 bytes in some
    training variants rather than exceed that; allowed 255 it uses ~200 and spills nothing
    (compiled, not timed: an SM then holds fewer CTAs). sm_90's ptxas does not cap: None."""
    return 255 if 0 < arch < 9 else None


def interpreter_config(cin: int, kw: int) -> ConvConfig:
    """Triton's CPU interpreter runs each program in numpy: small fixed tiles (the tests' tiny
    shapes still get several tiles and program groups), BLOCK_K as the GPU's for a filter row."""
    return ConvConfig(32, 32, block_k_for(cin, kw, 2) if flat_k(cin, kw) else 16, 4, 1, group_m=4)


def candidates(cin: int, kw: int, elem_bytes: int, pixel_major: bool = False, fma: bool = False) -> List[ConvConfig]:
    """The configurations exhaustive autotuning tries on a conv of this class: the class's
    BLOCK_K (see the table) with BLOCK_M 64 / 128 and BLOCK_N 64 / 128 (64 only for NCHW), each
    with the warps and stages the class rules give it: at most four, so even an autotuned first
    use compiles little. IEEE fp32 (``fma``) has its one configuration."""
    if fma:
        return [_fma_config(cin, kw)]
    flat = flat_k(cin, kw)
    bk = block_k_for(cin, kw, elem_bytes)
    if pixel_major and not flat:
        bk = min(bk, 32)
    bns = (64,) if pixel_major else (64, 128)
    return [_make(bm, bn, bk, elem_bytes) for bm in (64, 128) for bn in bns]


def _all_configs() -> List[ConvConfig]:
    seen: List[ConvConfig] = []
    for eb in (2, 4):
        for cin, kw in ((3, 7), (3, 3), (3, 1), (16, 3), (32, 3), (64, 3)):
            for pm in (False, True):
                for fma in ((False, True) if eb == 4 else (False,)):
                    for c in candidates(cin, kw, eb, pm, fma):
                        if c not in seen:
                            seen.append(c)
    return seen


# every configuration conv_config can return or the autotuner can try (the checked, no-spill set)
CONFIGS: List[ConvConfig] = _all_configs()


def autotune_requested() -> bool:
    """``RESNET_FUSED_AUTOTUNE=1`` (read at every launch, so it can be switched at run time)."""
    return os.environ.get(AUTOTUNE_ENV, "") not in ("", "0")


# ----------------------------------------------------------------------------- TMA descriptors
TMA_MIN_ARCH = 9  # tensor descriptors are TMA-backed from Hopper (sm_90) on


def _tma_ok(t: Tensor, row_stride: int) -> bool:
    """A 2-D descriptor over ``t``'s storage with this row stride: 16-byte aligned base and stride."""
    return t.data_ptr() % 16 == 0 and (row_stride * t.element_size()) % 16 == 0


def _dense(t: Tensor, dims) -> bool:
    """``t``'s ``dims`` (outermost first) index one dense run of elements, as a row-major tensor
    of those sizes would (a size-1 dimension's stride does not matter)."""
    expect = 1
    for d in reversed(dims):
        if t.shape[d] != 1 and t.stride(d) != expect:
            return False
        expect *= t.shape[d]
    return True


def tma_descriptors(x: Tensor, weight: Tensor, cfg: ConvConfig, flat: bool, one_by_one: bool, arch: int,
                    interp: bool) -> Tuple[Optional[object], Optional[object]]:
    """``(x_desc, w_desc)``: host tensor descriptors for the operands that can use TMA, else None.

    On sm_90+ (``arch`` >= 9) and in the interpreter (which emulates descriptors, so CI runs this
    path too); never on sm_80. The weight (channels_last, so [COUT, KH*KW*CIN] with K contiguous)
    when BLOCK_K divides CIN; x when the conv is a plain GEMM over a dense channels_last [M, CIN]
    matrix (1x1, stride 1, no padding). Batch-split views and odd channel counts fail the 16-byte
    alignment checks and keep the pointer path.
    """
    if triton is None or flat or not (interp or arch >= TMA_MIN_ARCH):
        return None, None
    from triton.tools.tensor_descriptor import TensorDescriptor

    cout, cin, kh, kw = weight.shape
    w_desc = x_desc = None
    row = kh * kw * cin if cout == 1 else weight.stride(0)
    if cin % cfg.block_k == 0 and _dense(weight, (2, 3, 1)) and _tma_ok(weight, row):
        w_desc = TensorDescriptor(weight, [cout, kh * kw * cin], [row, 1], [cfg.block_n, cfg.block_k])
    n, _, h, w = x.shape
    if one_by_one and _dense(x, (0, 2, 3, 1)) and _tma_ok(x, cin):
        x_desc = TensorDescriptor(x, [n * h * w, cin], [cin, 1], [cfg.block_m, cfg.block_k])
    return x_desc, w_desc


# ------------------------------------------------------------------- opt-in exhaustive autotuning
def _set_descriptor_blocks(nargs):
    """Autotuner pre-hook: the descriptors' block shapes follow the configuration being tried."""
    if nargs["x_desc"] is not None:
        nargs["x_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
    if nargs["w_desc"] is not None:
        nargs["w_desc"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]


def prune_configs(configs, named_args, **kwargs):
    """Keep the candidates of this conv's class (:func:`candidates`); a weight descriptor also
    needs BLOCK_K to divide CIN."""
    cin = int(named_args["CIN"])
    pm = (pixel_major_strides(named_args["sxc"], named_args["sxw"])
          or pixel_major_strides(named_args["soc"], named_args["sow"]))
    eb = named_args["x_ptr"].element_size()
    mine = candidates(cin, int(kwargs["KW"]), eb, pm, fma=eb == 4 and kwargs["PRECISION"] == "ieee")
    return [c for c in configs
            if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)
            in [(m.block_m, m.block_n, m.block_k, m.num_warps, m.num_stages) for m in mine]
            and (named_args["w_desc"] is None or cin % c.kwargs["BLOCK_K"] == 0)]


def make_autotuner(kernel, maxnreg: Optional[int] = None):
    """An Autotuner over every configuration of :data:`CONFIGS` that applies to the launch,
    compiled and timed on the first launch of each new key (batch size included)."""
    configs = [triton.Config(c.meta(), num_warps=c.num_warps, num_stages=c.num_stages, maxnreg=c.maxnreg or maxnreg,
                             pre_hook=_set_descriptor_blocks) for c in CONFIGS]
    return triton.autotune(
        configs=configs,
        key=["M", "COUT", "CIN", "KH", "KW", "stride_h", "FLAT_K", "HAS_RES", "PROLOGUE", "STATS", "X_TMA",
             "W_TMA", "sxc", "soc"],
        prune_configs_by={"early_config_prune": prune_configs},
        # candidates with different BLOCK_M write different STATS partial rows: zero the counts
        # after timing, so only the winner's rows count (stale rows would be merged twice)
        reset_to_zero=["cnt_part_ptr"],
    )(kernel)
