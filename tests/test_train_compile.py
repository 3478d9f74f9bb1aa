"""``torch.compile`` of the fused training blocks (Triton backend; CPU tensors through Triton's
interpreter).

``fullgraph=True`` turns any graph break into an error, so a passing compile proves the whole
block - the fused ``autograd.Function`` with its custom ops and the running-statistics update - is
one graph. Each step is judged three ways: the compiled block against the float64 reference
(bounded by PyTorch's own float32 error, ``utils.assert_close``), against the uncompiled fused
block, and on its buffers (running statistics to tolerance, ``num_batches_tracked`` exactly: an
update run twice, or not at all, shows in both).
"""
from __future__ import annotations

import copy

import pytest
import torch

import resnet_fused as rf
from builders import build_pair, build_preact_pair, load_params
from utils import INTERPRET, assert_close, rel_err

pytestmark = [pytest.mark.skipif(not INTERPRET, reason="CPU tensors: the Triton backend needs TRITON_INTERPRET=1"),
              pytest.mark.usefixtures("one_thread")]

CL = torch.channels_last
NCHW = torch.contiguous_format

WIDE_PROJ = ("wide", dict(cin=4, cout=6, stride=2), None, None)
PREACT_PROJ = ("preact", dict(cin=8, planes=2, stride=2), "conv", None)

# name: (build () -> (ours, reference) with one state, input [N, C, H, W], memory format)
CASES = {
    "bottleneck-ds-s2": (lambda: build_pair(("Bottleneck", dict(inplanes=6, planes=3, stride=2), True, None)),
                         (2, 6, 7, 7), NCHW),
    "basic-identity-cl": (lambda: build_pair(("BasicBlock", dict(inplanes=5, planes=5), False, None)),
                          (2, 5, 6, 6), CL),
    "widebasic-proj-s2": (lambda: build_preact_pair(WIDE_PROJ), (2, 4, 7, 7), NCHW),
    "preact-bottleneck-proj-s2": (lambda: build_preact_pair(PREACT_PROJ), (2, 8, 7, 7), NCHW),
}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _inputs(shape, fmt, step):
    return torch.randn(shape, generator=torch.Generator().manual_seed(100 + step)).to(memory_format=fmt)


def _step(model, x, grad_seed, dtype=torch.float32):
    """One forward + backward of ``sum(out * G)``, G random from ``grad_seed``; ``(out, x.grad)``."""
    xi = x.detach().to(dtype).requires_grad_()
    out = model(xi)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed))
    (out * g.to(out.dtype)).sum().backward()
    return out.detach(), xi.grad


def _same(c, f, what, exact):
    """Compiled vs uncompiled fused: bitwise under aot_eager (it runs the very same ops); Inductor
    may fuse the few elementwise ops around the custom ops differently, so to a few ulps there."""
    if exact:
        assert torch.equal(c, f), f"{what}: compiled differs from uncompiled fused (rel {rel_err(c, f):.3e})"
    else:
        assert rel_err(c, f) <= 1e-6, f"{what}: compiled vs uncompiled fused differ by {rel_err(c, f):.3e}"


def _check_against(compiled, eager_fused, ref32, ref64, x, step, exact):
    """One training step on all four; compiled checked against the fp64 truth and the uncompiled
    fused block."""
    tag = f"step {step}: "
    with rf.use_backend("triton"):
        out_c, dx_c = _step(compiled, x, 200 + step)
        out_f, dx_f = _step(eager_fused, x, 200 + step)
    with rf.use_backend("torch"):
        out_32, dx_32 = _step(ref32, x, 200 + step)
        out_64, dx_64 = _step(ref64, x, 200 + step, dtype=torch.float64)
    fmt = CL if (x.is_contiguous(memory_format=CL) and not x.is_contiguous()) else NCHW
    assert out_c.is_contiguous(memory_format=fmt), f"{tag}compiled output layout {out_c.stride()}"
    for what, c, f, t32, t64 in (("output", out_c, out_f, out_32, out_64), ("x.grad", dx_c, dx_f, dx_32, dx_64)):
        assert_close(c, t64, t32, name=tag + "compiled " + what)
        assert_close(f, t64, t32, name=tag + "uncompiled fused " + what)
        _same(c, f, tag + what, exact)
    module = compiled._orig_mod
    named = [dict(m.named_parameters()) for m in (module, eager_fused, ref32, ref64)]
    for n, p in named[0].items():
        assert p.grad is not None, f"{tag}{n}: no gradient through the compiled block"
        assert_close(p.grad, named[3][n].grad, named[2][n].grad, name=f"{tag}compiled {n}.grad")
        _same(p.grad, named[1][n].grad, f"{tag}{n}.grad", exact)
    bufs = [dict(m.named_buffers()) for m in (module, eager_fused, ref32, ref64)]
    assert set(bufs[0]) == set(bufs[3])
    for n, b in bufs[0].items():
        if n.endswith("num_batches_tracked"):
            assert int(b) == int(bufs[1][n]) == int(bufs[3][n]) == step + 1, \
                f"{tag}{n} = {int(b)} (uncompiled {int(bufs[1][n])}, reference {int(bufs[3][n])})"
        else:
            assert_close(b, bufs[3][n], bufs[2][n], name=f"{tag}compiled {n}")
            _same(b, bufs[1][n], tag + n, exact)


def _run_two_steps(case, backend, recorder=None):
    """Two training steps. Before each, every model takes the float64 reference's parameters
    (rounded to float32), and only the reference takes an SGD step: each step's forward and backward
    are judged from one state. (Models stepped independently drift apart by rounding, and a
    gradient dominated by cancellation - here conv3's at step 1 - magnifies the drift past any
    per-step bound, for PyTorch's float32 model as much as for ours.) Buffers are never copied:
    each model's running statistics and ``num_batches_tracked`` are its own updates only."""
    build, shape, fmt = CASES[case]
    ours, ref = build()
    ours.train()
    ref.train()
    eager_fused = copy.deepcopy(ours)
    ref32, ref64 = copy.deepcopy(ref), copy.deepcopy(ref).double()
    ours.backend = "triton"
    eager_fused.backend = "triton"
    compiled = torch.compile(ours, fullgraph=True, backend=recorder or backend)
    opt = torch.optim.SGD(ref64.parameters(), lr=0.05, momentum=0.9)
    for step in range(2):
        load_params((ours, eager_fused, ref32), dict(ref64.named_parameters()))
        _check_against(compiled, eager_fused, ref32, ref64, _inputs(shape, fmt, step), step,
                       exact=backend == "aot_eager")
        opt.step()
        opt.zero_grad()
    return compiled


@pytest.mark.parametrize("case", CASES)
def test_compile_aot_eager_fullgraph_two_steps(case):
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    rec = AotEagerAndRecordGraphs()
    _run_two_steps(case, "aot_eager", recorder=rec)
    # the fused training path is what got compiled: its custom ops in the forward and backward graphs
    assert rec.fw_graphs and rec.bw_graphs, "nothing was compiled"
    fw = "\n".join(g.code for g in rec.fw_graphs)
    bw = "\n".join(g.code for g in rec.bw_graphs)
    assert "resnet_fused.conv_train" in fw, "the compiled forward does not run the fused training conv"
    assert "resnet_fused.bn_relu_bwd_reduce" in bw and "resnet_fused.bn_relu_bwd_apply" in bw, \
        "the compiled backward does not run the fused BN backward"
    assert "batch_norm" not in fw, "the compiled forward runs eager BatchNorm"


def test_compile_inductor_fullgraph_bottleneck():
    """The default backend (Inductor) around the custom ops: one Bottleneck, two steps."""
    _run_two_steps("bottleneck-ds-s2", "inductor")
