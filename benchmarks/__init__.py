"""Benchmarks: run on demand (`make bench`), print ratios; never part of the test suite."""
