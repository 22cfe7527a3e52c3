"""The mechanisms of Identity Attention in plain PyTorch + einops.

Nothing in this package imports ComfyUI: every function takes tensors (and, where
heavy attention is needed, an ``attention_fn`` callable injected by ``nodes/``),
so each mechanism is testable against a float64 reference without a host.
"""
