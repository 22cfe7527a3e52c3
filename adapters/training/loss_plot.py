"""Loss curves as a picture, drawn with Pillow (ComfyUI ships it; no plotting library needed).

:func:`draw_loss_curves` draws one or more named series (values per step) on shared axes: the
raw values as thin lines, an exponential moving average as a thick line of the same colour,
the y range from the data (with 5 % margin), a few labelled ticks, and a legend with each
series' last smoothed value. :func:`image_tensor` turns the picture into a ComfyUI IMAGE
(``[1, H, W, 3]`` float in [0, 1]).
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch

COLOURS = ((52, 120, 246), (235, 87, 87), (39, 174, 96), (242, 153, 74), (155, 81, 224), (45, 156, 219))
BACKGROUND = (255, 255, 255)
AXIS = (60, 60, 60)
GRID = (225, 225, 225)


def smooth(values: Sequence[float], alpha: float = 0.3) -> List[float]:
    """Exponential moving average (``alpha`` = weight of the newest value), bias-free at the start."""
    out, avg, weight = [], 0.0, 0.0
    for v in values:
        avg = (1 - alpha) * avg + alpha * float(v)
        weight = (1 - alpha) * weight + alpha
        out.append(avg / weight)
    return out


def _ticks(lo: float, hi: float, count: int = 4) -> List[float]:
    if hi <= lo:
        return [lo]
    step = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(step))
    step = min((m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= step), default=step)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step) + 1)]


def _label(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000 or abs(v) < 0.01:
        return f"{v:.2e}"
    return f"{v:.3g}"


def draw_loss_curves(series: Dict[str, Sequence[float]], title: str = "loss", width: int = 640, height: int = 360, steps: Optional[Sequence[int]] = None):
    """A ``PIL.Image`` (RGB) of the curves (see module docstring). Empty series draw empty axes."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, right, top, bottom = 64, 16, 28, 34
    x0, y0, x1, y1 = left, top, width - right, height - bottom
    values = [float(v) for s in series.values() for v in s if math.isfinite(float(v))]
    n = max((len(s) for s in series.values()), default=0)
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5 * (abs(lo) or 1.0), hi + 0.5 * (abs(hi) or 1.0)
    pad = 0.05 * (hi - lo)
    lo, hi = lo - pad, hi + pad

    def px(i: int, v: float) -> Tuple[float, float]:
        x = x0 + (x1 - x0) * (i / max(n - 1, 1))
        y = y1 - (y1 - y0) * ((v - lo) / (hi - lo))
        return x, y

    for t in _ticks(lo, hi):
        _, y = px(0, t)
        draw.line([(x0, y), (x1, y)], fill=GRID)
        draw.text((4, y - 6), _label(t), fill=AXIS, font=font)
    draw.rectangle([x0, y0, x1, y1], outline=AXIS)
    first = steps[0] if steps else 1
    last = steps[-1] if steps else n
    draw.text((x0, y1 + 6), f"step {first}", fill=AXIS, font=font)
    draw.text((x1 - 70, y1 + 6), f"step {last}", fill=AXIS, font=font)
    draw.text((x0, 8), title, fill=AXIS, font=font)
    legend_x = x0 + 8
    for c, (name, s) in enumerate(series.items()):
        colour = COLOURS[c % len(COLOURS)]
        faint = tuple(int(0.35 * ch + 0.65 * 255) for ch in colour)
        finite = [(i, float(v)) for i, v in enumerate(s) if math.isfinite(float(v))]
        if len(finite) > 1:
            draw.line([px(i, v) for i, v in finite], fill=faint, width=1)
            sm = smooth([v for _, v in finite])
            draw.line([px(i, v) for (i, _), v in zip(finite, sm)], fill=colour, width=3)
        elif finite:
            x, y = px(*finite[0])
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        text = f"{name}: {_label(smooth([v for _, v in finite])[-1]) if finite else 'n/a'}"
        draw.rectangle([legend_x, y0 + 8 + 14 * c, legend_x + 10, y0 + 16 + 14 * c], fill=colour)
        draw.text((legend_x + 14, y0 + 6 + 14 * c), text, fill=AXIS, font=font)
    return img


def image_tensor(img) -> torch.Tensor:
    """``PIL.Image`` -> ComfyUI IMAGE ``[1, H, W, 3]`` float32 in [0, 1]."""
    data = torch.frombuffer(bytearray(img.convert("RGB").tobytes()), dtype=torch.uint8)
    return data.reshape(1, img.height, img.width, 3).float() / 255.0


def save_png(img, path: str) -> None:
    """Write atomically (``path + ".part"`` then rename)."""
    import os

    part = path + ".part"
    img.save(part, format="PNG")
    os.replace(part, path)
