"""The codegen report (resnet_fused.aot): recording, specialisation, compile + SASS parsing, rules, files.

Recording runs the models on the meta device (no compute); the compile tests build two tiny kernels
for sm_90a with the ptxas bundled with Triton (no GPU), the rest uses synthetic compile results.
"""
import csv
import json
from collections import Counter

import pytest
import torch
import triton
import triton.language as tl
from torch import nn
from triton.tools.tensor_descriptor import TensorDescriptor

from resnet_fused import backends, models
from resnet_fused.aot import __main__ as cli
from resnet_fused.aot import compile as aot_compile
from resnet_fused.aot import cuda_report, drive, report, sass
from resnet_fused.aot.record import as_jit, recording
from resnet_fused.modules import Bottleneck
from resnet_fused.ops import bn_train


# ------------------------------------------------------------------------------ probe kernels
@triton.jit
def _probe_kernel(x_ptr, y_ptr, n, stride, one, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(y_ptr + i * stride * one, tl.load(x_ptr + i, mask=i < n, other=0.0), mask=i < n)


@triton.jit(do_not_specialize=["n", "one"])
def _probe_dns_kernel(x_ptr, n, one, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(x_ptr + i * one, tl.zeros((BLOCK,), tl.float32), mask=i < n)


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, BLOCK: tl.constexpr):
    r = tl.arange(0, BLOCK)
    a = tl.load(a_ptr + r[:, None] * BLOCK + r[None, :])
    b = tl.load(b_ptr + r[:, None] * BLOCK + r[None, :])
    tl.store(c_ptr + r[:, None] * BLOCK + r[None, :], tl.dot(a, b))


@triton.jit
def _tma_kernel(desc, out_ptr, BLOCK: tl.constexpr):
    tile = desc.load([0, 0])  # a host-side TensorDescriptor: a TMA load on sm_90a
    r = tl.arange(0, BLOCK)
    tl.store(out_ptr + r[:, None] * BLOCK + r[None, :], tile)


@triton.jit
def _fill_kernel(x_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + i, tl.zeros((BLOCK,), tl.float32), mask=i < n)


_fill_tuned = triton.autotune(
    configs=[triton.Config({"BLOCK": b}, num_warps=w) for b, w in ((32, 1), (64, 2), (128, 4), (256, 4))],
    key=["n"], prune_configs_by={"early_config_prune": lambda cfgs, nargs, **kw: [
        c for c in cfgs if c.kwargs["BLOCK"] <= max(32, nargs["n"])]})(_fill_kernel)
_fill_one_config = triton.autotune(configs=[triton.Config({"BLOCK": 64}, num_warps=2)], key=["n"])(_fill_kernel)


def _meta(*shape, dtype=torch.float32):
    return torch.empty(shape, device="meta", dtype=dtype)


def _conv_calls(launches):
    return [ln for ln in drive.calls(launches) if ln.name == "_conv_bias_act_kernel"]


# ------------------------------------------------------------------------------------- recording
def test_resnet18_records_every_conv_site_eval_and_train():
    net = models.resnet18()
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    geometry = Counter((c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0]) for c in convs)
    launches = drive.record_models(["resnet18"], dtypes=["fp16"], layouts=["channels_last"], batches=[2])
    ev = [ln for ln in launches if ln.site["mode"] == "eval"]
    tr = [ln for ln in launches if ln.site["mode"] == "train"]
    # eval: one fused conv per conv module (stem, 16 block convs, 3 downsample), geometry by geometry
    got = Counter((ln.ints["CIN"], ln.ints["COUT"], ln.constexpr_values()["KH"], ln.ints.get("stride_h", 1))
                  for ln in _conv_calls(ev))
    assert got == geometry
    # train: the stem runs eager; every block conv runs fused with a statistics epilogue
    train_convs = _conv_calls(tr)
    assert len(train_convs) == len(convs) - 1
    assert all(ln.constexpr_values()["STATS"] for ln in train_convs)
    assert {ln.site["phase"] for ln in train_convs} == {"forward"}
    by_phase = {p: {ln.name for ln in tr if ln.site["phase"] == p} for p in ("forward", "backward")}
    assert {"_conv_bias_act_kernel", "_merge_kernel", "_apply_kernel"} <= by_phase["forward"]
    assert {"_bwd_reduce_kernel", "_bwd_apply_kernel", "_apply_kernel"} <= by_phase["backward"]
    # backward launches are attributed to the block whose forward made them
    assert {ln.site["module"] for ln in tr if ln.site["phase"] == "backward"} == {
        f"layer{i}.{j}" for i in range(1, 5) for j in range(2)}
    # by default every conv launch is one configuration (the shape class's), not an autotuning sweep
    assert all(ln.autotune is None for ln in _conv_calls(launches))


def test_opt_in_autotuning_records_every_surviving_configuration(monkeypatch):
    """With RESNET_FUSED_AUTOTUNE=1 an autotuned call records every configuration that survives
    pruning, all at one site."""
    monkeypatch.setenv("RESNET_FUSED_AUTOTUNE", "1")
    launches = drive.record_models(["resnet18"], dtypes=["fp16"], layouts=["channels_last"], batches=[2],
                                   modes=["eval"])
    convs = [ln for ln in launches if ln.name == "_conv_bias_act_kernel"]  # every configuration, not per call
    first = convs[0]
    assert first.autotune is not None and first.autotune[1] > 1
    assert first.autotune[1] == sum(
        1 for ln in convs if ln.autotune and ln.autotune[0] == first.autotune[0] and ln.site == first.site)


def test_bottleneck_block_conv_structure():
    with torch.device("meta"):
        ds = nn.Sequential(nn.Conv2d(64, 64, 1, stride=2, bias=False), nn.BatchNorm2d(64))
        block = Bottleneck(64, 16, stride=2, downsample=ds)
    block._init_fused("triton")
    sites = drive.Sites()
    x = _meta(2, 64, 8, 8, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    block.to(torch.float16, memory_format=torch.channels_last)
    with recording(where=sites.where) as rec:
        with torch.no_grad():
            block.eval()(x)
        n_eval = len(rec.launches)
        block.train()(x).float().sum().backward()
    ev, tr = _conv_calls(rec.launches[:n_eval]), _conv_calls(rec.launches[n_eval:])
    # eval: downsample (no ReLU), conv1, conv2 (3x3, stride 2), conv3 (+ residual)
    flags = [(c["KH"], c["RELU"], c["HAS_RES"]) for c in (ln.constexpr_values() for ln in ev)]
    assert flags == [(1, False, False), (1, True, False), (3, True, False), (1, True, True)]
    # train: conv1, conv2 and conv3 (each with the previous BN + ReLU as prologue), downsample
    prologue = [ln.constexpr_values()["PROLOGUE"] for ln in tr]
    assert prologue == [False, True, True, False]


def test_specialisation_ints_and_alignment():
    x = _meta(64)
    with recording() as rec:
        _probe_kernel[(1,)](x, x[1:], 32, 17, 1, BLOCK=16)  # y 4 bytes into its storage
        _probe_kernel[(1,)](x, x[4:], 31, 16, 1, BLOCK=16)  # y 16 bytes in: still aligned
        _probe_dns_kernel[(1,)](x, 32, 1, BLOCK=16)
    a, b, c = rec.launches
    assert a.signature["one"] == "constexpr" and a.constexpr_values()["one"] == 1  # int == 1 -> constexpr
    assert a.signature["n"] == "i32" and a.signature["x_ptr"] == "*fp32"
    assert set(a.divisible()) == {"x_ptr", "n"}  # 32 and an aligned pointer; not 17, not y at +4 B
    assert set(b.divisible()) == {"x_ptr", "y_ptr", "stride"}
    assert a.variant != b.variant
    assert c.signature["n"] == "i32" and c.signature["one"] == "i32" and c.divisible() == ["x_ptr"]
    assert "grid" not in a.options and "warmup" not in a.options and a.options["debug"] is False
    assert report.config_of(a) == "16 w4 s3"  # Triton's default warps and stages


def test_autotuner_records_every_config_that_survives_pruning():
    x = _meta(4096)
    with recording() as rec:
        _fill_tuned[lambda meta: (triton.cdiv(100, meta["BLOCK"]),)](x, 100)
        _fill_tuned[lambda meta: (triton.cdiv(64, meta["BLOCK"]),)](x, 64)
        _fill_one_config[(1,)](x, 100)  # one config: no tuning, as Triton runs it
    got = [(ln.constexpr_values()["BLOCK"], ln.options["num_warps"], ln.autotune) for ln in rec.launches]
    assert got == [(32, 1, ((100, "torch.float32"), 2, 0)), (64, 2, ((100, "torch.float32"), 2, 1)),
                   (32, 1, ((64, "torch.float32"), 2, 0)), (64, 2, ((64, "torch.float32"), 2, 1)),
                   (64, 2, None)]
    # n = 100 and n = 64 specialise differently (64 is divisible by 16): four trials, four variants;
    # the untuned launch (BLOCK 64, 2 warps, n = 100) is the variant the tuned trial already compiled
    assert len({ln.variant for ln in rec.launches[:4]}) == 4
    assert rec.launches[4].variant == rec.launches[1].variant


def test_tensor_descriptor_argument():
    base = _meta(64, 64, dtype=torch.float16)
    with recording() as rec:
        _tma_kernel[(1,)](TensorDescriptor.from_tensor(base, [32, 32]), base, BLOCK=32)
    (ln,) = rec.launches
    assert ln.signature["desc"] == "tensordesc<fp16[32, 32]>"


def test_recording_launches_nothing_and_restores_everything(monkeypatch):
    import triton.runtime.autotuner as autotuner
    import triton.runtime.jit as jit

    fake_calls = []
    real_fake = bn_train.bn_relu_apply._abstract_fn
    monkeypatch.setattr(bn_train.bn_relu_apply, "_abstract_fn", lambda *a: fake_calls.append(1) or real_fake(*a))
    before = (jit.JITFunction.run, autotuner.Autotuner.run, type(_probe_kernel).run, backends.unavailable_reason,
              torch.autocast, torch.is_autocast_enabled, torch.backends.cudnn.conv.fp32_precision)
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    y = torch.zeros(16)
    with pytest.raises(RuntimeError, match="boom"):
        with recording() as rec:
            _probe_kernel[(1,)](torch.ones(16), y, 16, 1, 1, BLOCK=16)  # CPU tensors: not run either
            v = _meta(4)
            bn_train.bn_relu_apply(_meta(2, 4, 3, 3), v, v, v, None, None, None, None, torch.float32)
            assert fake_calls == []  # the real body ran (and its launch was recorded)
            raise RuntimeError("boom")
    assert [ln.name for ln in rec.launches] == ["_probe_kernel", "_apply_kernel"]
    assert torch.equal(y, torch.zeros(16))
    torch.backends.cudnn.conv.fp32_precision = before[-1]
    assert (jit.JITFunction.run, autotuner.Autotuner.run, type(_probe_kernel).run, backends.unavailable_reason,
            torch.autocast, torch.is_autocast_enabled) == before[:-1]
    v = _meta(4)
    bn_train.bn_relu_apply(_meta(2, 4, 3, 3), v, v, v, None, None, None, None, torch.float32)
    assert fake_calls == [1]  # meta tensors reach the fake again


def test_launchers_that_ask_for_the_gpu_generation_record_per_target(monkeypatch):
    from resnet_fused.ops import bn_train as bt

    real = bt._geometry

    def geometry(y):  # a launcher choosing its tile by GPU generation
        P, C, HW, cl, grid, bp, bc = real(y)
        bp = bp if torch.cuda.get_device_capability()[0] >= 9 else bp // 2
        return P, C, HW, cl, (triton.cdiv(P, bp), grid[1]), bp, bc

    plain = drive.record_models(["resnet18"], ["fp16"], ["channels_last"], ["train"], batches=[2],
                                archs=["sm_90a", "sm_80"])
    monkeypatch.setattr(bt, "_geometry", geometry)
    asked = drive.record_models(["resnet18"], ["fp16"], ["channels_last"], ["train"], batches=[2],
                                archs=["sm_90a", "sm_80"])

    def blocks(launches, arch):
        return [ln.constexpr_values()["BLOCK_P"] for ln in launches if ln.name == "_apply_kernel"
                and ln.site["arch"] == arch]

    assert blocks(plain, "sm_90a") == blocks(plain, "sm_80") == blocks(asked, "sm_90a")
    assert blocks(asked, "sm_80") == [b // 2 for b in blocks(asked, "sm_90a")]
    with recording(capability=(8, 6)) as rec:
        assert torch.cuda.get_device_capability() == (8, 6)
    assert rec.capability_queries == 1


def test_recording_sets_tf32_and_restores_precision():
    conv = torch.backends.cudnn.conv
    before = conv.fp32_precision
    with recording(tf32=False):
        assert conv.fp32_precision == "ieee"
    with recording():
        assert conv.fp32_precision == "tf32"
    assert conv.fp32_precision == before


def test_amp_training_records_what_the_model_in_that_dtype_records():
    """drive.py records fp16/bf16 training with the model in that dtype (autocast has no meta mode);
    on CPU, where autocast runs, AMP and the bf16 model record the same kernel variants."""
    def run(amp):
        net = models.resnet18(backend="triton").to(memory_format=torch.channels_last)
        x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
        if not amp:
            net, x = net.to(torch.bfloat16), x.to(torch.bfloat16)
        with recording() as rec:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                loss = net.train()(x).float().sum()
            loss.backward()
        return Counter(ln.variant for ln in rec.launches)

    assert run(True) == run(False)


# ------------------------------------------------------------------------- compiling, parsing
def _compile_probe(kernel, args, meta, tmp_path):
    from triton import knobs

    with recording() as rec:
        kernel[(1,)](*args, **meta)
    (ln,) = rec.launches
    variant = {"signature": ln.signature, "constexprs": ln.constexprs, "attrs": ln.attrs, "options": ln.options}
    with knobs.cache.scope():
        knobs.cache.dir = str(tmp_path)
        return aot_compile.compile_variant(as_jit(kernel), variant, aot_compile.target("sm_90a"))


@pytest.mark.slow
def test_compile_for_sm90a_and_read_the_sass(tmp_path):
    a = _meta(64, 64, dtype=torch.float16)
    row = _compile_probe(_dot_kernel, (a, a, _meta(64, 64)), {"BLOCK": 64}, tmp_path)
    assert row["status"] == "ok", row["error"]
    assert 0 < row["registers"] <= 255 and row["spill_stores"] == 0 and row["shared"] > 0
    assert row["dots"] == 1 and row["tc_dots"] == 1
    assert row["hgmma"] > 0 and row["hmma"] == 0  # wgmma on sm_90a
    assert row["instructions"] > 0 and sum(row["ldg"].values()) > 0
    assert report.rule_failures(row, "sm_90a") == []
    desc = TensorDescriptor.from_tensor(_meta(64, 64, dtype=torch.float16), [32, 32])
    row = _compile_probe(_tma_kernel, (desc, _meta(32, 32, dtype=torch.float16)), {"BLOCK": 32}, tmp_path)
    assert row["status"] == "ok", row["error"]
    assert row["utmaldg"] > 0 and row["dots"] == 0


def test_parsers_on_samples():
    log = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z6kernelPf' for 'sm_90'
ptxas info    : Function properties for _Z6kernelPf
    24 bytes stack frame, 20 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 4096 bytes smem, 400 bytes cmem[0]
ptxas info    : Function properties for _Z6helperv
    16 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Compiling entry function '_Z6kernelPf' for 'sm_80'
ptxas info    : Function properties for _Z6kernelPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 128 registers, used 0 barriers, 400 bytes cmem[0]
"""
    funcs = sass.parse_ptxas_log(log)
    k90, k80, helper = funcs[("sm_90", "_Z6kernelPf")], funcs[("sm_80", "_Z6kernelPf")], funcs[("sm_90", "_Z6helperv")]
    assert (k90.registers, k90.stack, k90.spill_stores, k90.spill_loads, k90.smem, k90.entry) == (255, 24, 20, 12, 4096, True)
    assert (k80.registers, k80.spills) == (128, False)
    assert (helper.entry, helper.stack, helper.spills) == (False, 16, False)
    usage = sass.parse_res_usage(" Function k:\n  REG:96 STACK:8 SHARED:1024 LOCAL:4 CONSTANT[0]:560 TEXTURE:0\n")
    assert usage["k"]["REG"] == 96 and usage["k"]["LOCAL"] == 4 and usage["k"]["CONSTANT[0]"] == 560
    code = "\n".join([
        "        /*0080*/                   LDG.E.128 R4, desc[UR4][R2.64] ;    /* 0x0 */",
        "        /*0090*/              @!P0 LDG.E.U16 R6, desc[UR4][R2.64] ;    /* 0x0 */",
        "        /*00a0*/                   LDG.E R7, desc[UR4][R2.64] ;        /* 0x0 */",
        "        /*00b0*/                   HGMMA.64x64x16.F32 R24, gdesc[UR8], R24 ; /* 0x0 */",
        "        /*00c0*/                   LDGSTS.E.BYPASS.LTC128B.128 [R1], desc[UR4][R2.64] ; /* 0x0 */",
        "        /*00d0*/               @P1 STG.E.64 desc[UR4][R2.64], R4 ;   /* 0x0 */",
        "        /*00e0*/                   UTMALDG.2D [UR8], [UR4] ;           /* 0x0 */",
        "        /*00f0*/                   STL [R1], R4 ;                      /* 0x0 */",
    ])
    c = sass.sass_counts(code)
    assert (c["HGMMA"], c["HMMA"], c["LDGSTS"], c["UTMALDG"], c["STL"], c["instructions"]) == (1, 0, 1, 1, 1, 8)
    assert c["ldg"] == {128: 1, 32: 1, 16: 1} and c["stg"] == {64: 1} and c["ldgsts"] == {128: 1}
    assert sass.format_widths(c["ldg"]) == "128b:1 32b:1 16b:1"
    ttir = ("%4 = tt.dot %a, %b, %c, inputPrecision = tf32 : tensor<64x64xf32> * tensor<64x64xf32> -> tensor<64x64xf32>\n"
            "%5 = tt.dot %a, %b, %c : tensor<64x64xf32> * tensor<64x64xf32> -> tensor<64x64xf32>\n"
            "%6 = tt.dot %a, %b, %c : tensor<64x64xbf16> * tensor<64x64xbf16> -> tensor<64x64xf32>\n")
    assert sass.tensor_core_dots(ttir) == (3, 2)  # the IEEE fp32 dot is not a tensor-core dot


# ----------------------------------------------------------------------------- rules and files
_OK = {"status": "ok", "error": "", "registers": 128, "spill_stores": 0, "spill_loads": 0, "stack": 0, "local": 0,
       "shared": 32768, "num_warps": 4, "dots": 1, "tc_dots": 1, "hgmma": 8, "hmma": 0, "ldgsts": {"128": 4},
       "utmaldg": 0, "utmastg": 0, "ldl": 0, "stl": 0, "ldg": {"16": 8}, "stg": {"128": 2}, "instructions": 900,
       "compile_s": 1.0, "ptxas_s": 0.2, "cached": False}


@pytest.mark.parametrize("change, arch, rules", [
    ({}, "sm_90a", []),
    ({"spill_stores": 16}, "sm_90a", ["spill"]),
    ({"spill_loads": 4}, "sm_80", ["spill"]),
    ({"shared": 232448 + 1}, "sm_90a", ["smem"]),
    ({"shared": 200000}, "sm_80", ["smem"]),
    ({"shared": 200000}, "sm_90a", []),
    ({"hgmma": 0, "hmma": 16}, "sm_90a", ["no-hgmma"]),
    ({"hgmma": 0, "hmma": 16}, "sm_80", []),  # no wgmma before Hopper
    ({"hgmma": 0, "tc_dots": 0}, "sm_90a", []),  # IEEE fp32 dot / no dot: exempt
    ({"status": "error", "error": "CompilationError"}, "sm_80", ["compile"]),
])
def test_rules(change, arch, rules):
    assert report.rule_failures({**_OK, **change}, arch) == rules


def _fake_compile(change, seen=None):
    def compile_all(tasks, jobs, cache_dir=None, progress=None, triton_cache=None):
        if seen is not None:
            seen.update(cache_dir=cache_dir, triton_cache=triton_cache)
        return [{**_OK, **change, "variant": t["variant"], "arch": t["arch"]} for t in tasks]
    return compile_all


def test_precompile_compiles_into_the_triton_cache_the_jit_reads(monkeypatch, tmp_path):
    """--precompile hands the workers Triton's own cache directory (TRITON_CACHE_DIR) and bypasses
    the result cache (every variant must really land in Triton's cache)."""
    from triton import knobs

    seen = {}
    monkeypatch.setattr(aot_compile, "compile_all", _fake_compile({}, seen))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "tc"))
    argv = ["--models", "resnet18", "--modes", "eval", "--dtypes", "fp16", "--layouts", "channels_last",
            "--arch", "sm_90a", "--batch", "2", "--cache", str(tmp_path / "results")]
    assert cli.main(argv + ["--precompile"]) == 0
    assert seen == {"cache_dir": None, "triton_cache": knobs.cache.dir} and knobs.cache.dir == str(tmp_path / "tc")
    assert cli.main(argv) == 0
    assert seen == {"cache_dir": str(tmp_path / "results"), "triton_cache": None}


@pytest.mark.slow
def test_compile_all_into_a_given_triton_cache(tmp_path):
    """With ``triton_cache`` the compiled kernel stays in that directory (a cubin under Triton's key);
    without it nothing is written outside the private temporary cache."""
    a = _meta(64, 64, dtype=torch.float16)
    with recording() as rec:
        _dot_kernel[(1,)](a, a, _meta(64, 64), BLOCK=64)
    tasks = aot_compile.tasks_for(rec.launches, ["sm_90a"])
    for t in tasks:
        t["kernel"] = f"{__name__}:_dot_kernel"
    (row,) = aot_compile.compile_all(tasks, 1, triton_cache=str(tmp_path / "tc"))
    assert row["status"] == "ok", row["error"]
    assert len(list((tmp_path / "tc").glob("*/*.cubin"))) == 1


@pytest.mark.parametrize("change, code", [({}, 0), ({"spill_stores": 8}, 1), ({"shared": 10**6}, 1),
                                          ({"hgmma": 0}, 1), ({"status": "error", "error": "x"}, 1)])
def test_cli_exit_code_and_files(monkeypatch, tmp_path, change, code):
    monkeypatch.setattr(aot_compile, "compile_all", _fake_compile(change))
    out = tmp_path / "codegen"
    argv = ["--models", "resnet18", "--modes", "eval", "--dtypes", "fp16", "--layouts", "channels_last",
            "--arch", "sm_90a", "sm_80", "--batch", "2", "--out", str(out)]
    assert cli.main(argv) == code
    with open(out / "triton_variants.csv") as f:
        rows = list(csv.DictReader(f))
    summary = json.loads((out / "triton_summary.json").read_text())
    per_arch = {a: t["variants"] for a, t in summary["targets"].items()}
    assert len(rows) == sum(per_arch.values()) and min(per_arch.values()) > 0
    assert set(report.COLUMNS) == set(rows[0])
    assert all(r["models"] == "resnet18:eval" and r["kernel"] == "_conv_bias_act_kernel" for r in rows)
    # the launcher plans per GPU generation (TMA descriptors on sm_90, a register cap on sm_80), so
    # the two targets record different variants
    assert not summary["same_for_all_archs"] and [w["arch"] for w in summary["workloads"]] == ["sm_90a", "sm_80"]
    w = summary["workloads"][0]
    assert (w["model"], w["calls"], w["compilations"]) == ("resnet18", 20, per_arch["sm_90a"])
    md = (out / "triton_report.md").read_text()
    assert ("**Verdict: FAIL**" in md) == bool(code)
    assert md.split("## Variants x targets")[1].count("\n| sm_") == len(rows)
    assert f"command: python -m resnet_fused.aot {' '.join(argv)}" in md
    with open(out / "triton_sites.csv") as f:
        sites = list(csv.DictReader(f))
    for arch in ("sm_90a", "sm_80"):  # each target's calls, listed per target since their variants differ
        assert sum(int(s["calls"]) for s in sites if s["arch"] == arch) == 20
    assert {v for s in sites for v in s["variants"].split()} == {r["variant"] for r in rows}


def test_cli_rejects_bad_arguments(capsys):
    for argv in (["--models", "resnet51"], ["--arch", "sm_70"], ["--shard", "3/2"], ["--batch", "0"]):
        with pytest.raises(SystemExit) as e:
            cli.parse_args(argv)
        assert e.value.code == 2
    with pytest.raises(ValueError, match="sm_90a"):
        aot_compile.target("sm_90")
    with pytest.raises(ValueError, match=r"6n\+4"):
        drive.model_spec("wrn29_10")


def test_cuda_resource_report(tmp_path):
    log = """ptxas info    : Compiling entry function '_ZN2rf4cuda12stats_kernelEv' for 'sm_90'
ptxas info    : Function properties for _ZN2rf4cuda12stats_kernelEv
    8 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 400 bytes cmem[0]
ptxas info    : Function properties for _ZN7cutlass6helperEv
    32 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
"""
    code = """arch = sm_90
		Function : _ZN2rf4cuda12stats_kernelEv
        /*0000*/                   HMMA.16816.F32 R4, R8, R12, R4 ;   /* 0x0 */
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;  /* 0x0 */
"""
    rows = cuda_report.resource_rows([("bn_stats.cu", log), ("other.cu", log)], {"bn_stats.cu": code})
    kernel = next(r for r in rows if r["source"] == "bn_stats.cu" and r["entry"])
    assert (kernel["hmma"], kernel["hgmma"], kernel["ldg_widths"]) == (1, 0, "128b:1")
    failing = [(r["source"], r["kernel"]) for r in rows if r["fails"]]
    assert failing == [("bn_stats.cu", "stats_kernel")]  # other.cu is not a conv/BN source
    helper = [r for r in rows if r["source"] == "bn_stats.cu" and not r["entry"]]
    assert helper and helper[0]["stack"] == 32 and not helper[0]["fails"]  # a stack frame is no spill
    paths = cuda_report.write(tmp_path, rows, {"command": "test"})
    assert "**Verdict: FAIL**" in paths[1].read_text()
    with open(paths[0]) as f:
        assert len(list(csv.DictReader(f))) == len(rows)
