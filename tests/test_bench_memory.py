"""benchmarks/memory.py: saved-activation accounting under FakeTensorMode (no kernel runs)."""
from __future__ import annotations

import json

import pytest
import torch

import resnet_fused as rf
from benchmarks import memory as bm
from resnet_fused.models import reference
from utils import INTERPRET

pytestmark = pytest.mark.skipif(not INTERPRET, reason="the fused path on CPU tensors needs TRITON_INTERPRET=1")


def test_fake_count_equals_a_real_run():
    """The fake-mode count is the count of a real run (here a tiny WRN through the interpreter)."""
    torch.manual_seed(0)
    fused = rf.models.wrn(10, 1).train()
    x = torch.randn(2, 3, 8, 8)
    with rf.use_backend("triton"):
        real = bm.saved_activation_bytes(fused, x, torch.float32)
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode(allow_non_fake_inputs=True):
            fake = bm.saved_activation_bytes(fused, torch.empty(2, 3, 8, 8), torch.float32)
    assert fake == real > 0


def test_resnet50_rows_and_ordering(tmp_path):
    rows = bm.main(["--out", str(tmp_path)], cases=[("resnet50", 2, "fp16")], log=lambda s: None)
    by = {r["provider"]: r for r in rows}
    assert set(by) == set(bm.PROVIDERS) and by["eager"]["vs_eager"] == 1.0
    # the fused chain keeps no ReLU outputs and no normalised activations; low memory also drops y3
    assert by["triton-low-memory"]["saved_activation_mib"] < by["triton"]["saved_activation_mib"] \
        < by["eager"]["saved_activation_mib"]
    (json_path,) = tmp_path.glob("*_memory.json")
    data = json.loads(json_path.read_text())
    assert data["rows"] == rows and data["env"]["git_commit"] is not None
    assert (tmp_path / json_path.name.replace(".json", ".csv")).exists()


def test_stock_count_matches_hand_accounting_for_one_bottleneck():
    """Eager Bottleneck, fp32: x, y1, relu1, y2, relu2, y3 and the output (widths 4,1,1,1,1,4,4)."""
    block = reference.Bottleneck(16, 4).train()
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        got = bm.saved_activation_bytes(block, torch.empty(3, 16, 5, 5), torch.float32)
    unit = 3 * 4 * 5 * 5 * 4
    assert got == (4 + 1 + 1 + 1 + 1 + 4 + 4) * unit
