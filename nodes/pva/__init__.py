"""Parallel visual attention (PVA) and the decoupled IP-Adapter family: node, UNet stage, identity inputs,
and joint identity attention on Flux.
"""
