"""Benchmarks for resnet_fused: one script per question, results written as JSON + CSV.

- :mod:`benchmarks.common`: environment record, timing (CUDA events / perf_counter), correctness
  measures, result files.
- :mod:`benchmarks.bench_blocks`: ResNet-50 block shapes and the whole ResNet-50, inference.
- :mod:`benchmarks.bench_train`: the training step (blocks, ResNet-50, WRN-28-10), with memory.
- :mod:`benchmarks.bench_bandwidth`: the memory-bound kernels against the device's copy bandwidth.
- :mod:`benchmarks.bench_conv_epilogue`: the fused conv epilogue against cuDNN's conv alone.
- :mod:`benchmarks.bench_memory`, :mod:`benchmarks.bench_cpu_model`: saved activations; CPU ResNet-50.

Run from the repository root, e.g. ``python -m benchmarks.bench_blocks --quick``.
"""
