"""Downloading one weight file: atomic, resumable, checked. Used only by the CLI (``weights.py``).

This is the only module of the pack that opens network connections, and only
when the user runs the download command. A download:

1. writes to ``<dest>.part``; an existing ``.part`` is resumed with an HTTP
   ``Range: bytes=<size>-`` request (a server that answers 200 instead of 206
   restarts it from zero);
2. hashes while writing (the resumed part is hashed from disk first);
3. checks the byte count and the sha256 against the manifest, deleting the
   ``.part`` and refusing on a mismatch;
4. flushes, fsyncs and renames ``.part`` to ``dest`` (atomic on one filesystem),
   so a file under its final name is always complete.

An interrupted transfer leaves the ``.part`` and raises :class:`DownloadInterrupted`;
running the same command again resumes it.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
from typing import Callable, Optional

from .weight_errors import WeightError

Progress = Callable[[int, Optional[int]], None]
CHUNK = 1024 * 1024
USER_AGENT = "comfyui-identity-attention-weights/1"


class DownloadInterrupted(WeightError):
    """The transfer stopped early; the ``.part`` file is kept for resuming."""


class HashMismatch(WeightError):
    """The downloaded bytes are not the published file; nothing was kept."""


def _hash_existing(path: str, digest) -> int:
    done = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
            done += len(block)
    return done


def _content_range_start(value: Optional[str]) -> Optional[int]:
    # "bytes 1000-4095/4096"
    if not value or not value.startswith("bytes "):
        return None
    try:
        return int(value[6:].split("-", 1)[0])
    except ValueError:
        return None


def download(
    url: str,
    dest: str,
    sha256: Optional[str],
    expected_bytes: Optional[int],
    progress: Optional[Progress] = None,
    timeout: float = 60.0,
) -> str:
    """Download ``url`` to ``dest``; returns the file's sha256 (hex). See the module docstring."""
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    part = dest + ".part"
    digest = hashlib.sha256()
    done = 0
    if os.path.exists(part):
        if expected_bytes is not None and os.path.getsize(part) > expected_bytes:
            os.remove(part)
        else:
            done = _hash_existing(part, digest)

    if expected_bytes is None or done < expected_bytes:
        headers = {"User-Agent": USER_AGENT}
        if done:
            headers["Range"] = f"bytes={done}-"
        request = urllib.request.Request(url, headers=headers)
        try:
            response = urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as err:
            if err.code == 416 and done:  # nothing left to send: the part may already be whole
                response = None
            else:
                raise WeightError(f"the server answered {err.code} {err.reason} for {url}", fix="check the URL in weights_manifest.json or try again later") from None
        except (urllib.error.URLError, OSError) as err:
            raise DownloadInterrupted(f"could not connect to {url} ({getattr(err, 'reason', err)})", fix="check the network and run the same command again") from None
        if response is not None:
            with response:
                status = getattr(response, "status", 200)
                if done and (status != 206 or _content_range_start(response.headers.get("Content-Range")) != done):
                    digest, done = hashlib.sha256(), 0  # the server ignored the range: start over
                    mode = "wb"
                else:
                    mode = "ab" if done else "wb"
                length = response.headers.get("Content-Length")
                total = expected_bytes if expected_bytes is not None else (done + int(length) if length and length.isdigit() else None)
                try:
                    with open(part, mode) as out:
                        while True:
                            block = response.read(CHUNK)
                            if not block:
                                break
                            out.write(block)
                            digest.update(block)
                            done += len(block)
                            if progress is not None:
                                progress(done, total)
                        out.flush()
                        os.fsync(out.fileno())
                except (OSError, urllib.error.URLError, http.client.HTTPException) as err:
                    raise DownloadInterrupted(
                        f"the download stopped after {done:,} bytes ({type(err).__name__})",
                        fix="run the same command again: it resumes from the partial file",
                    ) from None
                if total is not None and done < total:  # the connection closed before Content-Length was reached
                    raise DownloadInterrupted(f"the download stopped after {done:,} of {total:,} bytes", fix="run the same command again: it resumes from the partial file")

    if expected_bytes is not None and done < expected_bytes:
        raise DownloadInterrupted(f"the download stopped after {done:,} of {expected_bytes:,} bytes", fix="run the same command again: it resumes from the partial file")
    if expected_bytes is not None and done > expected_bytes:
        os.remove(part)
        raise HashMismatch(f"the server sent {done:,} bytes but the published file has {expected_bytes:,}; the download was deleted", fix="check the URL in weights_manifest.json")
    got = digest.hexdigest()
    if sha256 is not None and got != sha256:
        os.remove(part)
        raise HashMismatch(
            f"the downloaded file's sha256 is {got} but the published one is {sha256}; it was refused and deleted",
            fix="try again later or from another mirror; never use a file whose hash does not match",
        )
    os.replace(part, dest)
    return got
