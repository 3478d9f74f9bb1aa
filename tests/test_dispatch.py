"""The measured dispatch of ``"auto"`` (resnet_fused.dispatch), with an injected clock.

Each test starts with no decision in memory, its own cache directory and a fake timer that gives
each candidate a fixed time (so "fastest" is the test's choice, not the machine's). Candidates are
added with ``register_candidate``: a correct one computes the op through PyTorch; the wrong ones
return wrong values, NaN, raise, or raise an out-of-memory error.
"""
from __future__ import annotations

import copy
import json
import subprocess
import sys
import threading
import warnings

import pytest
import torch

import resnet_fused as rf
from resnet_fused import dispatch
from resnet_fused.dispatch import cache, dispatcher, keys, measure

from builders import X_SHAPE, conv_inputs, torch_conv, use_timer
from utils import assert_close

pytestmark = pytest.mark.usefixtures("isolated_dispatch")  # tests/conftest.py


def run_auto(x, w, b, r, **kw):
    kw.setdefault("padding", 1)
    return rf.ops.conv_bias_act(x, w, b, r, backend="auto", **kw)


def reference(x, w, b, r, **kw):
    kw.setdefault("padding", 1)
    return rf.ops.conv_bias_act(x, w, b, r, backend="torch", **kw)


def only_row():
    rows = rf.dispatch_report()
    assert len(rows) == 1, str(rows)
    return rows[0]


def counted_conv():
    """([], a correct candidate that appends 1 to that list at every run)."""
    runs = []

    def fast(*a):
        runs.append(1)
        return torch_conv(*a)

    return runs, fast


# ------------------------------------------------------------------------------------ choosing
def test_fastest_correct_candidate_wins():
    calls, fast = counted_conv()
    rf.register_candidate("conv_bias_act", "fast", fast)
    timer = use_timer(torch=1.0, cuda=1.0, fast=0.5)
    x, w, b, r = conv_inputs()
    y = run_auto(x, w, b, r)
    assert len(timer.calls) == 1 and "fast" in timer.calls[0] and "torch" in timer.calls[0]
    row = only_row()
    assert (row.chosen, row.source, row.op) == ("fast", "measured", "conv_bias_act")
    assert row.candidates["fast"] == 0.5 and row.candidates["torch"] == 1.0
    assert row.sites == {"ops.conv_bias_act"}
    assert_close(y, reference(x, w, b, r).double(), name="y")
    n = len(calls)
    run_auto(x, w, b, r)  # decided: no measuring, the winner runs once
    assert len(timer.calls) == 1 and len(calls) == n + 1


@pytest.mark.parametrize("fast_ms", [0.99, [0.7, 0.85, 1.0]])
def test_candidate_within_noise_loses_to_torch(fast_ms):
    """1% faster is inside the 2% margin; a candidate whose own runs spread +-15% must beat torch
    by more than that spread."""
    rf.register_candidate("conv_bias_act", "fast", torch_conv)
    use_timer(torch=1.0, cuda=2.0, fast=fast_ms)
    run_auto(*conv_inputs())
    row = only_row()
    assert row.chosen == "torch" and row.margin >= measure.MIN_MARGIN


def test_torch_noise_widens_the_margin():
    rf.register_candidate("conv_bias_act", "fast", torch_conv)
    use_timer(torch=[0.7, 1.0, 1.3], cuda=2.0, fast=0.85)
    run_auto(*conv_inputs())
    row = only_row()
    assert row.chosen == "torch" and row.margin > 0.15


def _wrong(*a):
    return torch_conv(*a) * 1.1


def _nan(*a):
    y = torch_conv(*a)
    y.view(-1)[3] = float("nan")
    return y


def _raises(*a):
    raise RuntimeError("kernel exploded")


def _oom(*a):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


class _FailsSecondTime:
    def __init__(self):
        self.n = 0

    def __call__(self, *a):
        self.n += 1
        if self.n > 1:
            raise torch.OutOfMemoryError("out of memory on the second run")
        return torch_conv(*a)


@pytest.mark.parametrize("bad, why", [(_wrong, "relative error"), (_nan, "non-finite"),
                                      (_raises, "RuntimeError: kernel exploded"),
                                      (_oom, "OutOfMemoryError"), (_FailsSecondTime, "second run")])
def test_bad_candidate_excluded_with_one_warning(bad, why):
    if bad is _FailsSecondTime:
        bad = _FailsSecondTime()
    rf.register_candidate("conv_bias_act", "bad", bad)
    use_timer(torch=1.0, cuda=1.0, bad=0.1)  # the bad one would win on time
    x, w, b, r = conv_inputs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = run_auto(x, w, b, r)
        y2 = run_auto(x, w, b, r)
    ours = [w_ for w_ in caught if "excluded" in str(w_.message)]
    assert len(ours) == 1, [str(m.message) for m in caught]
    msg = str(ours[0].message)
    row = only_row()
    assert "'bad'" in msg and why in msg and row.key in msg
    assert row.chosen != "bad" and row.candidates["bad"].startswith("excluded:")
    ref = reference(x, w, b, r)
    assert torch.equal(y, y2)
    assert_close(y, ref.double(), name="y")


def test_model_output_stays_correct_with_a_wrong_candidate():
    rf.register_candidate("conv_bias_act", "bad", _wrong)
    use_timer(bad=0.01)
    stock = rf.models.resnet18(num_classes=10).eval()
    model = rf.convert(copy.deepcopy(stock))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = model(x)
        ref = stock.double()(x.double())
    keys_ = {d.key for d in rf.dispatch_report() if d.op == "conv_bias_act"}
    assert all(d.chosen != "bad" for d in rf.dispatch_report())
    assert len([c for c in caught if "'bad'" in str(c.message)]) == len(keys_)  # one per key
    assert_close(y, ref, name="logits", dtype=torch.float32, factor=4.0)


def test_forward_only_candidate_is_not_measured_under_autograd():
    x, w, b, r = conv_inputs()
    x.requires_grad_(True)
    use_timer()
    run_auto(x, w, b, r).sum().backward()
    row = only_row()
    assert row.candidates["cudnn_fused"].startswith("unsupported")
    assert x.grad is not None


# ------------------------------------------------------------------------------------- caching
def test_cache_round_trips(tmp_path):
    rf.register_candidate("conv_bias_act", "fast", torch_conv)
    timer = use_timer(torch=1.0, cuda=1.0, fast=0.5)
    args = conv_inputs()
    run_auto(*args)
    path = cache.cache_path()
    data = json.loads(path.read_text())
    (entry,) = data["entries"].values()
    assert entry["chosen"] == "fast" and entry["fields"]["op"] == "conv_bias_act"
    dispatch.forget()  # a new process, as far as memory goes
    run_auto(*args)
    assert len(timer.calls) == 1
    row = only_row()
    assert (row.chosen, row.source) == ("fast", "cache")


def _base_args():
    return dict(shape=X_SHAPE, cout=8, dtype=torch.float32, residual=True, cl=False), dict(stride=1, padding=1,
                                                                                          dilation=1, relu=True)


VARIANTS = {
    "batch": ({"shape": (3, 8, 6, 6)}, {}),
    "height": ({"shape": (2, 8, 7, 6)}, {}),
    "channels": ({"shape": (2, 4, 6, 6)}, {}),
    "cout": ({"cout": 16}, {}),
    "layout": ({"cl": True}, {}),
    "dtype": ({"dtype": torch.bfloat16}, {}),
    "residual": ({"residual": False}, {}),
    "stride": ({}, {"stride": 2}),
    "padding": ({}, {"padding": 2}),
    "dilation": ({}, {"dilation": 2, "padding": 2}),
    "relu": ({}, {"relu": False}),
}


@pytest.mark.parametrize("field", list(VARIANTS) + ["grad", "device", "threads", "versions", "candidates"])
def test_cache_invalidated_by_each_key_field(field, monkeypatch):
    timer = use_timer()
    inp, kw = _base_args()
    args = conv_inputs(**inp)
    run_auto(*args, **kw)
    dispatch.forget()
    run_auto(*args, **kw)
    assert len(timer.calls) == 1, "the unchanged key must come from the cache"
    if field in VARIANTS:
        inp2, kw2 = VARIANTS[field]
        kw = {**kw, **kw2}
        args = conv_inputs(**{**inp, **inp2}, **{k: v for k, v in kw.items() if k != "relu"})
    elif field == "grad":
        args[0].requires_grad_(True)
    elif field == "device":
        monkeypatch.setattr(keys, "_cpu_name", lambda: "another CPU")
    elif field == "threads":
        before = torch.get_num_threads()
        torch.set_num_threads(before + 1)
        monkeypatch.setattr(torch, "_rf_restore", before, raising=False)
    elif field == "versions":
        lib, tv, trv = keys._versions()
        monkeypatch.setattr(keys, "_versions", lambda: (lib + ".edited", tv, trv))
    elif field == "candidates":
        rf.register_candidate("conv_bias_act", "another", torch_conv)
    dispatch.forget()
    try:
        run_auto(*args, **kw)
    finally:
        if field == "threads":
            torch.set_num_threads(torch._rf_restore)
    assert len(timer.calls) == 2, f"a changed {field} must be measured again"
    assert [d.source for d in rf.dispatch_report()] == ["measured"]


class _CudaLike:
    """Just enough of a CUDA tensor for key building (no CUDA here)."""

    def __init__(self, t):
        self.t, self.shape, self.dtype, self.device = t, t.shape, t.dtype, torch.device("cuda", 0)

    def dim(self):
        return self.t.dim()

    def is_contiguous(self, **kw):
        return self.t.is_contiguous(**kw)


def test_tf32_is_a_key_field_on_cuda_only(monkeypatch):
    x = torch.randn(X_SHAPE)

    def case(t, tf32):
        monkeypatch.setattr(keys, "_tf32", lambda: tf32)
        return keys.conv_case(t, (8, 8, 3, 3), torch.contiguous_format, (1, 1), (1, 1), (1, 1), 1, torch.float32,
                              torch.float32, None, True, False)

    assert case(_CudaLike(x), True) != case(_CudaLike(x), False)
    assert case(x, True) == case(x, False)  # CPU convs are IEEE fp32 whatever cuDNN's setting
    half = keys.conv_case(_CudaLike(x.half()), (8, 8, 3, 3), torch.contiguous_format, (1, 1), (1, 1), (1, 1), 1,
                          torch.float16, torch.float16, None, True, False)
    assert dict(zip(keys.CASE_FIELDS["conv_bias_act"], half[1:]))["tf32"] is False


def test_corrupt_cache_file_ignored_with_one_warning():
    path = cache.cache_path()
    path.parent.mkdir(parents=True)
    path.write_text("{ this is not json")
    timer = use_timer()
    with pytest.warns(RuntimeWarning, match="ignoring the dispatch cache") as caught:
        run_auto(*conv_inputs())
        run_auto(*conv_inputs(shape=(3, 8, 6, 6)))
    assert len([c for c in caught if "ignoring" in str(c.message)]) == 1
    assert len(timer.calls) == 2
    assert len(json.loads(path.read_text())["entries"]) == 2  # rewritten whole


def test_wrong_format_file_ignored(tmp_path):
    cache.cache_path().parent.mkdir(parents=True)
    cache.cache_path().write_text(json.dumps({"format": 99, "entries": {}}))
    use_timer()
    with pytest.warns(RuntimeWarning, match="not a format-1"):
        run_auto(*conv_inputs())


def test_concurrent_writers_keep_every_entry():
    """Several writers (threads with their own file objects, as separate processes would be)
    each add entries: read-merge-write under the lock loses none, and the file is never torn."""
    files = [cache.DecisionFile() for _ in range(4)]

    def write(i):
        for j in range(10):
            files[i].store(f"k{i}-{j}", {"chosen": "torch", "candidates": {"torch": 1.0}, "measured_at": ""})

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(json.loads(cache.cache_path().read_text())["entries"]) == 40


def test_empty_cache_dir_turns_persistence_off(monkeypatch):
    monkeypatch.setenv(cache.ENV_DIR, "")
    assert cache.cache_path() is None
    timer = use_timer()
    run_auto(*conv_inputs())
    dispatch.forget()
    run_auto(*conv_inputs())
    assert len(timer.calls) == 2


def test_second_process_measures_nothing(tmp_path):
    script = (
        "import torch, resnet_fused as rf\n"
        "m = rf.convert(rf.models.resnet18(num_classes=10)).eval()\n"
        "with torch.no_grad(): m(torch.randn(1, 3, 32, 32))\n"
        "print(sorted({d.source for d in rf.dispatch_report()}))\n")
    env = {**__import__("os").environ, cache.ENV_DIR: str(tmp_path / "shared")}
    outs = [subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
            for _ in range(2)]
    for o in outs:
        assert o.returncode == 0, o.stderr[-2000:]
    assert outs[0].stdout.strip().splitlines()[-1] == "['measured']"
    assert outs[1].stdout.strip().splitlines()[-1] == "['cache']"


# ----------------------------------------------------------------------------- no measuring here
def _count_graphs():
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return gm.forward
    return graphs, backend


def test_no_measuring_under_compile_fullgraph():
    timer = use_timer()
    block = rf.BasicBlock(8, 8).eval()
    x = torch.randn(X_SHAPE)
    graphs, backend = _count_graphs()
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend=backend)
    with torch.no_grad():
        y = compiled(x)
        assert len(graphs) == 1 and timer.calls == []
        static = rf.dispatch_report()
        assert len(static) == 2 and {d.source for d in static} == {"static"}
        assert all(v == "not measured: traced (torch.compile / export)" for d in static
                   for n, v in d.candidates.items() if n in ("torch", "cuda"))
        ref = block(x)  # eager: measures now
    assert len(timer.calls) == 2
    torch.testing.assert_close(y, ref, rtol=0, atol=0)


def test_compile_uses_the_decision_made_outside():
    traced, fast = counted_conv()
    rf.register_candidate("conv_bias_act", "fast", fast)
    use_timer(fast=0.1)
    block = rf.BasicBlock(8, 8).eval()
    x = torch.randn(X_SHAPE)
    with torch.no_grad():
        block(x)  # measured: "fast" wins both sites
    assert {d.chosen for d in rf.dispatch_report()} == {"fast"}
    graphs, backend = _count_graphs()
    torch._dynamo.reset()
    traced.clear()
    with torch.no_grad():
        torch.compile(block, fullgraph=True, backend=backend, dynamic=True)(torch.randn(3, 8, 6, 6))
    assert len(graphs) == 1 and len(traced) == 2  # traced into the graph at both sites


def test_no_measuring_during_capture(monkeypatch):
    timer = use_timer()
    real = torch.cuda.is_current_stream_capturing
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    y = run_auto(*conv_inputs())
    row = only_row()
    assert timer.calls == [] and row.source == "static" and row.chosen == "torch"
    assert "CUDA graph capture" in row.candidates["torch"]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", real)
    run_auto(*conv_inputs())  # outside capture: measured now
    assert len(timer.calls) == 1
    assert_close(y, reference(*conv_inputs()).double(), name="y")


def test_tune_off_uses_static_default_then_cache(monkeypatch):
    rf.register_candidate("conv_bias_act", "fast", torch_conv)
    timer = use_timer(fast=0.1)
    monkeypatch.setenv(dispatcher.TUNE_ENV, "0")
    run_auto(*conv_inputs())
    assert timer.calls == [] and only_row().source == "static" and only_row().chosen == "torch"
    monkeypatch.delenv(dispatcher.TUNE_ENV)
    dispatch.forget()
    run_auto(*conv_inputs())  # measured and cached
    dispatch.forget()
    monkeypatch.setenv(dispatcher.TUNE_ENV, "0")
    run_auto(*conv_inputs())
    assert len(timer.calls) == 1 and (only_row().source, only_row().chosen) == ("cache", "fast")


# ------------------------------------------------------------------------ a module's site memo
def test_module_site_memo_keeps_settled_choices_only():
    """A block remembers its settled choices per conv site (later calls skip the key), and that
    memory follows the dispatcher: forget() and a candidate's (un)registration start over; a static
    choice (RESNET_FUSED_TUNE=0) is not remembered, so measuring resumes when it is allowed; a
    copy or a pickled module starts empty."""
    import pickle

    runs, fast = counted_conv()
    block = rf.BasicBlock(8, 8).eval()
    x = torch.randn(2, 8, 6, 6)
    timer = use_timer(torch=1.0, cuda=1.0, fast=0.5)
    with rf.use_backend("auto"), torch.no_grad():
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(dispatcher.TUNE_ENV, "0")
            block(x)
            assert not timer.calls and all(not m for m in block._dispatch_memos.values())
        rf.register_candidate("conv_bias_act", "fast", fast)
        y = block(x)  # measures both sites (two keys: conv2 adds the residual), remembers the choices
        assert len(timer.calls) == 2
        assert {r.chosen for r in rf.dispatch_report() if r.source == "measured"} == {"fast"}
        assert all(len(m) == 1 for m in block._dispatch_memos.values())
        n = len(runs)
        block(x)
        assert len(timer.calls) == 2 and len(runs) == n + 2  # from the memo: the winner, twice
        dispatch.unregister_candidate("conv_bias_act", "fast")
        y2 = block(x)  # a new generation: measured again, without "fast"
        assert len(timer.calls) == 4 and len(runs) == n + 2
        dispatch.forget()  # the process forgets; the block asks again and gets the cache file's answer
        block(x)
        assert len(timer.calls) == 4 and {r.source for r in rf.dispatch_report()} == {"cache"}
        torch.testing.assert_close(y, y2)
        assert not any(copy.deepcopy(block)._dispatch_memos.values())
        assert not any(pickle.loads(pickle.dumps(block))._dispatch_memos.values())
