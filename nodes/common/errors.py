"""Errors an artist can act on.

ComfyUI shows an exception's message in its UI next to the failing node, so
every error raised by this pack names the input that is wrong and what to do.
"""

from __future__ import annotations

from typing import Optional


class IdentityAttentionError(Exception):
    """A problem with a node's inputs or files, worded for the artist.

    ``str(err)`` reads: ``<node>: input '<input>': <problem> Fix: <fix>``.
    """

    def __init__(self, problem: str, *, node: Optional[str] = None, input_name: Optional[str] = None, fix: Optional[str] = None):
        self.problem = problem
        self.node = node
        self.input_name = input_name
        self.fix = fix
        parts = []
        if node:
            parts.append(f"{node}:")
        if input_name:
            parts.append(f"input '{input_name}':")
        parts.append(problem.rstrip("."))
        text = " ".join(parts) + "."
        if fix:
            text += f" Fix: {fix.rstrip('.')}."
        super().__init__(text)


class MissingDependencyError(IdentityAttentionError):
    """An optional Python package (insightface, onnxruntime...) is not installed."""

    def __init__(self, package: str, pip_command: str, *, node: Optional[str] = None):
        super().__init__(
            f"the Python package '{package}' is not installed in ComfyUI's environment",
            node=node,
            fix=f"run `{pip_command}` with ComfyUI's Python, then restart ComfyUI",
        )
        self.package = package
        self.pip_command = pip_command
