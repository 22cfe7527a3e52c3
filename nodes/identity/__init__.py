"""Nodes that make, load and show identities and weights: face analysis, encoders (TransFace, PuLID's
EVA-CLIP, Omni-ID, InstantID), loaders, displays and inspectors, restoration helpers.
"""
