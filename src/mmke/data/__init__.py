"""Benchmarks as data: the native case format, the generated world, readers of foreign formats."""
