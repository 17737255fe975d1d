"""Benchmarks of the whole system, run against a fresh `python -m berth run`."""
