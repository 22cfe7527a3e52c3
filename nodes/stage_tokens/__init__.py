"""Per-stage K/V identity tokens: node and UNet stage patch.
"""
