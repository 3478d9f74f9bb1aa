"""benchmarks/bench_wrn.py (the WRN paper's Figure 4 re-run): the CPU mode end to end (a
subprocess, Triton through the interpreter, the compiled library's C++ kernels as the cuda
provider where it loads, and auto with its dispatch decisions in the JSON), the thin / wide ratios,
speedups and goal on synthetic rows, the paper's table, the GPU networks' architectures (parameter
counts, probes, fused blocks) and run plan checked without a GPU, and a broken provider recorded
wrong and untimed (in process, monkeypatched).

The subprocess runs with one intra-op thread, as tests/test_bench_train.py does.
"""
from __future__ import annotations

import csv
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # benchmarks/ is not installed with the package: import it from the tree
    sys.path.insert(0, str(REPO))

from benchmarks import bench_train, bench_wrn, common  # noqa: E402
from resnet_fused import backends  # noqa: E402
from resnet_fused.modules import PreActBottleneck, WideBasic  # noqa: E402
from utils import run_bench_cpu  # noqa: E402
from test_bench_models import check_dispatch  # noqa: E402

needs_interpreter = pytest.mark.skipif(not backends.triton_interpreting(),
                                       reason="in-process CPU Triton needs TRITON_INTERPRET=1 at import")


def _ext_error():
    """Why the compiled library (the cuda provider) cannot run CPU tensors here, or None."""
    return backends.unavailable_reason("cuda", torch.device("cpu"))


def _data(out_dir: Path) -> dict:
    """The JSON, after checking its top level, the CSV and the markdown beside it."""
    files = sorted(out_dir.glob("*_wrn.json"))
    assert len(files) == 1, files
    data = json.loads(files[0].read_text())
    assert tuple(data) == ("env", "skipped", "paper", "ratios", "dispatch", "rows"), tuple(data)
    assert tuple(data["env"]) == common.ENV_KEYS
    assert all(tuple(r) == bench_wrn.KEYS for r in data["rows"])
    with open(files[0].with_suffix(".csv")) as f:
        got = list(csv.DictReader(f))
    assert len(got) == len(data["rows"]) and (not got or tuple(got[0]) == bench_wrn.KEYS)
    return data


def _check_timed(row, dtype="fp32"):
    assert tuple(row) == bench_wrn.KEYS == common.ROW_KEYS + ("layout", "compile_s", "paper_ms")
    assert row["bench"] == "wrn" and row["mode"] == "train_step" and row["dtype"] == dtype
    assert row["correct"] is True, row
    assert row["median_ms"] > 0 and row["p20_ms"] <= row["median_ms"] <= row["p80_ms"], row
    assert math.isclose(row["images_per_s"], row["batch"] * 1e3 / row["median_ms"], rel_tol=1e-3)
    assert row["peak_mem_mb"] is None  # CPU
    assert row["layout"] == "channels_last" and row["compile_s"] is None
    assert row["paper_ms"] is None  # the tiny stand-ins are not the paper's networks


def _check_untimed(row):
    assert row["correct"] is False
    assert row["median_ms"] is None and row["p20_ms"] is None and row["p80_ms"] is None
    assert row["images_per_s"] is None and row["peak_mem_mb"] is None


def _row(model, dtype, provider, ms, correct=True):
    t = None if ms is None else common.Timing(ms, ms * 0.95, ms * 1.05, 10)
    return common.make_row(bench="wrn", model=model, shape="3x32x32", batch=32, dtype=dtype, mode="train_step",
                           provider=provider, timing=t, peak_mem_mb=None, correct=correct,
                           extra={"layout": "channels_last", "compile_s": None,
                                  "paper_ms": bench_wrn.PAPER.get(model, {}).get("ms")})


# ------------------------------------------------------------------------------------ end to end
def test_cpu_mode_end_to_end(tmp_path):
    pytest.importorskip("triton")
    r = run_bench_cpu("benchmarks.bench_wrn", tmp_path, timeout=240)
    data = _data(tmp_path)
    assert data["env"]["gpu"].startswith("cpu: ")
    rows = data["rows"]
    names = ["preact11", "wrn10-1"]
    providers = ("eager", "triton") + (("cuda",) if _ext_error() is None else ()) + ("auto",)
    assert [(x["model"], x["provider"]) for x in rows] == [  # auto: wrn10-1 only on CPU
        (n, p) for n in names for p in providers if p != "auto" or n == "wrn10-1"]
    for row in rows:
        _check_timed(row)
        assert row["batch"] == 2 and row["shape"] == "3x8x8"
    # the fused providers really trained through the fused blocks: one per bottleneck unit of
    # preact11 (three stages of one), one per WideBasic of WRN-10-1 (three groups of one)
    for prov in [p for p in providers if p in bench_wrn.FUSED]:
        fused = {m: int(n) for m, p, n in re.findall(r"^  (\S+) b2 fp32 (\w+) *; ok .*fused blocks/step (\d+)",
                                                      r.stdout, re.M) if p == prov}
        assert fused == {"preact11": 3, "wrn10-1": 3}, (prov, r.stdout)
    assert "WRONG" not in r.stdout + r.stderr and "FAILED" not in r.stdout + r.stderr
    # auto: the network's three block shapes measured in its first (checked, untimed) step
    check_dispatch(data)
    assert [(e["model"], e["mode"], e["layout"]) for e in data["dispatch"]] == [("wrn10-1", "train_step",
                                                                                 "channels_last")]
    for e in data["dispatch"]:
        assert [d["op"] for d in e["decisions"]] == ["block_train"] * 3, e
        assert all(d["case"]["x"][0] == 2 for d in e["decisions"])
    assert re.search(r"^  wrn10-1 b2 fp32 auto +; ok .*auto: block_train ", r.stdout, re.M), r.stdout
    assert "note: auto on CPU: wrn10-1 only (name auto in --providers for both)" in r.stdout
    assert "first seen after the warm-up" not in r.stdout + r.stderr
    # ratios: the stand-in pair for every provider, computed from the rows themselves
    ms = {(x["model"], x["provider"]): x["median_ms"] for x in rows}
    tw = data["ratios"]["thin_wide"]
    assert [(t["provider"], t["thin"], t["wide"]) for t in tw] == [
        (p, "preact11", "wrn10-1") for p in providers if p != "auto"]  # auto ran on one network
    for t in tw:
        assert t["paper_ratio"] is None
        assert math.isclose(t["ratio"], ms[("preact11", t["provider"])] / ms[("wrn10-1", t["provider"])],
                            rel_tol=1e-3)
    assert [(g["provider"], g["of"]) for g in data["ratios"]["goal"]] == [
        (p, 1 if p == "auto" else 2) for p in providers[1:]]
    assert data["paper"]["claims"] == {"resnet1001/wrn28-10": pytest.approx(1.641, abs=1e-3),
                                       "resnet1001/wrn40-4": pytest.approx(7.529, abs=1e-3)}
    assert data["skipped"] == ({} if "cuda" in providers else {"cuda": _ext_error()})
    # the summary tables, on stdout and in the markdown
    md = next(tmp_path.glob("*_wrn.md")).read_text()
    for text in (r.stdout, md):
        assert "paper ms" in text and "eager/triton" in text and "preact11" in text
        assert "goal (fused >= 1.3x eager) fp32 triton: " in text and "fp32 auto: " in text
    assert "| fp32 | eager | preact11 / wrn10-1 |" in md


@needs_interpreter
@pytest.mark.parametrize("how", ["wrong", "raises"])
def test_broken_provider_is_recorded_wrong_and_untimed(tmp_path, monkeypatch, capsys, how):
    from resnet_fused.modules import _base

    real = _base.run_block_train

    def broken(*args, **kwargs):
        if how == "raises":
            raise RuntimeError("deliberately broken kernel")
        # 1% off: far beyond 4x eager's fp32 error. (A pre-activation network is blind to a
        # per-channel scale or shift of a block's output, which the next BN undoes, except in the
        # final BN's running statistics: this error varies along the rows instead.)
        out = real(*args, **kwargs)
        return out + 0.01 * out.detach().flip(-1)

    monkeypatch.setattr(_base, "run_block_train", broken)
    rc = bench_wrn.main(["--device", "cpu", "--networks", "wrn10-1", "--providers", "eager", "triton",
                         "--out", str(tmp_path)])
    assert rc == 1
    data = _data(tmp_path)
    rows = data["rows"]
    assert [x["provider"] for x in rows] == ["eager", "triton"]
    _check_timed(rows[0])
    _check_untimed(rows[1])
    assert rows[1]["layout"] == "channels_last"
    out, err = capsys.readouterr()
    assert ("WRONG wrn10-1 b2 fp32 triton" if how == "wrong" else "FAILED wrn10-1 b2 fp32 triton") in err, err
    # a wrong provider has no ratio and misses the goal
    assert [t["provider"] for t in data["ratios"]["thin_wide"]] == []  # only one network ran
    assert data["ratios"]["speedup_vs_eager"] == []
    assert data["ratios"]["goal"] == [{"dtype": "fp32", "provider": "triton", "target": 1.3, "met": 0, "of": 1,
                                       "worst_model": "wrn10-1", "worst_speedup": None, "all_met": False}]
    verdict = "WRONG" if how == "wrong" else "FAILED"
    assert re.search(rf"^wrn10-1 +fp32 +- +[\d.]+ +- +{verdict} *$", out, re.M), out


def test_triton_skipped_with_a_note_without_the_interpreter(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(backends, "triton_interpreting", lambda: False)
    rc = bench_wrn.main(["--device", "cpu", "--networks", "preact11", "--providers", "eager", "triton",
                         "--out", str(tmp_path)])
    assert rc == 0
    data = _data(tmp_path)
    assert [x["provider"] for x in data["rows"]] == ["eager"]
    _check_timed(data["rows"][0])
    assert list(data["skipped"]) == ["triton"] and "TRITON_INTERPRET=1" in data["skipped"]["triton"]
    assert "triton skipped" in capsys.readouterr().out


def test_options():
    with pytest.raises(SystemExit, match="--networks"):
        bench_wrn.make_plan(bench_wrn.parse_args(["--device", "cpu", "--networks", "wrn28-10"]))  # GPU-only name
    with pytest.raises(SystemExit, match="--reps"):
        bench_wrn.make_plan(bench_wrn.parse_args(["--device", "cpu", "--reps", "0"]))
    cfg, tasks, pairs = bench_wrn.make_plan(bench_wrn.parse_args(["--device", "cpu", "--quick", "--no-compile"]))
    assert cfg.deadline is not None and "compile" not in cfg.providers  # --quick stops starting providers in time
    assert pairs == bench_wrn.CPU_PAIRS
    assert [(t.job.case.name, t.job.batch, t.job.dtype) for t in tasks] == [("preact11", 2, "fp32"),
                                                                             ("wrn10-1", 2, "fp32")]
    cfg, tasks, _ = bench_wrn.make_plan(bench_wrn.parse_args(["--device", "cpu"]))
    assert cfg.deadline is None
    assert list(cfg.providers) == [p for p in ("eager", "triton", "cuda", "auto") if p not in cfg.skipped]
    assert [("auto" in t.providers) for t in tasks] == [False, True]  # auto: wrn10-1 only, by default
    _, tasks, _ = bench_wrn.make_plan(bench_wrn.parse_args(["--device", "cpu", "--providers", "eager", "auto"]))
    assert [t.providers for t in tasks] == [("eager", "auto")] * 2  # named: every network


def test_row_extra_compile_seconds_and_paper_time():
    job = bench_train.Job(bench_wrn.GPU_NETWORKS[-1].case(seed=0), 32, "fp16")
    info = bench_train.Info(None, 41.5, 12)
    assert bench_wrn.row_extra(job, "compile", info) == {"layout": "channels_last", "compile_s": 41.5,
                                                         "paper_ms": 312.0}
    assert bench_wrn.row_extra(job, "triton", info)["compile_s"] is None
    tiny = bench_train.Job(bench_wrn.CPU_NETWORKS[0].case(seed=0), 2, "fp32")
    assert bench_wrn.row_extra(tiny, "eager", info)["paper_ms"] is None


# ------------------------------------------------------------------------------- ratios and goal
def test_paper_table_and_claimed_ratios():
    assert {k: v["ms"] for k, v in bench_wrn.PAPER.items()} == {
        "resnet164": 85, "resnet1001": 512, "wrn40-4": 68, "wrn16-10": 164, "wrn28-10": 312}
    assert {k: v["cifar10_err_pct"] for k, v in bench_wrn.PAPER.items()} == {
        "resnet164": 5.46, "resnet1001": 4.64, "wrn40-4": 4.66, "wrn16-10": 4.56, "wrn28-10": 4.38}
    # the paper's claims: WRN-28-10 1.6x faster than ResNet-1001, WRN-40-4 about 8x (7.5)
    assert bench_wrn.paper_ratio("resnet1001", "wrn28-10") == pytest.approx(512 / 312)
    assert round(bench_wrn.paper_ratio("resnet1001", "wrn28-10"), 1) == 1.6
    assert bench_wrn.paper_ratio("resnet1001", "wrn40-4") == pytest.approx(512 / 68)
    assert round(bench_wrn.paper_ratio("resnet1001", "wrn40-4")) == 8
    assert bench_wrn.paper_ratio("preact11", "wrn10-1") is None
    assert bench_wrn.paper_extra()["claims"] == {"resnet1001/wrn28-10": 1.641, "resnet1001/wrn40-4": 7.529}
    assert [n.paper_ms for n in bench_wrn.GPU_NETWORKS] == [85, 512, 68, 164, 312]


def test_thin_wide_ratios_on_synthetic_rows():
    rows = [_row("resnet1001", "fp16", "eager", 100.0), _row("wrn28-10", "fp16", "eager", 50.0),
            _row("wrn40-4", "fp16", "eager", 10.0),
            _row("resnet1001", "fp16", "triton", 60.0), _row("wrn28-10", "fp16", "triton", 40.0),
            _row("wrn40-4", "fp16", "triton", None, correct=False),  # wrong: no ratio with it
            _row("resnet1001", "fp32", "eager", 300.0), _row("wrn40-4", "fp32", "eager", 20.0)]
    got = bench_wrn.thin_wide_ratios(rows)
    assert [(g["dtype"], g["provider"], g["wide"], g["ratio"]) for g in got] == [
        ("fp16", "eager", "wrn28-10", 2.0), ("fp16", "eager", "wrn40-4", 10.0),
        ("fp16", "triton", "wrn28-10", 1.5),
        ("fp32", "eager", "wrn40-4", 15.0)]
    assert all(g["thin"] == "resnet1001" for g in got)
    assert [g["paper_ratio"] for g in got] == [1.641, 7.529, 1.641, 7.529]
    assert got[0]["thin_ms"] == 100.0 and got[0]["wide_ms"] == 50.0
    # any pair of the paper's networks has its paper ratio
    assert bench_wrn.thin_wide_ratios(rows, [("wrn28-10", "wrn40-4")])[0] == {
        "dtype": "fp16", "provider": "eager", "thin": "wrn28-10", "wide": "wrn40-4", "thin_ms": 50.0,
        "wide_ms": 10.0, "ratio": 5.0, "paper_ratio": 4.588}  # 312 / 68
    headers, lines = bench_wrn.ratio_table(bench_wrn.ratios_summary(rows))
    assert len(lines) == 4 and lines[0][-2:] == ["2.00x", "1.64x"] and lines[1][-2:] == ["10.00x", "7.53x"]


def test_speedups_and_goal_on_synthetic_rows():
    rows = [_row("resnet164", "fp16", "eager", 13.0), _row("resnet164", "fp16", "triton", 10.0),
            _row("resnet164", "fp16", "cuda", 5.0),
            _row("wrn28-10", "fp16", "eager", 30.0), _row("wrn28-10", "fp16", "triton", 20.0),
            _row("wrn28-10", "fp16", "cuda", None, correct=False),
            _row("wrn28-10", "fp16", "compile", 15.0),
            _row("wrn28-10", "fp32", "eager", 60.0), _row("wrn28-10", "fp32", "cuda", 40.0),
            _row("wrn28-10", "fp32", "auto", 30.0)]
    sp = {(s["model"], s["dtype"], s["provider"]): s["speedup"] for s in bench_wrn.speedups(rows)}
    assert sp == {("resnet164", "fp16", "triton"): 1.3, ("resnet164", "fp16", "cuda"): 2.6,
                  ("wrn28-10", "fp16", "triton"): 1.5, ("wrn28-10", "fp16", "compile"): 2.0,
                  ("wrn28-10", "fp32", "cuda"): 1.5, ("wrn28-10", "fp32", "auto"): 2.0}
    goal = {(g["dtype"], g["provider"]): g for g in bench_wrn.goal_verdict(rows)}
    # compile is not judged; auto is, beside each fused backend
    assert list(goal) == [("fp16", "triton"), ("fp16", "cuda"), ("fp32", "cuda"), ("fp32", "auto")]
    assert goal["fp32", "auto"]["met"] == 1 and goal["fp32", "auto"]["worst_speedup"] == 2.0
    assert (goal["fp16", "triton"]["met"], goal["fp16", "triton"]["of"]) == (2, 2)  # 1.3 exactly meets it
    assert goal["fp16", "triton"]["all_met"] and goal["fp16", "triton"]["worst_model"] == "resnet164"
    # the wrong wrn28-10 row counts as a miss, and is the worst
    assert (goal["fp16", "cuda"]["met"], goal["fp16", "cuda"]["of"], goal["fp16", "cuda"]["worst_model"],
            goal["fp16", "cuda"]["worst_speedup"]) == (1, 2, "wrn28-10", None)
    assert goal["fp32", "cuda"]["met"] == 1 and goal["fp32", "cuda"]["worst_speedup"] == 1.5
    assert bench_wrn.goal_verdict(rows, target=2.0)[0]["met"] == 0
    lines = bench_wrn.goal_lines(bench_wrn.ratios_summary(rows))
    assert lines[0] == ("goal (fused >= 1.3x eager) fp16 triton: 2 of 2 networks (met on every network); "
                        "worst resnet164 1.3x")
    headers, table = bench_wrn.summary_table(rows, {}, ["eager", "triton", "cuda", "compile"])
    assert headers[:4] == ["network", "dtype", "paper ms", "eager ms"] and headers[-1] == "compile s"
    assert table[0][:6] == ["resnet164", "fp16", "85", "13.000", "10.000", "1.30x"]
    assert table[1][6:8] == ["-", "FAILED"] and table[1][8:10] == ["15.000", "2.00x"]


# ---------------------------------------------------------------------- GPU configuration, on CPU
# parameters for 10 classes: the WRNs as the brief gives them (BN included, 2 decimals); the
# pre-activation ResNets as He et al. give them (1.7M, 10.2M: conv and fc weights, BN left out)
WRN_PARAMS_M = {"wrn40-4": 8.95, "wrn16-10": 17.12, "wrn28-10": 36.48}
PREACT_WEIGHTS_M = {"resnet164": 1.7, "resnet1001": 10.2}
FUSED_BLOCKS = {"resnet164": 54, "resnet1001": 333, "wrn40-4": 18, "wrn16-10": 6, "wrn28-10": 12}


def test_gpu_networks_build_the_papers_architectures():
    nets = bench_wrn.GPU_NETWORKS
    assert [n.name for n in nets] == ["resnet164", "resnet1001", "wrn40-4", "wrn16-10", "wrn28-10"]
    for net in nets:
        case = net.case(seed=0)
        assert case.name == net.name and case.kind == "model" and case.chw == (3, 32, 32)
        assert case.num_classes == 10
        with torch.device("meta"):
            ref, ours = case.build_ref(), case.build_ours("triton")
        assert list(ref.state_dict()) == list(ours.state_dict())
        n_ref = sum(p.numel() for p in ref.parameters())
        assert n_ref == sum(p.numel() for p in ours.parameters())
        if net.name in WRN_PARAMS_M:
            assert round(n_ref / 1e6, 2) == WRN_PARAMS_M[net.name], (net.name, n_ref)
            assert round(n_ref / 1e6, 1) == bench_wrn.PAPER[net.name]["params_m"]
        else:
            weights = sum(p.numel() for m in ref.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
                          for p in m.parameters(recurse=False))
            assert round(weights / 1e6, 1) == PREACT_WEIGHTS_M[net.name] == bench_wrn.PAPER[net.name]["params_m"]
        # the fused training blocks a step runs: one per unit
        blocks = sum(isinstance(m, (PreActBottleneck, WideBasic)) for m in ours.modules())
        assert blocks == FUSED_BLOCKS[net.name], net.name
        for m in (ref, ours):
            params, bufs = dict(m.named_parameters()), dict(m.named_buffers())
            assert [p for p in case.probes if p not in params] == [], net.name
            assert [b for b in case.buffers if b not in bufs] == [], net.name
        del ref, ours


def test_preact_case_real_state_and_step_shape():
    """The reference really takes the random BN state, and ours loads it and runs."""
    case = bench_wrn.preact_case(11, 8, seed=3)
    ref = case.build_ref()
    assert not torch.allclose(ref.layer1[0].bn1.weight, torch.ones(16))  # randomized
    assert torch.equal(case.build_ref().layer1[0].bn1.weight, ref.layer1[0].bn1.weight)  # seeded
    ours = case.build_ours("torch")
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), ref.eval()(x), rtol=1e-4, atol=1e-5)


def test_gpu_plans():
    nets, gpu = bench_wrn.GPU_NETWORKS, ["eager", "triton", "cuda", "auto", "compile"]
    early4 = ("eager", "triton", "cuda", "auto")
    full = bench_wrn.plan(nets, gpu, ["fp16", "fp32"], quick=False, cpu=False, reps=None, dtypes_given=False)
    early, late = full[:10], full[10:]
    assert [(t.net.name, t.job.dtype, t.providers) for t in early] == [
        (n.name, d, early4) for n in nets for d in ("fp16", "fp32")]
    assert [(t.net.name, t.job.dtype, t.providers) for t in late] == [
        (n, d, ("compile",)) for n in bench_wrn.COMPILE_ORDER for d in ("fp16", "fp32")]
    assert {t.job.batch for t in full} == {32} and {t.reps for t in full} == {20}
    assert {t.job.case.chw for t in full} == {(3, 32, 32)}

    quick = bench_wrn.plan(nets, gpu, ["fp16", "fp32"], quick=True, cpu=False, reps=None, dtypes_given=False)
    assert [(t.net.name, t.job.dtype, t.providers) for t in quick] == [
        (n.name, d, early4 if d == "fp16" else ("eager",)) for n in nets
        for d in ("fp16", "fp32")] + [("wrn28-10", "fp16", ("compile",)), ("wrn40-4", "fp16", ("compile",))]
    assert {t.net.name: t.reps for t in quick} == {"resnet164": 20, "resnet1001": 10, "wrn40-4": 20, "wrn16-10": 20,
                                                   "wrn28-10": 20}
    given = bench_wrn.plan(nets[:2], gpu, ["fp32"], quick=True, cpu=False, reps=5, dtypes_given=True)
    assert [(t.net.name, t.providers, t.reps) for t in given] == [
        ("resnet164", early4, 5), ("resnet1001", early4, 5)]
    # the default GPU dtypes and the quick deadline (make_plan needs a CUDA device; parse only)
    args = bench_wrn.parse_args(["--quick"])
    assert args.dtypes is None and args.deadline is None and bench_wrn.QUICK_DEADLINE_S <= 120
