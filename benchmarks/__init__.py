"""Benchmarks: how much each Identity Attention mechanism costs per sampling step.

Run ``python -m benchmarks.run`` (see README.md beside this file). Speed is
measured here and only here; tests never assert timings.
"""
