"""Downloads (issue 21, classes 4 and 5): redirects, deadlines, stalls, Ctrl-C, early ends, links, manifests.

No real network: a fake opener hands ``weights_download.download`` scripted responses
(status, headers, body, and what happens mid-body), and the redirect policy is tried
on the real ``urllib`` handler chain against a loopback server. Each case checks what
is kept on disk (the partial file for resume, never a byte written through a link) and
the one-line message.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import threading
import urllib.error
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import pack

wd = pack("adapters.weights.weights_download")
weight_errors = pack("adapters.weights.weight_errors")
cli = pack("weights")
WeightError = weight_errors.WeightError

DATA = bytes(range(256)) * 4000  # 1,024,000 bytes
SHA = hashlib.sha256(DATA).hexdigest()


class FakeResponse:
    """A urllib response: ``body`` in chunks, then ``then`` (an exception to raise, or None for a clean end)."""

    def __init__(self, body: bytes, status: int = 200, headers=None, then=None, chunk: int = 100_000):
        self.status, self.body, self.then, self.chunk, self.pos = status, body, then, chunk, 0
        self.headers = Message()
        for k, v in (headers or {}).items():
            self.headers[k] = v

    def read(self, n):
        if self.pos >= len(self.body):
            if self.then is not None:
                err, self.then = self.then, None
                raise err
            return b""
        block = self.body[self.pos : self.pos + min(n, self.chunk)]
        self.pos += len(block)
        return block

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class FakeOpener:
    def __init__(self, *responses):
        self.responses, self.requests = list(responses), []

    def open(self, request, timeout=None):
        self.requests.append((request.full_url, request.headers.get("Range"), timeout))
        r = self.responses.pop(0)
        if isinstance(r, BaseException):
            raise r
        return r


def full(body=DATA, **headers):
    return FakeResponse(body, 200, {"Content-Length": str(len(body)), "Accept-Ranges": "bytes", **headers})


def partial(start: int, body=DATA):
    rest = body[start:]
    return FakeResponse(rest, 206, {"Content-Length": str(len(rest)), "Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}"})


def fetch(tmp_path, opener, **kw):
    dest = tmp_path / "folder" / "file.safetensors"
    return dest, wd.download("https://huggingface.co/x/file.safetensors", str(dest), kw.pop("sha", SHA), kw.pop("size", len(DATA)), opener=opener, **kw)


def test_clean_download(tmp_path):
    dest, got = fetch(tmp_path, FakeOpener(full()))
    assert got == SHA and dest.read_bytes() == DATA and not Path(str(dest) + ".part").exists()


@pytest.mark.parametrize("cut", [1, 99_999, 500_000, len(DATA) - 1])
@pytest.mark.parametrize("how", ["clean end", "IncompleteRead", "reset", "stall", "ctrl-c"])
def test_every_early_stop_keeps_the_part_and_resumes(tmp_path, cut, how):
    import http.client

    then = {
        "clean end": None,
        "IncompleteRead": http.client.IncompleteRead(b""),
        "reset": ConnectionResetError(104, "reset"),
        "stall": socket.timeout("timed out"),
        "ctrl-c": KeyboardInterrupt(),
    }[how]
    first = FakeResponse(DATA[:cut], 200, {"Content-Length": str(len(DATA)), "Accept-Ranges": "bytes"}, then=then)
    with pytest.raises(wd.DownloadInterrupted) as info:
        fetch(tmp_path, FakeOpener(first))
    text = str(info.value)
    assert "\n" not in text and f"{cut:,}" in text and "resumes" in text
    expected = {"clean end": "ended the transfer", "IncompleteRead": "ended the transfer", "reset": "stopped after",
                "stall": "stall timeout", "ctrl-c": "Ctrl-C"}[how]
    assert expected in text, text
    dest = tmp_path / "folder" / "file.safetensors"
    part = Path(str(dest) + ".part")
    assert part.read_bytes() == DATA[:cut] and not dest.exists()
    opener = FakeOpener(partial(cut))
    _, got = fetch(tmp_path, opener)
    assert got == SHA and dest.read_bytes() == DATA and opener.requests[0][1] == f"bytes={cut}-"


def test_a_server_that_cannot_resume_says_so(tmp_path):
    first = FakeResponse(DATA[:1000], 200, {"Content-Length": str(len(DATA))})  # no Accept-Ranges
    with pytest.raises(wd.DownloadInterrupted, match="does not resume, so the download starts over"):
        fetch(tmp_path, FakeOpener(first))
    _, got = fetch(tmp_path, FakeOpener(full()))  # the server ignores Range: answered 200, restarted cleanly
    assert got == SHA


def test_the_deadline_keeps_the_part(tmp_path):
    ticks = iter(range(0, 10_000, 40))
    with pytest.raises(wd.DownloadInterrupted, match="100 s deadline") as info:
        fetch(tmp_path, FakeOpener(full()), deadline_s=100, clock=lambda: next(ticks))
    assert "kept" in str(info.value)
    assert Path(str(tmp_path / "folder" / "file.safetensors") + ".part").stat().st_size > 0


def test_the_stall_timeout_reaches_the_connection(tmp_path):
    opener = FakeOpener(full())
    fetch(tmp_path, opener, timeout=7.5)
    assert opener.requests[0][2] == 7.5


@pytest.mark.parametrize("planted", ["symlink", "hardlink", "symlink to missing", "dangling dir link"])
def test_a_planted_part_is_never_written_through(tmp_path, planted):
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    folder = tmp_path / "folder"
    folder.mkdir()
    part = folder / "file.safetensors.part"
    if planted == "symlink":
        os.symlink(victim, part)
    elif planted == "hardlink":
        os.link(victim, part)
    elif planted == "symlink to missing":
        os.symlink(tmp_path / "nothing_here", part)
    else:
        os.symlink(tmp_path, part)
    opener = FakeOpener(full())
    _, got = fetch(tmp_path, opener)
    assert got == SHA and victim.read_bytes() == b"precious"
    assert not (tmp_path / "nothing_here").exists()
    assert opener.requests[0][1] is None  # started fresh, did not "resume" from the victim's bytes


def test_a_link_at_the_destination_is_replaced_not_written_through(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    folder = tmp_path / "folder"
    folder.mkdir()
    os.symlink(victim, folder / "file.safetensors")
    fetch(tmp_path, FakeOpener(full()))
    assert victim.read_bytes() == b"precious" and not (folder / "file.safetensors").is_symlink()


def test_hash_and_size_mismatches_delete_the_part(tmp_path):
    with pytest.raises(wd.HashMismatch, match="refused and deleted"):
        fetch(tmp_path, FakeOpener(full()), sha="0" * 64)
    assert not list((tmp_path / "folder").iterdir())
    with pytest.raises(wd.HashMismatch, match="sent"):
        fetch(tmp_path, FakeOpener(full(DATA + b"x")))
    assert not list((tmp_path / "folder").iterdir())


# --- redirects ---------------------------------------------------------------------------------------

ORIGIN = "https://huggingface.co/org/repo/resolve/main/file.safetensors"
REDIRECTS = [
    ("https://huggingface.co/other", [], True),
    ("https://cdn-lfs.huggingface.co/x", [], True),
    ("https://cas-bridge.xethub.hf.co/x", [], True),
    ("https://mirror.example.com/x", ["mirror.example.com"], True),
    ("https://a.b.example.com/x", ["*.example.com"], True),
    ("http://huggingface.co/x", [], False),  # downgrade
    ("http://cdn-lfs.huggingface.co/x", [], False),
    ("ftp://huggingface.co/x", [], False),
    ("file:///etc/passwd", [], False),
    ("https://evil.example/x", [], False),
    ("https://huggingface.co.evil.example/x", [], False),
    ("https://evilhuggingface.co/x", [], False),
    ("https://example.com/x", ["*.example.com"], False),
    ("https://127.0.0.1/x", [], False),
    ("https://user@evil.example/x", [], False),
    ("data:text/plain,hi", [], False),
]


@pytest.mark.parametrize("new,allowed,ok", REDIRECTS, ids=[r[0] for r in REDIRECTS])
def test_redirect_policy(new, allowed, ok):
    if ok:
        wd.check_redirect(ORIGIN, new, allowed)
    else:
        with pytest.raises(wd.RedirectRefused) as info:
            wd.check_redirect(ORIGIN, new, allowed)
        assert "not followed" in str(info.value) and "\n" not in str(info.value)


def test_loopback_http_mirrors_may_redirect_only_within_loopback():
    wd.check_redirect("http://127.0.0.1:8000/a", "http://127.0.0.1:8000/b")
    with pytest.raises(wd.RedirectRefused):
        wd.check_redirect("http://127.0.0.1:8000/a", "http://10.0.0.1/b")


class _Redirecting(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        self.server.hits.append(self.path)
        if self.path == "/data":
            self.send_response(200)
            self.send_header("Content-Length", str(len(DATA)))
            self.end_headers()
            self.wfile.write(DATA)
            return
        self.send_response(302)
        self.send_header("Location", self.server.targets[self.path])
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture()
def redirecting():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Redirecting)
    srv.hits = []
    base = f"http://127.0.0.1:{srv.server_address[1]}"
    srv.targets = {"/same": base + "/data", "/out": "http://198.51.100.7/data", "/https-out": "https://evil.example/data",
                   "/loop": base + "/loop"}
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    srv.base = base
    yield srv
    srv.shutdown()
    srv.server_close()


def test_redirects_through_the_real_handler(tmp_path, redirecting):
    dest = tmp_path / "a.bin"
    assert wd.download(redirecting.base + "/same", str(dest), SHA, len(DATA)) == SHA
    for path, words in (("/out", "not https"), ("/https-out", "does not allow"), ("/loop", "redirect")):
        with pytest.raises(WeightError) as info:
            wd.download(redirecting.base + path, str(tmp_path / "b.bin"), SHA, len(DATA))
        assert "\n" not in str(info.value) and words in str(info.value), str(info.value)
    assert "/data" in redirecting.hits and not (tmp_path / "b.bin").exists()


# --- the CLI -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("content", [
    b"", b"{", b"[]", b"null", b'{"schema": "x", "entries": []}', b"[" * 100_000, b'{"schema": "identity-attention-weights/1", "entries": [{"id": 1}]}',
    json.dumps({"schema": "identity-attention-weights/1", "entries": [{"id": "a", "redirect_hosts": ["*"]}]}).encode(), b"\xff\xfe\x00",
])
def test_an_invalid_manifest_is_one_line(tmp_path, content):
    path = tmp_path / "manifest.json"
    path.write_bytes(content)
    out = io.StringIO()
    code = cli.main(["--manifest", str(path), "--models-dir", str(tmp_path), "list"], out=out)
    assert code == 2 and out.getvalue().count("\n") == 1 and out.getvalue().startswith("cannot use the manifest")


def test_a_missing_manifest_is_one_line(tmp_path):
    out = io.StringIO()
    assert cli.main(["--manifest", str(tmp_path / "nope.json"), "list"], out=out) == 2 and out.getvalue().count("\n") == 1


def test_redirect_hosts_are_validated():
    manifest = pack("adapters.weights.weights_manifest")
    entry = dict(manifest.load_manifest().entries[0])
    for hosts, ok in ((["cdn.example.com"], True), (["*.example.com"], True), (["*"], False), (["http://x.com"], False), ("x.com", False), (["a..b"], False)):
        entry["redirect_hosts"] = hosts
        problems = manifest.validate_entry(entry)
        assert (not problems) == ok, (hosts, problems)


def _cli_manifest(tmp_path, url, **over):
    entry = {"id": "blob", "file": "sub/blob.bin", "folder": "identity_attention", "url": url, "sha256": SHA, "bytes": len(DATA), "verified": True,
             "source": "test", "format": "native", "base": "sd15", "license": "test", "nodes": ["IdentityAttentionLoadIdentityAdapter"], "description": "t"}
    entry.update(over)
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"schema": "identity-attention-weights/1", "entries": [entry]}))
    return path


def test_ctrl_c_in_the_cli_is_one_line_and_resumable(tmp_path, monkeypatch):
    manifest = _cli_manifest(tmp_path, "https://huggingface.co/x")
    models = tmp_path / "models"
    models.mkdir()
    first = FakeResponse(DATA[:300_000], 200, {"Content-Length": str(len(DATA)), "Accept-Ranges": "bytes"}, then=KeyboardInterrupt())
    openers = iter([FakeOpener(first), FakeOpener(partial(300_000))])
    monkeypatch.setattr(wd, "build_opener", lambda url, hosts=(): next(openers))
    out = io.StringIO()
    assert cli.main(["--manifest", str(manifest), "--models-dir", str(models), "download", "blob"], out=out) == 1
    assert "Ctrl-C" in out.getvalue() and "Traceback" not in out.getvalue()
    out = io.StringIO()
    assert cli.main(["--manifest", str(manifest), "--models-dir", str(models), "download", "blob"], out=out) == 0
    assert (models / "identity_attention" / "sub" / "blob.bin").read_bytes() == DATA


def test_ctrl_c_anywhere_else_in_the_cli_is_one_line(tmp_path, monkeypatch):
    manifest = _cli_manifest(tmp_path, "https://huggingface.co/x")

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_download", interrupted)
    out = io.StringIO()
    assert cli.main(["--manifest", str(manifest), "--models-dir", str(tmp_path), "download", "blob"], out=out) == 130
    assert out.getvalue().strip() == "interrupted; run the same command again to resume"


def test_the_cli_never_writes_through_a_linked_subfolder(tmp_path, monkeypatch):
    manifest = _cli_manifest(tmp_path, "https://huggingface.co/x")
    models = tmp_path / "models"
    (models / "identity_attention").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, models / "identity_attention" / "sub")
    monkeypatch.setattr(wd, "build_opener", lambda url, hosts=(): FakeOpener(full()))
    out = io.StringIO()
    assert cli.main(["--manifest", str(manifest), "--models-dir", str(models), "download", "blob"], out=out) == 1
    assert "outside" in out.getvalue() and list(outside.iterdir()) == []
