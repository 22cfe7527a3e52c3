"""Encode nodes: load a face analysis model, encode reference photos into an IDENTITY, score similarity.

ComfyUI glue over ``adapters/faces/face_analysis.py`` and ``adapters/faces/face_visuals.py``: types in,
adapter calls, types out, adapter errors turned into :class:`IdentityAttentionError`.
insightface / onnxruntime are imported only when a node runs, so the pack loads without them.

Socket types: FACE_ANALYSIS (a :class:`FaceAnalysisModel`; a name of its own, since other packs'
FACEANALYSIS objects are not interchangeable), IDENTITY, and ComfyUI's IMAGE / MASK / FLOAT /
CLIP_VISION.
"""

from __future__ import annotations

from typing import List

import numpy as np
import torch

from ...adapters.faces import face_analysis as fa
from ...adapters.faces import face_visuals as fv
from ...adapters.faces.identity import Identity
from ..common.errors import IdentityAttentionError, MissingDependencyError
from ...adapters.weights.weights_guidance import entries_for, missing_file, no_files
from ...adapters.weights.weights_manifest import manifest_or_none
from ..common.folders import folder_list
from ..common.input_checks import check_image
from ..dispatch.stage_inputs import CATEGORY

ENCODE_CATEGORY = f"{CATEGORY}/encode"
NO_PACKS = "(no packs found: put antelopev2 or buffalo_l in models/insightface/models/)"
PROVIDERS = ("auto", "CUDA", "CPU")
CLIP_SIZE = 224


def _error(err: fa.FaceAnalysisError, node: str) -> IdentityAttentionError:
    if isinstance(err, fa.FaceDependencyError):
        return MissingDependencyError(err.package, err.pip_command, node=node)
    return IdentityAttentionError(err.problem, node=node, input_name=err.input_name, fix=err.fix)


def _progress(total: int):
    """A callable advancing ComfyUI's progress bar by n (None outside a host)."""
    try:
        import comfy.utils

        bar = comfy.utils.ProgressBar(total)
    except Exception:  # noqa: BLE001 - no host, or a host without progress bars
        return None
    return bar.update


def host_runs_on_cpu() -> bool:
    """True when ComfyUI computes on the CPU: started with ``--cpu``, or its torch device is the CPU."""
    try:
        import comfy.model_management as mm
    except Exception:  # noqa: BLE001 - no host: let the adapter look at torch itself
        return False
    try:
        from comfy.cli_args import args

        if getattr(args, "cpu", False):
            return True
    except Exception:  # noqa: BLE001
        pass
    state = getattr(mm, "cpu_state", None)
    if state is not None and state == getattr(getattr(mm, "CPUState", None), "CPU", object()):
        return True
    try:
        return getattr(mm.get_torch_device(), "type", "") == "cpu"
    except Exception:  # noqa: BLE001
        return False


def _torch_device_index() -> int:
    try:
        import comfy.model_management as mm

        device = mm.get_torch_device()
        return int(device.index or 0) if getattr(device, "type", "") == "cuda" else 0
    except Exception:  # noqa: BLE001
        return 0


# --------------------------------------------------------------------------------------------- CLIP vision


def _field(output, name):
    """``output.name`` / ``output[name]`` for the output objects of every host version, or None."""
    value = output.get(name) if isinstance(output, dict) else getattr(output, name, None)
    if value is None:
        try:
            value = output[name]
        except Exception:  # noqa: BLE001 - Output.__getitem__ raises AttributeError, tuples TypeError
            value = None
    return value


def clip_vision_outputs(output) -> tuple:
    """``(penultimate hidden states [B, T, D], image embeds [B, De])`` from ``encode_image``'s result.

    ComfyUI (early 2024 and 0.3.x) returns an ``Output`` with ``penultimate_hidden_states``
    and ``image_embeds``; older hosts returned transformers' output with ``hidden_states``
    (a tuple of every layer's states).
    """
    hidden = _field(output, "penultimate_hidden_states")
    if hidden is None:
        states = _field(output, "hidden_states")
        if states is not None and len(states) >= 2:
            hidden = states[-2]
    embeds = _field(output, "image_embeds")
    if hidden is None or embeds is None:
        raise IdentityAttentionError(
            "this CLIP vision model's output has no penultimate hidden states or image embeds",
            node=EncodeIdentity.DISPLAY_NAME, input_name="clip_vision",
            fix="connect a CLIP vision model loaded with Load CLIP Vision (ViT-H/14 for IP-Adapter SD1.5 face models, ViT-bigG for SDXL)",
        )
    return hidden.float().cpu(), embeds.float().cpu()


def encode_clip_vision(clip_vision, crops_rgb: List[np.ndarray]) -> dict:
    """CLIP-vision features of the aligned 224x224 crops and of an all-black image (the uncond)."""
    pixels = torch.from_numpy(np.stack(crops_rgb)).float().div(255.0)  # [R, 224, 224, 3]
    hidden, embeds = clip_vision_outputs(clip_vision.encode_image(pixels))
    hidden_u, embeds_u = clip_vision_outputs(clip_vision.encode_image(torch.zeros(1, CLIP_SIZE, CLIP_SIZE, 3)))
    return {"clip_hidden": hidden, "clip_embeds": embeds, "clip_hidden_uncond": hidden_u, "clip_embeds_uncond": embeds_u}


# --------------------------------------------------------------------------------------------- nodes


class LoadFaceAnalysis:
    NODE_ID = "IdentityAttentionLoadFaceAnalysis"
    DISPLAY_NAME = "Load face analysis model"
    CATEGORY = ENCODE_CATEGORY
    DESCRIPTION = (
        "Loads an insightface model pack (face detector + face recognizer) from models/insightface/models/<pack>/, "
        "the folder other face nodes use. Use buffalo_l for IP-Adapter-FaceID adapters and antelopev2 for InstantID and PuLID; "
        "only the detector and recognizer are loaded."
    )
    RETURN_TYPES = ("FACE_ANALYSIS", "STRING")
    RETURN_NAMES = ("face_analysis", "info")
    OUTPUT_TOOLTIPS = (
        "The face detector and recognizer, for Encode identity and Identity similarity.",
        "What was loaded: the files, where they run (and, with provider auto, why), and which recognizer this is "
        "(buffalo_l's for FaceID adapters, antelopev2's for InstantID / PuLID), with a warning when it cannot be identified.",
    )
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        packs = fa.list_face_packs(folder_list("insightface")) or [NO_PACKS]
        return {
            "required": {
                "pack": (packs, {"tooltip": "The insightface pack: a folder of .onnx files in models/insightface/models/. "
                                            "buffalo_l for IP-Adapter-FaceID / FaceID-Plus(V2), antelopev2 for InstantID and "
                                            "PuLID (each adapter was trained on its pack's embedding). Refresh the page after adding one."}),
                "provider": (list(PROVIDERS), {"default": "auto", "tooltip": "Where the face models run. auto: the GPU when "
                                               "onnxruntime-gpu with CUDA is installed and ComfyUI runs on a CUDA GPU, else the CPU "
                                               "(with --cpu, CUDA is never tried). The info output says which was chosen. Face "
                                               "analysis is fast on the CPU too."}),
                "det_size": ("INT", {"default": 640, "min": 128, "max": 2048, "step": 32,
                                     "tooltip": "The size photos are scaled to for finding faces (640 is what the packs were trained "
                                                "for). Lower it for close-ups and small photos, raise it for small faces in big photos."}),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, pack):
        if pack is None:  # fed by a link: checked when the node runs
            return True
        try:
            cls.check_pack_present(pack)
        except IdentityAttentionError as err:
            return str(err)
        except fa.FaceAnalysisError as err:
            return str(_error(err, cls.DISPLAY_NAME))
        return True

    @classmethod
    def check_pack_present(cls, pack) -> None:
        """A pack that is not there (or the empty-list placeholder): one error naming the pack's files in
        weights_manifest.json, where they go and the command that downloads them (ComfyUI's "Value not in
        list" would answer otherwise)."""
        roots = folder_list("insightface")
        if pack != NO_PACKS and pack in fa.list_face_packs(roots):
            return
        searched = [str(d) for d in fa.pack_search_dirs(roots)]
        manifest = manifest_or_none()
        if pack == NO_PACKS:
            where = "; ".join(searched) or "no insightface folder is registered"
            get = no_files(("insightface",), searched, manifest, cls.NODE_ID).fix
            raise IdentityAttentionError(f"no face analysis pack was found (searched: {where})", node=cls.DISPLAY_NAME,
                                         input_name="pack", fix=f"put a pack in {fa.EXPECTED_LAYOUT}; {get}")
        err = missing_file(str(pack), ("insightface",), searched, manifest)
        if not entries_for(manifest, str(pack), ("insightface",)):  # a pack the manifest does not know: the layout
            fa.find_face_pack(str(pack), roots)
        raise IdentityAttentionError(err.problem, node=cls.DISPLAY_NAME, input_name="pack", fix=err.fix)

    def load(self, pack, provider, det_size):
        node = self.DISPLAY_NAME
        roots = folder_list("insightface")
        try:
            plain_name = not any(c in str(pack) for c in ("/", "\\", ":", "\x00")) and str(pack) not in (".", "..")
            if pack == NO_PACKS or plain_name:  # other names get find_face_pack's own error ("not a pack name")
                self.check_pack_present(pack)
            folder = fa.find_face_pack(pack, roots)
            model = fa.load_face_analysis(folder, provider, det_size, device_id=_torch_device_index(), name=pack,
                                          cpu_only=host_runs_on_cpu())
        except fa.FaceAnalysisError as err:
            raise _error(err, node) from None
        return (model, model.report())


class EncodeIdentity:
    NODE_ID = "IdentityAttentionEncodeIdentity"
    DISPLAY_NAME = "Encode identity"
    CATEGORY = ENCODE_CATEGORY
    DESCRIPTION = (
        "Finds the face in each reference photo, aligns it and turns it into an identity (ArcFace embeddings, and CLIP-vision "
        "features when a CLIP vision model is connected) that the identity attention nodes use. Several photos of the same "
        "person give a steadier identity. Shows the aligned faces, a mask per photo and the detections."
    )
    RETURN_TYPES = ("IDENTITY", "IMAGE", "MASK", "IMAGE")
    RETURN_NAMES = ("identity", "face_crops", "face_mask", "preview")
    OUTPUT_TOOLTIPS = (
        "The identity: one face per photo (mirrored copies too with flip_augment), for the identity attention nodes.",
        "The aligned 112x112 faces the identity was made from, one per photo (and mirror).",
        "A soft mask over the chosen face of each photo, at the photo's size.",
        "Each photo with the faces found: the chosen one in green with its 5 landmarks, others in grey.",
    )
    OUTPUT_IS_LIST = (False, False, True, True)
    INPUT_IS_LIST = True  # photos of different sizes arrive as a list of IMAGE batches
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "face_analysis": ("FACE_ANALYSIS", {"tooltip": "From Load face analysis model."}),
                "images": ("IMAGE", {"tooltip": "Reference photos of one person: one photo or a batch; photos of different "
                                                "sizes can come as an image list. Clear, frontal, well-lit faces work best."}),
                "face": (list(fa.FACE_CHOICES), {"default": "largest", "tooltip": "Which face to use when a photo shows several: "
                                                 "the largest, the one nearest the centre, or the one numbered face_index."}),
                "face_index": ("INT", {"default": 0, "min": 0, "max": 64, "tooltip": "With face = index: which face, counting "
                                       "from 0 at the left of the photo."}),
                "retry_smaller_sizes": ("BOOLEAN", {"default": True, "tooltip": "When no face is found, try again at smaller "
                                                    "detection sizes (helps with close-ups and small photos) before giving up."}),
                "flip_augment": ("BOOLEAN", {"default": False, "tooltip": "Also use each face mirrored. Gives a more even identity "
                                             "from few photos; turn off for strongly asymmetric features (a scar, a parting)."}),
                "mask_grow": ("FLOAT", {"default": 1.2, "min": 0.5, "max": 3.0, "step": 0.05, "tooltip": "Size of the face mask "
                                        "relative to the detected face box (1 = the box; more takes in hair and chin)."}),
                "mask_feather": ("FLOAT", {"default": 0.25, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip": "Softness of the "
                                           "face mask's edge, as a fraction of the face size (0 = hard edge)."}),
            },
            "optional": {
                "clip_vision": ("CLIP_VISION", {"tooltip": "Optional: a CLIP vision model (Load CLIP Vision). Needed by IP-Adapter "
                                                "plus-face / FaceID-Plus style adapters; its features of the aligned faces are "
                                                "kept in the identity."}),
            },
        }

    def encode(self, face_analysis, images, face, face_index, retry_smaller_sizes, flip_augment, mask_grow, mask_feather,
               clip_vision=None):
        node = self.DISPLAY_NAME
        first = lambda v: v[0] if isinstance(v, list) else v  # noqa: E731 - INPUT_IS_LIST wraps every input
        model, face, face_index = first(face_analysis), first(face), int(first(face_index))
        retry, flip = bool(first(retry_smaller_sizes)), bool(first(flip_augment))
        grow, feather = float(first(mask_grow)), float(first(mask_feather))
        clip_vision = first(clip_vision) if clip_vision is not None else None
        groups = images if isinstance(images, list) else [images]
        if not isinstance(model, fa.FaceAnalysisModel):
            raise IdentityAttentionError("this input needs a face analysis model", node=node, input_name="face_analysis",
                                         fix="connect Load face analysis model")
        groups = [check_image(g, node, "images", channels=(1, 2, 3, 4)) if torch.is_tensor(g) else g for g in groups]
        try:
            photos = [fa.to_uint8_rgb(g) for g in groups]  # per list item: its photos as [H, W, 3] uint8
            flat = [p for group in photos for p in group]
            result = fa.encode_identity(model, flat, face=face, face_index=face_index, retry=retry, flip=flip,
                                        crops_224=clip_vision is not None, progress=_progress(len(flat)))
        except fa.FaceAnalysisError as err:
            raise _error(err, node) from None
        identity = result.identity
        if clip_vision is not None:
            identity = _with_fields(identity, encode_clip_vision(clip_vision, result.crops_224))

        crops = fv.crops_image([f.crop for f in identity.faces])
        masks, previews, start = [], [], 0
        for group in photos:
            reports = result.reports[start:start + len(group)]
            start += len(group)
            masks.append(torch.stack([
                fv.face_mask(r.size[0], r.size[1], r.chosen.bbox, r.chosen.kps, grow=grow, feather=feather) for r in reports]))
            previews.append(torch.stack([
                fv.draw_faces(torch.from_numpy(p).float().div(255.0), [(f.bbox, f.kps, f is r.chosen, None) for f in r.faces])
                for p, r in zip(group, reports)]))
        return (identity, crops, masks, previews)


def _with_fields(identity, fields: dict):
    import dataclasses

    return dataclasses.replace(identity, **fields)


class IdentitySimilarity:
    NODE_ID = "IdentityAttentionIdentitySimilarity"
    DISPLAY_NAME = "Identity similarity"
    CATEGORY = ENCODE_CATEGORY
    DESCRIPTION = (
        "How much the face in each image looks like the identity: the cosine similarity of their face embeddings "
        "(1 = same embedding; the same person typically scores well above unrelated people, whose scores sit near 0). "
        "Use it to compare settings. Images without a face score 0."
    )
    RETURN_TYPES = ("FLOAT", "FLOAT", "IMAGE")
    RETURN_NAMES = ("similarity", "mean_similarity", "preview")
    OUTPUT_TOOLTIPS = (
        "One similarity per image (a list, in batch order); 0 where no face was found.",
        "The mean similarity over the images in which a face was found (0 if none).",
        "The images with the scored face boxed and its similarity written above it.",
    )
    OUTPUT_IS_LIST = (True, False, False)
    FUNCTION = "score"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "Generated images to score (e.g. from VAE Decode)."}),
                "identity": ("IDENTITY", {"tooltip": "The identity to compare with, from Encode identity."}),
                "face_analysis": ("FACE_ANALYSIS", {"tooltip": "The same face analysis model the identity was encoded with."}),
                "face": (list(fa.SIMILARITY_CHOICES), {"default": "largest", "tooltip": "Which face to score when an image "
                                                       "shows several: the largest, the most central, or the best match."}),
            }
        }

    def score(self, images, identity, face_analysis, face):
        node = self.DISPLAY_NAME
        if not isinstance(face_analysis, fa.FaceAnalysisModel):
            raise IdentityAttentionError("this input needs a face analysis model", node=node, input_name="face_analysis",
                                         fix="connect Load face analysis model")
        if not isinstance(identity, Identity):
            raise IdentityAttentionError("this input needs an IDENTITY", node=node, input_name="identity",
                                         fix="connect the identity output of Encode identity")
        images = check_image(images, node, "images", channels=(1, 2, 3, 4))
        try:
            result = fa.identity_similarity(face_analysis, identity, images, face=face)
        except fa.FaceAnalysisError as err:
            raise _error(err, node) from None
        photos = fa.to_uint8_rgb(images)
        previews = []
        for photo, score, faces, chosen in zip(photos, result.scores, result.faces, result.chosen):
            picture = torch.from_numpy(photo).float().div(255.0)
            if chosen is None:
                previews.append(fv.banner(picture, "NO FACE"))
                continue
            previews.append(fv.draw_faces(picture, [(f.bbox, f.kps, f is chosen, f"{score:.3f}" if f is chosen else None)
                                                    for f in faces]))
        found = [s for s in result.scores if s is not None]
        mean = float(sum(found) / len(found)) if found else 0.0
        return ([float(s) if s is not None else 0.0 for s in result.scores], mean, torch.stack(previews))


NODES = [LoadFaceAnalysis, EncodeIdentity, IdentitySimilarity]
