"""benchmarks/bench_bandwidth.py and benchmarks/bench_conv_epilogue.py in their CPU tiny modes:
end to end as subprocesses (the compiled library's C++ kernels as the ``cuda`` provider, Triton
through the interpreter), the written JSON / CSV / markdown, every row checked correct; a broken
provider recorded wrong and untimed, an unavailable one skipped with its reason; the conv table
against torchvision-style ResNet-50 itself.

The end-to-end tests skip, with the loader's reason, where the library does not load. Subprocesses
run with one intra-op thread, as tests/test_bench_and_main.py does.
"""
from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # benchmarks/ is not installed with the package: import it from the tree
    sys.path.insert(0, str(REPO))

from benchmarks import bench_bandwidth, bench_conv_epilogue, common  # noqa: E402
from utils import run_bench_cpu  # noqa: E402


def _needs_ext():
    from resnet_fused import _ext

    err = _ext.load_error()
    if err is not None:
        pytest.skip(f"the compiled library is unavailable: {err}")


def _run(args, tmp_path, timeout=120):
    return run_bench_cpu(args[0], tmp_path, *args[1:], timeout=timeout)


def _results(out_dir: Path, bench: str, keys):
    """The JSON's top level and rows, after checking the CSV and markdown beside it."""
    files = sorted(out_dir.glob(f"*_{common.slug(bench)}.json"))
    assert len(files) == 1, files
    assert "_cpu-" in files[0].name
    data = json.loads(files[0].read_text())
    assert tuple(data["env"]) == common.ENV_KEYS and data["env"]["gpu"].startswith("cpu: ")
    assert list(data)[0] == "env" and list(data)[-1] == "rows" and "skipped" in data
    rows = data["rows"]
    assert rows and all(tuple(r) == keys for r in rows)
    with open(files[0].with_suffix(".csv")) as f:
        got = list(csv.DictReader(f))
    assert len(got) == len(rows) and tuple(got[0]) == keys
    md = files[0].with_suffix(".md").read_text()
    assert md.startswith("## ") and ("\n| op |" in md or "\n| conv |" in md)
    return data, rows


# ------------------------------------------------------------------------------------- bandwidth
def test_bandwidth_cpu_end_to_end(tmp_path):
    _needs_ext()
    pytest.importorskip("triton")
    _run(["benchmarks.bench_bandwidth", "--shapes", "256x56", "2048x7"], tmp_path)
    data, rows = _results(tmp_path, "bandwidth", bench_bandwidth.KEYS)
    assert data["skipped"] == {} and data["goal"].startswith("goal (cuda >= 85%")
    shapes = {"16x14x14", "128x4x4"}  # tiny versions of 256x56x56 and 2048x7x7
    assert {r["shape"] for r in rows} == shapes and {r["layout"] for r in rows} == {"cl", "nchw"}
    ops = [r for r in rows if r["provider"] != "copy"]
    for name in bench_bandwidth.OP_NAMES:
        provs = sorted(r["provider"] for r in ops
                       if r["op"] == name and r["shape"] == "16x14x14" and r["layout"] == "cl")
        want = ["cuda", "eager"] if "mask" in name else ["cuda", "eager", "triton"]
        assert provs == want, (name, provs)
    for r in rows:
        assert r["correct"] is True, r
        assert r["batch"] == 2 and r["dtype"] == "fp32"
        assert r["median_ms"] > 0 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"], r
        assert math.isclose(r["gbps"], r["bytes"] / (r["median_ms"] * 1e-3) / 1e9, rel_tol=1e-4)
        assert math.isclose(r["frac_of_copy"], r["gbps"] / r["copy_gbps"], rel_tol=1e-4)
        if r["provider"] == "copy":
            assert r["op"] == "copy" and r["note"].startswith("for ")
        else:
            assert r["err"] <= r["bound"], r
    # bytes: each tensor once (activations in fp32, the mask as numel / 8, vectors as float32 [C])
    numel, C = 2 * 16 * 14 * 14, 16
    nbytes = {r["op"]: r["bytes"] for r in ops if r["shape"] == "16x14x14"}
    assert nbytes["bn_relu"] == 2 * numel * 4 + 3 * C * 4
    assert nbytes["bwd_apply_dual"] == 5 * numel * 4 + 10 * C * 4
    assert nbytes["relu_mask_backward"] == 2 * numel * 4 + numel // 8
    assert nbytes["bn_relu_mask"] == 2 * numel * 4 + numel // 8 + 3 * C * 4


def test_bandwidth_broken_and_unavailable_providers(tmp_path, monkeypatch, capsys):
    """A provider off by 1% is recorded wrong and untimed (exit code 1); an unavailable one is
    skipped with its reason in the JSON. In process, no compiled library needed."""
    real = common.provider_unavailable

    def unavailable(p, d):  # cuda "available" (its runner is replaced below), triton not
        fake = {"triton": "deliberately unavailable", "cuda": None}
        return fake[p] if p in fake else real(p, d)

    monkeypatch.setattr(common, "provider_unavailable", unavailable)

    def broken(op, d):
        return tuple(t * 1.01 if t.is_floating_point() else t for t in bench_bandwidth.run_eager(op, d))

    monkeypatch.setitem(bench_bandwidth.RUNNERS, "cuda", broken)
    rc = bench_bandwidth.main(["--device", "cpu", "--ops", "bn_relu", "channel_stats", "--shapes", "64x56",
                               "--layouts", "cl", "--out", str(tmp_path)])
    assert rc == 1
    data, rows = _results(tmp_path, "bandwidth", bench_bandwidth.KEYS)
    assert data["skipped"] == {"triton": "deliberately unavailable"}
    by = {(r["op"], r["provider"]): r for r in rows}
    assert set(by) == {("copy", "copy"), ("bn_relu", "cuda"), ("bn_relu", "eager"), ("channel_stats", "cuda"),
                       ("channel_stats", "eager")}
    for op in ("bn_relu", "channel_stats"):
        bad, good = by[(op, "cuda")], by[(op, "eager")]
        assert bad["correct"] is False and bad["median_ms"] is None and bad["gbps"] is None
        assert bad["err"] > bad["bound"] and bad["note"] == "wrong: not timed"
        assert good["correct"] is True and good["median_ms"] > 0
    out = capsys.readouterr()
    assert "WRONG bn_relu" in out.err and "triton skipped: deliberately unavailable" in out.out


def test_mask_packing_round_trip():
    bits = torch.rand(37) > 0.5
    packed = bench_bandwidth.pack_bits(bits)
    assert packed.dtype == torch.uint8 and packed.numel() == 5
    assert torch.equal(bench_bandwidth.unpack_bits(packed, 37), bits)
    assert int(bench_bandwidth.pack_bits(torch.tensor([True] + [False] * 7 + [False, True]))[1]) == 2


# ------------------------------------------------------------------------------------ epilogue
def test_conv_epilogue_cpu_end_to_end(tmp_path):
    _needs_ext()
    pytest.importorskip("triton")
    convs = ["layer1.0.conv2", "layer2.0.conv2", "layer4.0.conv3"]  # 3x3, 3x3 stride 2, 1x1
    _run(["benchmarks.bench_conv_epilogue", "--convs", *convs], tmp_path)
    data, rows = _results(tmp_path, "conv_epilogue", bench_conv_epilogue.KEYS)
    assert set(data["skipped"]) == {"compile"}  # left out on CPU unless --compile
    assert len(data["goal"]) == 2
    got = sorted((r["conv"], r["provider"], r["residual"]) for r in rows)
    want = sorted([(c, "conv_alone", False) for c in convs]
                  + [(c, p, res) for c in convs for p in ("eager", "cuda", "triton") for res in (False, True)])
    assert got == want
    for r in rows:
        assert r["correct"] is True, r
        assert r["batch"] == 2 and r["dtype"] == "fp32" and r["layout"] == "cl"
        assert r["median_ms"] > 0 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"], r
        assert r["err"] <= r["bound"] and r["vs_conv"] > 0 and r["tflops"] > 0
        if r["provider"] == "conv_alone":
            assert r["vs_conv"] == 1.0
        assert r["kernel"].startswith("fallback: CPU tensors") if r["provider"] == "cuda" else r["kernel"] == ""
    assert {r["shape"] for r in rows if r["conv"] == "layer2.0.conv2"} == {"8x8x8->8x4x4 k3s2"}


def test_conv_epilogue_broken_provider(tmp_path, monkeypatch):
    """A fused result 1% off is wrong and untimed; conv alone and eager still are timed."""
    monkeypatch.setattr(common, "provider_unavailable", lambda p, d: None)
    real = bench_conv_epilogue.provider_fn

    def fn(name, job, case, allow_tf32):
        if name == "cuda":
            eager = real("eager", job, case, allow_tf32)
            return lambda x, r: eager(x, r) * 1.01
        return real(name, job, case, allow_tf32)

    monkeypatch.setattr(bench_conv_epilogue, "provider_fn", fn)
    monkeypatch.setattr(bench_conv_epilogue, "kernel_name", lambda *a: "")
    rc = bench_conv_epilogue.main(["--device", "cpu", "--convs", "layer1.0.conv3", "--residual", "yes",
                                   "--providers", "eager", "cuda", "--out", str(tmp_path)])
    assert rc == 1
    _, rows = _results(tmp_path, "conv_epilogue", bench_conv_epilogue.KEYS)
    by = {r["provider"]: r for r in rows}
    assert set(by) == {"conv_alone", "eager", "cuda"}
    assert by["cuda"]["correct"] is False and by["cuda"]["median_ms"] is None
    assert by["cuda"]["note"] == "wrong: not timed"
    assert by["eager"]["correct"] and by["eager"]["vs_conv"] > 0 and by["conv_alone"]["correct"]


def test_resnet50_conv_table_is_complete():
    """:data:`RESNET50_CONVS` lists every distinct conv geometry of ResNet-50 at 224x224 input, once,
    with the number of convs that have it, and QUICK names entries of it."""
    from resnet_fused.models import reference

    with torch.device("meta"):  # shapes only: no weights initialised, no arithmetic
        model = reference.resnet50().eval()
    seen = {}

    def hook(mod, inp, _out, name=None):
        geo = (mod.in_channels, mod.out_channels, mod.kernel_size[0], mod.stride[0], inp[0].shape[-1])
        assert mod.padding[0] == mod.kernel_size[0] // 2
        seen.setdefault(geo, []).append(name)

    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(lambda mod, i, o, name=name: hook(mod, i, o, name))
    with torch.no_grad():
        model(torch.zeros(1, 3, 224, 224, device="meta"))
    table = {(s.cin, s.cout, s.k, s.stride, s.hw): s for s in bench_conv_epilogue.RESNET50_CONVS}
    assert len(table) == len(bench_conv_epilogue.RESNET50_CONVS) == 23
    assert set(table) == set(seen)
    for geo, names in seen.items():
        assert table[geo].uses == len(names) and table[geo].name in names, (geo, names)
    assert sum(s.uses for s in table.values()) == 53
    assert set(bench_conv_epilogue.QUICK) <= {s.name for s in table.values()}
