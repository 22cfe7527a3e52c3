"""Pictures of what face analysis found: feathered face masks, annotated previews, crop batches.

Pure torch (no cv2, no PIL), in ComfyUI's layouts: IMAGE ``[B, H, W, 3]`` float in
[0, 1], MASK ``[B, H, W]`` float in [0, 1].

- :func:`face_mask`: an ellipse around the face box, turned to the eye line of the 5
  landmarks, grown by ``grow`` and feathered over ``feather`` x the face size (a
  smoothstep falloff), 1 inside, 0 far outside.
- :func:`draw_faces`: boxes (the chosen face green, others grey) and the 5 landmarks
  (eyes blue, nose yellow, mouth corners red); an optional label (e.g. a similarity score)
  above the box in a built-in 5x7 pixel font.
- :func:`crops_image`: the aligned crops of an IDENTITY as one IMAGE batch.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence, Tuple

import torch

GREEN = (0.15, 0.9, 0.3)
GREY = (0.6, 0.6, 0.6)
LANDMARK_COLOURS = ((0.2, 0.55, 1.0), (0.2, 0.55, 1.0), (1.0, 0.85, 0.1), (1.0, 0.25, 0.25), (1.0, 0.25, 0.25))


def face_mask(height: int, width: int, bbox, landmarks=None, grow: float = 1.2, feather: float = 0.25) -> torch.Tensor:
    """``[H, W]`` float mask of one face.

    The ellipse's centre is the box centre, its semi-axes ``grow`` x half the box's width and
    height, its rotation the angle of the line between the eyes (landmarks 0 and 1) when
    landmarks are given. ``feather`` is the width of the soft edge as a fraction of the
    ellipse radius (0 = hard edge): the mask is 1 for normalised radius <= 1 - feather/2,
    0 for >= 1 + feather/2, smoothstep between.
    """
    x0, y0, x1, y1 = [float(v) for v in bbox]
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    a = max((x1 - x0) / 2.0 * grow, 0.5)
    b = max((y1 - y0) / 2.0 * grow, 0.5)
    angle = 0.0
    if landmarks is not None:
        lm = torch.as_tensor(landmarks, dtype=torch.float64)
        dx, dy = float(lm[1, 0] - lm[0, 0]), float(lm[1, 1] - lm[0, 1])
        if abs(dx) + abs(dy) > 1e-6:
            angle = math.atan2(dy, dx)
    ys = torch.arange(height, dtype=torch.float64).view(-1, 1) + 0.5
    xs = torch.arange(width, dtype=torch.float64).view(1, -1) + 0.5
    c, s = math.cos(angle), math.sin(angle)
    u = (xs - cx) * c + (ys - cy) * s
    v = -(xs - cx) * s + (ys - cy) * c
    r = torch.sqrt((u / a) ** 2 + (v / b) ** 2)
    if feather <= 0:
        return (r <= 1.0).float()
    t = ((1.0 + feather / 2.0 - r) / feather).clamp(0.0, 1.0)
    return (t * t * (3.0 - 2.0 * t)).float()


def _line_width(height: int, width: int) -> int:
    return max(1, round(min(height, width) / 256))


def _fill(image: torch.Tensor, x0: int, y0: int, x1: int, y1: int, colour) -> None:
    h, w = image.shape[:2]
    x0, x1 = max(0, x0), min(w, x1)
    y0, y1 = max(0, y0), min(h, y1)
    if x1 > x0 and y1 > y0:
        image[y0:y1, x0:x1] = torch.tensor(colour, dtype=image.dtype)


def draw_box(image: torch.Tensor, bbox, colour, thickness: int) -> None:
    """Rectangle outline, in place, on ``[H, W, 3]``."""
    x0, y0, x1, y1 = [int(round(float(v))) for v in bbox]
    t = thickness
    _fill(image, x0 - t, y0 - t, x1 + t, y0, colour)
    _fill(image, x0 - t, y1, x1 + t, y1 + t, colour)
    _fill(image, x0 - t, y0, x0, y1, colour)
    _fill(image, x1, y0, x1 + t, y1, colour)


def draw_dot(image: torch.Tensor, x: float, y: float, radius: int, colour) -> None:
    cx, cy = int(round(float(x))), int(round(float(y)))
    h, w = image.shape[:2]
    for yy in range(max(0, cy - radius), min(h, cy + radius + 1)):
        for xx in range(max(0, cx - radius), min(w, cx + radius + 1)):
            if (xx - cx) ** 2 + (yy - cy) ** 2 <= radius * radius:
                image[yy, xx] = torch.tensor(colour, dtype=image.dtype)


# 5x7 glyphs, one string of 7 rows of 5 bits per character (enough for scores and short notes)
FONT = {
    "0": "01110 10001 10011 10101 11001 10001 01110", "1": "00100 01100 00100 00100 00100 00100 01110",
    "2": "01110 10001 00001 00010 00100 01000 11111", "3": "11110 00001 00001 01110 00001 00001 11110",
    "4": "00010 00110 01010 10010 11111 00010 00010", "5": "11111 10000 11110 00001 00001 10001 01110",
    "6": "00110 01000 10000 11110 10001 10001 01110", "7": "11111 00001 00010 00100 01000 01000 01000",
    "8": "01110 10001 10001 01110 10001 10001 01110", "9": "01110 10001 10001 01111 00001 00010 01100",
    ".": "00000 00000 00000 00000 00000 01100 01100", "-": "00000 00000 00000 11111 00000 00000 00000",
    ":": "00000 01100 01100 00000 01100 01100 00000", " ": "00000 00000 00000 00000 00000 00000 00000",
    "A": "01110 10001 10001 11111 10001 10001 10001", "C": "01110 10001 10000 10000 10000 10001 01110",
    "D": "11110 10001 10001 10001 10001 10001 11110", "E": "11111 10000 10000 11110 10000 10000 11111",
    "F": "11111 10000 10000 11110 10000 10000 10000", "I": "01110 00100 00100 00100 00100 00100 01110",
    "M": "10001 11011 10101 10101 10001 10001 10001", "N": "10001 11001 10101 10011 10001 10001 10001",
    "O": "01110 10001 10001 10001 10001 10001 01110", "S": "01111 10000 10000 01110 00001 00001 11110",
    "B": "11110 10001 10001 11110 10001 10001 11110", "G": "01110 10001 10000 10111 10001 10001 01111",
    "K": "10001 10010 10100 11000 10100 10010 10001", "P": "11110 10001 10001 11110 10000 10000 10000",
    "R": "11110 10001 10001 11110 10100 10010 10001", "T": "11111 00100 00100 00100 00100 00100 00100",
    "U": "10001 10001 10001 10001 10001 10001 01110",
}


def text_mask(text: str, scale: int = 1) -> torch.Tensor:
    """``[7*scale, 6*len*scale]`` bool bitmap of ``text`` (upper-cased; unknown characters are blank)."""
    columns = []
    for ch in text.upper():
        rows = FONT.get(ch, FONT[" "]).split()
        glyph = torch.tensor([[bit == "1" for bit in row] + [False] for row in rows], dtype=torch.bool)
        columns.append(glyph)
    bitmap = torch.cat(columns, dim=1) if columns else torch.zeros(7, 0, dtype=torch.bool)
    return bitmap.repeat_interleave(scale, 0).repeat_interleave(scale, 1)


def draw_text(image: torch.Tensor, text: str, x: int, y: int, scale: int, colour, background=(0.0, 0.0, 0.0)) -> None:
    """Text with its top-left corner at (x, y) on a solid background, clipped to the image, in place."""
    bitmap = text_mask(text, scale)
    pad = scale
    bh, bw = bitmap.shape[0] + 2 * pad, bitmap.shape[1] + 2 * pad
    h, w = image.shape[:2]
    x = min(max(0, x), max(0, w - bw))
    y = min(max(0, y), max(0, h - bh))
    _fill(image, x, y, x + bw, y + bh, background)
    region = image[y + pad:y + pad + bitmap.shape[0], x + pad:x + pad + bitmap.shape[1]]
    mask = bitmap[:region.shape[0], :region.shape[1]]
    region[mask] = torch.tensor(colour, dtype=image.dtype)


def draw_faces(image: torch.Tensor, faces: Iterable[Tuple[object, object, bool, Optional[str]]]) -> torch.Tensor:
    """A copy of ``image`` ``[H, W, 3]`` with each face's box, landmarks and label drawn.

    ``faces``: ``(bbox [4], landmarks [5, 2] or None, chosen, label or None)`` in pixels.
    """
    out = image[..., :3].detach().float().clone().cpu()
    h, w = out.shape[:2]
    t = _line_width(h, w)
    radius = max(1, t + 1)
    scale = max(1, min(h, w) // 200)
    for bbox, landmarks, chosen, label in sorted(faces, key=lambda f: bool(f[2])):  # chosen drawn last, on top
        colour = GREEN if chosen else GREY
        draw_box(out, bbox, colour, t)
        if landmarks is not None:
            for (x, y), c in zip(torch.as_tensor(landmarks).tolist(), LANDMARK_COLOURS):
                draw_dot(out, x, y, radius, c)
        if label:
            x0, y0 = int(float(bbox[0])), int(float(bbox[1]))
            draw_text(out, label, x0, y0 - t - 9 * scale, scale, colour)
    return out


def banner(image: torch.Tensor, text: str, colour=(1.0, 0.35, 0.35)) -> torch.Tensor:
    """A copy of ``image`` with ``text`` in its top-left corner (e.g. "NO FACE")."""
    out = image[..., :3].detach().float().clone().cpu()
    scale = max(1, min(out.shape[:2]) // 160)
    draw_text(out, text, 2, 2, scale, colour)
    return out


def crops_image(crops: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[R, 112, 112, 3]`` IMAGE batch of aligned crops (each ``[112, 112, 3]`` in [0, 1])."""
    return torch.stack([c.float().clamp(0, 1) for c in crops]).contiguous()
