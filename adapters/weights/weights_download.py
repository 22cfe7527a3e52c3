"""Downloading one weight file: contained, resumable, bounded, checked. Used only by the CLI (``weights.py``).

This is the only module of the pack that opens network connections, and only
when the user runs the download command. A download:

1. writes to ``<dest>.part`` in the target folder, never through a link: an existing
   ``.part`` that is a symbolic link, not a regular file, or has other hard links is
   removed (the link itself, not what it points to) and the download starts fresh;
   a new ``.part`` is created with ``O_CREAT | O_EXCL`` (and ``O_NOFOLLOW`` where the
   OS has it). A regular ``.part`` is resumed with an HTTP ``Range: bytes=<size>-``
   request (a server that answers 200 instead of 206 restarts it from zero);
2. follows redirects only to ``https://`` URLs on the same host or on hosts the
   manifest entry allows (``redirect_hosts``, plus :data:`KNOWN_REDIRECTS` for the
   hosts the shipped manifest uses), at most :data:`MAX_REDIRECTS` times; anything else
   is refused before connecting (plain ``http://`` only between loopback addresses,
   for local mirrors);
3. stops with :class:`DownloadInterrupted`, keeping the partial bytes for the next run,
   when no byte arrives for ``stall_s`` seconds, when the whole transfer passes
   ``deadline_s``, on Ctrl-C (no traceback; the bytes so far are flushed), or when the
   server ends the body early without an error (said as such, and whether the
   server can resume);
4. hashes while writing (a resumed part is hashed from disk first) and checks the byte
   count and sha256 against the manifest, deleting the ``.part`` on a mismatch;
5. flushes, fsyncs and renames ``.part`` onto ``dest`` (atomic on one filesystem; a
   link at ``dest`` is replaced, not written through), so a file under its final name
   is always complete and checked.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import ipaddress
import os
import stat
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Callable, Dict, Optional, Sequence, Tuple

from .weight_errors import WeightError

Progress = Callable[[int, Optional[int]], None]
CHUNK = 1024 * 1024
USER_AGENT = "comfyui-identity-attention-weights/1"
MAX_REDIRECTS = 5
STALL_S = 60.0  # no byte for this long: the connection is dead
DEADLINE_S = 6 * 3600.0  # the whole transfer; 8 GB (the loader's limit) at 0.5 MB/s takes 4.5 h
KNOWN_REDIRECTS: Dict[str, Tuple[str, ...]] = {  # where these hosts send file downloads (their CDNs)
    "huggingface.co": ("*.huggingface.co", "*.hf.co"),
    "modelscope.cn": ("*.modelscope.cn",),
}


class DownloadInterrupted(WeightError):
    """The transfer stopped early; the ``.part`` file is kept for resuming."""


class HashMismatch(WeightError):
    """The downloaded bytes are not the published file; nothing was kept."""


class RedirectRefused(WeightError):
    """The server redirected to a URL the policy does not allow."""


# --- redirects ---------------------------------------------------------------------------------------


def _loopback(host: Optional[str]) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


def _host_allowed(host: str, origin_host: str, allowed: Sequence[str]) -> bool:
    host = host.lower().rstrip(".")
    if host == origin_host:
        return True
    for pattern in allowed:
        pattern = pattern.lower()
        if pattern.startswith("*.") and host.endswith(pattern[1:]):
            return True
        if host == pattern:
            return True
    return False


def check_redirect(origin_url: str, new_url: str, allowed_hosts: Sequence[str] = ()) -> None:
    """Raise :class:`RedirectRefused` unless ``new_url`` is https on the origin's host or an allowed one."""
    origin = urllib.parse.urlsplit(origin_url)
    new = urllib.parse.urlsplit(new_url)
    origin_host = (origin.hostname or "").lower()
    allowed = tuple(allowed_hosts) + KNOWN_REDIRECTS.get(origin_host, ())
    fix = "check the URL in weights_manifest.json; if the publisher moved the file, add its new host to the entry's redirect_hosts"
    if new.scheme != "https" and not (new.scheme == "http" and origin.scheme == "http" and _loopback(origin.hostname) and _loopback(new.hostname)):
        raise RedirectRefused(f"the server redirected {origin_url} to {new_url}, which is not https; it was not followed", fix=fix)
    if not new.hostname or not _host_allowed(new.hostname, origin_host, allowed):
        raise RedirectRefused(
            f"the server redirected {origin_url} to the host {new.hostname!r}, which the manifest entry does not allow "
            f"(allowed: {origin_host}{', ' if allowed else ''}{', '.join(allowed)}); it was not followed",
            fix=fix,
        )


class _RedirectPolicy(urllib.request.HTTPRedirectHandler):
    max_redirections = MAX_REDIRECTS

    def __init__(self, origin_url: str, allowed_hosts: Sequence[str]):
        super().__init__()
        self.origin_url, self.allowed_hosts = origin_url, tuple(allowed_hosts)

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        check_redirect(self.origin_url, urllib.parse.urljoin(req.full_url, newurl), self.allowed_hosts)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def build_opener(url: str, allowed_hosts: Sequence[str] = ()) -> urllib.request.OpenerDirector:
    """An opener that follows only the redirects :func:`check_redirect` allows (no proxies from files, no cookies)."""
    return urllib.request.build_opener(_RedirectPolicy(url, allowed_hosts))


# --- the partial file ---------------------------------------------------------------------------------

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_BINARY = getattr(os, "O_BINARY", 0)


def _usable_part(part: str) -> bool:
    """True when ``part`` is a regular file of its own to resume; anything else there is removed (never followed)."""
    try:
        st = os.lstat(part)
    except FileNotFoundError:
        return False
    if stat.S_ISDIR(st.st_mode):
        raise WeightError(f"'{part}' is a folder; the download needs that name for its partial file", fix="remove or rename that folder")
    if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
        return True
    os.unlink(part)  # a link (symbolic or hard) or a device: remove the name, never write to what it points to
    return False


def _open_part(part: str, append: bool):
    if append:
        fd = os.open(part, os.O_WRONLY | os.O_APPEND | _NOFOLLOW | _BINARY)
    else:
        if os.path.lexists(part):
            os.unlink(part)
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _BINARY, 0o644)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:  # replaced between the check and the open
        os.close(fd)
        raise WeightError(f"'{part}' changed into a link while it was opened; nothing was written", fix="run the command again")
    return os.fdopen(fd, "ab" if append else "wb")


def _hash_existing(path: str, digest) -> int:
    done = 0
    fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _BINARY)
    with os.fdopen(fd, "rb") as f:
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


def _resume_fix(resumable: bool, done: int) -> str:
    if resumable:
        return f"run the same command again: it resumes from the {done:,} bytes kept"
    return "run the same command again; this server does not resume, so the download starts over"


# --- the download -------------------------------------------------------------------------------------


def download(
    url: str,
    dest: str,
    sha256: Optional[str],
    expected_bytes: Optional[int],
    progress: Optional[Progress] = None,
    timeout: float = STALL_S,
    redirect_hosts: Sequence[str] = (),
    deadline_s: float = DEADLINE_S,
    opener: Optional[urllib.request.OpenerDirector] = None,
    clock: Callable[[], float] = time.monotonic,
) -> str:
    """Download ``url`` to ``dest``; returns the file's sha256 (hex). See the module docstring.

    ``timeout``: the stall timeout (seconds without a byte). ``deadline_s``: the whole transfer.
    ``opener``: for tests; by default :func:`build_opener` with ``redirect_hosts``.
    """
    started = clock()
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    part = dest + ".part"
    digest = hashlib.sha256()
    done = 0
    if _usable_part(part):
        if expected_bytes is not None and os.path.getsize(part) > expected_bytes:
            os.unlink(part)
        else:
            done = _hash_existing(part, digest)

    if expected_bytes is None or done < expected_bytes:
        headers = {"User-Agent": USER_AGENT}
        if done:
            headers["Range"] = f"bytes={done}-"
        request = urllib.request.Request(url, headers=headers)
        opener = opener or build_opener(url, redirect_hosts)
        try:
            response = opener.open(request, timeout=timeout)
        except urllib.error.HTTPError as err:
            if err.code == 416 and done:  # nothing left to send: the part may already be whole
                response = None
            else:
                reason = (str(err.reason or "").strip().splitlines() or [""])[0]
                raise WeightError(f"the server answered {err.code} {reason} for {url}", fix="check the URL in weights_manifest.json or try again later") from None
        except KeyboardInterrupt:
            raise DownloadInterrupted("stopped by Ctrl-C while connecting", fix=_resume_fix(True, done)) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
            raise DownloadInterrupted(f"could not connect to {url} ({getattr(err, 'reason', err)})", fix="check the network and run the same command again") from None
        if response is not None:
            done, digest = _receive(response, part, done, digest, expected_bytes, progress, started, deadline_s, clock)

    if expected_bytes is not None and done < expected_bytes:
        raise DownloadInterrupted(f"the download stopped after {done:,} of {expected_bytes:,} bytes", fix=_resume_fix(True, done))
    if expected_bytes is not None and done > expected_bytes:
        os.unlink(part)
        raise HashMismatch(f"the server sent {done:,} bytes but the published file has {expected_bytes:,}; the download was deleted", fix="check the URL in weights_manifest.json")
    got = digest.hexdigest()
    if sha256 is not None and got != sha256:
        os.unlink(part)
        raise HashMismatch(
            f"the downloaded file's sha256 is {got} but the published one is {sha256}; it was refused and deleted",
            fix="try again later or from another mirror; never use a file whose hash does not match",
        )
    if os.path.isdir(dest) and not os.path.islink(dest):
        raise WeightError(f"'{dest}' is a folder; the file cannot take its name", fix="remove or rename that folder")
    os.replace(part, dest)
    return got


def _receive(response, part, done, digest, expected_bytes, progress, started, deadline_s, clock):
    """Stream ``response`` into ``part``; returns ``(bytes done, digest)``. Raises :class:`DownloadInterrupted` (part kept)."""
    with response:
        status = getattr(response, "status", 200)
        resumable = status == 206 or (response.headers.get("Accept-Ranges") or "").strip().lower() == "bytes"
        if done and (status != 206 or _content_range_start(response.headers.get("Content-Range")) != done):
            digest, done = hashlib.sha256(), 0  # the server ignored the range: start over
        length = response.headers.get("Content-Length")
        total = expected_bytes if expected_bytes is not None else (done + int(length) if length and length.isdigit() else None)
        body_end = done + int(length) if length and length.isdigit() else None
        why = None
        with _open_part(part, append=bool(done)) as out:
            try:
                while True:
                    if clock() - started > deadline_s:
                        why = f"the download passed its {deadline_s:,.0f} s deadline after {done:,} bytes"
                        break
                    block = response.read(CHUNK)
                    if not block:
                        break
                    out.write(block)
                    digest.update(block)
                    done += len(block)
                    if progress is not None:
                        progress(done, total)
            except KeyboardInterrupt:
                why = f"stopped by Ctrl-C after {done:,} bytes"
            except http.client.IncompleteRead:
                pass  # the body ended before Content-Length: reported below as an early end
            except (OSError, urllib.error.URLError, http.client.HTTPException) as err:
                stalled = isinstance(err, TimeoutError) or getattr(err, "errno", None) == errno.ETIMEDOUT or "timed out" in str(err)
                why = f"no data arrived for the stall timeout after {done:,} bytes" if stalled else f"the download stopped after {done:,} bytes ({type(err).__name__})"
            finally:
                out.flush()
                os.fsync(out.fileno())
        if why:
            raise DownloadInterrupted(why + "; the partial file is kept", fix=_resume_fix(resumable, done))
        end = body_end if body_end is not None else total
        if end is not None and done < end:  # the server closed the body early without an error
            raise DownloadInterrupted(
                f"the server ended the transfer after {done:,} of {total if total is not None else end:,} bytes without reporting an error",
                fix=_resume_fix(resumable, done),
            )
    return done, digest
