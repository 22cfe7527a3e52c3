"""Published Flux.1 identity modules (PuLID-Flux, XLabs' and InstantX's Flux IP-Adapters): their math, pure torch.
"""
