"""The benchmark harness and ``python -m resnet_fused``: unit tests of the timing / statistics /
result-file helpers, and the two command lines run end to end as subprocesses (CPU sizes).

The subprocesses run with one intra-op thread: on a small shared CI machine two OpenMP threads
competing with other work make a forward pass tens of times slower, and this file must stay short.
"""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # benchmarks/ is not installed with the package: import it from the tree
    sys.path.insert(0, str(REPO))

from benchmarks import common  # noqa: E402


def _run(args, tmp_path, extra_env=None, timeout=240):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["OMP_NUM_THREADS"] = "1"
    env.pop("TRITON_INTERPRET", None)
    env.update(extra_env or {})
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _check_rows(rows, providers):
    assert rows, "no rows written"
    for row in rows:
        assert tuple(row) == common.ROW_KEYS
        assert row["mode"] in common.MODES and row["provider"] in providers
        assert row["dtype"] == "fp32" and isinstance(row["batch"], int) and row["batch"] >= 1
        assert row["correct"] is True, row
        assert row["median_ms"] > 0 and row["p20_ms"] <= row["median_ms"] <= row["p80_ms"], row
        assert math.isclose(row["images_per_s"], row["batch"] * 1e3 / row["median_ms"], rel_tol=1e-3)
        assert row["peak_mem_mb"] is None  # CPU


# ------------------------------------------------------------------------------------ statistics
def test_quantile_matches_torch_and_known_values():
    s = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert common.quantile(s, 0.5) == 3.0
    assert common.quantile(s, 0.0) == 1.0 and common.quantile(s, 1.0) == 5.0
    assert math.isclose(common.quantile(s, 0.2), 1.8)
    vals = torch.rand(101, dtype=torch.float64)
    for q in (0.2, 0.5, 0.8, 0.37):
        assert math.isclose(common.quantile(vals.tolist(), q), torch.quantile(vals, q).item(), rel_tol=1e-12)
    assert common.quantile([7.0], 0.8) == 7.0
    with pytest.raises(ValueError, match="samples"):
        common.quantile([], 0.5)
    with pytest.raises(ValueError, match="q"):
        common.quantile([1.0], 1.5)


def test_summarize_orders_quantiles():
    t = common.summarize([3.0, 1.0, 2.0, 10.0, 4.0])
    assert (t.median_ms, t.n) == (3.0, 5)
    assert t.p20_ms <= t.median_ms <= t.p80_ms


def test_rotation_copies():
    mib = 2**20
    assert common.rotation_copies(200 * mib, 50 * mib) == 1
    assert common.rotation_copies(30 * mib, 50 * mib) == 4  # 120 MiB > 2 x 50 MiB
    assert common.rotation_copies(1, 50 * mib, max_copies=8) == 8
    assert common.rotation_copies(0, 50 * mib) == 1


def test_benchmark_cpu_times_calls_and_rotates_inputs():
    seen = []

    def fn(i):
        seen.append(i)
        time.sleep(0.002)

    t = common.benchmark(fn, [(0,), (1,), (2,)], torch.device("cpu"), warmup=2, min_reps=12, budget_s=0.0)
    assert t.n == 12
    assert 2.0 <= t.median_ms < 50.0  # sleep(2 ms) never returns early
    assert t.p20_ms <= t.median_ms <= t.p80_ms
    assert len(seen) == 14 and set(seen) == {0, 1, 2}
    with pytest.raises(ValueError, match="inputs"):
        common.benchmark(fn, [], torch.device("cpu"))


def test_benchmark_cpu_respects_budget():
    t0 = time.perf_counter()
    t = common.benchmark(lambda: None, [()], torch.device("cpu"), warmup=0, min_reps=5, budget_s=0.05)
    assert t.n >= 5 and time.perf_counter() - t0 < 5.0
    assert common.peak_mem_mb(lambda: None, (), torch.device("cpu")) is None


# ----------------------------------------------------------------------------------- correctness
def test_rel_err_and_check_output():
    ref = torch.randn(4, 8, dtype=torch.float64)
    assert common.rel_err(ref.float(), ref) < 1e-7
    noisy = ref + 1e-3 * ref.norm() / math.sqrt(ref.numel()) * torch.randn_like(ref)
    assert 1e-4 < common.rel_err(noisy, ref) < 1e-2
    bad = ref.clone()
    bad[0, 0] = float("nan")
    assert common.rel_err(bad, ref) == math.inf
    assert common.rel_err(ref[:2], ref) == math.inf

    eager = ref.float()
    assert common.check_output(ref.float(), ref, eager, "fp32").ok
    chk = common.check_output(noisy.float(), ref, eager, "fp32")
    assert not chk.ok and chk.bound == common.FLOOR["fp32"]
    # a same-dtype eager error of ~1e-3 widens the bound to 4x that
    assert common.check_output(noisy.float(), ref, noisy.float(), "fp32").ok
    assert not common.check_output(bad.float(), ref, eager, "fp32").ok
    assert common.check_output(ref.half(), ref, None, "fp16").ok
    # several eager samples: the largest error sets the bound (None samples are ignored)
    many = common.check_output(noisy.float(), ref, [eager, noisy.float(), None], "fp32")
    assert many.ok and many.eager_err == common.rel_err(noisy.float(), ref)
    assert not common.check_output(noisy.float(), ref, [eager, eager], "fp32").ok
    assert math.isnan(common.check_output(ref.float(), ref, [None], "fp32").eager_err)


# ---------------------------------------------------------------------------------- result files
def test_env_info_keys():
    env = common.env_info(torch.device("cpu"))
    assert tuple(env) == common.ENV_KEYS
    assert env["gpu"].startswith("cpu: ") and env["driver"] is None
    assert env["torch"] == torch.__version__
    assert env["timestamp"].endswith("+00:00")


def test_make_row_and_write_results(tmp_path):
    timing = common.summarize([1.0, 2.0, 3.0])
    row = common.make_row(bench="unit", model="m", shape="3x8x8", batch=4, dtype="fp16", mode="infer",
                          provider="triton", timing=timing, peak_mem_mb=1.5, correct=True)
    assert tuple(row) == common.ROW_KEYS and row["images_per_s"] == 2000.0
    wrong = common.make_row(bench="unit", model="m", shape="3x8x8", batch=4, dtype="fp16", mode="infer",
                            provider="eager", timing=None, peak_mem_mb=None, correct=False)
    assert wrong["median_ms"] is None and wrong["images_per_s"] is None
    with pytest.raises(ValueError, match="mode"):
        common.make_row(bench="u", model="m", shape="s", batch=1, dtype="fp32", mode="train", provider="eager",
                        timing=timing, peak_mem_mb=None, correct=True)
    with pytest.raises(ValueError, match="provider"):
        common.make_row(bench="u", model="m", shape="s", batch=1, dtype="fp32", mode="infer", provider="cudnn",
                        timing=timing, peak_mem_mb=None, correct=True)

    env = {"gpu": "NVIDIA H100 80GB HBM3", "driver": "550.1", "torch": "x", "triton": None, "cuda": "12.4",
           "git_commit": "0123456789abcdef-dirty", "timestamp": "2026-01-02T03:04:05+00:00"}
    jpath, cpath = common.write_results(tmp_path / "out", "unit", env, [row, wrong])
    assert jpath.name == "2026-01-02_nvidia-h100-80gb-hbm3_0123456-dirty_unit.json"
    assert cpath.with_suffix(".json") == jpath
    data = json.loads(jpath.read_text())
    assert data == {"env": env, "rows": [row, wrong]}
    with open(cpath) as f:
        got = list(csv.DictReader(f))
    assert [r["provider"] for r in got] == ["triton", "eager"] and tuple(got[0]) == common.ROW_KEYS
    with pytest.raises(ValueError, match="rows"):
        common.write_results(tmp_path, "unit", env, [{"bench": "x"}])
    with pytest.raises(ValueError, match="env"):
        common.write_results(tmp_path, "unit", {"gpu": "x"}, [row])
    assert common.result_stem({**env, "git_commit": None}, "b").endswith("_nogit_b")


def test_format_table():
    text = common.format_table(["a", "bb"], [["x", 1.5], ["yyy", None]])
    lines = text.splitlines()
    assert lines[0].split() == ["a", "bb"] and lines[2].split() == ["x", "1.5"] and len(lines) == 4


# ------------------------------------------------------------------------------------ end to end
def test_main_resnet18_cpu(tmp_path):
    out = tmp_path / "main.json"
    r = _run(["-m", "resnet_fused", "resnet18", "--batch", "2", "--size", "64", "--iters", "2",
              "--json", str(out)], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    text = r.stdout
    assert "convert swapped 8 blocks + the stem" in text
    for word in ("stock ms", "fused ms", "speedup", "eval", "train step", "PASS", "equivalence: PASS"):
        assert word in text, text
    assert "FAIL" not in text
    data = json.loads(out.read_text())
    assert tuple(data["env"]) == common.ENV_KEYS
    # "auto": the measured dispatch picks per site; the run prints its decisions and saves them
    _check_rows(data["rows"], {"eager", "auto"})
    assert [(r["mode"], r["provider"]) for r in data["rows"]] == [
        ("infer", "eager"), ("infer", "auto"), ("train_step", "eager"), ("train_step", "auto")]
    assert data["summary"]["pass"] is True and data["summary"]["blocks"] == 8
    assert "resnet_fused dispatch:" in text
    decisions = data["summary"]["dispatch"]
    assert {d["op"] for d in decisions} == {"conv_bias_act", "block_train"}
    assert all(d["source"] == "measured" and d["chosen"] in d["candidates"] for d in decisions)


def test_main_rejects_unknown_model_and_unavailable_backend(tmp_path):
    r = _run(["-m", "resnet_fused", "resnet7", "--no-train"], tmp_path)
    assert r.returncode == 2 and "resnet7" in r.stderr
    if list((REPO / "resnet_fused").glob("_C*.so")):
        pytest.skip("an ahead-of-time build of the library is present: --backend cuda is available")
    # without an ahead-of-time build and with just-in-time builds forbidden the library is unavailable
    r = _run(["-m", "resnet_fused", "resnet18", "--backend", "cuda", "--device", "cpu", "--no-train"], tmp_path,
             {"RESNET_FUSED_JIT": "0"})
    assert r.returncode == 2 and "--backend cuda: unavailable" in r.stderr, r.stdout + r.stderr


def test_cpu_model_auto_records_decisions(tmp_path):
    """The CPU whole-model benchmark end to end at a tiny size: eager vs the converted model under
    'auto', both layouts, eval and train step, every row correct, and the dispatch decisions of
    each configuration saved beside the rows."""
    r = _run(["-m", "benchmarks.cpu_model", "--model", "resnet18", "--batches", "2", "--size", "32",
              "--iters", "1", "--repeats", "1", "--out", str(tmp_path)], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    (path,) = tmp_path.glob("*cpu-model-resnet18.json")
    data = json.loads(path.read_text())
    assert [(row["mode"], row["provider"], row["shape"]) for row in data["rows"]] == [
        (m, p, f"3x{s}x{s}_{lay}") for lay in ("nchw", "cl") for m, s in (("infer", 32), ("train_step", 32))
        for p in ("eager", "auto")]
    assert all(row["correct"] for row in data["rows"])
    assert sorted(data["dispatch"]) == ["batch 2 NCHW", "batch 2 channels_last"]
    for runs in data["dispatch"].values():
        assert {d["op"] for d in runs[0]} == {"conv_bias_act", "block_train"}
