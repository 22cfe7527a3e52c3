"""Command line: train Identity Attention's own weights on a folder of images.

Run it from ComfyUI's ``custom_nodes`` folder (``python -m`` accepts the hyphenated folder name
ComfyUI-Manager clones into), with ComfyUI's Python::

    cd ComfyUI/custom_nodes
    python -m comfyui-identity-attention.train my_training.json
    python -m comfyui-identity-attention.train my_training.json --resume runs/pva     # continue exactly
    python -m comfyui-identity-attention.train prepare faces/ --face-pack antelopev2  # cache identity features once
    torchrun --nproc_per_node 4 comfyui-identity-attention/train.py my_training.json # 4 GPUs (DDP)

or run the file from anywhere with ``--comfyui /path/to/ComfyUI`` (or ``COMFYUI_PATH``). ComfyUI
is found, in that order, from ``--comfyui``, ``COMFYUI_PATH``, or the pack's location
(``ComfyUI/custom_nodes/<pack>/`` -> ``ComfyUI``). Models load through ComfyUI's own loaders,
so any checkpoint ComfyUI opens works. The config format and what is written are described in
``nodes/training/trainer.py``.
"""

from __future__ import annotations

import os
import sys
from typing import List, Optional

if __name__ == "__main__" and not __package__:  # run as a file: import the pack's modules under a private name
    import types

    _root = os.path.dirname(os.path.abspath(__file__))
    _name = "_identity_attention_cli"
    if _name not in sys.modules:
        _pkg = types.ModuleType(_name)
        _pkg.__path__ = [_root]
        sys.modules[_name] = _pkg
    __package__ = _name

PACK_ROOT = os.path.dirname(os.path.abspath(__file__))


def find_comfyui(given: Optional[str] = None, pack_root: str = PACK_ROOT) -> str:
    """The ComfyUI folder to train with (see the module docstring); raises with what to do."""
    candidates = [given, os.environ.get("COMFYUI_PATH")]
    parent = os.path.dirname(os.path.abspath(pack_root))
    if os.path.basename(parent) == "custom_nodes":
        candidates.append(os.path.dirname(parent))
    for c in candidates:
        if c and os.path.isfile(os.path.join(c, "main.py")) and os.path.isdir(os.path.join(c, "comfy")):
            return os.path.abspath(c)
    raise SystemExit("cannot find ComfyUI: run this from ComfyUI/custom_nodes/<pack>/, or pass --comfyui PATH, or set COMFYUI_PATH")


def setup_comfyui(path: str) -> None:
    """Make ``import comfy`` work in this process, on the GPU when there is one (before any model code)."""
    if path not in sys.path:
        sys.path.insert(0, path)
    import torch

    import comfy.options  # noqa: F401  (ComfyUI then does not parse our command line)
    import comfy.cli_args

    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    import folder_paths  # noqa: F401

    yaml_path = os.path.join(path, "extra_model_paths.yaml")
    if os.path.isfile(yaml_path):
        try:
            from utils.extra_config import load_extra_path_config  # ComfyUI >= 2024-08
        except ImportError:
            load_extra_path_config = None
        if load_extra_path_config is not None:
            load_extra_path_config(yaml_path)


def _comfyui_arg(argv: List[str]) -> Optional[str]:
    for i, a in enumerate(argv):
        if a == "--comfyui" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--comfyui="):
            return a.split("=", 1)[1]
    return None


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    setup_comfyui(find_comfyui(_comfyui_arg(argv)))
    import importlib

    if argv and argv[0] == "prepare":  # cache identity features for a training folder (nodes/identity/prepare_features.py)
        return importlib.import_module(f"{__package__}.nodes.identity.prepare_features").main(argv[1:])
    trainer = importlib.import_module(f"{__package__}.nodes.training.trainer")
    return trainer.main(argv)


if __name__ == "__main__":
    sys.exit(main())
