"""benchmarks/bench_layers.py: shapes derived from the models, the GPU modes' case selection, and
the CPU tiny mode end to end (a subprocess: the library's C++ kernels as ``cuda``, Triton through
the interpreter, ``auto`` through the measured dispatch, ``cudnn_fused`` skipped) with its result
file checked row by row against the ceilings it records and each auto row's dispatch decision; a
peaks file used instead of measuring; a wrong provider recorded wrong and untimed; a wrong
candidate of the dispatch excluded from the auto rows and named in the JSON.

The end-to-end test skips, with the loader's reason, where the compiled library does not load; the
in-process tests fake the ``cuda`` provider and need no library.
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

from benchmarks import bench_bandwidth, bench_conv_epilogue, bench_layers, common, peaks  # noqa: E402
from resnet_fused.models import reference  # noqa: E402
from utils import run_bench_cpu  # noqa: E402
from test_bench_models import check_dispatch, spy_measuring  # noqa: E402

SHAPE = re.compile(r"^(\d+)x(\d+)x(\d+)->(\d+)x(\d+)x(\d+) k(\d+)s(\d+)$")


def _needs_ext():
    from resnet_fused import _ext

    err = _ext.load_error()
    if err is not None:
        pytest.skip(f"the compiled library is unavailable: {err}")


def _results(out_dir: Path):
    """The JSON's top level and rows, after checking the CSV and the markdown beside it."""
    files = sorted(out_dir.glob("*_layers.json"))
    assert len(files) == 1, files
    data = json.loads(files[0].read_text())
    assert tuple(data["env"]) == common.ENV_KEYS and data["env"]["gpu"].startswith("cpu: ")
    assert list(data)[0] == "env" and list(data)[-1] == "rows"
    for k in ("skipped", "peaks", "peaks_source", "timing", "not_run"):
        assert k in data, k
    rows = data["rows"]
    assert rows and all(tuple(r) == bench_layers.KEYS for r in rows)
    assert bench_layers.KEYS == common.ROW_KEYS + ("variant", "layout", "tflops", "frac_of_peak", "gbps",
                                                   "frac_of_copy", "floor_ms", "note")
    with open(files[0].with_suffix(".csv")) as f:
        got = list(csv.DictReader(f))
    assert len(got) == len(rows) and tuple(got[0]) == bench_layers.KEYS
    return data, rows, files[0].with_suffix(".md").read_text()


def _conv_flops_bytes(r: dict):
    """From the row's shape string alone: 2 N Ho Wo K C R S, and input + weight + output (+ the
    residual and the float32 bias for the fused variants) in float32."""
    cin, h, _, cout, ho, _, k, _ = map(int, SHAPE.match(r["shape"]).groups())
    n = r["batch"]
    flops = 2 * n * ho * ho * cout * cin * k * k
    out = n * cout * ho * ho
    nbytes = 4 * (n * cin * h * h + cout * cin * k * k + out)
    if r["variant"] != "conv_alone":
        nbytes += 4 * cout + (4 * out if r["variant"] == "conv_bn_add_relu" else 0)
    return flops, nbytes


def _check_against_peaks(rows, pk: dict):
    """Every row's fractions and floor follow from its own numbers and the recorded ceilings."""
    for r in rows:
        assert r["bench"] == "layers" and r["layout"] == "channels_last", r
        if r["variant"] in bench_bandwidth.OP_NAMES:  # memory-bound op
            assert r["tflops"] is None and r["frac_of_peak"] is None
            assert r["mode"] == ("infer" if r["variant"] in ("bn_relu", "bn_add_relu", "dual_bn_add_relu")
                                 else "train_step")
            c, h, _ = map(int, r["shape"].split("x"))
            op = next(o for o in bench_bandwidth.OPS if o.name == r["variant"])
            nbytes = op.traffic(r["batch"] * c * h * h, c, 4)
            assert math.isclose(r["floor_ms"], nbytes / (pk["copy_gbps"] * 1e9) * 1e3, rel_tol=1e-4), r
            if r["median_ms"] is not None:
                assert math.isclose(r["gbps"], nbytes / (r["median_ms"] * 1e-3) / 1e9, rel_tol=1e-4), r
                assert math.isclose(r["frac_of_copy"], r["gbps"] / pk["copy_gbps"], rel_tol=1e-4), r
            assert "bn inputs: " in r["note"]
        else:  # convolution
            assert r["variant"] in ("conv_alone", "conv_bn_relu", "conv_bn_add_relu") and r["mode"] == "infer"
            assert r["gbps"] is None and r["frac_of_copy"] is None
            flops, nbytes = _conv_flops_bytes(r)
            peak = pk["matmul_tflops"][r["dtype"]]
            floor = max(flops / (peak * 1e12), nbytes / (pk["copy_gbps"] * 1e9)) * 1e3
            assert math.isclose(r["floor_ms"], floor, rel_tol=1e-4), r
            if r["median_ms"] is not None:
                assert math.isclose(r["tflops"], flops / (r["median_ms"] * 1e-3) / 1e12, rel_tol=1e-4), r
                assert math.isclose(r["frac_of_peak"], r["tflops"] / peak, rel_tol=1e-4), r
            assert "modules: " in r["note"]


# ------------------------------------------------------------------------------ derived shapes
def test_resnet50_geometries_equal_the_epilogue_table():
    """Hooks on ResNet-50 at 224 give exactly bench_conv_epilogue's hand table: the same 23
    geometries, first-module names and uses, in the same order."""
    with torch.device("meta"):
        model = reference.resnet50()
    got = bench_layers.conv_geometries(model, 224)
    assert got == list(bench_conv_epilogue.RESNET50_CONVS)
    assert sum(s.uses for s in got) == 53
    assert all(not m._forward_hooks for m in model.modules())  # the hooks are gone afterwards
    acts = {(a.c, a.hw) for a in bench_layers.bn_activations(model, 224)}
    assert acts == {(64, 112), (64, 56), (256, 56), (128, 56), (128, 28), (512, 28), (256, 28), (256, 14),
                    (1024, 14), (512, 14), (512, 7), (2048, 7)}
    layers = bench_layers.model_layers("resnet50")
    uses = {s.name: mods for s, mods in layers.convs}
    assert uses["layer1.0.conv3"] == ("layer1.0.conv3", "layer1.0.downsample.0", "layer1.1.conv3", "layer1.2.conv3")
    assert set(bench_layers.MODELS["resnet50"].quick_convs) <= set(uses)
    assert set(bench_layers.QUICK_ACTS["resnet50"]) <= acts


def test_wrn28_10_geometries():
    """WRN-28-10 at 32: the 3->16 stem, the 160/320/640-wide 3x3s, the stride-2 3x3s entering
    groups 2 and 3, the 1x1 shortcuts: 10 geometries, 28 convs; 4 BN input shapes."""
    layers = bench_layers.model_layers("wrn28-10")
    got = {(s.cin, s.cout, s.k, s.stride, s.hw): (s.name, s.uses) for s, _ in layers.convs}
    assert got == {
        (3, 16, 3, 1, 32): ("conv1", 1),
        (16, 160, 3, 1, 32): ("layer1.0.conv1", 1),
        (160, 160, 3, 1, 32): ("layer1.0.conv2", 7),
        (16, 160, 1, 1, 32): ("layer1.0.shortcut", 1),
        (160, 320, 3, 2, 32): ("layer2.0.conv1", 1),
        (320, 320, 3, 1, 16): ("layer2.0.conv2", 7),
        (160, 320, 1, 2, 32): ("layer2.0.shortcut", 1),
        (320, 640, 3, 2, 16): ("layer3.0.conv1", 1),
        (640, 640, 3, 1, 8): ("layer3.0.conv2", 7),
        (320, 640, 1, 2, 16): ("layer3.0.shortcut", 1),
    }
    assert sum(s.uses for s, _ in layers.convs) == 28
    assert all(len(mods) == s.uses and mods[0] == s.name for s, mods in layers.convs)
    assert [s.shape for s, _ in layers.convs][4] == "160x32x32->320x16x16 k3s2"
    acts = {(a.c, a.hw): len(mods) for a, mods in layers.acts}
    assert acts == {(16, 32): 1, (160, 32): 8, (320, 16): 8, (640, 8): 8}
    assert set(bench_layers.WRN_QUICK) <= {s.name for s, _ in layers.convs}
    assert set(bench_layers.QUICK_ACTS["wrn28-10"]) <= set(acts)


def test_trace_on_cpu_equals_meta():
    """A real (tiny) forward on CPU sees what the meta device sees."""
    with torch.device("meta"):
        meta = bench_layers.trace_layers(reference.ref_wrn(10, 2), 8)
    cpu = bench_layers.trace_layers(reference.ref_wrn(10, 2), 8)
    assert cpu.convs == meta.convs and cpu.acts == meta.acts and len(cpu.convs) == 10


def test_gpu_modes_select_the_documented_cases(monkeypatch):
    """--quick and the full GPU mode (device faked as CUDA: make_config touches no GPU)."""
    monkeypatch.setattr(common, "pick_device", lambda name: torch.device("cuda"))
    quick = bench_layers.make_config(bench_layers.parse_args(["--quick", "--no-compile"]))
    assert {(j.model, j.job.batch) for j in quick.conv_jobs} == {("resnet50", 64), ("wrn28-10", 128)}
    assert {j.job.dtype for j in quick.conv_jobs} == {"fp16"} and len(quick.conv_jobs) == (6 + 4) * 2
    assert {j.job.spec.name for j in quick.conv_jobs if j.model == "resnet50"} == set(bench_conv_epilogue.QUICK)
    assert {j.job.spec.cin for j in quick.conv_jobs if j.job.spec.name == "layer1.0.conv2"} == {64, 160}  # full size
    assert [o.name for o in quick.ops] == list(bench_layers.QUICK_OPS)
    assert sorted((j.model, j.act.c, j.act.hw) for j in quick.mem_jobs) == [
        ("resnet50", 256, 56), ("resnet50", 1024, 14), ("wrn28-10", 160, 32)]
    assert quick.deadline is not None and quick.cuda_graph and "compile" not in quick.providers
    assert "auto" in quick.providers and ("cudnn_fused" in quick.providers) != ("cudnn_fused" in quick.skipped)
    full = bench_layers.make_config(bench_layers.parse_args([]))
    assert len(full.conv_jobs) == (23 + 10) * 3 * 2 and len(full.mem_jobs) == (12 + 4) * 3
    assert {(j.model, j.job.batch) for j in full.conv_jobs} == {("resnet50", 256), ("wrn28-10", 128)}
    assert len(full.ops) == len(bench_bandwidth.OPS) and full.deadline is None and "compile" in full.providers


# -------------------------------------------------------------------------------- end to end
def test_cpu_end_to_end(tmp_path):
    _needs_ext()
    pytest.importorskip("triton")
    r = run_bench_cpu("benchmarks.bench_layers", tmp_path, timeout=120)
    data, rows, md = _results(tmp_path)
    assert set(data["skipped"]) == {"compile", "cudnn_fused"} and data["not_run"] == []
    assert data["skipped"]["cudnn_fused"].startswith("CUDA only")
    assert data["peaks_source"] == "measured in this run"
    pk = data["peaks"]
    assert pk["copy_gbps"] > 0 and set(pk["matmul_tflops"]) == {"fp32"} and pk["matmul_tflops"]["fp32"] > 0
    _check_against_peaks(rows, pk)
    for row in rows:
        assert row["correct"] is True, row
        assert row["batch"] == 2 and row["dtype"] == "fp32"
        assert row["median_ms"] > 0 and row["p20_ms"] <= row["median_ms"] <= row["p80_ms"], row
        assert row["floor_ms"] > 0
    conv = [x for x in rows if x["variant"] not in bench_bandwidth.OP_NAMES]
    mem = [x for x in rows if x["variant"] in bench_bandwidth.OP_NAMES]
    # conv: each model's quick geometries, conv alone once, both variants for eager / cuda / triton / auto
    assert len({(x["model"], x["shape"]) for x in conv}) == 6 + 4
    for key in {(x["model"], x["shape"]) for x in conv}:
        got = sorted((x["provider"], x["variant"]) for x in conv if (x["model"], x["shape"]) == key)
        assert got == sorted([("eager", "conv_alone")] + [(p, v) for p in ("eager", "cuda", "triton", "auto")
                                                          for v in ("conv_bn_relu", "conv_bn_add_relu")]), key
    stem = [x for x in conv if x["model"] == "resnet50" and x["shape"].startswith("3x16x16")]
    assert stem and all(x["note"].startswith("modules: conv1") for x in stem)
    assert all("kernel: fallback: CPU tensors" in x["note"] for x in conv if x["provider"] == "cuda")
    # memory: three ops at one or two tiny shapes per model, cuda / triton / eager each, and auto for
    # the one of them bn_act computes
    assert {(x["model"], x["shape"]) for x in mem} == {("resnet50", "16x14x14"), ("resnet50", "64x4x4"),
                                                       ("wrn28-10", "10x8x8")}
    assert sorted({x["variant"] for x in mem}) == sorted(bench_layers.QUICK_OPS)
    assert {x["provider"] for x in mem} == {"cuda", "triton", "eager", "auto"} and len(mem) == 3 * 3 * 3 + 3
    assert {x["variant"] for x in mem if x["provider"] == "auto"} == {"bn_add_relu"}
    # auto's decision per row: one key (the row's own op and shape), measured in the checked call;
    # the row's note names the chosen candidate with the times it measured
    check_dispatch(data)
    for e in data["dispatch"]:
        assert len(e["decisions"]) == 1, e
        d = e["decisions"][0]
        row = next(x for x in rows
                   if x["provider"] == "auto" and all(x[k] == e[k] for k in common.DISPATCH_CASE_KEYS))
        assert f"auto chose {d['chosen']} (measured: torch " in row["note"], row["note"]
        if e["variant"] == "bn_add_relu":
            assert d["op"] == "bn_act" and d["case"]["residual"] == ["float32", "cl"]
            assert d["sites"] == ["ops.bn_act"]
        else:
            assert d["op"] == "conv_bias_act" and d["sites"] == ["ops.conv_bias_act"] and d["case"]["grad"] is False
            assert (d["case"]["residual"] is not None) == (e["variant"] == "conv_bn_add_relu")
            cin, h, _, cout, _, _, k, st = map(int, SHAPE.match(e["shape"]).groups())
            assert d["case"]["x"] == [2, cin, h, h] and d["case"]["weight"] == [cout, cin, k, k]
            assert d["case"]["stride"] == [st, st] and d["case"]["layout"] == "cl"
    assert "| auto ms |" in md and "| auto GB/s |" in md
    assert "\n| model | conv | shape |" in md and "\n| model | op | shape |" in md
    assert "resnet50" in r.stdout and "wrn28-10" in r.stdout


def _write_peaks(path: Path) -> dict:
    d = peaks.Peaks("cpu: fake", 123.0, {"fp32": 4.5}, copy_bytes=1, matmul_n={"fp32": 7}).as_dict()
    path.write_text(json.dumps(d))
    return d


def test_peaks_file_is_used_instead_of_measuring(tmp_path, monkeypatch):
    def no_measure(*a, **k):
        raise AssertionError("peaks.measure called although --peaks was given")

    monkeypatch.setattr(peaks, "measure", no_measure)
    pfile = tmp_path / "peaks.json"
    want = _write_peaks(pfile)
    out = tmp_path / "out"
    rc = bench_layers.main(["--device", "cpu", "--models", "wrn28-10", "--providers", "eager", "--convs",
                            "layer3.0.shortcut", "--ops", "bn_relu", "channel_stats", "--peaks", str(pfile),
                            "--out", str(out)])
    assert rc == 0
    data, rows, _ = _results(out)
    assert data["peaks"] == want and data["peaks_source"] == f"file: {pfile}"
    _check_against_peaks(rows, want)
    assert {x["variant"] for x in rows} == {"conv_alone", "conv_bn_relu", "conv_bn_add_relu", "bn_relu",
                                            "channel_stats"}
    assert all(x["correct"] and x["median_ms"] > 0 for x in rows)
    # a file without the run's dtype is refused
    with pytest.raises(SystemExit, match="no matmul peak"):
        bench_layers.main(["--device", "cpu", "--dtypes", "fp16", "--peaks", str(pfile), "--no-write"])


def test_wrong_provider_is_recorded_and_not_timed(tmp_path, monkeypatch, capsys):
    """A fused conv and a memory op 1% off: correct=false, no time, the floor still given; the
    others correct and timed; exit code 1. ``cuda`` is faked (no library needed), and so is a wrong
    ``auto``, whose rows still get their (here empty) dispatch entries."""
    monkeypatch.setattr(common, "provider_unavailable", lambda p, d: None)
    real = bench_layers.conv_provider_fn

    def fn(provider, variant, job, bc, allow_tf32):
        if provider in ("cuda", "auto"):
            eager = real("eager", variant, job, bc, allow_tf32)
            return lambda x, r: eager(x, r) * 1.01
        return real(provider, variant, job, bc, allow_tf32)

    def broken(op, d):
        return tuple(t * 1.01 if t.is_floating_point() else t for t in bench_bandwidth.run_eager(op, d))

    monkeypatch.setattr(bench_layers, "conv_provider_fn", fn)
    monkeypatch.setattr(bench_layers, "kernel_name", lambda *a: "fake")
    monkeypatch.setitem(bench_bandwidth.RUNNERS, "cuda", broken)
    monkeypatch.setitem(bench_bandwidth.RUNNERS, "auto", broken)
    pk = _write_peaks(tmp_path / "p.json")
    rc = bench_layers.main(["--device", "cpu", "--models", "resnet50", "--providers", "eager", "cuda", "auto",
                            "--convs", "layer1.0.conv3", "--acts", "1024x14", "--ops", "bn_add_relu", "--peaks",
                            str(tmp_path / "p.json"), "--out", str(tmp_path / "out")])
    assert rc == 1
    data, rows, md = _results(tmp_path / "out")
    _check_against_peaks(rows, pk)
    assert len(rows) == 1 + 3 * 2 + 3
    wrong = [r for r in rows if r["provider"] == "auto"]
    assert [(e["variant"], e["decisions"]) for e in data["dispatch"]] == [(r["variant"], []) for r in wrong]
    for row in rows:
        if row["provider"] in ("cuda", "auto"):
            assert row["correct"] is False and row["median_ms"] is None and row["images_per_s"] is None
            assert row["tflops"] is None and row["frac_of_peak"] is None and row["gbps"] is None
            assert row["frac_of_copy"] is None and row["floor_ms"] > 0
            assert row["note"].startswith("wrong: not timed"), row
        else:
            assert row["provider"] == "eager" and row["correct"] is True and row["median_ms"] > 0
    assert "| WRONG |" in md
    err = capsys.readouterr().err
    assert "WRONG resnet50 layer1.0.conv3" in err and "WRONG bn_add_relu" in err


def test_auto_excludes_a_wrong_candidate_and_the_json_says_so(tmp_path, monkeypatch):
    """A candidate 1% off, registered with the dispatch and made the fastest by an injected clock:
    the auto rows stay correct (the dispatch checked it and ran a right candidate), and the JSON's
    decision names it excluded with the error it made. Each key is measured in the row's checked
    call, none while timing."""
    from resnet_fused import dispatch
    from resnet_fused.dispatch import candidates as cands

    def wrong_conv(x, weight, bias, residual, stride, padding, dilation, relu, out_format):
        torch_fn = cands.get("conv_bias_act", "torch").fn
        return torch_fn(x, weight, bias, residual, stride, padding, dilation, relu, out_format) * 1.01

    def wrong_bn(x, scale, shift, residual, relu):
        return cands.get("bn_act", "torch").fn(x, scale, shift, residual, relu) * 1.01

    def clock(runs, device):  # if it were not excluded, "wrong" would win by far
        return {name: [0.5 if name == "wrong" else 1.0] * 3 for name in runs}

    _write_peaks(tmp_path / "p.json")
    ops, during = spy_measuring(monkeypatch)
    dispatch.register_candidate("conv_bias_act", "wrong", wrong_conv)
    dispatch.register_candidate("bn_act", "wrong", wrong_bn)
    previous = dispatch.set_timer(clock)
    try:
        with pytest.warns(RuntimeWarning, match="candidate 'wrong' of (conv_bias_act|bn_act) excluded"):
            rc = bench_layers.main(["--device", "cpu", "--models", "resnet50", "--providers", "eager", "auto",
                                    "--convs", "layer1.0.conv3", "--acts", "1024x14", "--ops", "bn_add_relu",
                                    "--peaks", str(tmp_path / "p.json"), "--out", str(tmp_path / "out")])
        assert rc == 0
        data, rows, _ = _results(tmp_path / "out")
        auto = [x for x in rows if x["provider"] == "auto"]
        assert [x["variant"] for x in auto] == ["conv_bn_relu", "conv_bn_add_relu", "bn_add_relu"]
        assert all(x["correct"] and x["median_ms"] > 0 for x in auto)
        check_dispatch(data)  # while "wrong" is registered: it is one of the op's real candidates
        for e in data["dispatch"]:
            (d,) = e["decisions"]
            assert d["chosen"] == "torch" and d["candidates"]["torch"] == 1.0, d  # the clock's ties go to torch
            assert d["candidates"]["wrong"].startswith("excluded: output 0: relative error 0.01"), d
            assert "wrong excluded" in next(x for x in auto if x["variant"] == e["variant"])["note"]
        assert ops == ["conv_bias_act", "conv_bias_act", "bn_act"] and during == []
    finally:
        dispatch.set_timer(previous)
        dispatch.unregister_candidate("conv_bias_act", "wrong")
        dispatch.unregister_candidate("bn_act", "wrong")
        dispatch.forget()


def test_deadline_zero_runs_nothing(tmp_path, capsys):
    rc = bench_layers.main(["--device", "cpu", "--models", "wrn28-10", "--providers", "eager", "--deadline", "0",
                            "--out", str(tmp_path)])
    assert rc == 0 and not list(tmp_path.glob("*_layers.json"))
    assert "past the deadline" in capsys.readouterr().err
