"""benchmarks/bench_train.py: the CPU mode end to end (a subprocess, Triton kernels through the
interpreter, the compiled library's C++ kernels as the cuda provider where it loads), a broken
provider recorded as wrong and untimed (in process, monkeypatched), the auto provider measuring in
its checked step only (the harness bench_wrn and bench_models' training share), the AMP step on the
PyTorch path, and the GPU configuration checked without a GPU (case names, state_dict compatibility, probe
names, output shapes).

The subprocess runs with one intra-op thread, as tests/test_bench_and_main.py does.
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

from benchmarks import bench_train, common  # noqa: E402
from resnet_fused import backends  # noqa: E402
from utils import run_bench_cpu  # noqa: E402
from test_bench_models import check_dispatch, spy_measuring  # noqa: E402

needs_interpreter = pytest.mark.skipif(not backends.triton_interpreting(),
                                       reason="in-process CPU Triton needs TRITON_INTERPRET=1 at import")


def _ext_error():
    """Why the compiled library (the cuda provider) cannot run CPU tensors here, or None."""
    return backends.unavailable_reason("cuda", torch.device("cpu"))


def _rows(out_dir: Path):
    files = sorted(out_dir.glob("*_train.json"))
    assert len(files) == 1, files
    data = json.loads(files[0].read_text())
    assert tuple(data) == ("env", "skipped", "dispatch", "rows") and tuple(data["env"]) == common.ENV_KEYS
    with open(files[0].with_suffix(".csv")) as f:
        assert len(list(csv.DictReader(f))) == len(data["rows"])
    return data["rows"]


def _check_timed(row, dtype="fp32"):
    assert tuple(row) == common.ROW_KEYS
    assert row["bench"] == "train" and row["mode"] == "train_step" and row["dtype"] == dtype
    assert row["correct"] is True, row
    assert row["median_ms"] > 0 and row["p20_ms"] <= row["median_ms"] <= row["p80_ms"], row
    assert math.isclose(row["images_per_s"], row["batch"] * 1e3 / row["median_ms"], rel_tol=1e-3)
    assert row["peak_mem_mb"] is None  # CPU


def _check_untimed(row):
    assert row["correct"] is False
    assert row["median_ms"] is None and row["p20_ms"] is None and row["p80_ms"] is None
    assert row["images_per_s"] is None and row["peak_mem_mb"] is None


# ------------------------------------------------------------------------------------ end to end
def test_cpu_mode_end_to_end(tmp_path):
    pytest.importorskip("triton")
    r = run_bench_cpu("benchmarks.bench_train", tmp_path, timeout=240)
    rows = _rows(tmp_path)
    names = ["resnet50.layer1.1", "resnet50.layer2.0", "wrn10-1"]
    providers = ("eager", "triton") + (("cuda",) if _ext_error() is None else ())
    assert [(x["model"], x["provider"]) for x in rows] == [(n, p) for n in names for p in providers]
    for row in rows:
        _check_timed(row)
        assert row["batch"] == 2
    assert {x["model"]: x["shape"] for x in rows} == {"resnet50.layer1.1": "16x8x8", "resnet50.layer2.0": "16x8x8",
                                                      "wrn10-1": "3x8x8"}
    # the triton (and cuda) providers really trained through the fused blocks (one per Bottleneck,
    # three in WRN-10-1)
    for prov in providers[1:]:
        fused = {m: int(n) for m, p, n in re.findall(r"^  (\S+) b2 fp32 (\w+) *; ok .*fused blocks/step (\d+)",
                                                      r.stdout, re.M) if p == prov}
        assert fused == {"resnet50.layer1.1": 1, "resnet50.layer2.0": 1, "wrn10-1": 3}, (prov, r.stdout)
        assert f"eager/{prov}" in r.stdout
    assert "WRONG" not in r.stdout + r.stderr


@needs_interpreter
@pytest.mark.parametrize("how", ["wrong", "raises"])
def test_broken_provider_is_recorded_wrong_and_untimed(tmp_path, monkeypatch, capsys, how):
    from resnet_fused.modules import _base

    real = _base.run_block_train

    def broken(*args, **kwargs):
        if how == "raises":
            raise RuntimeError("deliberately broken kernel")
        return real(*args, **kwargs) * 1.01  # 1% off: far beyond 4x eager's fp32 error

    monkeypatch.setattr(_base, "run_block_train", broken)
    rc = bench_train.main(["--device", "cpu", "--cases", "resnet50.layer1.1", "--providers", "eager", "triton",
                           "--out", str(tmp_path)])
    assert rc == 1
    rows = _rows(tmp_path)
    assert [x["provider"] for x in rows] == ["eager", "triton"]
    _check_timed(rows[0])
    _check_untimed(rows[1])
    err = capsys.readouterr().err
    assert ("WRONG resnet50.layer1.1 b2 fp32 triton" if how == "wrong" else "FAILED resnet50.layer1.1") in err, err


def test_triton_skipped_with_a_note_without_the_interpreter(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(backends, "triton_interpreting", lambda: False)
    rc = bench_train.main(["--device", "cpu", "--cases", "resnet50.layer2.0", "--providers", "eager", "triton",
                           "--out", str(tmp_path)])
    assert rc == 0
    rows = _rows(tmp_path)
    assert [x["provider"] for x in rows] == ["eager"]
    _check_timed(rows[0])
    assert "triton skipped" in capsys.readouterr().out
    skipped = json.loads(next(tmp_path.glob("*_train.json")).read_text())["skipped"]
    assert list(skipped) == ["triton"] and "TRITON_INTERPRET=1" in skipped["triton"]


def test_unavailable_cuda_provider_is_skipped_with_the_reason(tmp_path, monkeypatch, capsys):
    from resnet_fused import _ext

    monkeypatch.setattr(_ext, "load_error", lambda: "deliberately not built")
    rc = bench_train.main(["--device", "cpu", "--cases", "resnet50.layer2.0", "--providers", "eager", "cuda",
                           "--out", str(tmp_path)])
    assert rc == 0
    assert [x["provider"] for x in _rows(tmp_path)] == ["eager"]
    assert json.loads(next(tmp_path.glob("*_train.json")).read_text())["skipped"] == {"cuda": "deliberately not built"}
    assert "cuda skipped: deliberately not built" in capsys.readouterr().out


def test_auto_measures_in_its_checked_step_only(tmp_path, monkeypatch):
    """``auto`` (our block with backend="auto"): its first, checked step measures the block's key;
    no timed step measures; the JSON's "dispatch" holds that decision for the row's case."""
    ops, during = spy_measuring(monkeypatch)
    rc = bench_train.main(["--device", "cpu", "--cases", "resnet50.layer2.0", "--providers", "eager", "auto",
                           "--out", str(tmp_path)])
    assert rc == 0
    rows = _rows(tmp_path)
    assert [x["provider"] for x in rows] == ["eager", "auto"]
    for row in rows:
        _check_timed(row)
    data = json.loads(next(tmp_path.glob("*_train.json")).read_text())
    check_dispatch(data)
    (entry,) = data["dispatch"]
    assert (entry["model"], entry["batch"], entry["mode"]) == ("resnet50.layer2.0", 2, "train_step")
    assert entry["layout"] == ""  # bench_train's rows have no layout column (channels_last throughout)
    (d,) = entry["decisions"]
    assert d["op"] == "block_train" and d["case"]["block"] == "Bottleneck" and d["sites"] == ["Bottleneck"]
    assert d["case"]["shortcut"] is not None and d["case"]["x"][0] == 2  # layer2.0: the projection shortcut
    assert ops == ["block_train"] and during == []


def test_amp_step_on_the_pytorch_path(tmp_path):
    """fp16 autocast, the static loss scale and the block's output gradient, judged by the same
    checks (the "torch" provider runs our modules module by module: eager's numerics)."""
    rc = bench_train.main(["--device", "cpu", "--providers", "eager", "torch", "--dtypes", "fp16",
                           "--cases", "resnet50.layer2.0", "wrn10-1", "--out", str(tmp_path)])
    assert rc == 0
    rows = _rows(tmp_path)
    assert [(x["model"], x["provider"]) for x in rows] == [
        ("resnet50.layer2.0", "eager"), ("resnet50.layer2.0", "torch"), ("wrn10-1", "eager"), ("wrn10-1", "torch")]
    for row in rows:
        _check_timed(row, dtype="fp16")


# ---------------------------------------------------------------------- GPU configuration, on CPU
def test_gpu_job_lists():
    quick = [(j.case.name, j.batch, j.dtype) for j in bench_train.gpu_jobs(quick=True)]
    assert quick == [("resnet50.layer1.1", 256, "fp16"), ("resnet50.layer2.0", 256, "fp16"),
                     ("resnet50", 256, "fp16"), ("wrn28-10", 128, "fp16")]
    full = [(j.case.name, j.batch, j.dtype) for j in bench_train.gpu_jobs(quick=False)]
    assert len(full) == 8 + 1 + 2 and full[-2:] == [("wrn28-10", 128, "fp16"), ("wrn28-10", 128, "fp32")]
    assert {j.case.chw for j in bench_train.gpu_jobs(quick=False) if j.case.kind == "model"} == {(3, 224, 224),
                                                                                                 (3, 32, 32)}
    args = bench_train.parse_args(["--quick", "--device", "cpu", "--no-compile"])
    assert bench_train.make_config(args).deadline is not None  # --quick stops starting providers in time
    with pytest.raises(SystemExit, match="--cases"):
        bench_train.make_config(bench_train.parse_args(["--device", "cpu", "--cases", "resnet7"]))


def test_gpu_cases_build_probe_and_shape():
    """Every full-mode case: ours takes the reference's state_dict, the checked parameters and
    buffers exist in both, and a block's declared output shape is its real one."""
    seen = set()
    for job in bench_train.gpu_jobs(quick=False):
        case = job.case
        if case.name in seen:
            continue
        seen.add(case.name)
        ref, ours = case.build_ref(), case.build_ours("triton")
        ours.load_state_dict(ref.state_dict(), strict=True)
        for m in (ref, ours):
            params, bufs = dict(m.named_parameters()), dict(m.named_buffers())
            assert all(p in params for p in case.probes), (case.name, [p for p in case.probes if p not in params])
            assert all(b in bufs for b in case.buffers), (case.name, [b for b in case.buffers if b not in bufs])
        if case.kind == "block":
            with torch.no_grad():
                out = ref.eval()(torch.randn(1, *case.chw))
            assert tuple(out.shape[1:]) == case.out_chw, case.name
        del ref, ours


def test_strict_fp32_restores_the_switches():
    before = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    with bench_train.strict_fp32():
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == before


def test_judge_missing_quantity_and_eager_bound():
    ref = {"out": torch.ones(4, dtype=torch.float64), "grad w": torch.ones(3, dtype=torch.float64)}
    good = {"out": torch.ones(4), "grad w": torch.ones(3)}
    assert bench_train.judge(good, ref, None, "fp32").ok
    v = bench_train.judge({"out": torch.ones(4), "grad w": None}, ref, None, "fp32")
    assert not v.ok and v.worst_key == "grad w"
    noisy = {"out": torch.ones(4) * 1.01, "grad w": torch.ones(3)}
    assert not bench_train.judge(noisy, ref, good, "fp32").ok       # eager exact: floor bound
    assert bench_train.judge(noisy, ref, noisy, "fp32").ok          # eager as far off: within 4x
