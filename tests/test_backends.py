"""Backend names, selection (set/use/get), availability, resolution and the environment variable."""
import os
import subprocess
import sys
import threading
import types
import warnings
from pathlib import Path

import pytest
import torch

import resnet_fused
from resnet_fused import (BackendUnavailableError, _ext, available_backends, backends, get_backend, set_backend,
                          use_backend)
from resnet_fused.dispatch import candidates as dispatch_candidates
from resnet_fused.dispatch import keys as dispatch_keys
from resnet_fused.ops import bn_act, conv_bias_act
from utils import INTERPRET

ROOT = Path(__file__).resolve().parents[1]
NEEDS_INTERPRETER = pytest.mark.skipif(not INTERPRET, reason="CPU Triton needs TRITON_INTERPRET=1")
X = torch.zeros(1, 2, 3, 3)


def cuda_like():
    """A stand-in for a CUDA tensor on a machine without CUDA.

    ``resolve`` looks at nothing but ``x.device``, and a real CUDA tensor cannot be made here, so
    an object with a CUDA device is enough to drive the CUDA branch of 'auto'.
    """
    return types.SimpleNamespace(device=torch.device("cuda", 0))


EXT_ERROR = _ext.load_error()  # None where the compiled library builds and loads (CI: it does)
NOT_BUILT = "simulated for the test: the C++/CUDA extension is not built"


@pytest.fixture
def ext_unavailable(monkeypatch):
    """The loader's state as on a machine where the library cannot be built."""
    monkeypatch.setattr(_ext, "_state", {"done": True, "error": NOT_BUILT})
    monkeypatch.setattr(dispatch_candidates, "_warned", set())
    resnet_fused.dispatch.forget()  # decisions made with the library present do not apply
    yield
    resnet_fused.dispatch.forget()


@pytest.fixture(autouse=True)
def start_from_auto():
    """Each test starts from 'auto' whatever RESNET_FUSED_BACKEND the suite was run with (the
    default itself is tested in a subprocess); conftest restores the previous choice afterwards."""
    set_backend("auto")


# ----------------------------------------------------------------------------- names, validation
def name_backend(how, name):
    """Ask for backend ``name`` through one public route: ``how`` is "set_backend", "use_backend",
    "resolve", "unavailable_reason", "conv_bias_act" (alias "op") or "bn_act"."""
    if how == "set_backend":
        set_backend(name)
    elif how == "use_backend":
        with use_backend(name):
            pass
    elif how == "resolve":
        backends.resolve(name, X)
    elif how == "unavailable_reason":
        backends.unavailable_reason(name)
    elif how in ("conv_bias_act", "op"):
        conv_bias_act(X, torch.zeros(2, 2, 1, 1), backend=name)
    elif how == "bn_act":
        bn_act(X, torch.ones(2), torch.zeros(2), backend=name)
    else:
        raise AssertionError(f"unknown route {how!r}")


def test_names():
    assert backends.BACKENDS == ("auto", "triton", "cuda", "torch")
    assert issubclass(BackendUnavailableError, RuntimeError)
    for name in ("set_backend", "use_backend", "get_backend", "available_backends", "BackendUnavailableError"):
        assert name in resnet_fused.__all__


@pytest.mark.parametrize("call", ["set_backend", "use_backend", "resolve", "unavailable_reason", "op"])
def test_unknown_name_is_a_value_error_naming_it(call):
    with pytest.raises(ValueError) as info:
        name_backend(call, "tritonn")
    msg = str(info.value)
    assert "'tritonn'" in msg and "backend" in msg
    assert all(name in msg for name in backends.BACKENDS)  # says what would have been accepted
    assert get_backend() == "auto"


@pytest.mark.parametrize("bad", [None, 1, b"torch", ["torch"]], ids=repr)
def test_non_str_name_is_a_type_error(bad):
    with pytest.raises(TypeError, match=type(bad).__name__):
        set_backend(bad)
    with pytest.raises(TypeError, match=type(bad).__name__):
        with use_backend(bad):
            pass
    assert get_backend() == "auto"


def test_names_are_normalised():
    set_backend(" Torch ")
    assert get_backend() == "torch"
    with use_backend("AUTO") as name:
        assert name == get_backend() == "auto"


# ------------------------------------------------------------------------------ set / use / get
def test_set_backend():
    set_backend("torch")
    assert get_backend() == "torch"
    # process-wide: another thread sees it
    seen = []
    t = threading.Thread(target=lambda: seen.append(get_backend()))
    t.start()
    t.join()
    assert seen == ["torch"]
    set_backend("auto")
    assert get_backend() == "auto"


def test_use_backend_restores_on_exit_and_nests():
    set_backend("torch")
    with use_backend("auto") as name:
        assert name == "auto" and get_backend() == "auto"
        with use_backend("torch"):
            assert get_backend() == "torch"
        assert get_backend() == "auto"
    assert get_backend() == "torch"


def test_use_backend_restores_on_exception():
    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with use_backend("torch"):
            with use_backend("auto"):
                raise Boom
    assert get_backend() == "auto"
    with pytest.raises(Boom):
        with use_backend("torch"):
            raise Boom
    assert get_backend() == "auto"


def test_use_backend_is_per_thread():
    seen = []
    inside = threading.Event()
    done = threading.Event()

    def other():
        inside.wait()
        seen.append(get_backend())
        done.set()

    t = threading.Thread(target=other)
    t.start()
    with use_backend("torch"):
        inside.set()
        done.wait()
    t.join()
    assert seen == ["auto"]


def test_use_backend_leaves_no_thread_override():
    """After the block this thread follows the process-wide choice again, set from any thread."""
    with use_backend("auto"):
        pass
    t = threading.Thread(target=set_backend, args=("torch",))
    t.start()
    t.join()
    assert get_backend() == "torch"


def test_set_backend_inside_use_backend_persists():
    with use_backend("torch"):
        set_backend("auto")
        assert get_backend() == "auto"
    assert get_backend() == "auto"


# ---------------------------------------------------------------------------------- availability
def test_available_backends():
    names = available_backends()
    assert "auto" in names and "torch" in names
    assert ("cuda" in names) == (EXT_ERROR is None)
    assert ("cuda" in available_backends(torch.device("cpu"))) == (EXT_ERROR is None)
    assert ("triton" in names) == (INTERPRET or torch.cuda.is_available())
    cpu = available_backends(torch.device("cpu"))
    assert ("triton" in cpu) == INTERPRET
    assert available_backends(torch.device("meta")) == ["auto", "torch"]


def test_unavailable_reason():
    assert backends.unavailable_reason("auto") is None and backends.unavailable_reason("torch") is None
    assert backends.unavailable_reason("cuda") == EXT_ERROR
    assert "got a tensor on meta" in backends.unavailable_reason("cuda", torch.device("meta"))
    if INTERPRET:
        assert backends.unavailable_reason("triton", torch.device("cpu")) is None
    assert "got a tensor on meta" in backends.unavailable_reason("triton", torch.device("meta"))


@pytest.mark.skipif(EXT_ERROR is not None, reason=f"extension unavailable: {EXT_ERROR}")
def test_cuda_backend_without_cuda_kernels(monkeypatch):
    """A CPU-only build runs CPU tensors; a CUDA tensor gets the precise reason."""
    if _ext.build_info()["cuda"]:
        pytest.skip("this build has CUDA kernels")
    reason = backends.unavailable_reason("cuda", torch.device("cuda", 0))
    assert "no CUDA kernels" in reason
    assert backends.unavailable_reason("cuda", torch.device("cpu")) is None
    with pytest.raises(BackendUnavailableError, match="no CUDA kernels"):
        backends.resolve("cuda", cuda_like())


@pytest.mark.parametrize("how", ["set_backend", "use_backend", "resolve", "conv_bias_act", "bn_act"])
def test_cuda_backend_raises_not_built(how, ext_unavailable):
    set_backend("torch")
    with pytest.raises(BackendUnavailableError) as info:
        name_backend(how, "cuda")
    msg = str(info.value)
    assert "'cuda'" in msg and NOT_BUILT in msg
    assert get_backend() == "torch"  # a refused choice changes nothing


@NEEDS_INTERPRETER
@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_interpreter_state_is_fixed_at_import(monkeypatch):
    """Triton decided interpreter-or-compiler when our kernels were defined; a later change of
    TRITON_INTERPRET changes nothing, so availability must not follow it either."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert backends.triton_interpreting()
    assert "triton" in available_backends(torch.device("cpu"))
    assert backends.resolve("triton", X) == "triton"


def test_triton_without_interpreter(monkeypatch, ext_unavailable):
    """No CUDA and no interpreter: an explicit 'triton' is refused, with the way out in the message."""
    monkeypatch.setattr(backends, "triton_interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "triton" not in available_backends()
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        set_backend("triton")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        with use_backend("triton"):
            pass
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        backends.resolve("triton", X)
    assert backends.resolve("auto", X) == "auto"  # the measured dispatch decides per site
    assert get_backend() == "auto"


# -------------------------------------------------------------------------------------- resolve
def test_resolve_cpu():
    """'auto' comes back as 'auto' for fusable cases (the measured dispatch picks per call site)
    and as the PyTorch path for cases no kernel covers; explicit names are kept."""
    assert backends.resolve("auto", X) == "auto"
    if EXT_ERROR is None:
        assert backends.resolve("cuda", X) == "cuda"
    assert backends.resolve("torch", X) == "torch"
    assert backends.resolve("auto", X, fusable=False) == "torch"
    with use_backend("torch"):
        assert backends.resolve(None, X) == "torch"
    assert backends.resolve(None, X) == "auto"  # None: the current choice, 'auto'


def _facts(device):
    case = ("conv_bias_act", (1, 2, 3, 3), "nchw", (2, 2, 3, 3), "nchw", (1, 1), (1, 1), (1, 1), 1, "float32",
            "float32", None, True, False, False)
    return dispatch_keys.facts(case, torch.device(device))


def test_auto_without_extension_warns_once(ext_unavailable):
    """Resolving is silent; the measured dispatch runs without the missing library's candidate and
    says so once per process, with the reason."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [backends.resolve("auto", X) for _ in range(3)] == ["auto"] * 3
    cuda = dispatch_candidates.get("conv_bias_act", "cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reasons = [cuda.unsupported(_facts("cpu")) for _ in range(3)]
        y = conv_bias_act(torch.randn(1, 2, 4, 4), torch.randn(3, 2, 1, 1), backend="auto")
    assert reasons == [NOT_BUILT] * 3 and y.shape == (1, 3, 4, 4)
    runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(runtime) == 1 and NOT_BUILT in str(runtime[0].message) and "'cuda'" in str(runtime[0].message)


@NEEDS_INTERPRETER
def test_resolve_triton_on_cpu_under_interpreter():
    assert backends.resolve("triton", X) == "triton"
    assert backends.resolve("triton", X, fusable=False) == "torch"
    with use_backend("triton"):
        assert backends.resolve(None, X) == "triton"
    set_backend("triton")
    assert backends.resolve(None, X) == "triton"


def test_auto_measures_triton_on_cuda_not_on_the_interpreter(monkeypatch):
    """'auto' offers the Triton candidate for CUDA tensors; the interpreter (CPU tensors) is a test
    vehicle it never measures."""
    monkeypatch.setattr(dispatch_candidates, "_warned", set())
    triton = dispatch_candidates.get("conv_bias_act", "triton")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.resolve("auto", cuda_like()) == "auto"
        assert backends.resolve("auto", cuda_like(), fusable=False) == "torch"
        assert triton.unsupported(_facts("cuda")) is None
        assert "test vehicle" in triton.unsupported(_facts("cpu"))


def test_auto_without_triton_warns_once(monkeypatch):
    """'auto' on a CUDA tensor with Triton broken: the dispatch measures without the Triton
    candidate, and says so once per process.

    Honest simulation: Triton does import here, so we stand in for a machine where it does not by
    replacing ``triton_import_error`` (the one place backends learns why Triton cannot run), and for
    CUDA tensors by CUDA facts (the candidates look at nothing else).
    """
    reason = "import triton failed (ImportError: simulated for the test)"
    monkeypatch.setattr(backends, "triton_import_error", lambda: reason)
    monkeypatch.setattr(dispatch_candidates, "_warned", set())
    triton = dispatch_candidates.get("conv_bias_act", "triton")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert [triton.unsupported(_facts("cuda")) for _ in range(3)] == [reason] * 3
        assert backends.resolve("auto", cuda_like()) == "auto"
    runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(runtime) == 1, [str(w.message) for w in caught]
    assert reason in str(runtime[0].message) and "'triton'" in str(runtime[0].message)
    # an explicit request is not silently downgraded: it raises, with the same reason
    with pytest.raises(BackendUnavailableError, match="simulated for the test"):
        backends.resolve("triton", cuda_like())
    assert "triton" not in available_backends()


# ------------------------------------------------------------------------- environment variable
def run_python(code, **env_vars):
    env = {k: v for k, v in os.environ.items() if k not in ("RESNET_FUSED_BACKEND", "TRITON_INTERPRET")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    env.update(env_vars)
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


PRINT = "import resnet_fused as rf; print(rf.get_backend()); print(','.join(rf.available_backends()))"


@pytest.mark.parametrize("value,expected", [(None, "auto"), ("torch", "torch"), (" Triton ", "triton"),
                                            ("", "auto")], ids=["unset", "torch", "spaced-Triton", "empty"])
def test_env_var_is_honoured(value, expected):
    extra = {} if value is None else {"RESNET_FUSED_BACKEND": value}
    proc = run_python(PRINT, TRITON_INTERPRET="1", **extra)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == expected


def test_env_var_invalid_is_a_clear_error():
    proc = run_python(PRINT, RESNET_FUSED_BACKEND="fastest", TRITON_INTERPRET="1")
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ValueError") and "RESNET_FUSED_BACKEND='fastest'" in last
    assert all(name in last for name in backends.BACKENDS)


def test_env_var_cuda_is_refused_when_used(tmp_path):
    """Naming an unbuilt extension in the environment fails at the first op, with the reason
    (RESNET_FUSED_JIT=0 and an empty extension cache: nothing may be built)."""
    code = PRINT + """
import torch
try:
    rf.ops.bn_act(torch.zeros(1, 2, 2, 2), torch.ones(2), torch.zeros(2))
except rf.BackendUnavailableError as exc:
    print("refused:", exc)
"""
    if _ext._aot_library() is not None:
        pytest.skip("an ahead-of-time build is installed: the extension is built")
    proc = run_python(code, RESNET_FUSED_BACKEND="cuda", TRITON_INTERPRET="1", RESNET_FUSED_JIT="0",
                      TORCH_EXTENSIONS_DIR=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "cuda" and lines[2].startswith("refused:") and "not built" in lines[2], lines
    assert "RESNET_FUSED_JIT=0" in lines[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA, Triton is available without the interpreter")
@pytest.mark.parametrize("value,interpreting", [("1", True), ("yes", True), ("0", False), ("false", False),
                                                ("2", False)])
def test_triton_interpret_parsed_as_triton_does(value, interpreting):
    """'triton' on CPU is offered exactly when Triton itself runs our kernels in its interpreter."""
    code = PRINT + """
import torch
x, w = torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3)
try:
    y = rf.ops.conv_bias_act(x, w, backend="triton")
    print("ran", bool(torch.allclose(y, torch.relu(torch.nn.functional.conv2d(x, w)), atol=1e-5)))
except rf.BackendUnavailableError as exc:
    print("refused:", exc)
"""
    proc = run_python(code, TRITON_INTERPRET=value)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert ("triton" in lines[1].split(",")) == interpreting
    if interpreting:
        assert lines[2] == "ran True"
    else:
        assert lines[2].startswith("refused:") and "TRITON_INTERPRET=1" in lines[2]
