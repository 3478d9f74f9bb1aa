"""benchmarks/models.py: the CPU mode end to end (a subprocess; the compiled library's C++ kernels as
the cuda provider where it loads) and its files; the step harness judging (a wrong or failing
provider recorded ``correct=false`` and untimed, in inference and in the training step; a missing
gradient; eager's bound); ``auto`` measuring in its checked first call only, each case's decisions
in the JSON; the goals on synthetic rows; the GPU plans, the training batch's memory rule and the
out-of-memory halving without a GPU; the compile variants (freezing on for max-autotune only).
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # benchmarks/ is not installed with the package: import it from the tree
    sys.path.insert(0, str(REPO))

from benchmarks import common, models  # noqa: E402
from resnet_fused import backends  # noqa: E402
from bench_checks import (EXT_ERROR, check_dispatch, check_timed, check_untimed, needs_ext,  # noqa: E402
                          results, spy_measuring)
from utils import run_bench_cpu  # noqa: E402

MAX = models.MAX_AUTOTUNE




# ------------------------------------------------------------------------------------ end to end
def test_cpu_mode_end_to_end(tmp_path):
    r = run_bench_cpu("benchmarks.models", tmp_path, timeout=300)
    data, md = results(tmp_path)
    provs = ("eager",) + (("cuda",) if EXT_ERROR is None else ()) + ("auto",)
    want = [("resnet18", "infer", 1), ("resnet18", "infer", 2), ("resnet18", "train_step", 4),
            ("resnet50", "infer", 1), ("resnet50", "infer", 2)]
    assert [(x["model"], x["mode"], x["batch"], x["provider"]) for x in data["rows"]] == [  # auto: resnet18 infer
        w + (p,) for w in want for p in provs if p != "auto" or w[:2] == ("resnet18", "infer")]
    for row in data["rows"]:
        check_timed(row)
        assert row["bench"] == "models" and row["variant"] == "" and row["compile_s"] is None
        assert row["shape"] == ("3x64x64" if row["mode"] == "train_step" else "3x32x32")
    assert "--compile" in data["skipped"]["compile"] and "triton" in data["skipped"]
    assert len(data["goals"]) == 4 and all(g["met"] is None and g["fused"]["verdict"] == "not measured"
                                           for g in data["goals"])  # GPU rows only
    assert md.startswith("## models") and "\n| model | mode | shape | batch | dtype | provider | ms | img/s |" in md
    assert "goal: ResNet-50 inference, batch 256" in md and "compile skipped: left out on CPU" in md
    # the summary: a line per row, eager's time over the row's
    assert re.search(r"^resnet18 +infer +3x32x32 +2 +fp32 +auto +[\d.]+ +[\d.]+ +[\d.]+x +- +- *$", r.stdout, re.M)
    # auto: every conv site through the dispatch, its decisions measured per case in the warm-up
    assert re.search(r"^  resnet18 infer b1 fp32 auto; ok .*; auto: conv_bias_act ", r.stdout, re.M), r.stdout
    check_dispatch(data)
    assert [(e["model"], e["mode"], e["batch"]) for e in data["dispatch"]] == [("resnet18", "infer", 1),
                                                                                ("resnet18", "infer", 2)]
    for e in data["dispatch"]:
        assert len(e["decisions"]) == 15 and {d["op"] for d in e["decisions"]} == {"conv_bias_act"}  # 20 convs
        assert e["decisions"][0]["case"]["x"] == [e["batch"], 3, 32, 32]  # the stem, at the timed shape
        assert all(d["case"]["grad"] is False for d in e["decisions"])
        assert all(d["candidates"]["triton"].startswith("unsupported: the Triton interpreter") and
                   d["candidates"]["cudnn_fused"] == "unsupported: CUDA only" for d in e["decisions"])
    assert data["notes"] == ["auto on CPU: resnet18 infer only (name auto in --providers for every case)"]
    assert "WRONG" not in r.stdout + r.stderr and "first seen after the warm-up" not in r.stdout + r.stderr


def test_auto_measures_in_the_warm_up_only(tmp_path, monkeypatch):
    """In process: every conv key of an auto run is measured in its checked first call, none while
    timing; each case starts clean (resnet50 measures the stem key resnet18 measured before). The
    ``torch`` provider (our modules on the PyTorch path) is checked and timed like the others."""
    ops, during = spy_measuring(monkeypatch)
    assert models.main(["--device", "cpu", "--models", "resnet18", "resnet50", "--modes", "infer", "--batches", "1",
                        "--providers", "eager", "torch", "auto", "--out", str(tmp_path)]) == 0
    data, _ = results(tmp_path)
    assert [(x["model"], x["provider"]) for x in data["rows"]] == [
        (m, p) for m in ("resnet18", "resnet50") for p in ("eager", "torch", "auto")]
    for row in data["rows"]:
        check_timed(row)
    check_dispatch(data)
    assert during == [] and set(ops) == {"conv_bias_act"}
    r18, r50 = data["dispatch"]
    assert len(ops) == len(r18["decisions"]) + len(r50["decisions"]) and len(r50["decisions"]) > len(r18["decisions"])
    assert r18["decisions"][0]["case"] == r50["decisions"][0]["case"]  # the stem, measured in both cases
    assert r50["decisions"][0]["case"]["x"] == [1, 3, 32, 32] and r50["decisions"][0]["sites"] == ["StemConv.stem"]


@needs_ext
@pytest.mark.parametrize("how", ["wrong", "raises"])
def test_broken_provider_is_recorded_wrong_and_untimed(tmp_path, monkeypatch, capsys, how):
    """A fused conv (inference) or training block 1% off, or raising: the provider's rows are not
    correct and not timed, in both modes; eager's are; the exit code says so. (So the cuda provider
    really runs every conv and training block through the fused path.)"""
    from resnet_fused.modules import _base

    def broken(real):
        def fn(*args, **kwargs):
            if how == "raises":
                raise RuntimeError("deliberately broken kernel")
            return real(*args, **kwargs) * 1.01  # far beyond 4x eager's fp32 error
        return fn

    monkeypatch.setattr(_base.FusedBlockMixin, "_conv", broken(_base.FusedBlockMixin._conv))
    monkeypatch.setattr(_base, "run_block_train", broken(_base.run_block_train))
    assert models.main(["--device", "cpu", "--models", "resnet18", "--batches", "4", "--providers", "eager", "cuda",
                        "--out", str(tmp_path)]) == 1
    data, md = results(tmp_path)
    assert [(x["mode"], x["provider"]) for x in data["rows"]] == [("infer", "eager"), ("infer", "cuda"),
                                                                  ("train_step", "eager"), ("train_step", "cuda")]
    for row in data["rows"]:
        check_timed(row) if row["provider"] == "eager" else check_untimed(row)
    word = "WRONG" if how == "wrong" else "FAILED"
    assert md.count(f"| cuda | {word} | - | - | - | - |") == 2, md
    err = capsys.readouterr().err
    assert f"{word} resnet18 infer b4 fp32 cuda" in err and f"{word} resnet18 train_step b4 fp32 cuda" in err, err


def test_unavailable_providers_are_skipped_with_the_reason(tmp_path, monkeypatch, capsys):
    from resnet_fused import _ext

    monkeypatch.setattr(_ext, "load_error", lambda: "deliberately not built")
    monkeypatch.setattr(backends, "triton_interpreting", lambda: False)
    assert models.main(["--device", "cpu", "--models", "resnet18", "--modes", "infer", "--batches", "1",
                        "--providers", "eager", "cuda", "triton", "--out", str(tmp_path)]) == 0
    data, _ = results(tmp_path)
    assert [x["provider"] for x in data["rows"]] == ["eager"]
    check_timed(data["rows"][0])
    assert data["skipped"]["cuda"] == "deliberately not built" and "TRITON_INTERPRET=1" in data["skipped"]["triton"]
    out = capsys.readouterr().out
    assert "cuda skipped: deliberately not built" in out and "triton skipped" in out


def test_compile_variants_freezing_and_order(tmp_path, monkeypatch):
    """torch.compile replaced by a recorder: the inference gets the default and the max-autotune
    variant, the training step the default; freezing is on while max-autotune compiles and runs,
    off otherwise, and restored; compile runs after the others."""
    import torch._inductor.config as inductor_config

    calls = []

    def fake_compile(module, mode=None, **kwargs):
        def run(*args):
            calls.append((mode, inductor_config.freezing))
            return module(*args)
        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    before = inductor_config.freezing
    assert models.main(["--device", "cpu", "--models", "resnet18", "--batches", "4", "--providers", "eager",
                        "compile", "--compile", "--out", str(tmp_path)]) == 0
    assert inductor_config.freezing == before
    data, md = results(tmp_path)
    assert [(x["mode"], x["provider"], x["variant"]) for x in data["rows"]] == [
        ("infer", "eager", ""), ("train_step", "eager", ""), ("infer", "compile", "default"),
        ("train_step", "compile", "default"), ("infer", "compile", MAX)]
    for row in data["rows"]:
        check_timed(row)
        assert (row["compile_s"] is not None and row["compile_s"] > 0) == (row["provider"] == "compile")
    assert {m for m, _ in calls} == {None, "max-autotune"}
    assert all(frozen == (m == "max-autotune") for m, frozen in calls), calls
    assert "| compile-max |" in md and "compile s" in md


# ---------------------------------------------------------------------------------- the judging
def test_judge_missing_quantity_and_eager_bound():
    ref = {"out": torch.ones(4, dtype=torch.float64), "grad w": torch.ones(3, dtype=torch.float64)}
    good = {"out": torch.ones(4), "grad w": torch.ones(3)}
    assert models.judge(good, ref, None, "fp32").ok
    v = models.judge({"out": torch.ones(4), "grad w": None}, ref, None, "fp32")  # a gradient that never came
    assert not v.ok and v.worst_key == "grad w"
    noisy = {"out": torch.ones(4) * 1.01, "grad w": torch.ones(3)}
    assert not models.judge(noisy, ref, good, "fp32").ok      # eager exact: the floor bounds
    assert models.judge(noisy, ref, noisy, "fp32").ok         # eager as far off: within 4x
    assert not models.judge(noisy, ref, [good, good], "fp32").ok
    assert models.judge(noisy, ref, [good, noisy], "fp32").ok  # the larger eager sample sets the bound


def test_wrong_gradient_is_judged_wrong():
    """The step harness on the CPU mode's training case and inputs: eager's step passes against
    the float64 reference step; the same step with any one probed gradient 1% off (as a broken
    backward would give) is judged wrong, and that gradient named."""
    case, dev = models.model_case("resnet18", 64), torch.device("cpu")
    gen = torch.Generator().manual_seed(1000 + 4)  # run_case's inputs: its well-conditioned CPU case
    x = torch.randn(4, 3, 64, 64, generator=gen).contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, 1000, (4,), generator=gen)
    ref = case.build_ref().double()
    out = ref(x.double())
    loss = torch.nn.functional.cross_entropy(out, t)
    loss.backward()
    ref_q = models.collect(case, ref, out, loss)
    module, step = models.build_provider("eager", "", case, case.build_ref(), dev, "fp32", True)
    q = models.collect(case, module, *step(x, t))
    assert models.judge(q, ref_q, q, "fp32").ok
    grads = [k for k in q if k.startswith("grad ")]
    assert len(grads) == 6
    for key in grads:
        v = models.judge({**q, key: q[key] * 1.01}, ref_q, q, "fp32")
        assert not v.ok and [k for k, c in v.checks.items() if not c.ok] == [key], key


def test_strict_fp32_restores_the_switches():
    before = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    with models.strict_fp32():
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == before


# -------------------------------------------------------------------------------------- goals
def _row(mode, prov, ms, *, variant="", correct=True, shape="3x224x224"):
    t = common.Timing(ms, ms * 0.9, ms * 1.1, 10) if ms is not None else None
    return common.make_row(bench="models", model="resnet50", shape=shape, batch=256, dtype="fp16", mode=mode,
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
    g = {(x["mode"], x["baseline"], x["baseline_variant"]): x for x in models.goals(rows)}
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
    tr = g[("train_step", "eager", "")]
    assert tr["fused"]["provider"] == "cuda" and tr["fused"]["ratio"] == 1.25 and tr["fused"]["verdict"] == "missed"
    assert tr["met"] is False and tr["triton"] == {"provider": "triton", "ms": None, "ratio": None,
                                                   "verdict": "not measured"}
    tc = g[("train_step", "compile", "default")]
    assert tc["target"] == 1.0 and tc["fused"]["verdict"] == "missed"  # 78 / 80 < 1
    assert tc["text"].startswith("ResNet-50 training step, batch 256, AMP, channels_last: fused >= 1.0x compile")
    assert "fused (cuda) 0.97x: missed" in tc["text"] and "triton not measured" in tc["text"]
    assert tc["auto"]["verdict"] == "not measured" and "auto not measured" in tc["text"]
    no_max = next(x for x in models.goals([r for r in rows if r["variant"] != MAX]) if x["baseline_variant"] == MAX)
    assert no_max["met"] is None and no_max["baseline_ms"] is None and no_max["cuda"]["ms"] == 18.0
    assert all(no_max[k]["verdict"] == "not measured" for k in ("fused", "triton", "cuda", "auto"))
    assert all(x["met"] is None for x in models.goals([]))


# ------------------------------------------------------------------------- plans, without a GPU
def _plan(tasks):
    return [(t.mode, t.model, t.size, t.batch, t.dtype, tuple(models.label_of(*r) for r in t.runs)) for t in tasks]


def test_gpu_task_lists():
    provs, early = ["eager", "triton", "cuda", "auto", "compile"], ("eager", "triton", "cuda", "auto")
    assert _plan(models.plan_tasks(True, provs, quick=True)) == [
        ("infer", "resnet50", 224, 256, "fp16", early), ("train_step", "resnet50", 224, 256, "fp16", early),
        ("infer", "resnet50", 224, 1, "fp16", early), ("infer", "resnet50", 224, 256, "fp16", ("compile",)),
        ("train_step", "resnet50", 224, 256, "fp16", ("compile",)),
        ("infer", "resnet50", 224, 256, "fp16", ("compile-max",))]
    full = models.plan_tasks(True, provs)
    got = _plan(full)
    assert {t[1] for t in got} == set(models.MODELS) and {t[2] for t in got} == {224}
    for model in models.MODELS:
        for dtype in ("fp16", "fp32"):
            for b in (1, 32, 256):
                for runs in (early, ("compile",), ("compile-max",)):
                    assert got.count(("infer", model, 224, b, dtype, runs)) == 1
            for runs in (early, ("compile",)):
                assert got.count(("train_step", model, 224, 256, dtype, runs)) == 1
    assert len(got) == 6 * 2 * (3 * 3 + 2)
    phase = [0 if t[5] == early else (1 if t[5] == ("compile",) else 2) for t in got]
    assert phase == sorted(phase)  # compile after every other provider of every case; max-autotune last
    assert {r for t in full for r in t.runs if r[0] == "compile"} == {("compile", "default"), ("compile", MAX)}
    no_compile = _plan(models.plan_tasks(True, list(early)))
    assert len(no_compile) == 6 * 2 * 4 and all(t[5] == early for t in no_compile)


def test_cpu_task_list_and_config():
    all4 = ("eager", "triton", "cuda", "auto")
    assert _plan(models.plan_tasks(False, list(all4))) == [
        ("infer", "resnet18", 32, 1, "fp32", all4), ("infer", "resnet18", 32, 2, "fp32", all4),
        ("train_step", "resnet18", 64, 4, "fp32", all4[:3]),  # auto: resnet18's inference only
        ("infer", "resnet50", 32, 1, "fp32", ("eager", "cuda")),  # triton, auto: resnet18 only
        ("infer", "resnet50", 32, 2, "fp32", ("eager", "cuda"))]  # no resnet50 training step on CPU
    every = _plan(models.plan_tasks(False, list(all4), cpu_auto_cases=None))  # auto named: every case
    assert [t[5] for t in every if t[1] == "resnet50"] == [("eager", "cuda", "auto")] * 2
    b, _ = models.make_config(models.parse_args(["--device", "cpu", "--quick"]))
    assert b.deadline is not None and "compile" in b.skipped and "triton" in b.skipped
    assert b.providers == ["eager"] + (["cuda"] if EXT_ERROR is None else []) + ["auto"]
    assert b.notes == ["auto on CPU: resnet18 infer only (name auto in --providers for every case)"]
    assert models.make_config(models.parse_args(["--device", "cpu"]))[0].deadline is None
    for bad in (["--reps", "0"], ["--batches", "0"]):
        with pytest.raises(SystemExit):
            models.make_config(models.parse_args(["--device", "cpu"] + bad))
    with pytest.raises(SystemExit):
        models.parse_args(["--models", "resnet7"])


def test_training_batch_memory_rule():
    r50 = models.activation_elems("resnet50", 224)
    assert 30e6 < r50 < 34e6  # leaf-module outputs per 224x224 image
    assert models.activation_elems("resnet152", 224) > 2 * r50 > 2 * models.activation_elems("resnet18", 224)
    h100, h200, tb = 80 * 10**9, 141 * 10**9, models.train_batch
    assert tb("resnet50", 224, "fp16", 256, h100) == 256      # float32 reference: ~31 GiB
    assert tb("resnet152", 224, "fp16", 256, h100) == 128     # ~63 GiB at 256
    assert tb("resnet152", 224, "fp16", 256, h200) == 256
    assert tb("resnet50", 224, "fp32", 256, h100) == 128      # float64 reference
    assert tb("resnet152", 224, "fp32", 256, h100) == 64
    assert tb("resnet50", 224, "fp16", 256, None) == 256      # CPU: no limit
    assert tb("resnet152", 224, "fp32", 256, 10**9) == models.MIN_TRAIN_BATCH  # never below the floor
    assert tb("resnet18", 224, "fp32", 4, 10**6) == 4         # nor above what was asked


def test_out_of_memory_halves_the_batch_and_reruns(monkeypatch):
    """An OOM during a training case (the allocator's count grew): its rows are dropped and it runs
    again at half the batch, eager included (its own baseline), with a note; the batch is kept."""
    calls, oom = [], iter([0, 1, 1, 1])
    b = models.Bench(torch.device("cpu"), ["eager", "cuda"])

    def fake_run_case(bench, case, mode, batch, dtype, runs, reps=None):
        calls.append((batch, tuple(runs)))
        bench.rows.append({"batch": batch})

    monkeypatch.setattr(models, "run_case", fake_run_case)
    monkeypatch.setattr(models, "num_ooms", lambda dev: next(oom))
    batches = {}
    models.run_train(b, models.Task("train_step", "resnet18", 64, 64, "fp16", (("compile", "default"),)), batches)
    assert calls == [(64, (("compile", "default"),)), (32, (("eager", ""), ("compile", "default")))]
    assert b.rows == [{"batch": 32}] and batches == {("resnet18", "fp16", 64): 32}
    assert b.notes == ["resnet18 train_step b64 fp16: out of memory; re-run at batch 32"]


def test_training_cases_probe_every_model():
    """Ours takes the reference's state_dict keys, and the probed parameters and buffers exist in
    both (meta device: no weights, no arithmetic)."""
    import resnet_fused
    from resnet_fused.models import reference

    for name in models.MODELS:
        case = models.model_case(name, 224)
        assert case.num_classes == 1000 and case.chw == (3, 224, 224)
        with torch.device("meta"):
            ref, ours = getattr(reference, name)(), getattr(resnet_fused.models, name)(backend="cuda")
        assert set(ref.state_dict()) == set(ours.state_dict()), name
        for m in (ref, ours):
            params, bufs = dict(m.named_parameters()), dict(m.named_buffers())
            assert [p for p in case.probes if p not in params] == [], name
            assert [b for b in case.buffers if b not in bufs] == [], name
