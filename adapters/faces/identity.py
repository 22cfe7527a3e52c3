"""IDENTITY: what the encoder node extracts from reference photos.

An :class:`Identity` holds one :class:`FaceRecord` per reference image (the
face chosen in that image), the recognizer that made the embeddings (its label, and
``recognizer_id``: the pack, file and embedding space, which adapters check against the
space they were trained on, see ``recognizer_identity.py``), and,
optionally, CLIP-vision features of the aligned crops. Mechanisms never read
it directly: an ID_ADAPTER's projector turns :meth:`Identity.features` into
cross-attention tokens.

Shapes (R = number of references, E = recognizer width, 512 for ArcFace):

- ``FaceRecord.embedding``: ``[E]`` raw recognizer output; ``normed_embedding``: L2-normalised.
- ``FaceRecord.bbox``: ``[4]`` (x0, y0, x1, y1); ``landmarks``: ``[5, 2]`` (x, y); source pixels.
- ``FaceRecord.crop``: ``[112, 112, 3]`` float in [0, 1], RGB, aligned by insightface's ``norm_crop``.
- ``Identity.clip_hidden``: ``[R, T, Dh]`` penultimate CLIP-vision hidden states of the crops
  (257 x 1280 for ViT-H/14); ``clip_embeds``: ``[R, De]`` projected image embeds.
- ``Identity.clip_hidden_uncond`` / ``clip_embeds_uncond``: the same for an all-black image
  (IP-Adapter's negative image prompt), ``[1, T, Dh]`` / ``[1, De]``.
- ``Identity.face_tokens``: ``[R, P, Df]`` patch tokens of a face encoder run on the crops
  (FACT's TransFace ViT: 144 x 512), filled by the node that runs that encoder.
- ``Identity.eva_clip_embeds`` / ``eva_clip_hidden``: ``[R, 768]`` / ``[R, 5, 577, 1024]``
  EVA02-CLIP-L-14-336 features of PuLID's face-features images, which PuLID's ID encoder reads
  (filled by the node 'Encode PuLID face features (EVA-CLIP)'; the PuLID projector says so when
  they are missing).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .recognizer_identity import RecognizerId


@dataclass(frozen=True)
class FaceRecord:
    """One reference face."""

    image_index: int
    image_size: Tuple[int, int]  # (H, W) of the source image
    bbox: torch.Tensor  # [4] float32
    landmarks: torch.Tensor  # [5, 2] float32
    det_score: float
    embedding: torch.Tensor  # [E] float32, raw
    crop: torch.Tensor  # [112, 112, 3] float32 in [0, 1]
    flipped: bool = False  # an augmentation copy (horizontal flip) of image_index

    @property
    def normed_embedding(self) -> torch.Tensor:
        return F.normalize(self.embedding.float(), dim=-1)


@dataclass(frozen=True)
class IdentityFeatures:
    """Batched projector inputs for N token sets (N = 1 fused, or R per reference).

    arcface: ``[N, E]`` raw; arcface_normed: ``[N, E]``; clip_embeds ``[N, De]``;
    clip_hidden ``[N, T, Dh]``; the ``*_uncond`` fields are the negative inputs
    (zeros for ArcFace, an all-black image's CLIP features) with N = 1.
    """

    arcface: torch.Tensor
    arcface_normed: torch.Tensor
    clip_embeds: Optional[torch.Tensor] = None
    clip_hidden: Optional[torch.Tensor] = None
    clip_embeds_uncond: Optional[torch.Tensor] = None
    clip_hidden_uncond: Optional[torch.Tensor] = None
    face_tokens: Optional[torch.Tensor] = None
    eva_clip_embeds: Optional[torch.Tensor] = None
    eva_clip_hidden: Optional[torch.Tensor] = None

    @property
    def count(self) -> int:
        return self.arcface.shape[0]


@dataclass(frozen=True)
class Identity:
    """The IDENTITY socket type: reference faces plus optional CLIP-vision features."""

    faces: Tuple[FaceRecord, ...]
    recognizer: str = "unknown"  # e.g. "antelopev2/glintr100.onnx"
    clip_hidden: Optional[torch.Tensor] = None  # [R, T, Dh]
    clip_embeds: Optional[torch.Tensor] = None  # [R, De]
    clip_hidden_uncond: Optional[torch.Tensor] = None  # [1, T, Dh]
    clip_embeds_uncond: Optional[torch.Tensor] = None  # [1, De]
    face_tokens: Optional[torch.Tensor] = None  # [R, P, Df]
    eva_clip_embeds: Optional[torch.Tensor] = None  # [R, 768]
    eva_clip_hidden: Optional[torch.Tensor] = None  # [R, 5, 577, 1024]
    notes: Tuple[str, ...] = field(default_factory=tuple)
    recognizer_id: Optional[RecognizerId] = None  # which recognizer (embedding space) made the embeddings; None: not recorded

    def __post_init__(self):
        if not self.faces:
            raise ValueError("an Identity needs at least one face")
        r = len(self.faces)
        for name in ("clip_hidden", "clip_embeds", "face_tokens", "eva_clip_embeds", "eva_clip_hidden"):
            t = getattr(self, name)
            if t is not None and t.shape[0] != r:
                raise ValueError(f"{name} has {t.shape[0]} rows for {r} faces")

    @property
    def count(self) -> int:
        return len(self.faces)

    @property
    def embeddings(self) -> torch.Tensor:
        """``[R, E]`` raw embeddings."""
        return torch.stack([f.embedding.float() for f in self.faces])

    @property
    def normed_embeddings(self) -> torch.Tensor:
        """``[R, E]`` L2-normalised embeddings."""
        return F.normalize(self.embeddings, dim=-1)

    @property
    def fused_embedding(self) -> torch.Tensor:
        """``[E]``: the mean of the normalised embeddings (not renormalised)."""
        return self.normed_embeddings.mean(dim=0)

    def features(self, per_reference: bool = False) -> IdentityFeatures:
        """Projector inputs: one fused set (means over references) or one per reference."""

        def fuse(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            if t is None or per_reference:
                return t
            return t.float().mean(dim=0, keepdim=True)

        raw = self.embeddings
        normed = self.normed_embeddings
        return IdentityFeatures(
            arcface=fuse(raw),
            arcface_normed=fuse(normed),
            clip_embeds=fuse(self.clip_embeds),
            clip_hidden=fuse(self.clip_hidden),
            clip_embeds_uncond=self.clip_embeds_uncond,
            clip_hidden_uncond=self.clip_hidden_uncond,
            face_tokens=fuse(self.face_tokens),
            eva_clip_embeds=fuse(self.eva_clip_embeds),
            eva_clip_hidden=fuse(self.eva_clip_hidden),
        )
