"""benchmarks/bench_models.py: the CPU mode end to end (a subprocess; the compiled library's C++
kernels as the cuda provider where it loads), the written JSON / CSV / markdown; the goal verdicts
on synthetic rows; the GPU task lists and the training-batch memory rule without a GPU; the
training cases' probe names on every model; the ``auto`` provider's rows checked and timed like the
others, with each case's dispatch decisions in the JSON (real candidates, measured in the warm-up);
a wrong or failing provider recorded ``correct=false`` and untimed, an unavailable one skipped with
its reason; the compile variants' plumbing (freezing
on only for max-autotune, restored after) with ``torch.compile`` replaced by a recorder.

Subprocesses run with one intra-op thread, as tests/test_bench_and_main.py does.
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

from benchmarks import bench_models, common  # noqa: E402
from resnet_fused import backends  # noqa: E402
from utils import run_bench_cpu  # noqa: E402

MAX = bench_models.MAX_AUTOTUNE


def _ext_error():
    """Why the compiled library (the cuda provider) cannot run CPU tensors here, or None."""
    return backends.unavailable_reason("cuda", torch.device("cpu"))


def _needs_ext():
    err = _ext_error()
    if err is not None:
        pytest.skip(f"the compiled library is unavailable: {err}")


def _results(out_dir: Path):
    """The JSON (after checking the CSV and markdown beside it)."""
    files = sorted(out_dir.glob("*_models.json"))
    assert len(files) == 1, files
    data = json.loads(files[0].read_text())
    assert list(data) == ["env", "skipped", "goals", "notes", "dispatch", "rows"]
    assert tuple(data["env"]) == common.ENV_KEYS and data["env"]["gpu"].startswith("cpu: ")
    keys = common.row_keys("variant", "layout", "compile_s")
    assert bench_models.KEYS == keys
    assert all(tuple(r) == keys for r in data["rows"])
    with open(files[0].with_suffix(".csv")) as f:
        got = list(csv.DictReader(f))
    assert len(got) == len(data["rows"]) and (not got or tuple(got[0]) == keys)
    md = files[0].with_suffix(".md").read_text()
    assert md.startswith("## bench_models") and "\n| model | mode | shape | batch | dtype | eager ms |" in md
    return data, md


def _check_timed(row, dtype="fp32"):
    assert row["bench"] == "models" and row["dtype"] == dtype and row["mode"] in common.MODES
    assert row["correct"] is True, row
    assert row["median_ms"] > 0 and row["p20_ms"] <= row["median_ms"] <= row["p80_ms"], row
    assert math.isclose(row["images_per_s"], row["batch"] * 1e3 / row["median_ms"], rel_tol=1e-3)
    assert row["peak_mem_mb"] is None  # CPU
    assert row["layout"] == "channels_last"


def _check_untimed(row):
    assert row["correct"] is False
    assert row["median_ms"] is None and row["p20_ms"] is None and row["p80_ms"] is None
    assert row["images_per_s"] is None and row["peak_mem_mb"] is None


def check_dispatch(data: dict, device_prefix: str = "cpu: ") -> None:
    """The JSON's ``"dispatch"``: one entry per auto row, keyed by the row's case fields, whose
    decisions have the documented fields, were measured (not static, not from a file), name real
    candidates of their op, and chose one that was timed and beat or tied the others' record."""
    from resnet_fused.dispatch import candidates as cands

    auto = [r for r in data["rows"] if r["provider"] == "auto"]
    entries = data["dispatch"]
    assert len(entries) == len(auto) and auto, entries
    for e, r in zip(entries, auto):
        assert tuple(e) == common.DISPATCH_CASE_KEYS + ("env", "decisions"), tuple(e)
        assert all(e[k] == r.get(k, "") for k in common.DISPATCH_CASE_KEYS), (e, r)
        assert set(e["env"]) <= set(common.DISPATCH_ENV_FIELDS) and e["env"]["device"].startswith(device_prefix)
        assert e["decisions"], e
        for d in e["decisions"]:
            assert tuple(d) == common.DECISION_KEYS, tuple(d)
            names = [c.name for c in cands.candidates(d["op"])]
            assert d["source"] == "measured" and d["sites"] and d["measure_ms"] > 0, d
            assert set(d["candidates"]) == set(names) and d["chosen"] in names, d
            assert set(d["case"]["candidates"]) <= set(names) and "torch" in d["case"]["candidates"], d
            assert not set(d["case"]) & set(common.DISPATCH_ENV_FIELDS), d["case"]
            timed = {n: v for n, v in d["candidates"].items() if isinstance(v, (int, float))}
            assert "torch" in timed and d["chosen"] in timed, d
            for n, v in d["candidates"].items():  # an untimed candidate says why
                assert n in timed or v.startswith(("unsupported: ", "excluded: ")), (n, v)
            if d["chosen"] != "torch":  # a fused candidate wins only by more than the noise margin
                assert timed[d["chosen"]] <= timed["torch"] * (1 - d["margin"] + 1e-4), d  # (rounding)


def spy_measuring(monkeypatch):
    """(ops, during): the op of every dispatch key measured from now on, and of those measured while
    one of the harness's timing functions (``common.benchmark``, ``benchmark_graph_or_plain``,
    ``peak_mem_mb``) was running: ``during`` must stay empty (measuring belongs to the warm-up)."""
    from resnet_fused.dispatch import dispatcher

    ops, during, timing = [], [], []
    real = dispatcher._measure

    def measure(case, *args, **kwargs):
        ops.append(case[0])
        if timing:
            during.append(case[0])
        return real(case, *args, **kwargs)

    monkeypatch.setattr(dispatcher, "_measure", measure)
    for name in ("benchmark", "benchmark_graph_or_plain", "peak_mem_mb"):
        def timed(*args, _fn=getattr(common, name), **kwargs):
            timing.append(name)
            try:
                return _fn(*args, **kwargs)
            finally:
                timing.pop()

        monkeypatch.setattr(common, name, timed)
    return ops, during


# ------------------------------------------------------------------------------------ end to end
def test_cpu_mode_end_to_end(tmp_path):
    r = run_bench_cpu("benchmarks.bench_models", tmp_path, timeout=300)
    data, md = _results(tmp_path)
    rows = data["rows"]
    provs = ("eager",) + (("cuda",) if _ext_error() is None else ()) + ("auto",)
    want = [(m, "infer", b) for m in ("resnet18",) for b in (1, 2)] + [("resnet18", "train_step", 4)] \
        + [("resnet50", "infer", b) for b in (1, 2)]
    assert [(x["model"], x["mode"], x["batch"], x["provider"]) for x in rows] == [  # auto: resnet18 infer on CPU
        w + (p,) for w in want for p in provs if p != "auto" or w[:2] == ("resnet18", "infer")]
    assert {x["mode"] for x in rows} == {"infer", "train_step"}
    for row in rows:
        _check_timed(row)
        assert row["variant"] == "" and row["compile_s"] is None
        assert row["shape"] == ("3x64x64" if row["mode"] == "train_step" else "3x32x32")
    # compile is left out on CPU; triton (the interpreter) too, unless named: both with their reasons
    assert set(data["skipped"]) >= {"compile"} and "--compile" in data["skipped"]["compile"]
    assert "triton" in data["skipped"]
    if backends.triton_import_error() is None:
        assert "--providers" in data["skipped"]["triton"]
    # the goals are judged on GPU rows only: nothing here measures them
    assert len(data["goals"]) == 4 and all(g["met"] is None and g["fused"]["verdict"] == "not measured"
                                           for g in data["goals"])
    assert "goal: ResNet-50 inference, batch 256" in md and "compile skipped: left out on CPU" in md
    if "cuda" in provs:  # the cuda provider really ran the fused modules: every conv, every block
        convs = dict(re.findall(r"^  (resnet\d+) infer b1 fp32 cuda +; ok .*fused convs/forward (\d+) \(cuda\)",
                                r.stdout, re.M))
        assert convs == {"resnet18": "20", "resnet50": "53"}, r.stdout
        assert re.search(r"^  resnet18 b4 fp32 cuda +; ok .*fused blocks/step 8;", r.stdout, re.M), r.stdout
        assert "eager/cuda" in r.stdout
    # auto: our network with backend="auto", every conv site through the dispatch; its decisions per
    # case: the inference convs (no autograd) and the training step's blocks, measured in the
    # warm-up (no key first met while timing)
    convs = dict(re.findall(r"^  (resnet\d+) infer b1 fp32 auto +; ok .*fused convs/forward (\d+) \(auto\)",
                            r.stdout, re.M))
    assert convs == {"resnet18": "20"}, r.stdout
    check_dispatch(data)
    assert [(e["model"], e["mode"], e["batch"]) for e in data["dispatch"]] == [("resnet18", "infer", 1),
                                                                                ("resnet18", "infer", 2)]
    for e in data["dispatch"]:
        assert {d["op"] for d in e["decisions"]} == {"conv_bias_act"}
        assert all(d["case"]["grad"] is False for d in e["decisions"])
        assert e["decisions"][0]["case"]["x"] == [e["batch"], 3, 32, 32]  # the stem, at the timed shape
        assert len(e["decisions"]) == 15  # resnet18's 20 convs: 15 distinct (input, geometry, epilogue)
        for d in e["decisions"]:
            assert d["candidates"]["triton"].startswith("unsupported: the Triton interpreter")
            if d["op"] == "conv_bias_act":
                assert d["candidates"]["cudnn_fused"] == "unsupported: CUDA only"
    assert "first seen after the warm-up" not in r.stdout + r.stderr
    assert data["notes"] == ["auto on CPU: resnet18 infer only (name auto in --providers for every case)"]
    assert re.search(r"^  resnet18 infer b2 fp32 auto +; ok .*auto: conv_bias_act ", r.stdout, re.M), r.stdout
    assert "WRONG" not in r.stdout + r.stderr


def test_auto_measures_in_the_warm_up_only(tmp_path, monkeypatch):
    """In process: every conv key of an auto run is measured in its checked first call, none while
    timing; each case starts clean: resnet50 shares its stem's key with resnet18 at the same batch,
    and measures it again, so each case's record is complete and holds exactly what it measured."""
    ops, during = spy_measuring(monkeypatch)
    rc = bench_models.main(["--device", "cpu", "--models", "resnet18", "resnet50", "--modes", "infer", "--batches",
                            "1", "--providers", "eager", "auto", "--out", str(tmp_path)])
    assert rc == 0
    data, _ = _results(tmp_path)
    assert [(x["model"], x["provider"]) for x in data["rows"]] == [("resnet18", "eager"), ("resnet18", "auto"),
                                                                   ("resnet50", "eager"), ("resnet50", "auto")]
    for row in data["rows"]:
        _check_timed(row)
    check_dispatch(data)
    assert during == [] and set(ops) == {"conv_bias_act"}
    r18, r50 = data["dispatch"]
    assert len(ops) == len(r18["decisions"]) + len(r50["decisions"])
    assert r18["decisions"][0]["case"] == r50["decisions"][0]["case"]  # the stem, measured in both cases
    assert r18["decisions"][0]["case"]["x"] == [1, 3, 32, 32] and r50["decisions"][0]["sites"] == ["StemConv.stem"]
    assert len(r50["decisions"]) > len(r18["decisions"])


# -------------------------------------------------------------------------------------- goals
def _row(mode, prov, ms, *, variant="", batch=256, dtype="fp16", correct=True, shape="3x224x224",
         model="resnet50"):
    t = common.Timing(ms, ms * 0.9, ms * 1.1, 10) if ms is not None else None
    return common.make_row(bench="models", model=model, shape=shape, batch=batch, dtype=dtype, mode=mode,
                           provider=prov, timing=t, peak_mem_mb=None, correct=correct,
                           extra={"variant": variant, "layout": "channels_last", "compile_s": None})


def test_goals_on_synthetic_rows():
    rows = [
        _row("infer", "eager", 30.0), _row("infer", "triton", 25.0), _row("infer", "cuda", 18.0),
        _row("infer", "auto", 17.0),  # auto is judged alone: never the "fused" (best of triton / cuda)
        _row("infer", "compile", 24.0, variant="default"), _row("infer", "compile", 21.0, variant=MAX),
        _row("infer", "cuda", 1.0, shape="3x32x32"),  # a CPU-size row never counts
        _row("train_step", "eager", 100.0), _row("train_step", "triton", None, correct=False),
        _row("train_step", "cuda", 80.0), _row("train_step", "compile", 78.0, variant="default"),
        _row("train_step", "auto", 200.0, correct=False),  # wrong: not measured
    ]
    g = {(x["mode"], x["baseline"], x["baseline_variant"]): x for x in bench_models.goals(rows)}
    assert list(g) == [("infer", "eager", ""), ("infer", "compile", MAX), ("train_step", "eager", ""),
                       ("train_step", "compile", "default")]
    inf = g[("infer", "eager", "")]
    assert inf["target"] == 1.5 and inf["baseline_ms"] == 30.0
    assert inf["fused"] == {"provider": "cuda", "ms": 18.0, "ratio": round(30 / 18, 4), "verdict": "met"}
    assert inf["triton"]["verdict"] == "missed" and inf["triton"]["ratio"] == 1.2 and inf["met"] is True
    assert inf["auto"] == {"provider": "auto", "ms": 17.0, "ratio": round(30 / 17, 4), "verdict": "met"}
    assert "; auto 1.76x: met)" in inf["text"], inf["text"]
    mx = g[("infer", "compile", MAX)]
    assert mx["target"] == 1.1 and mx["fused"]["ratio"] == round(21 / 18, 4) and mx["fused"]["verdict"] == "met"
    assert mx["triton"]["verdict"] == "missed"
    tr = g[("train_step", "eager", "")]
    assert tr["fused"]["provider"] == "cuda" and tr["fused"]["ratio"] == 1.25 and tr["fused"]["verdict"] == "missed"
    assert tr["met"] is False and tr["triton"] == {"provider": "triton", "ms": None, "ratio": None,
                                                   "verdict": "not measured"}  # wrong: not measured
    tc = g[("train_step", "compile", "default")]
    assert tc["target"] == 1.0 and tc["fused"]["verdict"] == "missed"  # 78 / 80 < 1
    assert tc["text"].startswith("ResNet-50 training step, batch 256, AMP, channels_last: fused >= 1.0x compile")
    assert "fused (cuda) 0.97x: missed" in tc["text"] and "triton not measured" in tc["text"]
    assert tc["auto"]["verdict"] == "not measured" and "auto not measured" in tc["text"]
    # no baseline row (compile default of the inference is not a goal; no max-autotune row): not measured
    no_max = [r for r in rows if r["variant"] != MAX]
    mx = next(x for x in bench_models.goals(no_max) if x["baseline_variant"] == MAX)
    assert mx["met"] is None and mx["baseline_ms"] is None
    assert all(mx[k]["verdict"] == "not measured" for k in ("fused", "triton", "cuda", "auto"))
    assert mx["cuda"]["ms"] == 18.0  # the fused time is still given
    assert all(x["met"] is None for x in bench_models.goals([]))


# ------------------------------------------------------------------------- plans, without a GPU
def _plan(tasks):
    return [(t.mode, t.model, t.size, t.batch, t.dtype, t.layout, tuple(bench_models.label_of(*r) for r in t.runs))
            for t in tasks]


def test_gpu_task_lists():
    provs = ["eager", "triton", "cuda", "auto", "compile"]
    early = ("eager", "triton", "cuda", "auto")
    quick = _plan(bench_models.plan_tasks(True, provs, quick=True))
    cl = "channels_last"
    assert quick == [
        ("infer", "resnet50", 224, 256, "fp16", cl, early), ("train_step", "resnet50", 224, 256, "fp16", cl, early),
        ("infer", "resnet50", 224, 1, "fp16", cl, early),
        ("infer", "resnet50", 224, 256, "fp16", cl, ("compile",)),
        ("train_step", "resnet50", 224, 256, "fp16", cl, ("compile",)),
        ("infer", "resnet50", 224, 256, "fp16", cl, ("compile-max",)),
    ]
    full = bench_models.plan_tasks(True, provs)
    got = _plan(full)
    assert {t[1] for t in got} == set(bench_models.MODELS) and len(bench_models.MODELS) == 6
    assert {t[2] for t in got} == {224}
    for model in bench_models.MODELS:
        for dtype in ("fp16", "fp32"):
            for b in (1, 32, 256):
                for runs in (early, ("compile",), ("compile-max",)):
                    assert got.count(("infer", model, 224, b, dtype, cl, runs)) == 1
            for runs in (early, ("compile",)):
                assert got.count(("train_step", model, 224, 256, dtype, cl, runs)) == 1
    assert len(got) == 6 * 2 * (3 * 3 + 2)
    # compile after every other provider of every case; max-autotune last
    phase = [0 if t[6] == early else (1 if t[6] == ("compile",) else 2) for t in got]
    assert phase == sorted(phase)
    assert not any(t[0] == "train_step" and t[6] == ("compile-max",) for t in got)
    # the variants reach the rows: compile's default and max-autotune+freezing
    assert {r for t in full for r in t.runs if r[0] == "compile"} == {("compile", "default"), ("compile", MAX)}
    no_max = _plan(bench_models.plan_tasks(True, provs, max_autotune=False))
    assert len(no_max) == len(got) - 36 and not any(t[6] == ("compile-max",) for t in no_max)
    no_compile = _plan(bench_models.plan_tasks(True, ["eager", "triton", "cuda", "auto"]))
    assert len(no_compile) == 6 * 2 * 4 and all(t[6] == early for t in no_compile)
    lay = _plan(bench_models.plan_tasks(True, provs, quick=True, layouts=("channels_last", "nchw"),
                                        max_autotune=False))
    assert ("infer", "resnet50", 224, 256, "fp16", "nchw", early) in lay
    assert all(t[5] == cl for t in lay if t[0] == "train_step")  # training is channels_last only


def test_cpu_task_list_and_config():
    all4 = ("eager", "triton", "cuda", "auto")
    got = _plan(bench_models.plan_tasks(False, list(all4)))
    assert got == [("infer", "resnet18", 32, 1, "fp32", "channels_last", all4),
                   ("infer", "resnet18", 32, 2, "fp32", "channels_last", all4),
                   ("train_step", "resnet18", 64, 4, "fp32", "channels_last", all4[:3]),  # auto: infer
                   ("infer", "resnet50", 32, 1, "fp32", "channels_last", ("eager", "cuda")),  # triton, auto: r18
                   ("infer", "resnet50", 32, 2, "fp32", "channels_last", ("eager", "cuda"))]
    every = _plan(bench_models.plan_tasks(False, list(all4), cpu_auto_cases=None))  # auto named: every case
    assert [t[6] for t in every if t[1] == "resnet50"] == [("eager", "cuda", "auto")] * 2
    assert [t[6] for t in every if t[0] == "train_step"] == [all4]
    cfg = bench_models.make_config(bench_models.parse_args(["--device", "cpu", "--quick"]))
    assert cfg.deadline is not None  # --quick stops starting providers in time
    assert "compile" not in cfg.providers and "compile" in cfg.skipped
    # the default providers: auto (what users get) beside each backend; triton's interpreter left out
    assert cfg.providers == ["eager"] + (["cuda"] if _ext_error() is None else []) + ["auto"]
    assert cfg.notes == ["auto on CPU: resnet18 infer only (name auto in --providers for every case)"]
    for bad in (["--reps", "0"], ["--batches", "0"]):
        with pytest.raises(SystemExit):
            bench_models.make_config(bench_models.parse_args(["--device", "cpu"] + bad))
    with pytest.raises(SystemExit):
        bench_models.parse_args(["--models", "resnet7"])


def test_training_batch_memory_rule():
    r50 = bench_models.activation_elems("resnet50", 224)
    assert 30e6 < r50 < 34e6  # leaf-module outputs per 224x224 image
    r18, r152 = (bench_models.activation_elems(m, 224) for m in ("resnet18", "resnet152"))
    assert r152 > 2 * r50 > 2 * r18
    h100, h200 = 80 * 10**9, 141 * 10**9
    tb = bench_models.train_batch
    assert tb("resnet50", 224, "fp16", 256, h100) == 256      # float32 reference: ~31 GiB
    assert tb("resnet152", 224, "fp16", 256, h100) == 128     # ~63 GiB at 256
    assert tb("resnet152", 224, "fp16", 256, h200) == 256
    assert tb("resnet50", 224, "fp32", 256, h100) == 128      # float64 reference
    assert tb("resnet152", 224, "fp32", 256, h100) == 64
    assert tb("resnet50", 224, "fp16", 256, None) == 256      # CPU: no limit
    assert tb("resnet152", 224, "fp32", 256, 10**9) == bench_models.MIN_TRAIN_BATCH  # never below the floor
    assert tb("resnet18", 224, "fp32", 4, 10**6) == 4         # nor above what was asked


def test_training_cases_probe_every_model():
    """Every model's case: ours takes the reference's state_dict keys, and the probed parameters
    and buffers exist in both (meta device: no weights, no arithmetic)."""
    import resnet_fused

    from resnet_fused.models import reference

    for name in bench_models.MODELS:
        case = bench_models.train_case(name, 224)
        assert case.kind == "model" and case.num_classes == 1000 and case.chw == (3, 224, 224)
        with torch.device("meta"):
            ref, ours = getattr(reference, name)(), getattr(resnet_fused.models, name)(backend="cuda")
        assert set(ref.state_dict()) == set(ours.state_dict()), name
        for m in (ref, ours):
            params, bufs = dict(m.named_parameters()), dict(m.named_buffers())
            assert all(p in params for p in case.probes), (name, [p for p in case.probes if p not in params])
            assert all(b in bufs for b in case.buffers), (name, [b for b in case.buffers if b not in bufs])


# ------------------------------------------------------------------- broken and missing providers
@pytest.mark.parametrize("how", ["wrong", "raises"])
def test_broken_provider_is_recorded_wrong_and_untimed(tmp_path, monkeypatch, capsys, how):
    _needs_ext()
    from resnet_fused.modules import _base

    real_conv, real_train = _base.FusedBlockMixin._conv, _base.run_block_train

    def conv(self, *args, **kwargs):
        if how == "raises":
            raise RuntimeError("deliberately broken kernel")
        return real_conv(self, *args, **kwargs) * 1.01  # 1% off: far beyond 4x eager's fp32 error

    def train(*args, **kwargs):
        if how == "raises":
            raise RuntimeError("deliberately broken kernel")
        return real_train(*args, **kwargs) * 1.01

    monkeypatch.setattr(_base.FusedBlockMixin, "_conv", conv)
    monkeypatch.setattr(_base, "run_block_train", train)
    rc = bench_models.main(["--device", "cpu", "--models", "resnet18", "--batches", "4", "--providers", "eager",
                            "cuda", "--out", str(tmp_path)])
    assert rc == 1
    data, md = _results(tmp_path)
    rows = data["rows"]
    assert [(x["mode"], x["provider"]) for x in rows] == [("infer", "eager"), ("infer", "cuda"),
                                                          ("train_step", "eager"), ("train_step", "cuda")]
    for row in rows:
        if row["provider"] == "eager":
            _check_timed(row)
        else:
            _check_untimed(row)
    word = "WRONG" if how == "wrong" else "FAILED"
    assert md.count(f"| - | {word} | - |") == 2, md
    err = capsys.readouterr().err
    if how == "wrong":
        assert "WRONG resnet18 infer b4 fp32 cuda" in err and "WRONG resnet18 b4 fp32 cuda" in err, err
    else:
        assert "FAILED resnet18 infer b4 fp32 cuda" in err and "FAILED resnet18 b4 fp32 cuda" in err, err


def test_unavailable_providers_are_skipped_with_the_reason(tmp_path, monkeypatch, capsys):
    from resnet_fused import _ext

    monkeypatch.setattr(_ext, "load_error", lambda: "deliberately not built")
    monkeypatch.setattr(backends, "triton_interpreting", lambda: False)
    rc = bench_models.main(["--device", "cpu", "--models", "resnet18", "--modes", "infer", "--batches", "1",
                            "--providers", "eager", "cuda", "triton", "--out", str(tmp_path)])
    assert rc == 0
    data, _ = _results(tmp_path)
    assert [x["provider"] for x in data["rows"]] == ["eager"]
    _check_timed(data["rows"][0])
    assert set(data["skipped"]) == {"cuda", "triton"}
    assert data["skipped"]["cuda"] == "deliberately not built" and "TRITON_INTERPRET=1" in data["skipped"]["triton"]
    out = capsys.readouterr().out
    assert "cuda skipped: deliberately not built" in out and "triton skipped" in out


# --------------------------------------------------------------------------- compile's variants
def test_compile_variants_freezing_and_order(tmp_path, monkeypatch):
    """torch.compile replaced by a recorder (no Inductor on this small machine): the inference gets
    the default and the max-autotune variant, the training step the default; freezing is on while
    max-autotune compiles and runs, off otherwise, and restored; compile runs after the others."""
    import torch._inductor.config as inductor_config

    calls = []

    def fake_compile(module, mode=None, **kwargs):
        def run(*args):
            calls.append((mode, inductor_config.freezing))
            return module(*args)

        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    before = inductor_config.freezing
    rc = bench_models.main(["--device", "cpu", "--models", "resnet18", "--batches", "4", "--providers", "eager",
                            "compile", "--compile", "--out", str(tmp_path)])
    assert rc == 0
    assert inductor_config.freezing == before
    data, md = _results(tmp_path)
    rows = data["rows"]
    assert [(x["mode"], x["provider"], x["variant"]) for x in rows] == [
        ("infer", "eager", ""), ("train_step", "eager", ""), ("infer", "compile", "default"),
        ("train_step", "compile", "default"), ("infer", "compile", MAX)]
    for row in rows:
        _check_timed(row)
        assert (row["compile_s"] is not None and row["compile_s"] > 0) == (row["provider"] == "compile")
    assert {m for m, _ in calls} == {None, "max-autotune"}
    assert all(frozen == (m == "max-autotune") for m, frozen in calls), calls
    assert "compile-max ms" in md and "compile s" in md and "compile-max s" in md
