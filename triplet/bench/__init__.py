"""Benchmark plumbing: timing and memory, the suite's measured paths, the straightforward reference, tables."""
