"""PuLID's face-features image: the picture of a reference face that EVA-CLIP sees.

PuLID (github:ToTheBeginning/PuLID ``pulid/pipeline_v1_1.py`` ``get_id_embedding``):

1. align the face to 512x512 with facexlib's FFHQ 5-point template
   (``FaceRestoreHelper(face_size=512)``: similarity transform, bilinear
   warp, border filled with grey ``(135, 133, 132)`` BGR);
2. parse it with BiSeNet (:mod:`.face_parsing`); background, ears, neck,
   cloth, hat... become white, the rest becomes grey
   ``0.299 R + 0.587 G + 0.114 B`` (repeated to 3 channels);
3. EVA-CLIP reads that image resized to 336 (:mod:`.eva_clip_vision`).

Choices where this pack cannot do exactly the same (written here and in the README):

- Landmarks: PuLID re-detects the face with facexlib's RetinaFace for the
  alignment; this pack reuses the 5 landmarks insightface found when the
  IDENTITY was encoded (same points, same order: eyes, nose, mouth corners),
  so no second detector is needed. The similarity is the least-squares fit
  (Umeyama), where facexlib calls ``cv2.estimateAffinePartial2D(LMEDS)``;
  with five consistent points both give the same transform up to detector noise.
- Without a parsing model the face is not masked: the aligned 512 crop is
  made grey as PuLID does, background and all; the node says so.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .face_crop_mask import similarity_transform

FFHQ_TEMPLATE_512 = torch.tensor(
    [
        [192.98138, 239.94708],
        [318.90277, 240.1936],
        [256.63416, 314.01935],
        [201.26117, 371.41043],
        [313.08905, 371.15118],
    ],
    dtype=torch.float64,
)
"""facexlib ``FaceRestoreHelper.face_template`` for ``face_size=512`` (left eye, right eye, nose, mouth corners)."""

ALIGN_SIZE = 512
BORDER_RGB = (132.0 / 255.0, 133.0 / 255.0, 135.0 / 255.0)  # facexlib's borderValue (135, 133, 132) is BGR


def align_face_512(image: torch.Tensor, landmarks: torch.Tensor, size: int = ALIGN_SIZE) -> torch.Tensor:
    """``image`` ``[3, H, W]`` RGB in [0, 1], ``landmarks`` ``[5, 2]`` (x, y) -> ``[3, size, size]`` aligned.

    Bilinear with OpenCV's pixel convention (integer coordinates are pixel
    centres); outside the photo the grey border blends in as ``cv2.warpAffine``'s
    constant border does.
    """
    m = similarity_transform(landmarks, FFHQ_TEMPLATE_512 * (size / 512.0))
    inv = torch.linalg.inv(torch.cat([m, torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)]))[:2]
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64), indexing="ij")
    src = torch.stack([xs, ys, torch.ones_like(xs)], dim=-1) @ inv.T
    h, w = image.shape[-2:]
    grid = torch.stack([2.0 * src[..., 0] / max(w - 1, 1) - 1.0, 2.0 * src[..., 1] / max(h - 1, 1) - 1.0], dim=-1)
    border = torch.tensor(BORDER_RGB, dtype=torch.float32, device=image.device).view(3, 1, 1)
    shifted = (image.float() - border).unsqueeze(0)  # zeros padding of (image - border) == a constant border
    out = F.grid_sample(shifted, grid.float().unsqueeze(0).to(image.device), mode="bilinear", padding_mode="zeros", align_corners=True)
    return out[0] + border


def to_gray(images: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` -> ``[B, 3, H, W]`` ITU-R 601 luma repeated (PuLID's ``to_gray``)."""
    y = 0.299 * images[:, 0:1] + 0.587 * images[:, 1:2] + 0.114 * images[:, 2:3]
    return y.repeat(1, 3, 1, 1)


def face_features_image(faces: torch.Tensor, background: Optional[torch.Tensor]) -> torch.Tensor:
    """``faces`` ``[B, 3, H, W]``, ``background`` ``[B, H, W]`` bool or None -> white where background, grey face elsewhere."""
    gray = to_gray(faces)
    if background is None:
        return gray
    return torch.where(background.unsqueeze(1), torch.ones_like(gray), gray)
