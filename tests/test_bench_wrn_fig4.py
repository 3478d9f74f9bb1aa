"""benchmarks/wrn_fig4.py (the WRN paper's Figure 4 re-run): the CPU mode end to end (a subprocess:
Triton through the interpreter, the compiled library's C++ kernels as cuda where it loads, auto with
its decisions in the JSON); a broken provider recorded wrong and untimed; the AMP step; auto
measuring in its checked step only; the thin / wide ratios, speedups and goal on synthetic rows;
the paper's table; the GPU networks' architectures and run plans, without a GPU.
"""
from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # benchmarks/ is not installed with the package: import it from the tree
    sys.path.insert(0, str(REPO))

from benchmarks import common, models, wrn_fig4  # noqa: E402
from resnet_fused import backends  # noqa: E402
from resnet_fused.modules import PreActBottleneck, WideBasic  # noqa: E402
import bench_checks  # noqa: E402
from bench_checks import EXT_ERROR, check_dispatch, check_timed, check_untimed, spy_measuring  # noqa: E402
from utils import run_bench_cpu  # noqa: E402

needs_interpreter = pytest.mark.skipif(not backends.triton_interpreting(),
                                       reason="in-process CPU Triton needs TRITON_INTERPRET=1 at import")


def results(out_dir: Path):
    return bench_checks.results(out_dir, "wrn", wrn_fig4.KEYS, ("paper", "ratios"))


def check_row(row, dtype="fp32"):
    assert tuple(row) == wrn_fig4.KEYS == common.ROW_KEYS + ("layout", "compile_s", "paper_ms")
    assert row["bench"] == "wrn" and row["mode"] == "train_step" and row["batch"] == 2 and row["shape"] == "3x8x8"
    assert row["paper_ms"] is None  # the tiny stand-ins are not the paper's networks
    check_timed(row, dtype) if row["correct"] else check_untimed(row)


def _row(model, dtype, provider, ms, correct=True):
    t = None if ms is None else common.Timing(ms, ms * 0.95, ms * 1.05, 10)
    return common.make_row(bench="wrn", model=model, shape="3x32x32", batch=32, dtype=dtype, mode="train_step",
                           provider=provider, timing=t, peak_mem_mb=None, correct=correct,
                           extra={"layout": "channels_last", "compile_s": None,
                                  "paper_ms": wrn_fig4.PAPER.get(model, {}).get("ms")})


# ------------------------------------------------------------------------------------ end to end
def test_cpu_mode_end_to_end(tmp_path):
    pytest.importorskip("triton")
    r = run_bench_cpu("benchmarks.wrn_fig4", tmp_path, timeout=300)
    data, md = results(tmp_path)
    rows = data["rows"]
    providers = ("eager", "triton") + (("cuda",) if EXT_ERROR is None else ()) + ("auto",)
    assert [(x["model"], x["provider"]) for x in rows] == [  # auto: wrn10-1 only on CPU
        (n, p) for n in ("preact11", "wrn10-1") for p in providers if p != "auto" or n == "wrn10-1"]
    for row in rows:
        assert row["correct"], row
        check_row(row)
    assert "WRONG" not in r.stdout + r.stderr and "FAILED" not in r.stdout + r.stderr
    check_dispatch(data)  # auto: the three block shapes measured in its first (checked, untimed) step
    assert [(e["model"], e["mode"], e["layout"]) for e in data["dispatch"]] == [
        ("wrn10-1", "train_step", "channels_last")]
    assert [(d["op"], d["case"]["x"][0]) for d in data["dispatch"][0]["decisions"]] == [("block_train", 2)] * 3
    assert re.search(r"^  wrn10-1 train_step b2 fp32 auto; ok .*auto: block_train ", r.stdout, re.M), r.stdout
    assert "note: auto on CPU: wrn10-1 only (name auto in --providers for both)" in r.stdout
    ms = {(x["model"], x["provider"]): x["median_ms"] for x in rows}
    tw = data["ratios"]["thin_wide"]
    assert [(t["provider"], t["thin"], t["wide"]) for t in tw] == [
        (p, "preact11", "wrn10-1") for p in providers if p != "auto"]  # auto ran on one network
    for t in tw:
        assert t["paper_ratio"] is None
        assert math.isclose(t["ratio"], ms[("preact11", t["provider"])] / ms[("wrn10-1", t["provider"])], rel_tol=1e-3)
    assert [(g["provider"], g["of"]) for g in data["ratios"]["goal"]] == [
        (p, 1 if p == "auto" else 2) for p in providers[1:]]
    assert data["paper"]["claims"] == {"resnet1001/wrn28-10": 1.641, "resnet1001/wrn40-4": 7.529}
    assert data["skipped"] == ({} if "cuda" in providers else {"cuda": EXT_ERROR})
    for text in (r.stdout, md):
        assert "paper ms" in text and "eager/it" in text and "preact11" in text
        assert "goal (fused >= 1.3x eager) fp32 triton: " in text and "fp32 auto: " in text
    assert "| fp32 | eager | preact11 / wrn10-1 |" in md


@needs_interpreter
@pytest.mark.parametrize("how", ["wrong", "raises"])
def test_broken_provider_is_recorded_wrong_and_untimed(tmp_path, monkeypatch, capsys, how):
    """A training block 1% off, or raising: triton's and cuda's rows wrong and untimed (so both run
    the stand-ins' blocks through the fused path), no ratio, the goal missed."""
    from resnet_fused.modules import _base

    real = _base.run_block_train

    def broken(*args, **kwargs):
        if how == "raises":
            raise RuntimeError("deliberately broken kernel")
        # 1% off. (A pre-activation network is blind to a per-channel scale or shift of a block's
        # output, which the next BN undoes, except in the final BN's running statistics: this error
        # varies along the rows instead.)
        out = real(*args, **kwargs)
        return out + 0.01 * out.detach().flip(-1)

    monkeypatch.setattr(_base, "run_block_train", broken)
    fused = ["triton"] + (["cuda"] if EXT_ERROR is None else [])
    assert wrn_fig4.main(["--device", "cpu", "--networks", "wrn10-1", "--providers", "eager", *fused,
                          "--out", str(tmp_path)]) == 1
    data, _ = results(tmp_path)
    assert [(x["provider"], x["correct"]) for x in data["rows"]] == [("eager", True)] + [(p, False) for p in fused]
    for row in data["rows"]:
        check_row(row)
    out, err = capsys.readouterr()
    word = "WRONG" if how == "wrong" else "FAILED"
    assert all(f"{word} wrn10-1 train_step b2 fp32 {p}" in err for p in fused), err
    # a wrong provider has no ratio and misses the goal
    assert data["ratios"]["thin_wide"] == [] and data["ratios"]["speedup_vs_eager"] == []
    assert data["ratios"]["goal"] == [{"dtype": "fp32", "provider": p, "target": 1.3, "met": 0, "of": 1, "worst_model":
                                       "wrn10-1", "worst_speedup": None, "all_met": False} for p in fused]
    assert re.search(rf"^wrn10-1 +fp32 +- +triton +{word} +- +- +- +- *$", out, re.M), out


def test_triton_skipped_with_a_note_without_the_interpreter(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(backends, "triton_interpreting", lambda: False)
    assert wrn_fig4.main(["--device", "cpu", "--networks", "preact11", "--providers", "eager", "triton",
                          "--out", str(tmp_path)]) == 0
    data, _ = results(tmp_path)
    assert [x["provider"] for x in data["rows"]] == ["eager"]
    check_row(data["rows"][0])
    assert list(data["skipped"]) == ["triton"] and "TRITON_INTERPRET=1" in data["skipped"]["triton"]
    assert "triton skipped" in capsys.readouterr().out


def test_amp_step_and_auto_measuring_in_the_checked_step(monkeypatch):
    """fp16 autocast and the static loss scale judged by the same checks (the "torch" provider runs
    our modules module by module: eager's numerics); auto measures its block keys in its first,
    checked step only, none while timing, and keeps the decisions for its row."""
    ops, during = spy_measuring(monkeypatch)
    b = models.Bench(torch.device("cpu"), ["eager", "torch", "auto"], bench="wrn", keys=wrn_fig4.KEYS)
    case = wrn_fig4.wrn_case(10, 1, 8, seed=0)
    models.run_case(b, case, "train_step", 2, "fp16", [("eager", ""), ("torch", "")])
    models.run_case(b, case, "train_step", 2, "fp32", [("eager", ""), ("auto", "")])
    assert [(x["dtype"], x["provider"]) for x in b.rows] == [("fp16", "eager"), ("fp16", "torch"),
                                                             ("fp32", "eager"), ("fp32", "auto")]
    for row in b.rows:
        check_row(row, row["dtype"])
        assert row["correct"], row
    assert ops == ["block_train"] * 3 and during == []
    (entry,) = b.dispatch()
    assert (entry["model"], entry["dtype"], len(entry["decisions"])) == ("wrn10-1", "fp32", 3)


def test_options():
    with pytest.raises(SystemExit, match="--networks"):
        wrn_fig4.make_plan(wrn_fig4.parse_args(["--device", "cpu", "--networks", "wrn28-10"]))  # GPU-only name
    with pytest.raises(SystemExit, match="--reps"):
        wrn_fig4.make_plan(wrn_fig4.parse_args(["--device", "cpu", "--reps", "0"]))
    b, tasks, pairs = wrn_fig4.make_plan(wrn_fig4.parse_args(["--device", "cpu", "--quick", "--no-compile"]))
    assert b.deadline is not None and "compile" not in b.providers and pairs == wrn_fig4.CPU_PAIRS
    assert [(t.net.name, t.dtype) for t in tasks] == [("preact11", "fp32"), ("wrn10-1", "fp32")]
    b, tasks, _ = wrn_fig4.make_plan(wrn_fig4.parse_args(["--device", "cpu"]))
    assert b.deadline is None and b.paper_ms("wrn28-10") == 312.0 and b.paper_ms("wrn10-1") is None
    assert b.providers == [p for p in ("eager", "triton", "cuda", "auto") if p not in b.skipped]
    assert [("auto" in t.providers) for t in tasks] == [False, True]  # auto: wrn10-1 only, by default
    _, tasks, _ = wrn_fig4.make_plan(wrn_fig4.parse_args(["--device", "cpu", "--providers", "eager", "auto"]))
    assert [t.providers for t in tasks] == [("eager", "auto")] * 2  # named: every network


# ------------------------------------------------------------------------------- ratios and goal
def test_paper_table_and_claimed_ratios():
    assert {k: (v["ms"], v["cifar10_err_pct"]) for k, v in wrn_fig4.PAPER.items()} == {
        "resnet164": (85, 5.46), "resnet1001": (512, 4.64), "wrn40-4": (68, 4.66), "wrn16-10": (164, 4.56),
        "wrn28-10": (312, 4.38)}
    # the paper's claims: WRN-28-10 1.6x faster than ResNet-1001, WRN-40-4 about 8x (7.5)
    assert round(wrn_fig4.paper_ratio("resnet1001", "wrn28-10"), 1) == 1.6
    assert round(wrn_fig4.paper_ratio("resnet1001", "wrn40-4")) == 8
    assert wrn_fig4.paper_ratio("preact11", "wrn10-1") is None
    assert wrn_fig4.paper_extra()["claims"] == {"resnet1001/wrn28-10": 1.641, "resnet1001/wrn40-4": 7.529}
    assert [n.paper_ms for n in wrn_fig4.GPU_NETWORKS] == [85, 512, 68, 164, 312]


def test_thin_wide_ratios_on_synthetic_rows():
    rows = [_row("resnet1001", "fp16", "eager", 100.0), _row("wrn28-10", "fp16", "eager", 50.0),
            _row("wrn40-4", "fp16", "eager", 10.0),
            _row("resnet1001", "fp16", "triton", 60.0), _row("wrn28-10", "fp16", "triton", 40.0),
            _row("wrn40-4", "fp16", "triton", None, correct=False),  # wrong: no ratio with it
            _row("resnet1001", "fp32", "eager", 300.0), _row("wrn40-4", "fp32", "eager", 20.0)]
    got = wrn_fig4.thin_wide_ratios(rows)
    assert [(g["dtype"], g["provider"], g["thin"], g["wide"], g["ratio"], g["paper_ratio"]) for g in got] == [
        ("fp16", "eager", "resnet1001", "wrn28-10", 2.0, 1.641),
        ("fp16", "eager", "resnet1001", "wrn40-4", 10.0, 7.529),
        ("fp16", "triton", "resnet1001", "wrn28-10", 1.5, 1.641),
        ("fp32", "eager", "resnet1001", "wrn40-4", 15.0, 7.529)]
    assert got[0]["thin_ms"] == 100.0 and got[0]["wide_ms"] == 50.0
    assert wrn_fig4.thin_wide_ratios(rows, [("wrn28-10", "wrn40-4")])[0]["paper_ratio"] == 4.588  # 312 / 68
    headers, lines = wrn_fig4.ratio_table(wrn_fig4.ratios_summary(rows))
    assert len(lines) == 4 and lines[0][-2:] == ["2.00x", "1.64x"] and lines[1][-2:] == ["10.00x", "7.53x"]


def test_speedups_and_goal_on_synthetic_rows():
    rows = [_row("resnet164", "fp16", "eager", 13.0), _row("resnet164", "fp16", "triton", 10.0),
            _row("resnet164", "fp16", "cuda", 5.0),
            _row("wrn28-10", "fp16", "eager", 30.0), _row("wrn28-10", "fp16", "triton", 20.0),
            _row("wrn28-10", "fp16", "cuda", None, correct=False), _row("wrn28-10", "fp16", "compile", 15.0),
            _row("wrn28-10", "fp32", "eager", 60.0), _row("wrn28-10", "fp32", "cuda", 40.0),
            _row("wrn28-10", "fp32", "auto", 30.0)]
    sp = {(s["model"], s["dtype"], s["provider"]): s["speedup"] for s in wrn_fig4.speedups(rows)}
    assert sp == {("resnet164", "fp16", "triton"): 1.3, ("resnet164", "fp16", "cuda"): 2.6,
                  ("wrn28-10", "fp16", "triton"): 1.5, ("wrn28-10", "fp16", "compile"): 2.0,
                  ("wrn28-10", "fp32", "cuda"): 1.5, ("wrn28-10", "fp32", "auto"): 2.0}
    goal = {(g["dtype"], g["provider"]): g for g in wrn_fig4.goal_verdict(rows)}
    assert list(goal) == [("fp16", "triton"), ("fp16", "cuda"), ("fp32", "cuda"), ("fp32", "auto")]  # not compile
    assert (goal["fp16", "triton"]["met"], goal["fp16", "triton"]["of"]) == (2, 2)  # 1.3 exactly meets it
    assert goal["fp16", "triton"]["all_met"] and goal["fp16", "triton"]["worst_model"] == "resnet164"
    # the wrong wrn28-10 row counts as a miss, and is the worst
    g = goal["fp16", "cuda"]
    assert (g["met"], g["of"], g["worst_model"], g["worst_speedup"], g["all_met"]) == (1, 2, "wrn28-10", None, False)
    assert goal["fp32", "auto"]["met"] == 1 and goal["fp32", "auto"]["worst_speedup"] == 2.0
    assert wrn_fig4.goal_verdict(rows, target=2.0)[0]["met"] == 0
    assert wrn_fig4.goal_lines(wrn_fig4.ratios_summary(rows))[0] == (
        "goal (fused >= 1.3x eager) fp16 triton: 2 of 2 networks (met on every network); worst resnet164 1.3x")
    paper = lambda r: "-" if r["paper_ms"] is None else f"{r['paper_ms']:.0f}"
    headers, table = models.summary_table(rows, {}, group=("model", "dtype"), lead=(("paper ms", paper),))
    assert headers == ["model", "dtype", "paper ms", "provider", "ms", "img/s", "eager/it", "MiB", "compile s"]
    assert table[1] == ["resnet164", "fp16", "85", "triton", "10.000", "3200.0", "1.30x", "-", "-"]
    assert table[5][3:7] == ["cuda", "FAILED", "-", "-"] and table[6][3:7] == ["compile", "15.000", "2133.3", "2.00x"]


# ---------------------------------------------------------------------- GPU configuration, on CPU
# parameters for 10 classes: the WRNs with BN, to 2 decimals; the pre-activation ResNets as He et
# al. count them (conv and fc weights); one fused training block per unit
WRN_PARAMS_M = {"wrn40-4": 8.95, "wrn16-10": 17.12, "wrn28-10": 36.48}
PREACT_WEIGHTS_M = {"resnet164": 1.7, "resnet1001": 10.2}
FUSED_BLOCKS = {"resnet164": 54, "resnet1001": 333, "wrn40-4": 18, "wrn16-10": 6, "wrn28-10": 12}


def test_gpu_networks_build_the_papers_architectures():
    nets = wrn_fig4.GPU_NETWORKS
    assert [n.name for n in nets] == ["resnet164", "resnet1001", "wrn40-4", "wrn16-10", "wrn28-10"]
    for net in nets:
        case = net.case(seed=0)
        assert case.name == net.name and case.chw == (3, 32, 32) and case.num_classes == 10
        with torch.device("meta"):
            ref, ours = case.build_ref(), case.build_ours("triton")
        assert list(ref.state_dict()) == list(ours.state_dict())
        n_ref = sum(p.numel() for p in ref.parameters())
        assert n_ref == sum(p.numel() for p in ours.parameters())
        if net.name in WRN_PARAMS_M:
            assert round(n_ref / 1e6, 2) == WRN_PARAMS_M[net.name], (net.name, n_ref)
            assert round(n_ref / 1e6, 1) == wrn_fig4.PAPER[net.name]["params_m"]
        else:
            weights = sum(p.numel() for m in ref.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
                          for p in m.parameters(recurse=False))
            assert round(weights / 1e6, 1) == PREACT_WEIGHTS_M[net.name] == wrn_fig4.PAPER[net.name]["params_m"]
        assert sum(isinstance(m, (PreActBottleneck, WideBasic)) for m in ours.modules()) == FUSED_BLOCKS[net.name]
        for m in (ref, ours):
            params, bufs = dict(m.named_parameters()), dict(m.named_buffers())
            assert [p for p in case.probes if p not in params] == [], net.name
            assert [b for b in case.buffers if b not in bufs] == [], net.name


def test_preact_case_real_state():
    """The reference really takes the random BN state (seeded), and ours loads it and computes the same."""
    case = wrn_fig4.preact_case(11, 8, seed=3)
    ref = case.build_ref()
    assert not torch.allclose(ref.layer1[0].bn1.weight, torch.ones(16))
    assert torch.equal(case.build_ref().layer1[0].bn1.weight, ref.layer1[0].bn1.weight)
    ours = case.build_ours("torch")
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), ref.eval()(x), rtol=1e-4, atol=1e-5)


def test_gpu_plans():
    nets, gpu = wrn_fig4.GPU_NETWORKS, ["eager", "triton", "cuda", "auto", "compile"]
    early4 = ("eager", "triton", "cuda", "auto")
    full = wrn_fig4.plan(nets, gpu, ["fp16", "fp32"], quick=False, reps=None, dtypes_given=False)
    assert [(t.net.name, t.dtype, t.providers) for t in full] == [
        (n.name, d, early4) for n in nets for d in ("fp16", "fp32")] + [
        (n, d, ("compile",)) for n in wrn_fig4.COMPILE_ORDER for d in ("fp16", "fp32")]
    assert {t.reps for t in full} == {20}
    quick = wrn_fig4.plan(nets, gpu, ["fp16", "fp32"], quick=True, reps=None, dtypes_given=False)
    assert [(t.net.name, t.dtype, t.providers) for t in quick] == [
        (n.name, d, early4 if d == "fp16" else ("eager",)) for n in nets
        for d in ("fp16", "fp32")] + [("wrn28-10", "fp16", ("compile",)), ("wrn40-4", "fp16", ("compile",))]
    assert {t.net.name: t.reps for t in quick} == {"resnet164": 20, "resnet1001": 10, "wrn40-4": 20, "wrn16-10": 20,
                                                   "wrn28-10": 20}
    given = wrn_fig4.plan(nets[:2], gpu, ["fp32"], quick=True, reps=5, dtypes_given=True)
    assert [(t.net.name, t.providers, t.reps) for t in given] == [("resnet164", early4, 5), ("resnet1001", early4, 5)]
    assert wrn_fig4.parse_args(["--quick"]).deadline is None and wrn_fig4.QUICK_DEADLINE_S <= 120
