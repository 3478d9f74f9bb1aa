"""Test configuration.

Without CUDA the Triton kernels run on CPU tensors through Triton's interpreter, which must be
switched on before triton is first imported: we set TRITON_INTERPRET=1 here unless the caller
chose. Dispatch decisions are not persisted unless a test asks (RESNET_FUSED_CACHE_DIR=""). ``gpu``-marked tests are skipped without a CUDA device (they run on the GPU machine).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The measured dispatch keeps its decisions in this process only during tests (no file under the
# user's cache directory); tests of the cache point RESNET_FUSED_CACHE_DIR at a temporary folder.
os.environ.setdefault("RESNET_FUSED_CACHE_DIR", "")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# Property tests draw the same examples on every run (a CI verdict must not depend on the draw);
# `pytest --hypothesis-profile=explore` draws fresh ones to hunt for new failures. (A fresh draw
# found PyTorch's CPU conv crashing on a dilated 1x1 kernel: tests/test_integration.py.)
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False, max_examples=200)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_backend():
    """Fresh seed per test; every test leaves the global backend as it found it."""
    import resnet_fused

    torch.manual_seed(0)
    before = resnet_fused.get_backend()
    yield
    resnet_fused.set_backend(before)


@pytest.fixture
def fused_calls(monkeypatch):
    """The backend of every fused conv the modules run, in order ("auto" for one the measured
    dispatch ran); proves which path ran: empty means the eager module-by-module forward."""
    from resnet_fused.modules import _base

    calls = []
    real, real_site = _base._conv_run, _base.dispatch_sites.conv_site

    def spy(*a, **k):
        calls.append(k.get("backend"))
        return real(*a, **k)

    def site_spy(*a, **k):
        calls.append("auto")
        return real_site(*a, **k)

    monkeypatch.setattr(_base, "_conv_run", spy)
    monkeypatch.setattr(_base.dispatch_sites, "conv_site", site_spy)
    return calls


@pytest.fixture
def fused_train_calls(monkeypatch):
    """The ``preact`` flag of every fused training block forward, in order (empty: the blocks
    trained module by module)."""
    from resnet_fused.modules import _base

    calls = []
    real = _base.run_block_train

    def spy(x, preact, *a, **k):
        calls.append(preact)
        return real(x, preact, *a, **k)

    monkeypatch.setattr(_base, "run_block_train", spy)
    return calls


@pytest.fixture
def poisoned_empty(monkeypatch):
    """``torch.empty`` returns NaN-filled floating tensors: an output element (or statistics row) a
    kernel should have written but did not stays NaN and fails the NaN-pattern checks, where a
    zeroed page could pass for a ReLU zero."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", empty)
    assert torch.isnan(torch.empty(3)).all()  # the poison is really in place


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-tensor tests: on a small shared machine OpenMP
    threads only add spin-wait (up to 100x slower eager references there)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cuda_library():
    """The compiled library built (or loaded) once per module of ``"cuda"``-backend GPU tests (they
    name it in ``pytestmark``). Without its CUDA kernels the whole module skips with the loader's
    exact reason, and says it as a warning too (shown without ``-rs``)."""
    import warnings

    from resnet_fused import _ext

    err = _ext.cuda_error()
    if err is not None:
        reason = f"resnet_fused's cuda backend cannot run CUDA tensors here: {err}"
        warnings.warn(reason, UserWarning, stacklevel=1)
        pytest.skip(reason)
    info = _ext.build_info()
    assert info["cuda"] is True and info["torch"] == torch.__version__, info


@pytest.fixture(params=["triton", "cuda"])
def train_backend(request):
    """Each fused training backend in turn as ``builders.build``'s default (tests/test_train_blocks.py
    and test_train_models.py use it for every test): "triton", and "cuda" where the compiled library
    builds and loads (else that run skips with the loader's reason)."""
    import builders
    from utils import EXT_ERROR

    if request.param == "cuda" and EXT_ERROR is not None:
        pytest.skip(f"the compiled library is unavailable: {EXT_ERROR}")
    builders.TRAIN["backend"] = request.param
    yield request.param
    builders.TRAIN["backend"] = "triton"


@pytest.fixture
def isolated_dispatch(monkeypatch, tmp_path):
    """A fresh measured dispatcher with its own cache directory; the real timer put back afterwards
    (every test of tests/test_dispatch.py and test_dispatch_train.py)."""
    from resnet_fused import dispatch
    from resnet_fused.dispatch import cache, candidates, dispatcher, measure

    monkeypatch.setenv(cache.ENV_DIR, str(tmp_path / "cache"))
    monkeypatch.delenv(dispatcher.TUNE_ENV, raising=False)
    dispatch.forget()
    before = measure.get_timer()
    yield
    measure.set_timer(before)
    for op in candidates.OPS:
        for c in candidates.candidates(op):
            if not c.builtin:
                dispatch.unregister_candidate(op, c.name)
    dispatch.forget()
