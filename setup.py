"""Build script.

``pip install -e .`` installs the Python package and compiles nothing: the C++/CUDA library of the
``"cuda"`` backend is then built on first use (just in time, cached; see ``resnet_fused/build.py``).

``RESNET_FUSED_BUILD_EXT=1 pip install --no-build-isolation .`` (or ``-e .``) builds it ahead of
time as ``resnet_fused/_C*.so`` with the same sources and flags. It needs torch installed (hence
``--no-build-isolation``); the CUDA kernels are included when torch is a CUDA build, nvcc is found
(``CUDA_HOME``) and CUTLASS's headers are (``pip install --no-deps nvidia-cutlass`` or
``CUTLASS_PATH``), else the C++ kernels alone are built, with a warning.
``RESNET_FUSED_CUDA_ARCHS`` picks the GPU architectures (default ``"80;90"``); ``MAX_JOBS`` caps
parallel compiles. Every install also packages ``csrc/`` (as ``resnet_fused/_csrc``) so an installed
package can build just in time too.
"""
import importlib.util
import json
import os
import shutil
import warnings
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithSources(build_py):
    """Also copy csrc/ into the package (resnet_fused/_csrc): the sources of the just-in-time build."""

    def run(self):
        super().run()
        dst = Path(self.build_lib) / "resnet_fused" / "_csrc"
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(ROOT / "csrc", dst)


def _build_module():
    """resnet_fused/build.py loaded on its own (importing the package would import triton etc.)."""
    spec = importlib.util.spec_from_file_location("_resnet_fused_build", ROOT / "resnet_fused" / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _extension():
    """(ext_modules, cmdclass) for the ahead-of-time build, or nothing when it is not asked for."""
    if os.environ.get("RESNET_FUSED_BUILD_EXT", "0").strip() in ("", "0"):
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        raise SystemExit("RESNET_FUSED_BUILD_EXT=1 needs torch installed first, and pip's "
                         f"--no-build-isolation (import failed: {exc})")
    b = _build_module()
    csrc = ROOT / "csrc"
    problem = b.cuda_build_problem()
    with_cuda = problem is None
    if not with_cuda:
        warnings.warn(f"resnet_fused: building the C++ kernels only, without CUDA: {problem}")
    archs = b.cuda_archs() if with_cuda else []
    sources = [str(p.relative_to(ROOT)) for p in b.cpp_sources(csrc)]
    if with_cuda:
        sources += [str(p.relative_to(ROOT)) for p in b.cuda_sources(csrc)]
    args = {"cxx": b.cxx_flags(with_cuda, archs)}
    if with_cuda:
        args["nvcc"] = b.nvcc_flags(archs)
    kind = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    ext = kind("resnet_fused._C", sources, include_dirs=b.include_dirs(csrc, cuda=with_cuda),
               extra_compile_args=args, extra_link_args=b.openmp_flags())
    record = {"torch": torch.__version__, "cuda": with_cuda, "archs": ";".join(archs), "cuda_problem": problem}

    class BuildExt(cpp_extension.BuildExtension):
        def run(self):
            super().run()
            # what the loader compares with the running torch before loading the library
            meta = Path(self.get_ext_fullpath("resnet_fused._C")).with_name("_C.build.json")
            meta.write_text(json.dumps(record, indent=1) + "\n")

    return [ext], {"build_ext": BuildExt}


ext_modules, cmdclass = _extension()
setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPyWithSources, **cmdclass})
