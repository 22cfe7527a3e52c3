"""Faces: detection and recognition packs, alignment, crops and masks, parsing, the face encoders, the
IDENTITY record they produce, and the pictures that show them.
"""
