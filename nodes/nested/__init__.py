"""Nested attention: node, UNet stage and Flux path.
"""
