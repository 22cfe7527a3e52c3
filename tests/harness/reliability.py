"""Helpers for the reliability host tests: saved latents, cache and interrupt evidence, server memory."""

from __future__ import annotations

import re
import time
from typing import Any, Dict, Optional

import torch
from safetensors.torch import load_file


def latent_of(server, entry: Dict[str, Any]) -> torch.Tensor:
    """The one latent a finished prompt saved."""
    (path,) = server.output_files(entry, "latents")
    return load_file(str(path))["latent_tensor"]


def messages_of(entry_or_error) -> list:
    """The status messages of a history entry (or of a PromptFailed)."""
    messages = getattr(entry_or_error, "messages", None)
    if messages is None and isinstance(entry_or_error, dict):
        messages = entry_or_error.get("status", {}).get("messages")
    return list(messages or [])


def cached_nodes(entry: Dict[str, Any]) -> set:
    """Node ids the host served from its output cache for this prompt (its ``execution_cached`` message)."""
    out = set()
    for kind, data in messages_of(entry):
        if kind == "execution_cached":
            out |= set(data.get("nodes", []))
    return out


def interruption(messages) -> Optional[dict]:
    """The ``execution_interrupted`` message of a prompt, or None."""
    for kind, data in messages or []:
        if kind == "execution_interrupted":
            return data
    return None


def client_of(server, prompt_id: str) -> Optional[str]:
    """The client_id a prompt was queued with, read back from /history."""
    entry = server.get(f"/history/{prompt_id}")[prompt_id]
    extra = entry["prompt"][3] if len(entry.get("prompt", [])) > 3 else {}
    return extra.get("client_id")


def server_rss(server) -> int:
    """Resident memory of the server process, bytes."""
    import psutil

    return psutil.Process(server.proc.pid).memory_info().rss


def server_cpu_seconds(server) -> float:
    import psutil

    t = psutil.Process(server.proc.pid).cpu_times()
    return t.user + t.system


def device_memory_used(server) -> Optional[int]:
    """Accelerator memory the server's torch holds (bytes), or None when it runs on the CPU.

    From /system_stats: ``torch_vram_total`` is what torch reserved, ``torch_vram_free``
    the reserved but unused part, so their difference is what is allocated.
    """
    device = server.get("/system_stats")["devices"][0]
    if device.get("type") in (None, "cpu"):
        return None
    return int(device["torch_vram_total"]) - int(device["torch_vram_free"])


def log_size(server) -> int:
    try:
        return server.log_path.stat().st_size
    except OSError:
        return 0


def wait_for_log(server, offset: int, pattern: str, timeout: float = 120.0) -> str:
    """Wait until the server log, from byte ``offset``, matches ``pattern``; returns the match."""
    regex = re.compile(pattern)
    deadline = time.time() + timeout
    while time.time() < deadline:
        with open(server.log_path, "rb") as f:
            f.seek(offset)
            text = f.read().decode("utf-8", errors="replace")
        found = regex.search(text)
        if found:
            return found.group(0)
        if server.proc.poll() is not None:
            raise RuntimeError(f"ComfyUI died:\n{server.log_tail()}")
        time.sleep(0.05)
    raise TimeoutError(f"{pattern!r} did not appear in the server log within {timeout:.0f} s:\n{server.log_tail(2000)}")
