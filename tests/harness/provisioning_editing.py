"""Tiny-model runs of the face-editing workflows (scripts/workflow_specs_editing.py).

The editing workflows sample the photo itself (img2img / inpainting) rather than an
Empty Latent Image, so the size ``tiny_swap.for_tiny_models`` caps for text-to-image comes
from ``ImageScaleToTotalPixels`` ("fit the photo to SD1.5 size") instead: its megapixels are
capped here the same way. 0.4 MP of a provisioned 640x480 photo costs over a minute of CPU per
run on the tiny models; 0.03 MP (about 205x154 pixels, a 25x19 latent) takes a second or two
and still leaves the provisioned face large enough for the toy detector (it is found down to
0.01 MP), so Encode identity's face mask, the CA² / STFG masks and Identity similarity all run
on the real code path.
"""

from __future__ import annotations

from .host import Instance
from .tiny_swap import register

TINY_MEGAPIXELS = 0.03


@register("ImageScaleToTotalPixels")
def _fit_photo(node: dict, instance: Instance, context: dict) -> dict:
    megapixels = node["inputs"].get("megapixels")
    if isinstance(megapixels, (int, float)):
        node["inputs"]["megapixels"] = min(float(megapixels), TINY_MEGAPIXELS)
    return node
