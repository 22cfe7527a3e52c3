"""FACT's face adapter (gated self-attention in each UNet block): node and block patch.
"""
