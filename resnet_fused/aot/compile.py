"""Compiling recorded kernel variants for NVIDIA targets on a CPU-only machine, and measuring them.

``triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", cc, 32))``
produces PTX and a cubin with the ptxas that ships with Triton; no GPU or CUDA driver is needed.
Triton compiles capability 9.0 as ``sm_90a`` (wgmma and TMA available) and 8.x as plain
``sm_8x``. For each compiled variant this module reports:

- registers, stack frame and spill store/load bytes: the ptxas ``-v`` log Triton's own ptxas call
  writes (``TRITON_DUMP_PTXAS_LOG``), cross-checked against ``cuobjdump -res-usage``;
- shared memory: Triton's metadata ``shared`` (the dynamic shared memory the launch requests);
- SASS instruction counts (:func:`.sass.sass_counts`) from ``cuobjdump -sass`` of the cubin;
- whether the kernel has tensor-core dots (``tt.dot`` in the Triton IR, :func:`.sass.tensor_core_dots`).

Variants compile in worker processes started with ``spawn`` and without ``TRITON_INTERPRET`` (an
interpreted kernel cannot be compiled), each with a private, temporary Triton cache so every compile
runs ptxas and yields its log. Results can be kept in a directory (``cache_dir``) keyed by Triton's
own compile key (Triton and ptxas versions, kernel source and its callees, signature, constexprs,
attributes, options, target): a later run only compiles what changed.
"""
from __future__ import annotations

import concurrent.futures as futures
import contextlib
import hashlib
import importlib
import io
import json
import multiprocessing
import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

from .sass import parse_ptxas_log, parse_res_usage, sass_counts, tensor_core_dots

RESULT_VERSION = 1  # bump when a result's fields or their meaning change (invalidates the cache)


@dataclass(frozen=True)
class Target:
    """A GPU architecture: name as ptxas spells it, compute capability, and the most dynamic shared
    memory one block may use there (the opt-in limit, ``cudaDevAttrMaxSharedMemoryPerBlockOptin``)."""
    name: str
    capability: int
    smem_limit: int

    @property
    def has_wgmma(self) -> bool:
        return self.capability == 90  # sm_90a: Hopper's warpgroup MMA (HGMMA in SASS)


TARGETS = {
    "sm_90a": Target("sm_90a", 90, 232448),  # H100 / H200: 227 KB
    "sm_80": Target("sm_80", 80, 166912),  # A100: 163 KB
    "sm_86": Target("sm_86", 86, 101376),  # A10, RTX 30xx: 99 KB
    "sm_89": Target("sm_89", 89, 101376),  # L4, L40, RTX 40xx: 99 KB
}


def target(name: str) -> Target:
    """The :class:`Target` named ``name`` (``"sm_90a"``, ``"sm_80"``, ``"sm_86"``, ``"sm_89"``)."""
    if not isinstance(name, str):
        raise TypeError(f"arch: expected a name like 'sm_90a', got {type(name).__name__}")
    if name == "sm_90":
        raise ValueError("arch: Triton compiles compute capability 9.0 as 'sm_90a' (with wgmma and TMA); "
                         "ask for 'sm_90a'")
    if name not in TARGETS:
        raise ValueError(f"arch: unknown {name!r}; expected one of {list(TARGETS)}")
    return TARGETS[name]


def _tool(name: str) -> str:
    """Path of a CUDA binary tool shipped with Triton (``cuobjdump``, ``nvdisasm``)."""
    from triton import knobs

    return getattr(knobs.nvidia, name).path


def resolve_kernel(qualified: str):
    """The ``JITFunction`` named ``"module:qualname"``."""
    from triton.runtime.jit import JITFunction

    module, _, qualname = qualified.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    while not isinstance(obj, JITFunction) and hasattr(obj, "fn"):  # Autotuner / Heuristics wrappers
        obj = obj.fn
    if not isinstance(obj, JITFunction):
        raise TypeError(f"{qualified}: not a @triton.jit function here ({type(obj).__name__}); compile "
                        f"without TRITON_INTERPRET set")
    return obj


def _source(fn, variant: Dict[str, Any]):
    from triton.compiler import ASTSource

    return ASTSource(fn, variant["signature"], variant["constexprs"], variant["attrs"])


def cache_key(fn, variant: Dict[str, Any], tgt: Target) -> str:
    """Triton's own compile key for this variant and target, with this module's result version."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.cache import get_cache_key
    from triton._C.libtriton import get_cache_invalidating_env_vars

    backend = make_backend(GPUTarget("cuda", tgt.capability, 32))
    options = backend.parse_options(dict(variant["options"]))
    key = get_cache_key(_source(fn, variant), backend, options, get_cache_invalidating_env_vars())
    return hashlib.sha256(f"{key}-result{RESULT_VERSION}".encode()).hexdigest()


def compile_variant(fn, variant: Dict[str, Any], tgt: Target) -> Dict[str, Any]:
    """Compile one variant (``signature``/``constexprs``/``attrs``/``options`` as recorded) for
    ``tgt`` and measure it. Returns a flat dict; ``status`` is ``"ok"`` or ``"error"``."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    row: Dict[str, Any] = {"status": "ok", "error": ""}
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(log):
            knobs.nvidia.dump_ptxas_log = True  # Triton prints its ptxas -v log: ours to parse
            knobs.compilation.always_compile = True  # a Triton cache hit would skip ptxas and its log
            compiled = triton.compile(_source(fn, variant), target=GPUTarget("cuda", tgt.capability, 32),
                                      options=dict(variant["options"]))
    except Exception as exc:  # a compile error is a result, reported per variant
        msg = str(exc).strip().splitlines()
        row.update(status="error", error=f"{type(exc).__name__}: {' | '.join(msg[:3])[:400]}",
                   compile_s=round(time.perf_counter() - start, 3))
        return row
    row["compile_s"] = round(time.perf_counter() - start, 3)
    name = compiled.metadata.name
    funcs = parse_ptxas_log(log.getvalue())
    ptx = next((f for (arch, n), f in funcs.items() if n == name and f.entry), None)
    ms = re.search(r"Compile time = ([\d.]+) ms", log.getvalue())
    row["ptxas_s"] = round(float(ms.group(1)) / 1000, 3) if ms else None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cubin = Path(tmp) / f"{name}.cubin"
            cubin.write_bytes(compiled.asm["cubin"])
            usage = parse_res_usage(_run([_tool("cuobjdump"), "-res-usage", str(cubin)])).get(name, {})
            counts = sass_counts(_run([_tool("cuobjdump"), "-sass", str(cubin)]))
    except (OSError, RuntimeError) as exc:  # compiled, but unreadable here: not a pass
        row.update(status="error", error=f"reading the cubin: {exc}"[:400])
        return row
    dots, tc_dots = tensor_core_dots(compiled.asm["ttir"])
    row.update(
        registers=ptx.registers if ptx and ptx.registers is not None else usage.get("REG"),
        stack=ptx.stack if ptx else usage.get("STACK"),
        spill_stores=ptx.spill_stores if ptx else None,
        spill_loads=ptx.spill_loads if ptx else None,
        local=usage.get("LOCAL"),
        shared=int(compiled.metadata.shared),
        num_warps=int(compiled.metadata.num_warps),
        dots=dots, tc_dots=tc_dots,
        **{k.lower(): v for k, v in counts.items()},
    )
    if ptx is None:  # the log is how spills are known: say so rather than report 0
        row.update(status="error", error="no ptxas -v log for this kernel (spills unknown)")
    return row


def _run(cmd: List[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[:300]}")
    return proc.stdout


# ------------------------------------------------------------------------------ worker processes
_worker_cache_dir: Optional[str] = None


def _worker_init(triton_cache: str, cache_dir: Optional[str]) -> None:
    global _worker_cache_dir
    from triton import knobs

    knobs.cache.dir = triton_cache  # private (the user's is left alone), unless precompiling into it
    _worker_cache_dir = cache_dir


def _work(task: Dict[str, Any]) -> Dict[str, Any]:
    """One (variant, target) in a worker: from the result cache, or compiled and stored there."""
    tgt = TARGETS[task["arch"]]
    base = {"variant": task["variant"], "arch": tgt.name, "cached": False}
    try:
        fn = resolve_kernel(task["kernel"])
        key = cache_key(fn, task, tgt)
    except Exception as exc:
        return {**base, "status": "error", "error": f"{type(exc).__name__}: {exc}"[:400]}
    path = Path(_worker_cache_dir) / f"{key}.json" if _worker_cache_dir else None
    if path is not None and path.is_file():
        try:
            return {**json.loads(path.read_text()), **base, "cached": True}
        except ValueError:  # a torn write: compile again
            pass
    row = {**base, **compile_variant(fn, task, tgt)}
    if path is not None and row["status"] == "ok":  # errors are retried, not remembered
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(row, sort_keys=True))
        tmp.replace(path)
    return row


def compile_all(tasks: List[Dict[str, Any]], jobs: int, cache_dir: Optional[str] = None,
                progress: Optional[Callable[[int, int], None]] = None,
                triton_cache: Optional[str] = None) -> List[Dict[str, Any]]:
    """Results of ``tasks`` (dicts: ``variant``, ``kernel``, ``arch``, ``signature``, ``constexprs``,
    ``attrs``, ``options``), in order, compiled by ``jobs`` spawned worker processes. Call it from
    under ``if __name__ == "__main__":`` in a script (spawned workers import the main module).

    ``triton_cache``: compile into this Triton cache instead of a private temporary one. On the GPU
    the report is made for, that is how a run precompiles: the kernels land under the same keys the
    JIT computes at launch (Triton's key does not depend on the ptxas-log and always-compile
    switches used here), so later launches load them instead of compiling one at a time."""
    if cache_dir:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
    if not tasks:
        return []
    ctx = multiprocessing.get_context("spawn")
    # workers compile, so they must not start Triton's interpreter; they spawn lazily, so the
    # variable stays out of this process's environment until the pool is gone
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        with tempfile.TemporaryDirectory(prefix="resnet_fused_aot_") as tmp, \
                futures.ProcessPoolExecutor(max(1, min(jobs, len(tasks))), mp_context=ctx, initializer=_worker_init,
                                            initargs=(triton_cache or tmp, cache_dir)) as pool:
            results = []
            # chunksize 1: both workers stay busy to the end (kernel sizes vary 50x)
            for i, row in enumerate(pool.map(_work, tasks, chunksize=1)):
                results.append(row)
                if progress is not None:
                    progress(i + 1, len(tasks))
    except futures.process.BrokenProcessPool as exc:  # a worker died (out of memory, a crash)
        raise RuntimeError(f"compile_all: a compile worker died ({exc}); finished results are in --cache, if given") from None
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved
    return results


def tasks_for(variants: Iterable[Any], archs: Iterable[str]) -> List[Dict[str, Any]]:
    """One task per (recorded variant, target)."""
    out = []
    for tgt in archs:
        for ln in variants:
            out.append({"variant": ln.variant, "kernel": ln.kernel, "arch": tgt, "signature": ln.signature,
                        "constexprs": ln.constexprs, "attrs": ln.attrs, "options": ln.options})
    return out
