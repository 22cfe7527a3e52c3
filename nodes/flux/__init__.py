"""Flux-only published modules: PuLID-Flux, XLabs' and InstantX's Flux IP-Adapters (nodes and block hooks).
"""
