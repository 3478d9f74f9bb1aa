"""benchmarks/layers.py and benchmarks/layer_ops.py: the shapes traced from the models, the GPU modes'
case selection, every memory op's providers against float64, the CPU mode end to end (a subprocess:
the C++ kernels as ``cuda``, Triton through the interpreter, ``auto`` through the measured dispatch)
with every row checked against the ceilings it records; a peaks file used instead of measuring; a
wrong provider recorded wrong and untimed, an unavailable one skipped; a wrong dispatch candidate
excluded. Tests needing the compiled library skip with the loader's reason where it does not load.
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

from benchmarks import common, layer_ops, layers, peaks, settings  # noqa: E402
from resnet_fused.models import reference  # noqa: E402
from utils import INTERPRET, run_bench_cpu  # noqa: E402

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
    for k in ("skipped", "peaks", "peaks_source", "timing", "not_run", "goal"):
        assert k in data, k
    rows = data["rows"]
    assert layers.KEYS == common.ROW_KEYS + ("variant", "layout", "tflops", "frac_of_peak", "gbps", "frac_of_copy",
                                             "floor_ms", "note")
    assert rows and all(tuple(r) == layers.KEYS for r in rows)
    with open(files[0].with_suffix(".csv")) as f:
        got = list(csv.DictReader(f))
    assert len(got) == len(rows) and tuple(got[0]) == layers.KEYS
    return data, rows, files[0].with_suffix(".md").read_text()


def _check_against_peaks(rows, pk: dict):
    """Every row's rates, fractions and roofline floor follow from its own shape and time and the
    recorded ceilings: conv flops 2 N Ho Wo K C R S, bytes input + weight + output (+ residual and
    float32 bias when fused); memory bytes each tensor once, the mask as numel / 8."""
    for r in rows:
        assert r["bench"] == "layers" and r["layout"] == "channels_last", r
        sec = None if r["median_ms"] is None else r["median_ms"] * 1e-3
        if r["variant"] in layer_ops.OP_NAMES:
            assert r["tflops"] is None and r["frac_of_peak"] is None
            assert r["mode"] == ("infer" if r["variant"] in ("bn_relu", "bn_add_relu", "dual_bn_add_relu")
                                 else "train_step")
            c, h, _ = map(int, r["shape"].split("x"))
            numel = r["batch"] * c * h * h
            nbytes = next(o for o in layer_ops.OPS if o.name == r["variant"]).traffic(numel, c, 4)
            assert math.isclose(r["floor_ms"], nbytes / (pk["copy_gbps"] * 1e9) * 1e3, rel_tol=1e-4), r
            if sec is not None:
                assert math.isclose(r["gbps"], nbytes / sec / 1e9, rel_tol=1e-4), r
                assert math.isclose(r["frac_of_copy"], r["gbps"] / pk["copy_gbps"], rel_tol=1e-4), r
            assert "bn inputs: " in r["note"] and "same-size copy " in r["note"]
        else:
            assert r["variant"] in layers.CONV_VARIANTS and r["mode"] == "infer"
            assert r["gbps"] is None and r["frac_of_copy"] is None
            cin, h, _, cout, ho, _, k, _ = map(int, SHAPE.match(r["shape"]).groups())
            n, out = r["batch"], r["batch"] * cout * ho * ho
            flops = 2 * n * ho * ho * cout * cin * k * k
            nbytes = 4 * (n * cin * h * h + cout * cin * k * k + out)
            if r["variant"] != "conv_alone":
                nbytes += 4 * cout + (4 * out if r["variant"] == "conv_bn_add_relu" else 0)
            peak = pk["matmul_tflops"][r["dtype"]]
            floor = max(flops / (peak * 1e12), nbytes / (pk["copy_gbps"] * 1e9)) * 1e3
            assert math.isclose(r["floor_ms"], floor, rel_tol=1e-4), r
            if sec is not None:
                assert math.isclose(r["tflops"], flops / sec / 1e12, rel_tol=1e-4), r
                assert math.isclose(r["frac_of_peak"], r["tflops"] / peak, rel_tol=1e-4), r
            assert "modules: " in r["note"]


# ------------------------------------------------------------------------------ traced shapes
def test_resnet50_trace():
    """ResNet-50 at 224: 23 geometries covering 53 convs, 12 BN input shapes; hooks removed."""
    with torch.device("meta"):
        model = reference.resnet50()
    convs, acts = layers.trace_layers(model, 224)
    assert all(not m._forward_hooks for m in model.modules())
    assert len(convs) == 23 and sum(s.uses for s in convs) == 53
    assert [(s.name, s.shape) for s in convs[:2]] == [("conv1", "3x224x224->64x112x112 k7s2"),
                                                      ("layer1.0.conv1", "64x56x56->64x56x56 k1s1")]
    by = {s.name: s for s in convs}
    assert by["layer1.0.conv3"].modules == ("layer1.0.conv3", "layer1.0.downsample.0", "layer1.1.conv3",
                                            "layer1.2.conv3")
    assert (by["layer2.0.conv2"].stride, by["layer4.0.downsample.0"].shape) == (2, "1024x14x14->2048x7x7 k1s2")
    assert {(a.c, a.hw) for a in acts} == {(64, 112), (64, 56), (256, 56), (128, 56), (128, 28), (512, 28),
                                           (256, 28), (256, 14), (1024, 14), (512, 14), (512, 7), (2048, 7)}
    info = layers.MODELS["resnet50"]
    assert set(info.quick_convs) <= set(by) and set(info.quick_acts) <= {(a.c, a.hw) for a in acts}
    assert layers.model_layers("resnet50") == (convs, acts)


def test_wrn28_10_trace():
    """WRN-28-10 at 32: the stem, the 160/320/640-wide 3x3s, the stride-2 3x3s, the 1x1 shortcuts:
    10 geometries, 28 convs; 4 BN input shapes."""
    convs, acts = layers.model_layers("wrn28-10")
    assert {(s.cin, s.cout, s.k, s.stride, s.hw): (s.name, s.uses) for s in convs} == {
        (3, 16, 3, 1, 32): ("conv1", 1), (16, 160, 3, 1, 32): ("layer1.0.conv1", 1),
        (160, 160, 3, 1, 32): ("layer1.0.conv2", 7), (16, 160, 1, 1, 32): ("layer1.0.shortcut", 1),
        (160, 320, 3, 2, 32): ("layer2.0.conv1", 1), (320, 320, 3, 1, 16): ("layer2.0.conv2", 7),
        (160, 320, 1, 2, 32): ("layer2.0.shortcut", 1), (320, 640, 3, 2, 16): ("layer3.0.conv1", 1),
        (640, 640, 3, 1, 8): ("layer3.0.conv2", 7), (320, 640, 1, 2, 16): ("layer3.0.shortcut", 1)}
    assert sum(s.uses for s in convs) == 28 and convs[4].shape == "160x32x32->320x16x16 k3s2"
    assert {(a.c, a.hw): len(a.modules) for a in acts} == {(16, 32): 1, (160, 32): 8, (320, 16): 8, (640, 8): 8}
    assert set(layers.MODELS["wrn28-10"].quick_convs) <= {s.name for s in convs}
    # a real (tiny) forward on CPU sees what the meta device sees
    with torch.device("meta"):
        meta = layers.trace_layers(reference.ref_wrn(10, 2), 8)
    assert layers.trace_layers(reference.ref_wrn(10, 2), 8) == meta and len(meta[0]) == 10


def test_gpu_modes_select_the_documented_cases(monkeypatch):
    """--quick and the full GPU mode (device faked as CUDA: make_config touches no GPU)."""
    monkeypatch.setattr(common, "pick_device", lambda name: torch.device("cuda"))
    quick = layers.make_config(layers.parse_args(["--quick"]))
    assert {(j.model, j.batch) for j in quick.conv_jobs} == {("resnet50", 64), ("wrn28-10", 128)}
    assert {j.dtype for j in quick.conv_jobs} == {"fp16"} and len(quick.conv_jobs) == (6 + 4) * 2
    assert {j.spec.cin for j in quick.conv_jobs if j.spec.name == "layer1.0.conv2"} == {64, 160}  # full size
    assert [o.name for o in quick.ops] == list(layers.QUICK_OPS)
    assert sorted((j.model, j.spec.c, j.spec.hw) for j in quick.mem_jobs) == [
        ("resnet50", 256, 56), ("resnet50", 1024, 14), ("wrn28-10", 160, 32)]
    assert quick.deadline is not None and quick.cuda_graph and "compile" in quick.providers
    assert "auto" in quick.providers and ("cudnn_fused" in quick.providers) != ("cudnn_fused" in quick.skipped)
    full = layers.make_config(layers.parse_args([]))
    assert len(full.conv_jobs) == (23 + 10) * 3 * 2 and len(full.mem_jobs) == (12 + 4) * 3
    assert {j.dtype for j in full.conv_jobs} == {"fp16", "bf16", "fp32"}
    assert {(j.model, j.batch) for j in full.conv_jobs} == {("resnet50", 256), ("wrn28-10", 128)}
    assert full.ops == list(layer_ops.OPS) and full.deadline is None
    with pytest.raises(SystemExit, match="match no layer"):
        layers.make_config(layers.parse_args(["--convs", "layer9.conv"]))


# ---------------------------------------------------------------------------------- memory ops
def test_mask_packing_round_trip():
    bits = torch.rand(37) > 0.5
    packed = layer_ops.pack_bits(bits)
    assert packed.dtype == torch.uint8 and packed.numel() == 5
    assert torch.equal(layer_ops.unpack_bits(packed, 37), bits)
    assert int(layer_ops.pack_bits(torch.tensor([True] + [False] * 7 + [False, True]))[1]) == 2


def test_memory_op_bytes():
    numel, c = 2 * 16 * 14 * 14, 16
    traffic = {o.name: o.traffic(numel, c, 4) for o in layer_ops.OPS}
    assert traffic["bn_relu"] == 2 * numel * 4 + 3 * c * 4
    assert traffic["bwd_apply_dual"] == 5 * numel * 4 + 10 * c * 4
    assert traffic["relu_mask_backward"] == 2 * numel * 4 + numel // 8
    assert traffic["bn_relu_mask"] == 2 * numel * 4 + numel // 8 + 3 * c * 4


@pytest.mark.parametrize("c,hw", [(16, 14), (1, 4)])  # C = 1: contiguous and channels_last at once
def test_every_memory_op_matches_float64(c, hw):
    """Each op's cuda runner (the C++ kernels), triton runner (interpreter) and eager sequence within
    the bound of the float64 reference; a 1% error is caught."""
    _needs_ext()
    d = layer_ops.make_inputs(2, c, hw, torch.float32, torch.device("cpu"), torch.Generator().manual_seed(c))
    for op in layer_ops.OPS:
        ref, eager = layer_ops.run_eager(op, d, up=True), layer_ops.run_eager(op, d)
        assert layer_ops.judge(op, eager, ref, eager, "fp32", d).ok, op.name
        for prov in [p for p in op.providers if p != "triton" or INTERPRET]:
            chk = layer_ops.judge(op, layer_ops.RUNNERS[prov](op, d), ref, eager, "fp32", d)
            assert chk.ok, (op.name, prov, chk)
        off = tuple(t * 1.01 if t.is_floating_point() else t for t in eager)
        assert not layer_ops.judge(op, off, ref, eager, "fp32", d).ok, op.name
    with pytest.raises(ValueError, match="no auto path"):
        layer_ops.run_auto(layer_ops.OPS[-1], d)


# -------------------------------------------------------------------------------- end to end
def test_cpu_end_to_end(tmp_path):
    _needs_ext()
    pytest.importorskip("triton")
    r = run_bench_cpu("benchmarks.layers", tmp_path, timeout=120)
    data, rows, md = _results(tmp_path)
    assert set(data["skipped"]) == {"compile", "cudnn_fused"} and data["not_run"] == []
    assert data["skipped"]["cudnn_fused"].startswith("CUDA only")
    assert data["peaks_source"] == "measured in this run" and len(data["goal"]) == 3
    pk = data["peaks"]
    assert pk["copy_gbps"] > 0 and set(pk["matmul_tflops"]) == {"fp32"} and pk["matmul_tflops"]["fp32"] > 0
    _check_against_peaks(rows, pk)
    for row in rows:
        assert row["correct"] is True, row
        assert row["batch"] == 2 and row["dtype"] == "fp32"
        assert row["median_ms"] > 0 and row["p20_ms"] <= row["median_ms"] <= row["p80_ms"], row
    conv = [x for x in rows if x["variant"] in layers.CONV_VARIANTS]
    mem = [x for x in rows if x["variant"] in layer_ops.OP_NAMES]
    # conv: each model's quick geometries, conv alone once, both variants for eager / cuda / triton / auto
    keys = {(x["model"], x["shape"]) for x in conv}
    assert len(keys) == 6 + 4
    for key in keys:
        got = sorted((x["provider"], x["variant"]) for x in conv if (x["model"], x["shape"]) == key)
        assert got == sorted([("eager", "conv_alone")] + [(p, v) for p in ("eager", "cuda", "triton", "auto")
                                                          for v in ("conv_bn_relu", "conv_bn_add_relu")]), key
    assert {x["shape"] for x in conv if x["note"].startswith("modules: layer2.0.conv2")} == {"8x8x8->8x4x4 k3s2"}
    assert all("kernel: fallback: CPU tensors" in x["note"] for x in conv if x["provider"] == "cuda")
    # memory: three ops at the quick shapes (tiny), cuda / triton / eager each, auto for bn_add_relu
    assert {(x["model"], x["shape"]) for x in mem} == {("resnet50", "16x14x14"), ("resnet50", "64x4x4"),
                                                       ("wrn28-10", "10x8x8")}
    assert sorted({x["variant"] for x in mem}) == sorted(layers.QUICK_OPS)
    assert {x["provider"] for x in mem} == {"cuda", "triton", "eager", "auto"} and len(mem) == 3 * 3 * 3 + 3
    assert {x["variant"] for x in mem if x["provider"] == "auto"} == {"bn_add_relu"}
    # auto's decision per row: one key (the row's own op and shape), measured in the checked call
    from bench_checks import check_dispatch

    check_dispatch(data)
    for e in data["dispatch"]:
        assert len(e["decisions"]) == 1, e
        d = e["decisions"][0]
        row = next(x for x in rows
                   if x["provider"] == "auto" and all(x[k] == e[k] for k in settings.DISPATCH_CASE_KEYS))
        assert f"auto chose {d['chosen']} (measured: torch " in row["note"], row["note"]
        if e["variant"] == "bn_add_relu":
            assert d["op"] == "bn_act" and d["case"]["residual"] == ["float32", "cl"] and d["sites"] == ["ops.bn_act"]
        else:
            assert d["op"] == "conv_bias_act" and d["sites"] == ["ops.conv_bias_act"] and d["case"]["grad"] is False
            assert (d["case"]["residual"] is not None) == (e["variant"] == "conv_bn_add_relu")
            cin, h, _, cout, _, _, k, st = map(int, SHAPE.match(e["shape"]).groups())
            assert d["case"]["x"] == [2, cin, h, h] and d["case"]["weight"] == [cout, cin, k, k]
            assert d["case"]["stride"] == [st, st] and d["case"]["layout"] == "cl"
    assert "| auto ms |" in md and "| cuda/conv |" in md and "| auto GB/s |" in md
    assert "\n| model | conv | shape |" in md and "\n| model | op | shape |" in md and "goal (cuda conv_bn" in md
    assert "resnet50" in r.stdout and "wrn28-10" in r.stdout


def _write_peaks(path: Path) -> dict:
    d = peaks.Peaks("cpu: fake", 123.0, {"fp32": 4.5}, copy_bytes=1, matmul_n={"fp32": 7}).as_dict()
    path.write_text(json.dumps(d))
    return d


def test_peaks_file_is_used_instead_of_measuring(tmp_path, monkeypatch):
    def no_measure(*a, **k):
        raise AssertionError("peaks.measure called although --peaks was given")

    monkeypatch.setattr(peaks, "measure", no_measure)
    want = _write_peaks(tmp_path / "peaks.json")
    rc = layers.main(["--device", "cpu", "--models", "wrn28-10", "--providers", "eager", "--convs",
                      "layer3.0.shortcut", "--ops", "bn_relu", "channel_stats", "--peaks", str(tmp_path / "peaks.json"),
                      "--out", str(tmp_path / "out")])
    assert rc == 0
    data, rows, _ = _results(tmp_path / "out")
    assert data["peaks"] == want and data["peaks_source"] == f"file: {tmp_path / 'peaks.json'}"
    _check_against_peaks(rows, want)
    assert {x["variant"] for x in rows} == {"conv_alone", "conv_bn_relu", "conv_bn_add_relu", "bn_relu",
                                            "channel_stats"}
    assert all(x["correct"] and x["median_ms"] > 0 for x in rows)
    with pytest.raises(SystemExit, match="no matmul peak"):  # a file without the run's dtype is refused
        layers.main(["--device", "cpu", "--dtypes", "fp16", "--peaks", str(tmp_path / "peaks.json"), "--no-write"])


def test_wrong_provider_is_recorded_and_not_timed(tmp_path, monkeypatch, capsys):
    """A fused conv and a memory op 1% off (``cuda`` and ``auto`` faked: no library needed):
    correct=false, no time, the floor still given, exit code 1; the others correct and timed; an
    unavailable provider skipped with its reason."""
    monkeypatch.setattr(common, "provider_unavailable",
                        lambda p, d: "deliberately unavailable" if p == "triton" else None)
    real = layer_ops.conv_fn

    def fn(provider, variant, job, case, allow_tf32):
        if provider in ("cuda", "auto") and variant != "conv_alone":
            eager = real("eager", variant, job, case, allow_tf32)
            return lambda x, r: eager(x, r) * 1.01
        return real(provider, variant, job, case, allow_tf32)

    def broken(op, d):
        return tuple(t * 1.01 if t.is_floating_point() else t for t in layer_ops.run_eager(op, d))

    monkeypatch.setattr(layer_ops, "conv_fn", fn)
    monkeypatch.setitem(layer_ops.RUNNERS, "cuda", broken)
    monkeypatch.setitem(layer_ops.RUNNERS, "auto", broken)
    pk = _write_peaks(tmp_path / "p.json")
    rc = layers.main(["--device", "cpu", "--models", "resnet50", "--providers", "eager", "cuda", "triton", "auto",
                      "--convs", "layer1.0.conv3", "--acts", "1024x14", "--ops", "bn_add_relu", "--peaks",
                      str(tmp_path / "p.json"), "--out", str(tmp_path / "out")])
    assert rc == 1
    data, rows, md = _results(tmp_path / "out")
    assert data["skipped"] == {"triton": "deliberately unavailable"}
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
    assert "| WRONG |" in md and "met in 0 of 1 cases" not in md  # untimed rows are no goal cases
    out = capsys.readouterr()
    assert "WRONG resnet50 layer1.0.conv3" in out.err and "WRONG bn_add_relu" in out.err
    assert "triton skipped: deliberately unavailable" in out.out


def test_auto_excludes_a_wrong_candidate_and_the_json_says_so(tmp_path, monkeypatch):
    """A candidate 1% off, registered with the dispatch and made the fastest by an injected clock:
    the auto rows stay correct and the JSON's decision names it excluded with its error. Each key
    is measured in the row's checked call, none while timing."""
    from resnet_fused import dispatch
    from resnet_fused.dispatch import candidates as cands
    from bench_checks import check_dispatch, spy_measuring

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
            rc = layers.main(["--device", "cpu", "--models", "resnet50", "--providers", "eager", "auto",
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
    rc = layers.main(["--device", "cpu", "--models", "wrn28-10", "--providers", "eager", "--deadline", "0",
                      "--out", str(tmp_path)])
    assert rc == 0 and not list(tmp_path.glob("*_layers.json"))
    assert "past the deadline" in capsys.readouterr().err
