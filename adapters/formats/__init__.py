"""Adapter file formats: which published layout a file is (from its keys) and its conversion to the
pack's projector modules; the pack's own native format.
"""
