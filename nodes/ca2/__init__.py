"""The CA² gate (CA-Edit): node, UNet stage and Flux path.
"""
