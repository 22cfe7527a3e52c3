"""sha256 of a file in chunks, with a progress callback (no torch: the CLI uses it too)."""

from __future__ import annotations

import hashlib
import os
from typing import Callable, Optional

Progress = Callable[[int, int], None]


def sha256_file(path: str, progress: Optional[Progress] = None, chunk: int = 8 * 1024**2) -> str:
    """Hex sha256 of a file; ``progress(done_bytes, total_bytes)`` after every chunk."""
    total = os.path.getsize(path)
    digest = hashlib.sha256()
    done = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            digest.update(block)
            done += len(block)
            if progress is not None:
                progress(done, total)
    return digest.hexdigest()
