"""KV-mixed cross-attention: node and its Flux path.
"""
