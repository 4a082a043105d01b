"""Benchmarks of the NEFTune reference implementation: `python -m bench --help` (from the repo root)."""
