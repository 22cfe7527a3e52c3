"""Checks of a command-line training config (``train.py``), before any model is loaded.

One :class:`TrainingConfigError` per problem, naming the setting (``train.learning_rate``),
the value given and the fix. Numbers must be real numbers (``true`` is not 1, NaN and inf are
not numbers) inside the ranges below; ``data.folder`` must be a folder with at least one image.
Every number anywhere in the config (a target's own ``token_lr``, ``strength``,
``loss_weight``...) must be finite. The ranges are sanity bounds, far outside anything a run uses, so a typo (``1e6`` steps
instead of ``1e4`` still passes; ``-1``, ``0``, ``1e400`` do not) fails in the first second,
not after the models have loaded. Nothing here imports ComfyUI.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Optional

# setting -> (kind, low, high); kind "int" or "float"; None = optional (the trainer's default)
RANGES = {
    "train.steps": ("int", 1, 100_000_000),
    "train.batch_size": ("int", 1, 1024),
    "train.grad_accum": ("int", 1, 1024),
    "train.time_resample": ("int", 1, 64),
    "train.seed": ("int", 0, 2**63 - 1),
    "train.checkpoint_every": ("int", 0, 100_000_000),  # 0: no checkpoints
    "train.log_every": ("int", 0, 100_000_000),
    "train.learning_rate": ("float", 0.0, 1.0),
    "train.weight_decay": ("float", 0.0, 1.0),
    "train.background_weight": ("float", 0.0, 1.0),
    "data.resolution": ("int", 64, 4096),
    "data.max_references": ("int", 1, 64),
}
RESOLUTION_STEP = 8  # the VAE downscales by 8
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_FOLDER_ENTRIES = 1_000_000  # the image search stops here (a folder of a million files is not a face set)


class TrainingConfigError(ValueError):
    """A config value the trainer cannot run with; ``str()`` is the whole message."""

    def __init__(self, setting: str, problem: str, fix: str):
        self.setting, self.problem, self.fix = setting, problem, fix
        super().__init__(f"{setting}: {problem}. Fix: {fix}")


def _number(setting: str, value: Any, kind: str, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TrainingConfigError(setting, f"{value!r} is not a number", f"write a number from {low:g} to {high:g}")
    if not math.isfinite(value):
        raise TrainingConfigError(setting, f"{value} is not a finite number", f"write a number from {low:g} to {high:g}")
    if kind == "int" and value != int(value):
        raise TrainingConfigError(setting, f"{value} is not a whole number", f"write a whole number from {low:g} to {high:g}")
    if not low <= value <= high or (setting == "train.learning_rate" and value == 0):
        raise TrainingConfigError(setting, f"{value:g} is outside {low:g} .. {high:g}" + (" (and must be above 0)" if setting == "train.learning_rate" else ""),
                                  f"write a number from {low:g} to {high:g}")


def _has_image(folder: str) -> bool:
    seen = 0
    for _root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in files:
            seen += 1
            if name.lower().endswith(IMAGE_EXTENSIONS) and not name.lower().endswith(".id.safetensors"):
                return True
            if seen > MAX_FOLDER_ENTRIES:
                return False
    return False


MAX_CONFIG_DEPTH = 16  # a config nests 3 deep (targets.pva.setting); JSON can nest a million


def _nonfinite_setting(config: Mapping) -> Optional[str]:
    """The dotted name of the first number anywhere in ``config`` that is NaN or inf (JSON reads ``NaN``,
    ``Infinity``; TOML ``nan``, ``inf``), e.g. ``targets.pva.token_lr``; None if all are finite."""
    stack = [(config, "", 0)]
    while stack:
        item, name, depth = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return name
        if depth > MAX_CONFIG_DEPTH and isinstance(item, (Mapping, list, tuple)):
            return name + " (nested more than 16 deep)"
        if isinstance(item, Mapping):
            stack.extend((v, f"{name}.{k}" if name else str(k), depth + 1) for k, v in item.items())
        elif isinstance(item, (list, tuple)):
            stack.extend((v, f"{name}[{i}]", depth + 1) for i, v in enumerate(item))
    return None


def check_training_config(config: Any, config_dir: str = "") -> None:
    """Raise :class:`TrainingConfigError` for the first problem of ``config`` (the parsed JSON / TOML)."""
    if not isinstance(config, Mapping):
        raise TrainingConfigError("config", f"the file holds a {type(config).__name__}, not a table of sections", "start from the example in nodes/training/trainer.py's docstring")
    for section in ("models", "data", "targets", "train", "output"):
        if section in config and not isinstance(config[section], Mapping):
            raise TrainingConfigError(section, f"is a {type(config[section]).__name__}, not a table", f'write "{section}": {{...}}')
    if not config.get("models"):
        raise TrainingConfigError("models", "is missing", 'name the base model, e.g. "models": {"checkpoint": "sd15.safetensors"}')
    if not config.get("targets"):
        raise TrainingConfigError("targets", "names no training target", 'add one, e.g. "targets": {"pva": {}}')
    bad = _nonfinite_setting(config)
    if bad:
        raise TrainingConfigError(bad, "is not a finite number" if "nested" not in bad else "is not a setting", "write a finite number (NaN and Infinity are not settings)")
    for setting, (kind, low, high) in RANGES.items():
        section, key = setting.split(".")
        value = config.get(section, {}).get(key)
        if value is None:
            continue
        _number(setting, value, kind, low, high)
    resolution = config.get("data", {}).get("resolution")
    if resolution is not None and int(resolution) % RESOLUTION_STEP:
        fit = int(resolution) // RESOLUTION_STEP * RESOLUTION_STEP
        raise TrainingConfigError("data.resolution", f"{resolution} is not a multiple of {RESOLUTION_STEP}", f"use {max(fit, 64)}")
    caption = config.get("data", {}).get("caption")
    if caption is not None and (not isinstance(caption, str) or not caption.strip()):
        raise TrainingConfigError("data.caption", f"{caption!r} is not a caption", 'write text, e.g. "photo of a <new1> person"')
    checkpointing = config.get("train", {}).get("gradient_checkpointing")
    if checkpointing is not None and checkpointing not in ("auto", True, False):
        raise TrainingConfigError("train.gradient_checkpointing", f"{checkpointing!r} is not auto, true or false", 'write "auto", true or false')
    folder: Optional[str] = config.get("data", {}).get("folder")
    if not isinstance(folder, str) or not folder.strip() or "\x00" in folder:
        raise TrainingConfigError("data.folder", "is missing" if not folder else f"{folder!r} is not a folder name", 'name the folder of training photos, e.g. "data": {"folder": "faces/"}')
    path = folder if os.path.isabs(folder) else os.path.join(config_dir, folder)
    if not os.path.isdir(path):
        raise TrainingConfigError("data.folder", f"{path} is not a folder", "create it and put the training photos in it (paths are relative to the config file)")
    if not _has_image(path):
        raise TrainingConfigError("data.folder", f"{path} holds no images ({', '.join(IMAGE_EXTENSIONS)})", "put the training photos in it")

