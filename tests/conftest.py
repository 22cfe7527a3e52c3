"""Shared fixtures: the in-process host, the pack as a package, a real server, tiny models.

The pack is registered in-process as the package ``identity_attention`` without
running its ``__init__`` (so ``adapters`` import without a host); the server
tests load it the way ComfyUI does, from ``custom_nodes/``.
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from harness.host import CACHE, import_host_in_process, prepare_instance  # noqa: E402
from harness.server import ComfyServer  # noqa: E402

PACKAGE = "identity_attention"

import_host_in_process(cpu=True)

# One intra-op thread: the tiny models gain nothing from more, and on a shared CPU OpenMP's
# spinning threads make in-process sampling ~10x slower. Override for local experiments.
import os  # noqa: E402

import torch  # noqa: E402

_THREADS = os.environ.get("IDENTITY_ATTENTION_TEST_THREADS", "1")
torch.set_num_threads(int(_THREADS))
os.environ.setdefault("OMP_NUM_THREADS", _THREADS)  # inherited by the test servers


def _register_package() -> types.ModuleType:
    if PACKAGE not in sys.modules:
        pkg = types.ModuleType(PACKAGE)
        pkg.__path__ = [str(REPO)]
        pkg.__file__ = str(REPO / "__init__.py")
        pkg.IDENTITY_ATTENTION_PACK = True
        sys.modules[PACKAGE] = pkg
    return sys.modules[PACKAGE]


_register_package()


def pack(relative: str):
    """Import a module of the pack, e.g. ``pack("adapters.attention.attention_core")``."""
    return importlib.import_module(f"{PACKAGE}.{relative}")


@pytest.fixture(scope="session")
def instance(tmp_path_factory):
    """A scratch host instance (custom_nodes links, models, output...)."""
    return prepare_instance(tmp_path_factory.mktemp("comfy-instance"))


@pytest.fixture(scope="session")
def server(instance):
    """One real headless ComfyUI with this pack and the test kit, for the whole session."""
    srv = ComfyServer(instance)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def tiny():
    """Builders for in-process tiny models, cached per (arch, seed)."""
    from testkit import tiny_models

    cache = {}

    class Tiny:
        models = tiny_models

        def unet(self, arch: str, seed: int = 0):
            key = (arch, seed)
            if key not in cache:
                cache[key] = tiny_models.build_unet(arch, seed=seed)
            return cache[key].clone()

    return Tiny()
