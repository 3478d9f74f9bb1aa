"""Benchmarks for resnet_fused: one script per question, results written as JSON + CSV.

- :mod:`benchmarks.common`: environment record, timing (CUDA events / perf_counter), correctness
  measures, result files.
- :mod:`benchmarks.bench_blocks`: ResNet-50 block shapes and the whole ResNet-50, inference.

Run from the repository root, e.g. ``python -m benchmarks.bench_blocks --quick``.
"""
