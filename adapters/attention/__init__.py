"""The attention math of each mechanism (PVA, KV-mixed, MoA routing, the CA² gate, STFG, FACT's gated
self-attention, per-stage tokens, nested attention): pure torch, shapes in each function's docstring.
"""
