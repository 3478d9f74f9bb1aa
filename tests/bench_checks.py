"""Checks the benchmark tests share: a script's result files, a timed / untimed row, the auto
provider's dispatch record, and a spy proving no dispatch key is measured while the harness times."""
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

from benchmarks import common, models, settings  # noqa: E402
from resnet_fused import backends  # noqa: E402

EXT_ERROR = backends.unavailable_reason("cuda", torch.device("cpu"))  # why the C++ kernels cannot run here
needs_ext = pytest.mark.skipif(EXT_ERROR is not None, reason=f"the compiled library is unavailable: {EXT_ERROR}")


def results(out_dir: Path, bench: str = "models", keys=models.KEYS, top=("goals", "notes")):
    """The JSON (after checking the CSV and markdown beside it)."""
    files = sorted(out_dir.glob(f"*_{bench}.json"))
    assert len(files) == 1, files
    data = json.loads(files[0].read_text())
    assert tuple(data) == ("env", "skipped") + tuple(top) + ("dispatch", "rows"), tuple(data)
    assert tuple(data["env"]) == common.ENV_KEYS and data["env"]["gpu"].startswith("cpu: ")
    assert all(tuple(r) == keys for r in data["rows"])
    with open(files[0].with_suffix(".csv")) as f:
        got = list(csv.DictReader(f))
    assert len(got) == len(data["rows"]) and (not got or tuple(got[0]) == keys)
    return data, files[0].with_suffix(".md").read_text()


def check_timed(row, dtype="fp32"):
    assert row["dtype"] == dtype and row["mode"] in common.MODES and row["correct"] is True, row
    assert row["median_ms"] > 0 and row["p20_ms"] <= row["median_ms"] <= row["p80_ms"], row
    assert math.isclose(row["images_per_s"], row["batch"] * 1e3 / row["median_ms"], rel_tol=1e-3)
    assert row["peak_mem_mb"] is None and row["layout"] == "channels_last"  # CPU


def check_untimed(row):
    assert row["correct"] is False and row["peak_mem_mb"] is None
    assert row["median_ms"] is row["p20_ms"] is row["p80_ms"] is row["images_per_s"] is None


def check_dispatch(data: dict) -> None:
    """One "dispatch" entry per auto row, keyed by the row's case fields; its decisions have the
    documented fields, were measured (not static, not from a file), name real candidates of their
    op, and chose one that was timed and beat torch by the margin (or is torch)."""
    from resnet_fused.dispatch import candidates as cands

    auto = [r for r in data["rows"] if r["provider"] == "auto"]
    assert len(data["dispatch"]) == len(auto) and auto, data["dispatch"]
    for e, r in zip(data["dispatch"], auto):
        assert tuple(e) == settings.DISPATCH_CASE_KEYS + ("env", "decisions"), tuple(e)
        assert all(e[k] == r.get(k, "") for k in settings.DISPATCH_CASE_KEYS), (e, r)
        assert set(e["env"]) <= set(settings.DISPATCH_ENV_FIELDS) and e["env"]["device"].startswith("cpu")
        assert e["decisions"], e
        for d in e["decisions"]:
            assert tuple(d) == settings.DECISION_KEYS, tuple(d)
            names = [c.name for c in cands.candidates(d["op"])]
            assert d["source"] == "measured" and d["sites"] and d["measure_ms"] > 0, d
            assert set(d["candidates"]) == set(names) and d["chosen"] in names, d
            assert set(d["case"]["candidates"]) <= set(names) and "torch" in d["case"]["candidates"], d
            assert not set(d["case"]) & set(settings.DISPATCH_ENV_FIELDS), d["case"]
            timed = {n: v for n, v in d["candidates"].items() if isinstance(v, (int, float))}
            assert "torch" in timed and d["chosen"] in timed, d
            assert all(n in timed or v.startswith(("unsupported: ", "excluded: ")) for n, v in d["candidates"].items())
            if d["chosen"] != "torch":
                assert timed[d["chosen"]] <= timed["torch"] * (1 - d["margin"] + 1e-4), d  # (rounding)


def spy_measuring(monkeypatch):
    """(ops, during): the op of every dispatch key measured from now on, and of those measured while
    the harness was timing (``common.benchmark`` and friends): ``during`` must stay empty."""
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
            timing.append(1)
            try:
                return _fn(*args, **kwargs)
            finally:
                timing.pop()

        monkeypatch.setattr(common, name, timed)
    return ops, during
