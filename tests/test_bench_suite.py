"""The benchmark suite's plumbing on CPU: result schema with optional columns, measured peaks and
the roofline floor, the combined per-run file (JSON / CSV / markdown / PNG charts), the README
section, junit parsing, child processes under a time limit, step planning, the auto provider's
helpers (no decision file, a clean dispatch per case, the compact decision record), and one short
real run of ``python -m benchmarks.suite`` (peaks + layers, auto's decisions carried into the
combined file). CI also runs the whole CPU suite from the
README's test commands."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import common, peaks, report, settings, suite  # noqa: E402

ENV = {"gpu": "NVIDIA H100 80GB HBM3", "driver": "580.1", "torch": "2.11", "triton": "3.6", "cuda": "13.0",
       "git_commit": "0123456789abcdef0123456789abcdef01234567", "timestamp": "2026-11-22T10:00:00+00:00"}


def _t(ms):
    return common.Timing(ms, ms * 0.9, ms * 1.1, 20)


def _rows():
    rows = []
    for net, paper in (("resnet164", 85.0), ("wrn28-10", 312.0)):
        for prov, ms in (("eager", 40.0), ("triton", 30.0), ("cuda", 28.0)):
            rows.append(common.make_row(bench="wrn", model=net, shape="3x32x32", batch=32, dtype="fp16",
                                        mode="train_step", provider=prov, timing=_t(ms), peak_mem_mb=100.0,
                                        correct=True, extra={"layout": "channels_last", "compile_s": None,
                                                             "paper_ms": paper}))
    for prov, variant, ms, ok in (("eager", "", 100.0, True), ("compile", "default", 80.0, True),
                                  ("compile", "max-autotune+freezing", 70.0, True), ("triton", "", 60.0, True),
                                  ("cuda", "", None, False)):
        rows.append(common.make_row(bench="models", model="resnet50", shape="3x224x224", batch=256, dtype="fp16",
                                    mode="infer", provider=prov, timing=_t(ms) if ms else None, peak_mem_mb=None,
                                    correct=ok, extra={"variant": variant, "layout": "channels_last",
                                                       "compile_s": 30.0 if prov == "compile" else None}))
    for prov, variant, fp, fc in (("eager", "conv_alone", 0.6, None), ("cuda", "conv_bn_relu", 0.55, None),
                                  ("cuda", "bn_relu", None, 0.9), ("eager", "bn_relu", None, 0.3)):
        rows.append(common.make_row(bench="layers", model="resnet50", shape="64x56x56", batch=256, dtype="fp16",
                                    mode="infer" if fp else "train_step", provider=prov, timing=_t(1.0),
                                    peak_mem_mb=None, correct=True,
                                    extra={"variant": variant, "layout": "channels_last", "tflops": fp and fp * 700,
                                           "frac_of_peak": fp, "gbps": fc and fc * 3000, "frac_of_copy": fc,
                                           "floor_ms": 0.5, "note": ""}))
    return rows


# ------------------------------------------------------------------------------ the auto provider
def test_dispatch_isolated_restores_the_cache_setting(monkeypatch):
    from resnet_fused.dispatch import CACHE_DIR_ENV, cache_path

    for before in ("/tmp/somewhere", None):
        if before is None:
            monkeypatch.delenv(CACHE_DIR_ENV, raising=False)
        else:
            monkeypatch.setenv(CACHE_DIR_ENV, before)
        with pytest.raises(RuntimeError, match="inside"):
            with settings.dispatch_isolated():
                assert os.environ[CACHE_DIR_ENV] == "" and cache_path() is None  # persistence off
                raise RuntimeError("inside")
        assert os.environ.get(CACHE_DIR_ENV) == before


def test_auto_and_cudnn_fused_availability():
    assert common.provider_unavailable("auto", torch.device("cpu")) is None  # measures what can run
    assert common.provider_unavailable("cudnn_fused", torch.device("cpu")).startswith("CUDA only")
    assert {"auto", "cudnn_fused"} <= set(common.PROVIDERS)


def test_dispatch_record_entry_note_and_late_keys():
    """A real auto call with an injected clock (torch 1 ms, every other candidate 0.5 ms): the
    compact record of the decision, the entry for a result file, the note, a late key."""
    import resnet_fused
    from resnet_fused import dispatch
    from resnet_fused.ops import conv_bias_act

    cpu = torch.device("cpu")
    ext = resnet_fused.backends.unavailable_reason("cuda", cpu) is None
    x = torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    w = torch.randn(5, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    previous = dispatch.set_timer(lambda runs, dev: {n: [1.0 if n == "torch" else 0.5] * 3 for n in runs})
    try:
        with settings.dispatch_isolated(), torch.no_grad():
            settings.dispatch_fresh()
            assert settings.dispatch_record() == {"env": {}, "decisions": []}
            conv_bias_act(x, w, None, None, padding=1, backend="auto")
            warm = settings.dispatch_record()
            conv_bias_act(x, w, None, None, padding=1, backend="auto")  # a decided key: nothing new
            record = settings.dispatch_record()
            assert settings.dispatch_late(warm, record) is None
            conv_bias_act(x[:1], w, None, None, padding=1, backend="auto")  # a new shape: a new key
            late = settings.dispatch_late(warm, settings.dispatch_record())
            settings.dispatch_fresh()
            assert settings.dispatch_record()["decisions"] == []
    finally:
        dispatch.set_timer(previous)
        dispatch.forget()
    assert late == "auto: 1 dispatch key(s) first seen after the warm-up: measured inside the timed region"
    assert tuple(record) == ("env", "decisions")
    assert record["env"]["device"] == common.device_name(cpu) and record["env"]["threads"] == torch.get_num_threads()
    assert set(record["env"]) == {"device", "threads", "resnet_fused", "torch", "triton"}
    (d,) = record["decisions"]
    assert tuple(d) == settings.DECISION_KEYS and d["op"] == "conv_bias_act" and d["source"] == "measured"
    assert d["chosen"] == ("cuda" if ext else "torch") and d["sites"] == ["ops.conv_bias_act"]
    assert d["candidates"]["torch"] == 1.0 and d["candidates"]["cudnn_fused"] == "unsupported: CUDA only"
    assert d["case"]["x"] == [2, 4, 6, 6] and d["case"]["weight"] == [5, 4, 3, 3] and d["case"]["relu"] is True
    assert d["case"]["candidates"] == ["torch"] + (["cuda"] if ext else [])
    assert not set(d["case"]) & set(settings.DISPATCH_ENV_FIELDS)
    row = {"model": "m", "shape": "s", "batch": 2, "dtype": "fp32", "mode": "infer", "provider": "auto"}
    entry = settings.dispatch_entry(row, record)
    assert entry == {"model": "m", "shape": "s", "batch": 2, "dtype": "fp32", "mode": "infer", "layout": "",
                     "variant": "", "env": record["env"], "decisions": record["decisions"]}
    assert settings.auto_note(record["decisions"]) == (
        "auto chose cuda (measured: torch 1 ms, cuda 0.5 ms)" if ext else "auto chose torch (measured: torch 1 ms)")


def test_auto_note_forms():
    one = {"op": "bn_act", "chosen": "torch", "source": "measured",
           "candidates": {"torch": 0.25, "cuda": "excluded: output 0: relative error 1 > 0.0001",
                          "triton": "unsupported: CUDA only"}}
    assert settings.auto_note([one]) == "auto chose torch (measured: torch 0.25 ms; cuda excluded)"
    many = [dict(one, op="conv_bias_act", chosen="cuda"), dict(one, op="conv_bias_act", chosen="torch"),
            dict(one, op="conv_bias_act", chosen="cuda"), dict(one, op="block_train")]
    assert settings.auto_note(many) == "auto: conv_bias_act cuda 2, torch 1; block_train torch 1"
    assert settings.auto_note([]) == "auto: no dispatch decision"


# ------------------------------------------------------------------------------------------ schema
def test_make_row_extra_columns_in_schema_order():
    row = common.make_row(bench="b", model="m", shape="s", batch=2, dtype="fp32", mode="infer", provider="eager",
                          timing=_t(2.0), peak_mem_mb=None, correct=True,
                          extra={"note": "n", "variant": "v", "tflops": 1.234567891})
    assert tuple(row) == common.ROW_KEYS + ("variant", "tflops", "note")
    assert tuple(row) == common.row_keys("note", "tflops", "variant")
    assert row["tflops"] == 1.23457 and common.is_timing_row(row)
    with pytest.raises(ValueError, match="unknown columns \\['speed'\\]"):
        common.make_row(bench="b", model="m", shape="s", batch=2, dtype="fp32", mode="infer", provider="eager",
                        timing=None, peak_mem_mb=None, correct=False, extra={"speed": 1})
    with pytest.raises(ValueError, match="unknown columns"):
        common.row_keys("speed")
    assert not common.is_timing_row({"bench": "x"})
    assert not common.is_timing_row({**row, "speed": 1})


def test_write_results_with_extra_columns(tmp_path):
    rows = _rows()[:3]
    keys = common.row_keys("layout", "compile_s", "paper_ms")
    jpath, cpath = common.write_results(tmp_path, "wrn", ENV, rows, keys=keys)
    assert tuple(json.loads(jpath.read_text())["rows"][0]) == keys
    with open(cpath) as f:
        assert tuple(next(csv.DictReader(f))) == keys
    with pytest.raises(ValueError, match="expected keys"):
        common.write_results(tmp_path, "wrn", ENV, rows)  # ROW_KEYS alone does not describe them


# ------------------------------------------------------------------------------------------- peaks
def test_peaks_cpu_and_roofline():
    p = peaks.measure(torch.device("cpu"), dtypes=("fp32",), quick=True)
    assert p.copy_gbps > 0 and p.matmul_tflops["fp32"] > 0 and p.matmul_n["fp32"] == 256
    assert peaks.Peaks.from_dict(json.loads(json.dumps(p.as_dict()))) == p
    fake = peaks.Peaks("gpu", copy_gbps=1000.0, matmul_tflops={"fp16": 500.0})
    assert peaks.roofline_floor_ms(1e12, 1e6, fake, "fp16") == pytest.approx(2.0)  # compute-bound: 1e12 / 5e14
    assert peaks.roofline_floor_ms(1e6, 1e9, fake, "fp16") == pytest.approx(1.0)  # memory-bound: 1e9 / 1e12
    assert "copy 1000 GB/s" in peaks.describe(fake) and "fp16 500" in peaks.describe(fake)


# ----------------------------------------------------------------------------------------- combine
def test_combine_writes_json_csv_markdown_and_charts(tmp_path):
    pytest.importorskip("matplotlib")
    rows = _rows()
    suite_facts = {"mode": "quick", "steps": [{"step": "wrn", "status": "PASS", "seconds": 3.0, "note": ""}],
                   "goals": ["models: resnet50 infer fused/eager 1.67x (goal 1.5x): met"],
                   "peaks": {"device": "gpu", "copy_gbps": 3000.0, "matmul_tflops": {"fp16": 700.0},
                             "copy_bytes": 1, "matmul_n": {"fp16": 8192}}}
    paths = report.combine(tmp_path, ENV, rows, suite_facts)
    stem = "2026-11-22_nvidia-h100-80gb-hbm3_0123456"
    assert paths["json"].name == f"{stem}.json"
    data = json.loads(paths["json"].read_text())
    assert list(data) == ["env", "suite", "rows"] and tuple(data["env"]) == common.ENV_KEYS
    assert all(tuple(r) == report.ALL_KEYS for r in data["rows"]) and len(data["rows"]) == len(rows)
    assert data["rows"][0]["variant"] is None and data["rows"][0]["paper_ms"] == 85.0
    with open(paths["csv"]) as f:
        got = list(csv.DictReader(f))
    assert len(got) == len(rows) and tuple(got[0]) == report.ALL_KEYS
    for bench in ("wrn", "models", "layers"):
        png = paths[f"png_{bench}"]
        assert png.name == f"{stem}_{bench}.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = paths["md"].read_text()
    assert "NVIDIA H100 80GB HBM3" in md and "0123456789abcdef" in md
    assert "### wrn" in md and f"![wrn]({stem}_wrn.png)" in md and "paper ms" in md
    assert "goal 1.5x" in md and "copy 3000 GB/s" in md
    # the wrong cuda row is shown as WRONG, compile variants are columns of their own
    line = next(ln for ln in md.splitlines() if ln.startswith("| resnet50 | 3x224x224 | 256 |"))
    assert "WRONG" in line and "1.43x" in line and "1.25x" in line  # 100/70 and 100/80
    with pytest.raises(ValueError, match="not in the shared schema"):
        report.combine(tmp_path, ENV, [{"bench": "x"}], {})


def test_summary_markdown_ratios():
    md = report.summary_markdown("wrn", _rows()[:3])
    header, _, line = md.splitlines()
    assert "eager/triton" in header and "paper ms" in header
    assert "| 85.0 | 40.000 | 30.000 | 1.33x | 28.000 | 1.43x |" in line


def test_update_readme_replaces_only_the_section(tmp_path):
    pytest.importorskip("matplotlib")
    res = tmp_path / "benchmarks" / "results"
    paths = report.combine(res, ENV, _rows(), {"mode": "quick"})
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.README_BEGIN}\nold table\n{report.README_END}\noutro\n")
    report.update_readme(readme, paths["json"], link_dir="benchmarks/results")
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith(f"{report.README_END}\noutro\n")
    assert "old table" not in text and "NVIDIA H100" in text
    assert f"(benchmarks/results/{paths['json'].stem}_wrn.png)" in text
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="results:begin"):
        report.update_readme(readme, paths["json"])


def test_plot_needs_timed_rows(tmp_path):
    rows = [dict(r, correct=False, median_ms=None) for r in _rows()]
    assert report.plot_bench("wrn", rows, tmp_path / "x.png") is None and not (tmp_path / "x.png").exists()


# ---------------------------------------------------------------------------------------- children
def test_junit_counts(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite tests="10" failures="2" errors="1" skipped="3"/></testsuites>')
    assert suite.junit_counts(xml) == {"passed": 4, "failed": 2, "errors": 1, "skipped": 3}
    assert suite.junit_counts(tmp_path / "missing.xml") == {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}


def test_proc_echoes_logs_and_stops_at_its_limit(tmp_path, capsys):
    env = dict(os.environ)
    ok = suite.Proc("ok", [sys.executable, "-c", "print('hello'); print('world')"], tmp_path / "ok.log", 30)
    assert ok.start(env, tmp_path).wait() == 0 and suite.status_of(ok) == "PASS"
    assert (tmp_path / "ok.log").read_text() == "hello\nworld\n"
    assert "ok | hello" in capsys.readouterr().out
    code = "import time, sys\ntry:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n    print('stopped'); sys.exit(3)"
    slow = suite.Proc("slow", [sys.executable, "-c", code], tmp_path / "slow.log", 1.0)
    t0 = time.monotonic()
    slow.start(env, tmp_path).wait()
    assert time.monotonic() - t0 < 30 and slow.timed_out and suite.status_of(slow) == "TIMEOUT"
    assert "stopped" in (tmp_path / "slow.log").read_text()  # SIGINT first: it could say so
    bad = suite.Proc("bad", [sys.executable, "-c", "raise SystemExit(2)"], tmp_path / "bad.log", 30)
    bad.start(env, tmp_path).wait()
    assert suite.status_of(bad) == "FAIL(rc=2)"


def test_plan_caps_steps_and_arguments(tmp_path):
    args = suite.parse_args(["--device", "cpu", "--out", str(tmp_path), "--skip", "build"])
    plan = suite.make_plan(args)
    assert plan.mode == "cpu" and plan.deadline is None and plan.cap("wrn") is None
    assert plan.steps == ["env", "precompile", "smoke", "models", "wrn", "peaks", "layers"]
    assert plan.parts.parent == tmp_path and plan.parts.name.endswith("_parts")
    argv = suite.bench_argv(plan, "wrn", None)
    assert argv[1:3] == ["-m", "benchmarks.wrn_fig4"] and "--quick" not in argv and argv[-2:] == ["--device", "cpu"]
    plan.peaks_file = tmp_path / "peaks.json"
    assert suite.bench_argv(plan, "layers", None)[-2:] == ["--peaks", str(tmp_path / "peaks.json")]
    # quick mode: caps cut to what is left of the deadline; benchmarks told their own deadline
    quick = suite.Plan("cuda", "quick", list(suite.QUICK_STEPS), suite.elapsed() + 100.0, tmp_path, tmp_path)
    assert quick.cap("models") == pytest.approx(90.0, abs=1.0)  # 100 s left - 10 s for the summary
    assert quick.cap("env") == 20
    argv = suite.bench_argv(quick, "models", 90.0)
    assert "--quick" in argv and argv[argv.index("--deadline") + 1] == "72"
    assert suite.run_tests(suite.Plan("cpu", "cpu", [], None, tmp_path, tmp_path))[0].status == "SKIPPED"
    assert set(suite.FULL_STEPS) > set(suite.QUICK_STEPS) and "tests" not in suite.QUICK_STEPS
    assert all(s in suite.BENCH_STEPS or s in ("env", "build", "precompile", "smoke", "tests", "peaks", "main")
               for s in suite.ALL_STEPS)
    assert all(s in suite.QUICK_CAPS for s in suite.QUICK_STEPS)
    shard_names = [n for n, _ in suite.SHARDS]
    assert set(suite.QUICK_SHARDS) <= set(shard_names)


def test_device_run_plumbing(tmp_path):
    """The pieces of the 8-file device run: the build's environment, the precompile command (CPU:
    recording only), result names outside OUT, and the packed parts."""
    args = suite.parse_args(["--device", "cpu", "--out", str(tmp_path / "out"), "--parts", str(tmp_path / "p"),
                             "--pack", "--steps", "env", "tests"])
    plan = suite.make_plan(args)
    assert plan.parts == tmp_path / "p" and plan.pack and plan.explicit and plan.steps == ["env", "tests"]
    assert suite.child_env(plan, "build")["MAX_JOBS"] == str(os.cpu_count() or 1)
    # (CPU: no GPU architecture to narrow the build to; on a GPU it is the GPU's own)
    assert suite.child_env(plan, "build").get("RESNET_FUSED_CUDA_ARCHS") == os.environ.get("RESNET_FUSED_CUDA_ARCHS")
    code = suite.precompile_argv(plan)[2]
    assert "'--record-only'" in code and "'--precompile'" not in code and code.count("'--models'") == 2
    assert "'resnet50'" in code and "'preact_resnet1001'" in code
    plan.parts.mkdir()
    (plan.parts / "env.log").write_text("hello\n")
    assert plan.rel(plan.parts / "env.log") == "parts/env.log"
    assert plan.rel(plan.out / "x.json") == "x.json"
    plan.out.mkdir()
    packed = suite.pack_parts(plan, "stem")
    import tarfile

    with tarfile.open(packed) as tar:
        assert tar.extractfile("stem_parts/env.log").read() == b"hello\n"
    assert [p.name for p in plan.out.iterdir()] == ["stem_parts.tar.gz"]


def test_goal_lines_take_strings_lists_and_dicts():
    facts = {"wrn": {"goal": "3 of 5 networks >= 1.3x"}, "models": {"goals": {"infer": "met", "train": {"x": 1}}},
             "layers": {"goals": ["a", {"b": 2}]}, "blocks": {}}
    assert suite.goal_lines(facts) == ["wrn: 3 of 5 networks >= 1.3x", "models: infer: met", 'models: train: {"x": 1}',
                                       "layers: a", 'layers: {"b": 2}']
    wrn = {"dtype": "fp16", "provider": "cuda", "target": 1.3, "met": 4, "of": 5, "worst_model": "resnet1001",
           "worst_speedup": 1.1}
    assert suite.goal_lines({"wrn": {"ratios": {"goal": [wrn], "thin_wide": []}}}) == \
        ["wrn: fp16 cuda: 4 of 5 >= 1.3x; worst resnet1001 1.1x"]  # one level down, as wrn_fig4 writes it


# --------------------------------------------------------------------------------------- a real run
def test_suite_cpu_run_end_to_end(tmp_path):
    """``python -m benchmarks.suite --device cpu --steps peaks layers``: the per-benchmark files in
    the parts folder, the combined files with the layer rows and the peaks, exit code 0."""
    from resnet_fused import _ext

    if _ext.load_error() is not None:
        pytest.skip(f"the compiled library is unavailable: {_ext.load_error()}")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("TRITON_INTERPRET", None)  # triton skipped with its reason: the plumbing is what is tested
    r = subprocess.run([sys.executable, "-m", "benchmarks.suite", "--device", "cpu", "--steps", "peaks", "layers",
                        "--out", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "[suite 00:" in r.stdout and "layers | " in r.stdout and "ALL STEPS PASSED" in r.stdout
    combined = [p for p in tmp_path.glob("*.json")]
    assert len(combined) == 1 and "_cpu-" in combined[0].name
    data = json.loads(combined[0].read_text())
    assert data["suite"]["mode"] == "cpu" and [s["step"] for s in data["suite"]["steps"]] == ["peaks", "layers"]
    assert data["suite"]["peaks"]["copy_gbps"] > 0
    assert data["rows"] and {r["bench"] for r in data["rows"]} == {"layers"}
    assert all(r["correct"] and r["median_ms"] is not None for r in data["rows"])
    assert data["suite"]["benchmarks"]["layers"]["peaks"] == data["suite"]["peaks"]  # handed over, not re-measured
    # auto ran (triton skipped without the interpreter, cudnn_fused without CUDA, compile on CPU) and its decisions,
    # one per auto row, travel into the combined file
    auto = [r for r in data["rows"] if r["provider"] == "auto"]
    assert auto and len(data["suite"]["benchmarks"]["layers"]["dispatch"]) == len(auto)
    assert set(data["suite"]["benchmarks"]["layers"]["skipped"]) == {"compile", "triton", "cudnn_fused"}
    parts = combined[0].with_name(combined[0].stem + "_parts")
    assert (parts / "layers.log").exists() and list(parts.glob("*_layers.json"))
    assert combined[0].with_suffix(".csv").exists() and combined[0].with_suffix(".md").exists()
    assert list(tmp_path.glob("*_layers.png")) or "matplotlib unavailable" in r.stderr
