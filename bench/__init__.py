"""Benchmarks of the cortex-flow runtime against hand-written redis-py loops (see README.md)."""
