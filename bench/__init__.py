"""Benchmark scripts (see bench/README.md); a package only so that scripts can share ``bench.kernel_bench``."""
