"""Benchmarks for resnet_fused: one script per question, one small measuring layer under them.

- :mod:`benchmarks.models`: the model zoo, inference and a training step, against eager and
  torch.compile.
- :mod:`benchmarks.wrn_fig4`: the Wide ResNet paper's Figure 4 (thin-deep vs wide) re-run.
- :mod:`benchmarks.layers`: every conv shape and memory-bound op against the measured ceilings.
- :mod:`benchmarks.memory`: activation memory a training step saves; :mod:`benchmarks.cpu_model`:
  the whole-model comparison on a CPU at full size.
- :mod:`benchmarks.suite` (with :mod:`benchmarks.smoke`, :mod:`benchmarks.peaks` and
  ``run_gpu.sh``): the device run; :mod:`benchmarks.report`: tables, charts, the README section.
- :mod:`benchmarks.common`: the measuring layer (providers, check before timing, medians with
  quantiles via ``triton.testing.do_bench`` / ``torch.utils.benchmark``, result files).

Run from the repository root, e.g. ``python -m benchmarks.models --quick``.
"""
