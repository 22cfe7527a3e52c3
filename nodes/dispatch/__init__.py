"""The attention dispatcher (UNet attn2 replaces and the DiT path), stage inputs and schedules, recorders,
and running the model with gradients: what every mechanism's stage runs in. Imports only common.
"""
