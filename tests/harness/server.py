"""A headless ComfyUI server on loopback, driven through its HTTP API.

Only standard-library HTTP is used (urllib), so the harness needs nothing the
host does not already need. Endpoints: /object_info, /prompt, /history,
/queue, /interrupt, /free, /view.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Dict, Optional

from .host import Instance, server_command


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PromptFailed(AssertionError):
    """A prompt ended in an error; ``.messages`` holds what ComfyUI reported."""

    def __init__(self, message: str, messages: Any = None, node_errors: Any = None):
        super().__init__(message)
        self.messages = messages
        self.node_errors = node_errors

    def exception_message(self) -> str:
        """The exception text ComfyUI shows in its UI for the failing node."""
        for kind, data in self.messages or []:
            if kind == "execution_error":
                return str(data.get("exception_message", ""))
        return str(self)


class ComfyServer:
    """Start, talk to and stop one host process."""

    def __init__(self, instance: Instance, port: Optional[int] = None, extra_args: Optional[list] = None, env: Optional[dict] = None):
        self.instance = instance
        self.port = port or free_port()
        self.extra_args = extra_args or []
        self.env = env
        self.proc: Optional[subprocess.Popen] = None
        self.log_path = instance.root / f"server-{self.port}.log"

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout: float = 180.0) -> "ComfyServer":
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        if self.env:
            env.update(self.env)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            server_command(self.instance, self.port, self.extra_args),
            cwd=str(self.instance.root),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                self.get("/object_info/KSampler", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.3)
        raise RuntimeError(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    # --- HTTP --------------------------------------------------------------------------------
    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str, timeout: float = 60) -> Any:
        with urllib.request.urlopen(self.base + path, timeout=timeout) as r:
            body = r.read()
        return json.loads(body) if body else None

    def post(self, path: str, payload: Optional[dict] = None, timeout: float = 60) -> Any:
        data = json.dumps(payload or {}).encode()
        req = urllib.request.Request(self.base + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                body = r.read()
        except urllib.error.HTTPError as e:
            body = e.read()
            try:
                detail = json.loads(body)
            except ValueError:
                detail = body.decode(errors="replace")
            raise PromptFailed(f"POST {path} -> {e.code}: {detail}", node_errors=detail) from None
        return json.loads(body) if body else None

    def object_info(self) -> Dict[str, Any]:
        return self.get("/object_info")

    # --- prompts -----------------------------------------------------------------------------
    def queue(self, prompt: Dict[str, Any], client_id: Optional[str] = None) -> str:
        answer = self.post("/prompt", {"prompt": prompt, "client_id": client_id or uuid.uuid4().hex})
        if answer.get("node_errors"):
            raise PromptFailed(f"prompt rejected: {answer['node_errors']}", node_errors=answer["node_errors"])
        return answer["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600.0) -> Dict[str, Any]:
        """Wait for a queued prompt; returns its history entry or raises PromptFailed."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            entry = (history or {}).get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                status = entry["status"]
                if status.get("status_str") == "error" or not status.get("completed"):
                    messages = status.get("messages")
                    raise PromptFailed(f"prompt {prompt_id} failed: {self._error_text(messages)}", messages=messages)
                return entry
            if entry and "outputs" in entry and "status" not in entry:  # very old hosts
                return entry
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running a prompt:\n{self.log_tail()}")
            time.sleep(0.1)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout:.0f} s")

    def run(self, prompt: Dict[str, Any], timeout: float = 600.0) -> Dict[str, Any]:
        return self.wait(self.queue(prompt), timeout)

    def interrupt(self) -> None:
        self.post("/interrupt", {})

    def free(self) -> None:
        try:
            self.post("/free", {"unload_models": True, "free_memory": True})
        except PromptFailed:
            pass

    def output_files(self, entry: Dict[str, Any], kind: str = "images") -> list:
        """Absolute paths of a finished prompt's saved files (images, latents...)."""
        paths = []
        for node_out in entry.get("outputs", {}).values():
            for item in node_out.get(kind, []) or []:
                folder = self.instance.output if item.get("type", "output") == "output" else self.instance.root / "temp" / "temp"
                paths.append(folder / item.get("subfolder", "") / item["filename"])
        return paths

    @staticmethod
    def _error_text(messages: Any) -> str:
        for kind, data in messages or []:
            if kind == "execution_error":
                return f"{data.get('node_type')} (node {data.get('node_id')}): {data.get('exception_type')}: {data.get('exception_message')}"
        return str(messages)
