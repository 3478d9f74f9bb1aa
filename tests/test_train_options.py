"""The low-memory training mode: the switch itself, and that it changes what is kept, not what is
computed (a Bottleneck recomputes its last 1x1 conv in the backward instead of saving its output)."""
from __future__ import annotations

import importlib

import pytest
import torch

import resnet_fused as rf
from resnet_fused import train_options
from builders import build_pair, make_input, sgd_steps
from utils import INTERPRET

needs_triton = pytest.mark.skipif(not INTERPRET, reason="CPU tensors: the Triton backend needs TRITON_INTERPRET=1")


@pytest.fixture(autouse=True)
def _restore_low_memory():
    before = rf.low_memory()
    yield
    rf.set_low_memory(before)


def test_switch_and_context_manager():
    rf.set_low_memory(False)
    with rf.use_low_memory():
        assert rf.low_memory() is True
        with rf.use_low_memory(False):
            assert rf.low_memory() is False
        assert rf.low_memory() is True
    assert rf.low_memory() is False
    with pytest.raises(TypeError, match="enabled: expected a bool, got int"):
        rf.set_low_memory(1)


@pytest.mark.parametrize("value,expected", [("1", True), ("on", True), ("0", False), ("", False), ("off", False)])
def test_environment_variable(monkeypatch, value, expected):
    monkeypatch.setenv(train_options.ENV_VAR, value)
    try:
        assert importlib.reload(train_options).low_memory() is expected
    finally:
        monkeypatch.delenv(train_options.ENV_VAR)
        importlib.reload(train_options)


def test_environment_variable_rejects_garbage(monkeypatch):
    monkeypatch.setenv(train_options.ENV_VAR, "maybe")
    try:
        with pytest.raises(ValueError, match="RESNET_FUSED_LOW_MEMORY='maybe'"):
            importlib.reload(train_options)
    finally:
        monkeypatch.delenv(train_options.ENV_VAR)
        importlib.reload(train_options)


def _saved_activation_bytes(block, x):
    """Bytes of the distinct storages autograd keeps whose tensors have x's batch dimension."""
    seen = {}

    def pack(t):
        if t.dim() == 4 and t.shape[0] == x.shape[0]:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x)
    return sum(seen.values())


@needs_triton
def test_low_memory_bottleneck_keeps_x_y1_y2_only():
    block = rf.Bottleneck(32, 8).train()
    block.backend = "triton"
    x = torch.randn(2, 32, 6, 6, requires_grad=True)
    unit = 2 * 8 * 6 * 6 * 4  # one width-sized fp32 activation (N x planes x H x W)
    full = _saved_activation_bytes(block, x)
    with rf.use_low_memory():
        lean = _saved_activation_bytes(block, x)
    assert full == (4 + 1 + 1 + 4) * unit, "fused: x, y1, y2, y3"
    assert lean == (4 + 1 + 1) * unit, "low memory: x, y1, y2"


@needs_triton
@pytest.mark.parametrize("case", ["bottle-s2-ds-batch1", "bottle-identity"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
def test_low_memory_training_matches_reference(case, fmt, fused_train_calls):
    ours, ref = build_pair(case)
    ours.backend = "triton"
    with rf.use_low_memory():
        sgd_steps(ours, ref, lambda step: make_input(case, fmt, seed=step), steps=2)
    assert fused_train_calls == [False, False]


@needs_triton
def test_low_memory_leaves_basic_blocks_alone():
    """A BasicBlock's last conv is a 3x3: recomputing it would cost half the block, so it is kept."""
    block = rf.BasicBlock(8, 8).train()
    block.backend = "triton"
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    full = _saved_activation_bytes(block, x)
    with rf.use_low_memory():
        assert _saved_activation_bytes(block, x) == full
