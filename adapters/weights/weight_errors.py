"""Errors raised while reading, detecting and converting weight files.

``adapters/`` never imports ComfyUI, so it cannot raise the node-level
``IdentityAttentionError``; it raises :class:`WeightError` with the same two
parts (what is wrong, what to do) and ``nodes/`` re-raises it with the node
and input names. Both parts are written for artists.
"""

from __future__ import annotations

from typing import Optional


class WeightError(ValueError):
    """A weight file that cannot be used. ``str(err)`` = problem + fix."""

    def __init__(self, problem: str, fix: Optional[str] = None):
        self.problem = problem
        self.fix = fix
        text = problem.rstrip(".") + "."
        if fix:
            text += f" Fix: {fix.rstrip('.')}."
        super().__init__(text)


class UnsafeFileError(WeightError):
    """A pickle that ``torch.load(weights_only=True)`` refused: it holds more than tensors."""


class ProjectorInputError(WeightError):
    """A token projector was given an IDENTITY without the features it reads."""
