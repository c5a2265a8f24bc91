"""Smoke tests of the benchmarks: they run and report every row; what they measure is not asserted."""
