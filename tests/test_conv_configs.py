"""The conv's launch heuristic (:mod:`resnet_fused.ops.conv_configs`): one configuration per shape
class for every conv ResNet-50 and WRN-28-10 reach, the statistics partials sized for the
smallest tile, the opt-in autotuner over exactly the no-spill set, and one ahead-of-time compile
for sm_90a proving the wgmma / no-spill claim for a representative configuration (no GPU needed:
Triton ships ptxas and cuobjdump).
"""
import importlib
import os
import re
import subprocess
import sys

import pytest
import torch
from torch import nn

from resnet_fused.models import reference
from resnet_fused.ops import conv_configs as cc

cba = importlib.import_module("resnet_fused.ops.conv_bias_act")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SM90_SMEM, SM80_SMEM = 232448, 166912  # bytes of shared memory a block may use


def model_convs(model: nn.Module, hw: int):
    """(cin, cout, kh, kw, stride, oh, ow) of every Conv2d the model runs on a [1, 3, hw, hw] input."""
    found = []

    def hook(mod, inp, out):
        found.append((mod.in_channels, mod.out_channels, *mod.kernel_size, mod.stride[0], *out.shape[2:]))

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model.to("meta")(torch.empty(1, 3, hw, hw, device="meta"))
    for h in hooks:
        h.remove()
    return sorted(set(found))


MODEL_CONVS = {"resnet50": model_convs(reference.resnet50(), 224), "wrn28_10": model_convs(reference.ref_wrn(28, 10), 32)}


def test_the_model_shape_lists_are_complete():
    """The hooks saw every distinct conv geometry: ResNet-50 has 23 (the stem included; layer1's
    expansion 1x1 and its shortcut share one), WRN-28-10 10."""
    assert len(MODEL_CONVS["resnet50"]) == 23
    assert (3, 64, 7, 7, 2, 112, 112) in MODEL_CONVS["resnet50"]
    assert (512, 512, 3, 3, 2, 7, 7) in MODEL_CONVS["resnet50"]
    assert len(MODEL_CONVS["wrn28_10"]) == 10
    assert (3, 16, 3, 3, 1, 32, 32) in MODEL_CONVS["wrn28_10"]
    assert (640, 640, 3, 3, 1, 8, 8) in MODEL_CONVS["wrn28_10"]


def test_ieee_fp32_takes_small_fma_tiles():
    """With TF32 off the dot runs on FMA units (no wgmma): one small tile over 8 warps."""
    assert cc.conv_config(10**6, 2048, 512, 3, 3, 4, fma=True) == cc.ConvConfig(64, 64, 16, 8, 4, maxnreg=255)
    assert cc.conv_config(10**6, 64, 3, 7, 7, 4, pixel_major=True, fma=True).block_k == 32  # the stem's row


@pytest.mark.parametrize("batch", [1, 8, 256])
@pytest.mark.parametrize("nchw", [False, True], ids=["cl", "nchw"])
@pytest.mark.parametrize("elem_bytes", [2, 4], ids=["16bit", "fp32"])
@pytest.mark.parametrize("model", list(MODEL_CONVS))
def test_every_model_conv_gets_a_wgmma_config(model, elem_bytes, nchw, batch):
    """One configuration from the verified set per conv, with BLOCK_M >= 64 and whole warpgroups
    (the m64 wgmma needs both), BLOCK_K that divides Cin wherever Cin allows (the weight's TMA
    descriptor), and operand buffers within both targets' shared memory; it is among the
    autotuner's candidates for the conv."""
    for cin, cout, kh, kw, stride, oh, ow in MODEL_CONVS[model]:
        cfg = cc.conv_config(batch * oh * ow, cout, cin, kh, kw, elem_bytes, pixel_major=nchw)
        assert cfg in cc.candidates(cin, kw, elem_bytes, nchw)
        where = f"{model} conv {cin}->{cout} {kh}x{kw}/{stride}, batch {batch}: {cfg}"
        assert cfg in cc.CONFIGS, where
        assert cfg.block_m >= 64 and cfg.num_warps % 4 == 0, where
        assert cfg.block_n in ((64,) if nchw else (64, 128)), where
        assert nchw or cfg.block_n >= min(cout, 128), where
        if cc.flat_k(cin, kw):
            assert cfg.block_k >= kw * cin, where
        elif cin % 16 == 0:
            assert cin % cfg.block_k == 0 and (not nchw or cfg.block_k <= 32), where
        assert elem_bytes == 2 or cfg.block_k <= 32, where
        operands = (cfg.block_m + cfg.block_n) * cfg.block_k * elem_bytes * cfg.num_stages
        assert operands <= cc.STAGE_BUDGET < SM80_SMEM, where


def test_small_grids_take_64_row_tiles():
    """A 7x7 layer at batch 8 has 392 rows: 128-row tiles would leave most SMs idle."""
    assert cc.conv_config(8 * 7 * 7, 2048, 512, 1, 1, 2).block_m == 64
    assert cc.conv_config(256 * 56 * 56, 64, 64, 3, 3, 2).block_m == 128
    assert cc.conv_config(256 * 56 * 56, 64, 64, 3, 3, 2).block_n == 64


def test_block_k_classes():
    assert cc.block_k_for(3, 7, 2) == 32  # the stem: one 7x3 filter row per K block
    assert cc.block_k_for(3, 3, 4) == 16
    assert cc.block_k_for(64, 3, 2) == 64 and cc.block_k_for(64, 3, 4) == 32
    assert cc.block_k_for(160, 3, 2) == 32  # WRN's 160 channels: 64 would straddle taps
    assert cc.block_k_for(16, 3, 2) == 16
    assert cc.block_k_for(17, 3, 2) == 16 and cc.block_k_for(40, 3, 2) == 32
    assert not cc.flat_k(7, 7) and cc.flat_k(7, 3)  # a 49-wide row is past one 32-wide block


def test_config_set_is_what_the_heuristic_can_return():
    """CONFIGS holds no duplicate and nothing the heuristic could not pick (it is the set the
    codegen check verifies); the interpreter's fixed tile is separate."""
    assert len(set(cc.CONFIGS)) == len(cc.CONFIGS)
    reachable, tried = set(), set()
    for eb in (2, 4):
        for cin in (3, 5, 16, 32, 64, 96, 160, 2048):
            for kw in (1, 3, 7):
                for pm in (False, True):
                    for fma in ((False, True) if eb == 4 else (False,)):
                        tried.update(cc.candidates(cin, kw, eb, pm, fma))
                        for cout in (16, 64, 65, 2048):
                            for m in (1, 10**4, 10**7):
                                reachable.add(cc.conv_config(m, cout, cin, kw, kw, eb, pixel_major=pm, fma=fma))
    assert reachable <= tried == set(cc.CONFIGS)


def test_stats_partials_cover_the_smallest_tile():
    """The launcher sizes the STATS partial rows before a tile is chosen: one row per
    _MIN_BLOCK_M rows must cover every tile any path can launch (table, autotuner, interpreter)."""
    smallest = min(c.block_m for c in cc.CONFIGS + [cc.interpreter_config(cin, kw) for cin in (3, 64)
                                                      for kw in (1, 7)])
    assert cba._MIN_BLOCK_M <= smallest


@pytest.mark.parametrize("value,on", [(None, False), ("", False), ("0", False), ("1", True)])
def test_autotune_is_opt_in(monkeypatch, value, on):
    if value is None:
        monkeypatch.delenv(cc.AUTOTUNE_ENV, raising=False)
    else:
        monkeypatch.setenv(cc.AUTOTUNE_ENV, value)
    assert cc.autotune_requested() is on


CL_STRIDES = dict(sxc=1, sxw=64, soc=1, sow=64)  # the strides the pruner reads: channels_last x and out
NCHW_STRIDES = dict(sxc=49, sxw=1, soc=49, sow=1)


def test_autotuner_spans_exactly_the_no_spill_set(monkeypatch):
    """RESNET_FUSED_AUTOTUNE=1 builds one Autotuner whose candidates are CONFIGS, each with its
    warps and stages, zeroing the statistics counts after timing; its pruner keeps what applies."""
    from triton.runtime.autotuner import Autotuner

    monkeypatch.setattr(cba, "_AUTOTUNER", {})
    tuner = cba._autotuner(9)
    assert isinstance(tuner, Autotuner) and cba._autotuner(9) is tuner
    assert {c.maxnreg for c in tuner.configs} == {None, 255}  # 255: only the IEEE (FMA) class on sm_90
    assert {c.maxnreg for c in cba._autotuner(8).configs} == {255}
    got = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.kwargs["GROUP_M"], c.num_warps,
            c.num_stages) for c in tuner.configs]
    want = [(c.block_m, c.block_n, c.block_k, c.group_m, c.num_warps, c.num_stages) for c in cc.CONFIGS]
    assert [c.maxnreg for c in tuner.configs] == [c.maxnreg for c in cc.CONFIGS]
    assert got == want
    assert tuner.reset_to_zero == ["cnt_part_ptr"]
    x16 = torch.empty(1, dtype=torch.float16)
    stem = cc.prune_configs(tuner.configs, {"CIN": 3, "x_ptr": x16, "w_desc": None, **CL_STRIDES}, KW=7, PRECISION="ieee")
    assert stem and {c.kwargs["BLOCK_K"] for c in stem} == {32}
    wide = cc.prune_configs(tuner.configs, {"CIN": 160, "x_ptr": torch.empty(1), "w_desc": object(), **CL_STRIDES}, KW=3,
                            PRECISION="tf32")
    assert {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) for c in wide} == {
        (bm, bn, 32) for bm in (64, 128) for bn in (64, 128)}  # fp32, and dividing 160
    pm = cc.prune_configs(tuner.configs, {"CIN": 256, "x_ptr": x16, "w_desc": None, **NCHW_STRIDES}, KW=3, PRECISION="ieee")
    assert {(c.kwargs["BLOCK_N"], c.num_warps if c.kwargs["BLOCK_M"] == 128 else 8) for c in pm} == {(64, 8)}
    fma = cc.prune_configs(tuner.configs, {"CIN": 256, "x_ptr": torch.empty(1), "w_desc": None, **CL_STRIDES}, KW=3,
                           PRECISION="ieee")
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps) for c in fma] == [
        (64, 64, 16, 8)]  # IEEE fp32: FMA units, one small configuration
    for c in tuner.configs:  # whatever is pruned, each candidate is one of the class's own configurations
        assert cc.ConvConfig(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps,
                             c.num_stages, maxnreg=c.maxnreg) in cc.CONFIGS


# A child process without TRITON_INTERPRET (the kernel must be a JITFunction to compile): the real
# launcher on meta tensors, as on an sm_90 GPU, its launch captured and compiled for sm_90a.
_AOT = r"""
import contextlib, io, json, os, re, subprocess, sys, tempfile
import torch, triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature
import importlib
cba = importlib.import_module("resnet_fused.ops.conv_bias_act")

calls = []
class Capture:
    def __getitem__(self, grid):
        return lambda *a, **k: calls.append((a, k))
kernel = cba._conv_bias_act_kernel
cba._conv_bias_act_kernel = Capture()
cba._device_arch = lambda t: 9
meta = lambda *s, dt=torch.float16: torch.empty(*s, dtype=dt, device="meta")
x = meta(32, 64, 56, 56).contiguous(memory_format=torch.channels_last)
w = meta(256, 64, 1, 1).contiguous(memory_format=torch.channels_last)
cba._launch(x, w, meta(256, dt=torch.float32), None, (1, 1), (0, 0), (1, 1), True, torch.float16,
            torch.channels_last)
(args, kw), = calls
target = GPUTarget("cuda", 90, 32)
backend = make_backend(target)
bound, spec, opts = create_function_from_signature(kernel.signature, kernel.params, backend)(*args, **kw)
options, sig, constexprs, attrs = kernel._pack_args(backend, kw, bound, spec, opts)
knobs.compilation.always_compile = True
knobs.nvidia.dump_ptxas_log = True
log = io.StringIO()
with contextlib.redirect_stdout(log):
    k = triton.compile(ASTSource(kernel, sig, constexprs, attrs), target=target, options=options.__dict__)
with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
    f.write(k.asm["cubin"]); f.flush()
    tool = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
print(json.dumps(dict(log=log.getvalue(), smem=k.metadata.shared, hgmma=len(re.findall(r"\bHGMMA\.", sass)),
                      utmaldg=len(re.findall(r"\bUTMALDG\b", sass)), tma=[kw["X_TMA"], kw["W_TMA"]],
                      block=[kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], kw["num_warps"], kw["num_stages"]])))
"""


def test_representative_variant_compiles_for_sm90a_with_wgmma_tma_and_no_spill():
    """ResNet-50's layer1 expansion 1x1 (64 -> 256, fp16, channels_last, batch 32) as an sm_90
    GPU would launch it: both operands through TMA, HGMMA in the SASS, no spill, shared memory
    within sm_90a's limit. Compiled only: this says nothing about speed or results on a GPU."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _AOT], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    if proc.returncode and "ptxas" in proc.stderr and "No such file" in proc.stderr:
        pytest.skip("this Triton build ships no ptxas")
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["block"] == [128, 128, 64, 8, 3]
    assert res["tma"] == [True, True]
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", res["log"])
    assert spills and all(s == ("0", "0") for s in spills), res["log"]
    assert res["hgmma"] > 0 and res["utmaldg"] > 0
    assert res["smem"] <= SM90_SMEM
