"""Mixture-of-attention routing (MoA): node, UNet router stage and Flux path.
"""
