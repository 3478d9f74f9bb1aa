"""Building the C++/CUDA extension (the ``"cuda"`` backend): sources, flags, and the checks CI runs.

Two ways to get the library ``resnet_fused_C``:

- **just in time** (default): the first use compiles ``csrc/`` with
  ``torch.utils.cpp_extension.load`` and ninja into torch's extension cache
  (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``); later processes reuse it.
  ``RESNET_FUSED_JIT=0`` forbids building at run time.
- **ahead of time**: ``RESNET_FUSED_BUILD_EXT=1 pip install --no-build-isolation .`` builds
  ``resnet_fused/_C*.so`` through ``setup.py`` with the same sources and flags.

Either build takes the CUDA kernels (``csrc/cuda/*.cu``) when torch is a CUDA build and nvcc is
found (``CUDA_HOME``), else the C++ (CPU) kernels only. CUDA architectures come from
``RESNET_FUSED_CUDA_ARCHS`` (default ``"80;90"``: Ampere and Hopper; ``"90a"`` style suffixes are
kept). CUTLASS headers come from ``CUTLASS_PATH`` (a CUTLASS checkout: its ``include/``) or the
``nvidia-cutlass`` package (``pip install --no-deps nvidia-cutlass``).

Command line::

    python -m resnet_fused.build --check   # compile every CUDA source with nvcc (no GPU needed) and
                                           # syntax-check the C++ layer with CUDA on; exit 1 on error
                                           # or on a register spill in a conv / BN kernel
    python -m resnet_fused.build --check --report-dir benchmarks/results/codegen
                                           # ... and write the kernels' resources (ptxas -v) there
    python -m resnet_fused.build           # build (or reuse) the JIT extension and print what it has
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

LIB_NAME = "resnet_fused_C"
ARCHS_ENV = "RESNET_FUSED_CUDA_ARCHS"
DEFAULT_ARCHS = "80;90"


# ------------------------------------------------------------------------------------- sources
def csrc_dir() -> Path:
    """The C++/CUDA sources: ``csrc/`` of a source checkout, or the copy packaged as ``_csrc``."""
    here = Path(__file__).resolve().parent
    for cand in (here.parent / "csrc", here / "_csrc"):
        if (cand / "bind.cpp").is_file():
            return cand
    raise FileNotFoundError(f"resnet_fused: C++/CUDA sources not found (looked in {here.parent / 'csrc'} "
                            f"and {here / '_csrc'})")


def cpp_sources(root: Optional[Path] = None) -> List[Path]:
    root = root or csrc_dir()
    return [root / "bind.cpp", root / "ops.cpp"] + sorted((root / "cpu").glob("*.cpp"))


def cuda_sources(root: Optional[Path] = None) -> List[Path]:
    return sorted((root or csrc_dir()).glob("cuda/*.cu"))


def include_dirs(root: Optional[Path] = None, cuda: bool = False) -> List[str]:
    root = root or csrc_dir()
    dirs = [str(root / "include"), str(root)]
    if cuda:
        cutlass = cutlass_include()
        if cutlass is not None:
            dirs.append(cutlass)
    return dirs


def cutlass_include() -> Optional[str]:
    """CUTLASS's include directory: ``$CUTLASS_PATH/include``, or the ``nvidia-cutlass`` package's."""
    env = os.environ.get("CUTLASS_PATH")
    if env:
        inc = Path(env) / "include"
        return str(inc) if (inc / "cutlass" / "cutlass.h").is_file() else None
    spec = importlib.util.find_spec("cutlass_library")  # locates the package without importing it
    for loc in (spec.submodule_search_locations or []) if spec is not None else []:
        inc = Path(loc) / "source" / "include"
        if (inc / "cutlass" / "cutlass.h").is_file():
            return str(inc)
    return None


# --------------------------------------------------------------------------------------- flags
def cuda_archs() -> List[str]:
    """Architectures to compile for, e.g. ``["80", "90"]``, from ``RESNET_FUSED_CUDA_ARCHS``."""
    raw = os.environ.get(ARCHS_ENV, DEFAULT_ARCHS)
    archs = [a.strip().replace("sm_", "").replace(".", "") for a in raw.replace(",", ";").split(";") if a.strip()]
    if not archs or not all(a[:2].isdigit() for a in archs):
        raise ValueError(f"{ARCHS_ENV}={raw!r}: expected a list like '80;90' or 'sm_80,sm_90a'")
    return archs


def gencode_flags(archs: Sequence[str]) -> List[str]:
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]


def cxx_standard() -> str:
    """The C++ standard torch's extension builder compiles with (C++20 from torch 2.10 on, C++17
    before): ``--check`` compiles with the same one, so it checks what a build compiles."""
    import inspect

    from torch.utils import cpp_extension

    return "c++20" if "-std=c++20" in inspect.getsource(cpp_extension) else "c++17"


def nvcc_flags(archs: Optional[Sequence[str]] = None) -> List[str]:
    """Flags of every CUDA compile, JIT, ahead-of-time and ``--check`` alike (the C++ standard is
    added by torch's extension builder, and by ``--check`` to match it)."""
    # no --use_fast_math: approximate division / sqrt and flushed denormals would change results
    # against PyTorch's for no measurable gain in memory-bound kernels
    return ["-O3", "-DNDEBUG", "--expt-relaxed-constexpr",
            # torch's extension builder disables the half/bfloat16 operators; CUTLASS and our
            # kernels convert explicitly but include headers that expect them
            "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
            "-U__CUDA_NO_HALF2_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
            *gencode_flags(archs or cuda_archs())]


def cxx_flags(with_cuda: bool, archs: Optional[Sequence[str]] = None) -> List[str]:
    import torch

    # bare tokens, stringified in ops.cpp: quotes would not survive ninja's shell
    flags = ["-O3", f"-DRESNET_FUSED_TORCH_VERSION={torch.__version__}", *openmp_flags()]
    if with_cuda:
        flags += ["-DRESNET_FUSED_WITH_CUDA", f"-DRESNET_FUSED_CUDA_ARCHS={'_'.join(archs or cuda_archs())}"]
    return flags


def openmp_flags() -> List[str]:
    """at::parallel_for runs our CPU kernels on torch's OpenMP thread pool only when the
    extension itself is compiled and linked with OpenMP (else it runs them on one thread)."""
    return [] if sys.platform == "darwin" else ["-fopenmp"]


def nvcc_path() -> Optional[str]:
    """nvcc under CUDA_HOME / CUDA_PATH, else on PATH; None if there is none."""
    for env in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(env)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def cuda_build_problem() -> Optional[str]:
    """Why a build here would leave out the CUDA kernels, or None if it includes them."""
    import torch

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    if nvcc_path() is None:
        return "nvcc not found (set CUDA_HOME)"
    if cutlass_include() is None:
        return "CUTLASS headers not found (pip install --no-deps nvidia-cutlass, or set CUTLASS_PATH)"
    return None


# ------------------------------------------------------------------------------------ building
def jit_build(verbose: bool = False) -> str:
    """Compile (or reuse the cached build of) the library; returns the shared library's path."""
    from torch.utils import cpp_extension

    with_cuda = cuda_build_problem() is None
    root = csrc_dir()
    archs = cuda_archs() if with_cuda else []
    sources = [str(p) for p in cpp_sources(root)] + ([str(p) for p in cuda_sources(root)] if with_cuda else [])
    if with_cuda:  # cpp_extension reads TORCH_CUDA_ARCH_LIST when no -gencode is given; ours are given
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", " ".join(f"{a[0]}.{a[1:]}" for a in archs))
    return cpp_extension.load(
        name=LIB_NAME + ("_cuda" if with_cuda else "_cpu"),
        sources=sources,
        extra_cflags=cxx_flags(with_cuda, archs),
        extra_cuda_cflags=nvcc_flags(archs) if with_cuda else None,
        extra_include_paths=include_dirs(root, cuda=with_cuda),
        extra_ldflags=openmp_flags(),
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=verbose,
    )


def _run(cmd: List[str]) -> Tuple[List[str], int, str, float]:
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return cmd, proc.returncode, proc.stdout + proc.stderr, time.time() - start


def check(jobs: Optional[int] = None, out=sys.stdout, report_dir: Optional[Path] = None) -> int:
    """Compile every CUDA source with nvcc (object files into a temporary directory, read by
    ``cuobjdump``, then thrown away) and syntax-check the C++ layer with the CUDA registrations on.
    No GPU and no CUDA build of torch needed. ptxas reports each kernel's registers, stack, spills
    and shared memory (``-Xptxas -v``), the SASS its tensor-core and memory instructions; a spill in
    a conv or BatchNorm kernel is a failure (:mod:`resnet_fused.aot.cuda_report`), and
    ``report_dir`` gets the table as ``cuda_resources.csv`` / ``cuda_report.md``. Returns the
    number of failures."""
    with tempfile.TemporaryDirectory(prefix="resnet_fused_check_") as objdir:
        return _check(jobs, out, report_dir, Path(objdir))


def _check(jobs: Optional[int], out, report_dir: Optional[Path], objdir: Path) -> int:
    from torch.utils import cpp_extension

    root = csrc_dir()
    nvcc = nvcc_path()
    std = cxx_standard()
    cmds: List[List[str]] = []
    failures = 0
    if nvcc is None:
        print("check: nvcc not found (set CUDA_HOME): the CUDA sources were not compiled", file=out)
        failures += 1
    elif cutlass_include() is None:
        print("check: CUTLASS headers not found (pip install --no-deps nvidia-cutlass, or set CUTLASS_PATH)",
              file=out)
        failures += 1
    else:
        incs = [f"-I{d}" for d in include_dirs(root, cuda=True)]
        for src in cuda_sources(root):
            cmds.append([nvcc, f"-std={std}", *nvcc_flags(), "-Xptxas", "-v", *incs, "-c", str(src),
                         "-o", str(objdir / f"{src.stem}.o")])
    cxx = os.environ.get("CXX", "c++")
    torch_incs = [f"-I{d}" for d in cpp_extension.include_paths()]
    for src in cpp_sources(root):
        cmds.append([cxx, "-fsyntax-only", f"-std={std}", *cxx_flags(True), *torch_incs,
                     *(f"-I{d}" for d in include_dirs(root)), str(src)])
    ptxas_logs = []
    with futures.ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as pool:
        for cmd, rc, log, secs in pool.map(_run, cmds):
            name = Path(cmd[-3] if cmd[-2] == "-o" else cmd[-1]).relative_to(root)
            print(f"check: {'ok  ' if rc == 0 else 'FAIL'} {name} ({secs:.0f} s)", file=out)
            if rc != 0:
                failures += 1
                print(log, file=out)
            elif cmd[0] == nvcc:
                ptxas_logs.append((name.name, log))
    sass = {src: _sass_of(objdir / f"{Path(src).stem}.o") for src, _ in ptxas_logs}
    failures += _resource_report(ptxas_logs, sass, out, report_dir)
    print(f"check: {len(cmds)} sources, {failures} failure(s); archs {';'.join(cuda_archs())}", file=out)
    return failures


def _sass_of(obj: Path) -> str:
    """``cuobjdump -sass`` of an object file (nvcc's cuobjdump, else the one shipped with Triton);
    empty when there is none (the report then has no instruction counts)."""
    tool = Path(nvcc_path() or "nvcc").parent / "cuobjdump"
    if not tool.is_file():
        try:
            from triton import knobs

            tool = Path(knobs.nvidia.cuobjdump.path)
        except Exception:  # no triton: resources without SASS counts
            return ""
    proc = subprocess.run([str(tool), "-sass", str(obj)], capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else ""


def _resource_report(logs: List[Tuple[str, str]], sass: Dict[str, str], out, report_dir: Optional[Path]) -> int:
    """Print (and write) the ptxas resource table of the CUDA sources; the number of spilling
    conv / BN kernels."""
    from .aot import cuda_report

    rows = cuda_report.resource_rows(logs, sass)
    for line in cuda_report.summary_lines(rows):
        print(f"check: resources {line}", file=out)
    failing = [r for r in rows if r["fails"]]
    for r in failing:
        print(f"check: FAIL {r['source']} {r['arch']} {r['kernel']}: {r['spill_stores']} B spill stores, "
              f"{r['spill_loads']} B spill loads", file=out)
    if report_dir is not None and rows:
        header = {"command": "python -m resnet_fused.build " + " ".join(sys.argv[1:]),
                  "nvcc": _nvcc_version(), "archs": ";".join(cuda_archs()), "cutlass": str(cutlass_include())}
        for p in cuda_report.write(Path(report_dir), rows, header):
            print(f"check: wrote {p}", file=out)
    return len(failing)


def _nvcc_version() -> str:
    nvcc = nvcc_path()
    if nvcc is None:
        return "none"
    proc = subprocess.run([nvcc, "--version"], capture_output=True, text=True)
    return (proc.stdout.strip().splitlines() or ["?"])[-1]


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m resnet_fused.build", description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compile every CUDA source with nvcc, no GPU needed")
    ap.add_argument("--jobs", type=int, default=None, help="parallel compiles for --check (default: all cores)")
    ap.add_argument("--report-dir", type=Path, default=None,
                    help="with --check: write the CUDA kernels' resource report (cuda_resources.csv, cuda_report.md) here")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    if args.check:
        return 1 if check(args.jobs, report_dir=args.report_dir) else 0
    from . import _ext

    path = jit_build(verbose=args.verbose)
    print(f"built: {path}")
    _ext.reset()
    info = _ext.build_info()
    print(f"extension: {info}")
    err = _ext.load_error()
    if err:
        print(f"but unavailable: {err}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
