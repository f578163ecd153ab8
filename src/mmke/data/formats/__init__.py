"""Benchmark readers, one module each, registered by name (``mmke.registry.benchmarks``)."""
