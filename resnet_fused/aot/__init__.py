"""Ahead-of-time codegen report for the Triton kernels: what a GPU would compile, compiled here.

No GPU needed. ``python -m resnet_fused.aot`` (see :mod:`.__main__`):

1. records (:mod:`.record`, :mod:`.drive`) every Triton launch the named models make in eval and in
   a training step, on the meta device, for fp16 / bf16 / fp32 (TF32) and channels_last / NCHW:
   kernel, argument types, constexprs, the launch configurations the launchers pick (every
   configuration an autotuner would compile), and the specialisation Triton's JIT applies;
2. compiles each distinct variant once per target (``sm_90a``, ``sm_80``...) in worker processes
   (:mod:`.compile`), reading registers, spills and shared memory from ptxas and Triton, and
   instruction counts from the SASS (:mod:`.sass`);
3. writes the report (:mod:`.report`) and exits non-zero when a variant fails to compile, spills,
   needs more shared memory than the target has, or is a tensor-core variant without HGMMA on sm_90a.
"""
from .record import Launch, Recorder, recording, specialize

__all__ = ["Launch", "Recorder", "recording", "specialize"]
