"""Provisioners for the pack's own loader nodes (see tiny_swap.py).

Each mechanism's engineers add the provisioner for the files their example
workflows name: a synthetic file of the real format that fits the tiny models.
"""

from __future__ import annotations

from .tiny_swap import PROVISIONERS, register  # noqa: F401
