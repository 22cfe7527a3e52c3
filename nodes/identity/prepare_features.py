"""The trainer's ``prepare`` command: identity features cached next to every training photo.

``python -m <pack>.train prepare FOLDER --face-pack antelopev2 [--clip-vision FILE] [--force]``
runs face analysis (detector + ArcFace recognizer, ``adapters/faces/face_analysis.py``) once per photo
of a training folder (``adapters/training/training_data.py`` layout) and writes ``<photo>.id.safetensors``
with what the identity-conditioned targets read:

- ``arcface`` ``[E]``: the raw recognizer embedding of the photo's face (the largest by default);
- with ``--clip-vision``: ``clip_embeds`` ``[De]`` and ``clip_hidden`` ``[T, Dh]`` of the aligned
  224x224 crop (the features IP-Adapter plus / FaceID-Plus projectors read).

Training then reads these files (``StreamingImages.reference_features``) and never runs face
analysis. A photo whose file exists is skipped unless ``--force``; a photo without a face is
listed and skipped (it still trains as an image, but cannot be another photo's reference:
the trainer names it if it is needed). A summary is printed at the end.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import numpy as np
import torch

from ...adapters.faces import face_analysis as fa
from ...adapters.training.training_data import ImageFolderIndex

FEATURES_SUFFIX = ".id.safetensors"


@dataclass
class PrepareReport:
    written: List[str] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)  # already had features
    no_face: List[str] = field(default_factory=list)

    def summary(self) -> str:
        text = f"identity features: {len(self.written)} written, {len(self.skipped)} already there, {len(self.no_face)} photos without a face"
        if self.no_face:
            text += " (" + ", ".join(os.path.basename(p) for p in self.no_face[:10]) + (" ..." if len(self.no_face) > 10 else "") + ")"
        return text


def features_path(photo: str) -> str:
    return os.path.splitext(photo)[0] + FEATURES_SUFFIX


def read_rgb(path: str) -> np.ndarray:
    """A photo as ``[H, W, 3]`` uint8 RGB (the whole photo: the detector finds the face)."""
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def photo_features(face_model, rgb: np.ndarray, face: str = "largest", clip_vision=None) -> dict:
    """The features of one photo: ``{"arcface": [E]}`` (+ ``clip_embeds`` / ``clip_hidden``). Raises ``NoFaceError``."""
    result = fa.encode_identity(face_model, [rgb], face=face, retry=True, crops_224=clip_vision is not None)
    out = {"arcface": result.identity.faces[0].embedding.float().reshape(-1).clone()}
    if clip_vision is not None:
        from .identity_nodes import encode_clip_vision

        clip = encode_clip_vision(clip_vision, result.crops_224)
        out["clip_embeds"] = clip["clip_embeds"][0].contiguous()
        out["clip_hidden"] = clip["clip_hidden"][0].contiguous()
    return out


def prepare_folder(folder: str, face_model, clip_vision=None, face: str = "largest", force: bool = False, log: Optional[Callable[[str], None]] = None) -> PrepareReport:
    """Write ``<photo>.id.safetensors`` for every photo of ``folder`` (see the module docstring)."""
    from safetensors.torch import save_file

    log = log or (lambda text: None)
    report = PrepareReport()
    index = ImageFolderIndex(folder)
    for n, entry in enumerate(index.entries):
        target = features_path(entry.path)
        if os.path.isfile(target) and not force:
            report.skipped.append(entry.path)
            continue
        try:
            tensors = photo_features(face_model, read_rgb(entry.path), face=face, clip_vision=clip_vision)
        except fa.NoFaceError:
            report.no_face.append(entry.path)
            log(f"[{n + 1}/{len(index)}] no face: {entry.path}")
            continue
        save_file(tensors, target + ".part")
        os.replace(target + ".part", target)
        report.written.append(target)
        log(f"[{n + 1}/{len(index)}] {target}")
    return report


def _face_model(name: str, provider: str, det_size: int):
    if os.path.isdir(name):
        return fa.load_face_analysis(name, provider, det_size)
    from ..common.folders import folder_list

    roots = folder_list("insightface")
    return fa.load_face_analysis(fa.find_face_pack(name, roots), provider, det_size, name=name)


def _clip_vision(name: Optional[str]):
    if not name:
        return None
    path = name
    if not os.path.isfile(path):
        import folder_paths

        path = folder_paths.get_full_path("clip_vision", name)
        if path is None:
            raise SystemExit(f"no CLIP vision model {name!r}: give a file path or a name in models/clip_vision")
    import comfy.clip_vision

    return comfy.clip_vision.load(path)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m <pack>.train prepare",
        description="Cache identity features (<photo>.id.safetensors) for a training folder, so training never runs face analysis.",
    )
    parser.add_argument("folder", help="the training folder (the layout of adapters/training/training_data.py)")
    parser.add_argument("--face-pack", default="antelopev2", help="insightface pack name in models/insightface/models/, or its folder (default antelopev2)")
    parser.add_argument("--provider", default="auto", help="onnxruntime provider: auto, CPU, CUDA... (default auto)")
    parser.add_argument("--det-size", type=int, default=640, help="detection size (default 640)")
    parser.add_argument("--face", default="largest", choices=["largest", "most central"], help="which face of a photo with several (default largest)")
    parser.add_argument("--clip-vision", help="also store CLIP-vision features of the aligned face (a file, or a name in models/clip_vision)")
    parser.add_argument("--force", action="store_true", help="recompute photos that already have features")
    parser.add_argument("--comfyui", help="the ComfyUI folder (read by train.py)")
    args = parser.parse_args(argv)
    try:
        model = _face_model(args.face_pack, args.provider, args.det_size)
    except fa.FaceAnalysisError as err:
        raise SystemExit(f"cannot load the face analysis pack: {err}") from None
    with torch.inference_mode():
        report = prepare_folder(args.folder, model, clip_vision=_clip_vision(args.clip_vision), face=args.face, force=args.force, log=print)
    print(report.summary())
    return 0
