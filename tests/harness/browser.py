"""Headless Chromium driven through the Chrome DevTools Protocol over a pipe (standard library only).

``--remote-debugging-pipe`` makes Chromium read protocol messages from file descriptor 3
and write its answers and events to descriptor 4, each message JSON ended by a NUL byte;
no WebDriver, no websocket, no port. One :class:`Chromium` is one browser with one page
(a target attached in flat mode, so page commands carry its ``sessionId``).

The flags are those that work on a machine with no network and no display: headless, no
sandbox (CI runs as root), no GPU, no background connections or updates, and a new empty
profile folder.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from typing import Any, List, Optional

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--mute-audio",
)


def find_chromium() -> Optional[str]:
    """``IDENTITY_ATTENTION_CHROMIUM`` or the first Chromium on PATH (Debian's package installs /usr/bin/chromium)."""
    given = os.environ.get("IDENTITY_ATTENTION_CHROMIUM")
    if given:
        return given if os.access(given, os.X_OK) else None
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


class BrowserError(RuntimeError):
    """A protocol command failed, the page threw, or Chromium went away."""


class Chromium:
    def __init__(self, executable: str, width: int = 1600, height: int = 900, timeout: float = 60.0):
        self.executable = executable
        self.width, self.height = width, height
        self.timeout = timeout
        self.events: List[dict] = []
        self.foreign_errors: List[str] = []  # failed requests to hosts other than the test server
        self.origin: Optional[str] = None  # the test server, set by the page fixture
        self._buffer = b""
        self._next_id = 0
        self._session: Optional[str] = None
        self.proc: Optional[subprocess.Popen] = None

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self) -> "Chromium":
        self._profile = tempfile.mkdtemp(prefix="identity-attention-chromium-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def wire_pipes():  # in the child: the protocol's fixed descriptors (via high copies, so neither overwrites the other)
            reading, writing = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD, 10), fcntl.fcntl(from_browser_w, fcntl.F_DUPFD, 10)
            os.dup2(reading, 3)
            os.dup2(writing, 4)

        self.proc = subprocess.Popen(
            [self.executable, *FLAGS, f"--user-data-dir={self._profile}", f"--window-size={self.width},{self.height}", "--remote-debugging-pipe", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=wire_pipes, pass_fds=(3, 4),
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        target = self.call("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        self._session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True}, session=False)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")
        self.call("Emulation.setDeviceMetricsOverride", {"width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False})
        return self

    def close(self) -> None:
        if self.proc is None:
            return
        try:
            self.call("Browser.close", session=False, timeout=5)
        except (BrowserError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_browser, self._from_browser):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self._profile, ignore_errors=True)
        self.proc = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    # --- protocol -------------------------------------------------------------------------------
    def call(self, method: str, params: Optional[dict] = None, session: bool = True, timeout: Optional[float] = None) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session and self._session:
            message["sessionId"] = self._session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error'].get('message')} {reply['error'].get('data', '')}".strip())
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError("Chromium did not answer in time")
            ready, _, _ = select.select([self._from_browser], [], [], left)
            if ready:
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    raise BrowserError("Chromium closed the protocol pipe (it exited)")
                self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    # --- page helpers ---------------------------------------------------------------------------
    def evaluate(self, expression: str, timeout: Optional[float] = None) -> Any:
        """The value of a JavaScript expression (promises are awaited); page exceptions raise BrowserError."""
        result = self.call("Runtime.evaluate", {"expression": expression, "awaitPromise": True, "returnByValue": True}, timeout=timeout)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"page threw: {text}")
        return result.get("result", {}).get("value")

    def navigate(self, url: str, ready: str, timeout: Optional[float] = None) -> None:
        """Open ``url`` and wait until the JavaScript expression ``ready`` is true."""
        self.call("Page.navigate", {"url": url})
        self.wait_for(ready, timeout)

    def wait_for(self, expression: str, timeout: Optional[float] = None) -> None:
        deadline = time.monotonic() + (timeout or self.timeout)
        while time.monotonic() < deadline:
            try:
                if self.evaluate(f"Boolean({expression})"):
                    return
            except BrowserError:
                pass  # the page is still loading its modules
            time.sleep(0.1)
        raise BrowserError(f"timed out waiting for: {expression}")

    def screenshot_png(self) -> bytes:
        data = self.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": False})["data"]
        return base64.b64decode(data)

    def page_errors(self, origin: Optional[str] = None) -> List[str]:
        """Uncaught exceptions and console errors since the last call.

        With ``origin`` (the test server's ``http://host:port``), a failed request to any OTHER host
        (newer frontends ask the Comfy registry for node metadata; there is no network here) is
        left out and kept in :attr:`foreign_errors`: it is not the pack's. Everything from the test
        server, the pack's scripts and the page's own scripts still counts.
        """
        errors = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                errors.append(details.get("exception", {}).get("description") or details.get("text", "exception"))
            elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
                errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", [])))
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                entry = params["entry"]
                text = f"{entry.get('text', '')} ({entry.get('url', '')})"
                if origin and entry.get("source") == "network" and _is_foreign(entry.get("url", ""), origin):
                    self.foreign_errors.append(text)
                    continue
                errors.append(text)
        self.events.clear()
        return errors


def _is_foreign(url: str, origin: str) -> bool:
    """True for an http(s) URL on another host than ``origin`` (scheme://host:port)."""
    from urllib.parse import urlsplit

    if not url.startswith(("http://", "https://")):
        return False
    ours, theirs = urlsplit(origin), urlsplit(url)
    return (theirs.scheme, theirs.hostname, theirs.port) != (ours.scheme, ours.hostname, ours.port)
