"""Fused training across processes: ``nn.SyncBatchNorm`` and ``DistributedDataParallel``.

Two CPU ranks on the gloo backend, Triton kernels through its interpreter. One job runs both ranks
once for the whole file (a module fixture); each rank saves what it computed and the tests below
judge it here, in this process, against references that never leave it:

- the truth: the same block with plain ``nn.BatchNorm2d``, float64, ONE process, on the
  concatenated full batch (``nn.SyncBatchNorm`` refuses CPU tensors in this torch, so it cannot be
  the reference; full-batch BatchNorm is what SyncBatchNorm promises to equal);
- PyTorch's own float32 error: the same, in float32 (``utils.assert_close`` bounds);
- each rank's *local* parameter gradients (``nn.SyncBatchNorm`` semantics: the statistics and the
  dx sums are global, but a rank's dW / dgamma / dbeta are the sums over its own images): a
  "per-rank parameters" copy of the reference, in which each rank's slice of the batch goes through
  its own copy of every conv weight and BN affine (one BatchNorm's statistics still over the whole
  batch). The gradient of a copy is exactly that rank's share.

Worker processes get ``TRITON_INTERPRET=1`` in their environment before anything imports triton.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import resnet_fused as rf
from resnet_fused.models import reference as R
from builders import build_pair, build_preact_pair
from utils import assert_close, randomize_bn

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
WORLD = 2
CL = torch.channels_last
NCHW = torch.contiguous_format


# --------------------------------------------------------------------------------- the cases
def _post(kind, kw, ds, n):
    return build_pair((kind, kw, ds, (n, 0, 0)))


WIDE_PROJ = ("wide", dict(cin=4, cout=6, stride=2), None, None)
PREACT_PROJ = ("preact", dict(cin=8, planes=2, stride=2), "conv", None)


# name: (build () -> (ours, ref) with plain BatchNorm2d and one state, input [C, H, W], images per
# rank, memory format, number of fused blocks)
SYNC_CASES = {
    "bottleneck-ds": (lambda: _post("Bottleneck", dict(inplanes=6, planes=3, stride=2), True, 4),
                      (6, 7, 7), (2, 2), NCHW),
    # a rank with 3 images, one with 1: the cross-rank merge must weight by counts
    "bottleneck-ds-uneven-3-1": (lambda: _post("Bottleneck", dict(inplanes=6, planes=3, stride=2), True, 4),
                                 (6, 7, 7), (3, 1), NCHW),
    "basic-identity-cl": (lambda: _post("BasicBlock", dict(inplanes=5, planes=5), False, 4),
                          (5, 6, 6), (2, 2), CL),
    "widebasic-proj": (lambda: build_preact_pair(WIDE_PROJ), (4, 7, 7), (2, 2), NCHW),
    "preact-bottleneck-proj-uneven-1-3": (lambda: build_preact_pair(PREACT_PROJ), (8, 7, 7), (1, 3), NCHW),
}


class TinyNet(nn.Module):
    """Stem conv (bias, no BN: every BatchNorm sits in a fused block) + 2 Bottlenecks + pool + fc."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=True)
        self.layer = nn.Sequential(
            rf.Bottleneck(8, 4, stride=2, downsample=nn.Sequential(R.conv1x1(8, 16, 2), nn.BatchNorm2d(16))),
            rf.Bottleneck(16, 4))
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.layer(torch.relu(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


DDP_STEPS, DDP_BATCH, DDP_LR, DDP_MOMENTUM = 2, 4, 0.1, 0.9
DDP_VARIANTS = ("bn", "syncbn")


def _split(t, sizes):
    return [p.contiguous(memory_format=CL if t.dim() == 4 and not t.is_contiguous() else NCHW).clone()
            for p in t.split(list(sizes))]


def _build_job():
    """Everything both ranks need, and the references this process keeps."""
    job, refs = {"sync": {}}, {"sync": {}}
    for i, (name, (build, chw, sizes, fmt)) in enumerate(SYNC_CASES.items()):
        ours, ref = build()
        gen = torch.Generator().manual_seed(10 + i)
        x = torch.randn(sum(sizes), *chw, generator=gen).to(memory_format=fmt)
        with torch.no_grad():
            out_shape = ref.train()(x.clone()).shape
        ours, ref = build()  # again: the probe forward above moved the running stats
        g = torch.randn(out_shape, generator=gen)
        sync = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(ours)).train()
        job["sync"][name] = {"model": sync, "x": _split(x, sizes), "g": _split(g, sizes)}
        refs["sync"][name] = {"ref": ref, "x": x, "g": g, "sizes": sizes, "fmt": fmt}
    torch.manual_seed(3)
    tiny = TinyNet()
    randomize_bn(tiny)
    gen = torch.Generator().manual_seed(4)
    steps = [{"x": torch.randn(DDP_BATCH, 3, 8, 8, generator=gen), "y": torch.randint(0, 5, (DDP_BATCH,), generator=gen)}
             for _ in range(DDP_STEPS)]
    job["ddp"] = {"model": tiny, "steps": [{k: list(v.chunk(WORLD)) for k, v in s.items()} for s in steps]}
    refs["ddp"] = {"model": tiny, "steps": steps}
    return job, refs


# ------------------------------------------------------------------------------ the workers
def _worker(rank: int, world: int, init_file: str, job_path: str, out_path: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from resnet_fused.modules import _base

    assert os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
    dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=world,
                            timeout=timedelta(seconds=90))
    calls = []
    real = _base.run_block_train

    def spy(x, preact, *a, **k):
        calls.append(preact)
        return real(x, preact, *a, **k)

    _base.run_block_train = spy
    job = torch.load(job_path, weights_only=False)
    results = {"sync": {}}
    with rf.use_backend("triton"):
        for name, case in job["sync"].items():
            n0 = len(calls)
            try:
                model = case["model"]
                x = case["x"][rank].clone().requires_grad_()
                out = model(x)
                (out * case["g"][rank]).sum().backward()
                results["sync"][name] = {
                    "out": out.detach(), "x_grad": x.grad,
                    "grads": {n: p.grad for n, p in model.named_parameters()},
                    "buffers": {n: b.clone() for n, b in model.named_buffers()},
                    "fused_calls": len(calls) - n0}
            except Exception:
                results["sync"][name] = {"error": traceback.format_exc()}
        results["ddp"] = {}
        for variant in DDP_VARIANTS:
            n0 = len(calls)
            try:
                model = copy.deepcopy(job["ddp"]["model"]).train()
                # broadcast_buffers=False: rank 0's running stats are NOT copied to the other rank
                # at each forward; each rank's buffers are what its own BatchNorms computed
                ddp = DDP(model, broadcast_buffers=False)
                if variant == "syncbn":
                    # DDP refuses to be built around a CPU SyncBatchNorm (a construction-time check
                    # only); convert after: the SyncBatchNorms take over the very Parameter and buffer
                    # objects DDP registered, so DDP's gradient hooks stay in place
                    ids = [id(p) for p in model.parameters()]
                    assert nn.SyncBatchNorm.convert_sync_batchnorm(model) is model
                    assert [id(p) for p in model.parameters()] == ids
                    assert any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
                opt = torch.optim.SGD(ddp.parameters(), lr=DDP_LR, momentum=DDP_MOMENTUM)
                for step in job["ddp"]["steps"]:
                    loss = F.cross_entropy(ddp(step["x"][rank]), step["y"][rank])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                results["ddp"][variant] = {
                    "params": {n: p.detach().clone() for n, p in model.named_parameters()},
                    "buffers": {n: b.clone() for n, b in model.named_buffers()},
                    "fused_calls": len(calls) - n0}
            except Exception:
                results["ddp"][variant] = {"error": traceback.format_exc()}
    torch.save(results, out_path)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def dist_run(tmp_path_factory):
    """Run both ranks once; ``(refs, [rank 0 results, rank 1 results])``."""
    d = tmp_path_factory.mktemp("dist")
    job, refs = _build_job()
    torch.save(job, d / "job.pt")
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "1"  # before the worker imports triton
    env["OMP_NUM_THREADS"] = "1"  # two ranks on a small machine
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(r), str(WORLD), str(d / "init"),
                               str(d / "job.pt"), str(d / f"rank{r}.pt")],
                              cwd=str(d), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(WORLD)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("distributed workers timed out")
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} exited with {p.returncode}:\n{logs[r][-6000:]}"
    return refs, [torch.load(d / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


# ------------------------------------------------------------------------- the references
class _PerRankConv(nn.Module):
    """A conv whose images ``sizes[r]`` (in batch order) use their own weight copy ``weights[r]``."""

    def __init__(self, conv: nn.Conv2d, sizes) -> None:
        super().__init__()
        self.sizes = list(sizes)
        self.kw = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups)
        self.weights = nn.ParameterList([nn.Parameter(conv.weight.detach().clone()) for _ in sizes])

    def forward(self, x):
        return torch.cat([F.conv2d(p, w, None, **self.kw) for p, w in zip(x.split(self.sizes), self.weights)])


class _PerRankBN(nn.Module):
    """Training BatchNorm over the WHOLE batch, then each rank's slice its own (gamma, beta) copy."""

    def __init__(self, bn: nn.BatchNorm2d, sizes) -> None:
        super().__init__()
        self.sizes, self.eps, self.momentum = list(sizes), bn.eps, bn.momentum
        self.register_buffer("running_mean", bn.running_mean.detach().clone())
        self.register_buffer("running_var", bn.running_var.detach().clone())
        self.gammas = nn.ParameterList([nn.Parameter(bn.weight.detach().clone()) for _ in sizes])
        self.betas = nn.ParameterList([nn.Parameter(bn.bias.detach().clone()) for _ in sizes])

    def forward(self, x):
        xhat = F.batch_norm(x, self.running_mean, self.running_var, None, None, True, self.momentum, self.eps)
        return torch.cat([p * g.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)
                          for p, g, b in zip(xhat.split(self.sizes), self.gammas, self.betas)])


def _per_rank_copy(model: nn.Module, sizes) -> nn.Module:
    model = copy.deepcopy(model)
    for name, m in list(model.named_modules()):
        if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)):
            parent, _, leaf = name.rpartition(".")
            new = _PerRankConv(m, sizes) if isinstance(m, nn.Conv2d) else _PerRankBN(m, sizes)
            setattr(model.get_submodule(parent) if parent else model, leaf, new)
    return model


def _per_rank_grads(model: nn.Module, rank: int):
    """``{original parameter name: this rank's gradient}`` of a :func:`_per_rank_copy`."""
    grads = {}
    for name, m in model.named_modules():
        if isinstance(m, _PerRankConv):
            grads[f"{name}.weight"] = m.weights[rank].grad
        elif isinstance(m, _PerRankBN):
            grads[f"{name}.weight"] = m.gammas[rank].grad
            grads[f"{name}.bias"] = m.betas[rank].grad
    return grads


def _fwd_bwd(model, x, g, dtype):
    model = model.to(dtype).train()
    x = x.detach().to(dtype).requires_grad_()
    with rf.use_backend("torch"):
        out = model(x)
    (out * g.to(dtype)).sum().backward()
    return model, out.detach(), x.grad


# ----------------------------------------------------------------------------- SyncBatchNorm
def _sync_refs(case):
    ref, x, g, sizes = case["ref"], case["x"], case["g"], case["sizes"]
    full = {dt: _fwd_bwd(copy.deepcopy(ref), x, g, dt) for dt in (torch.float32, torch.float64)}
    split = {dt: _fwd_bwd(_per_rank_copy(ref, sizes), x, g, dt)[0] for dt in (torch.float32, torch.float64)}
    return full, split


def _rank_result(results, name, rank):
    res = results[rank]["sync"][name]
    assert "error" not in res, f"rank {rank} failed:\n{res['error']}"
    return res


@pytest.mark.parametrize("name", list(SYNC_CASES))
def test_syncbn_fused_matches_full_batch(name, dist_run):
    refs, results = dist_run
    case = refs["sync"][name]
    sizes = case["sizes"]
    full, split = _sync_refs(case)
    (m64, out64, xg64), (m32, out32, xg32) = full[torch.float64], full[torch.float32]
    res = [_rank_result(results, name, r) for r in range(WORLD)]
    starts = [sum(sizes[:r]) for r in range(WORLD)]
    for r, rr in enumerate(res):
        assert rr["fused_calls"] == 1, f"rank {r}: the block did not take the fused training path"
        sl = slice(starts[r], starts[r] + sizes[r])
        assert rr["out"].is_contiguous(memory_format=case["fmt"]), f"rank {r}: output layout"
        assert_close(rr["out"], out64[sl], out32[sl], name=f"rank {r} output")
        assert_close(rr["x_grad"], xg64[sl], xg32[sl], name=f"rank {r} x.grad")

    # running statistics: identical on every rank, equal to full-batch BatchNorm's
    ref_bufs64, ref_bufs32 = dict(m64.named_buffers()), dict(m32.named_buffers())
    assert set(res[0]["buffers"]) == set(ref_bufs64)
    for n, b64 in ref_bufs64.items():
        b0, b1 = res[0]["buffers"][n], res[1]["buffers"][n]
        assert torch.equal(b0, b1), f"{n} differs between ranks: {b0} vs {b1}"
        if n.endswith("num_batches_tracked"):
            assert int(b0) == int(b64) == 1, f"{n}: {b0}, reference {b64}"
        else:
            assert_close(b0, b64, ref_bufs32[n], name=n)

    # parameter gradients: each rank its own share; the shares add up to the full-batch gradient
    ref_p64, ref_p32 = dict(m64.named_parameters()), dict(m32.named_parameters())
    local64 = [_per_rank_grads(split[torch.float64], r) for r in range(WORLD)]
    local32 = [_per_rank_grads(split[torch.float32], r) for r in range(WORLD)]
    assert set(res[0]["grads"]) == set(ref_p64) == set(local64[0])
    for n, p64 in ref_p64.items():
        for r in range(WORLD):
            assert res[r]["grads"][n] is not None, f"rank {r}: {n} got no gradient"
            assert_close(res[r]["grads"][n], local64[r][n], local32[r][n], name=f"rank {r} local {n}.grad")
        total = sum(res[r]["grads"][n] for r in range(WORLD))
        assert_close(total, p64.grad, ref_p32[n].grad, name=f"sum over ranks of {n}.grad")


# ------------------------------------------------------------------------------------- DDP
def _ddp_reference(model, steps, dtype, per_rank: bool):
    """Models after the SGD steps. ``per_rank``: DDP over plain BatchNorm emulated in one process:
    one model copy per rank normalising by its own images' statistics, the ranks' gradients
    averaged (what DDP's all-reduce does), the same averaged step applied to every copy. Else one
    model on the full batch (what DDP over SyncBatchNorm must equal)."""
    models = [copy.deepcopy(model).to(dtype).train() for _ in range(WORLD if per_rank else 1)]
    opts = [torch.optim.SGD(m.parameters(), lr=DDP_LR, momentum=DDP_MOMENTUM) for m in models]
    with rf.use_backend("torch"):
        for step in steps:
            if per_rank:
                xs, ys = step["x"].to(dtype).chunk(WORLD), step["y"].chunk(WORLD)
                grads = [torch.autograd.grad(F.cross_entropy(m(x), y), list(m.parameters()))
                         for m, x, y in zip(models, xs, ys)]
                avg = [sum(gs) / WORLD for gs in zip(*grads)]
            else:
                avg = torch.autograd.grad(F.cross_entropy(models[0](step["x"].to(dtype)), step["y"]),
                                          list(models[0].parameters()))
            for m, opt in zip(models, opts):
                for p, g in zip(m.parameters(), avg):
                    p.grad = g.clone()
                opt.step()
    return models if per_rank else models * WORLD


@pytest.mark.parametrize("variant", DDP_VARIANTS)
def test_ddp_two_sgd_steps(variant, dist_run):
    """DDP (gloo, 2 CPU ranks, 2 images each) over stem + 2 fused Bottlenecks + fc, 2 SGD steps.

    ``bn``: plain BatchNorm2d, the configuration DDP supports on CPU. Each rank normalises by its
    own images' statistics, so the reference is per rank (:func:`_ddp_reference`): identical
    parameters on both ranks, each rank's running statistics its own.
    ``syncbn``: the BatchNorms converted to SyncBatchNorm (after wrapping; see the worker): the two
    ranks together compute full-batch BatchNorm, so the reference is ONE process on the full batch.
    Each rank's loss is the mean over its 2 images; DDP averages the gradients of the 2 ranks, which
    is the gradient of the mean over all 4 images: the reference's loss. SyncBatchNorm's backward
    all-reduce runs interleaved with DDP's gradient all-reduces here, as on GPUs.
    """
    refs, results = dist_run
    res = [results[r]["ddp"][variant] for r in range(WORLD)]
    for r in range(WORLD):
        assert "error" not in res[r], f"rank {r} failed:\n{res[r]['error']}"
        assert res[r]["fused_calls"] == 2 * DDP_STEPS, f"rank {r}: the Bottlenecks did not train fused"
    per_rank = variant == "bn"
    ref64 = _ddp_reference(refs["ddp"]["model"], refs["ddp"]["steps"], torch.float64, per_rank)
    ref32 = _ddp_reference(refs["ddp"]["model"], refs["ddp"]["steps"], torch.float32, per_rank)
    init = dict(refs["ddp"]["model"].named_parameters())
    for r in range(WORLD):
        p64, p32 = dict(ref64[r].named_parameters()), dict(ref32[r].named_parameters())
        b64, b32 = dict(ref64[r].named_buffers()), dict(ref32[r].named_buffers())
        assert set(res[r]["params"]) == set(p64) and set(res[r]["buffers"]) == set(b64)
        for n in p64:
            assert torch.equal(res[r]["params"][n], res[0]["params"][n]), f"{n} differs between ranks"
            assert not torch.equal(res[r]["params"][n], init[n]), f"{n} did not move"
            assert_close(res[r]["params"][n], p64[n], p32[n], name=f"rank {r} param {n}")
        for n in b64:
            if n.endswith("num_batches_tracked"):
                assert int(res[r]["buffers"][n]) == int(b64[n]) == DDP_STEPS, n
            else:
                assert_close(res[r]["buffers"][n], b64[n], b32[n], name=f"rank {r} buffer {n}")
            if not per_rank:
                assert torch.equal(res[r]["buffers"][n], res[0]["buffers"][n]), f"{n} differs between ranks"


if __name__ == "__main__" and len(sys.argv) == 7 and sys.argv[1] == "--worker":
    _worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6])
