"""The face-editing workflows' tiny-run provisioner caps the photo size like Empty Latent Image's."""

from __future__ import annotations

from harness import provisioning  # noqa: F401  (registers every provisioning_*.py)
from harness.provisioning_editing import TINY_MEGAPIXELS
from harness.tiny_swap import for_tiny_models


def _prompt(megapixels):
    return {"1": {"class_type": "ImageScaleToTotalPixels", "inputs": {"image": ["0", 0], "upscale_method": "lanczos", "megapixels": megapixels}}}


def test_photo_fit_is_capped_for_tiny_runs():
    assert for_tiny_models(_prompt(0.4), None)["1"]["inputs"]["megapixels"] == TINY_MEGAPIXELS
    assert for_tiny_models(_prompt(0.02), None)["1"]["inputs"]["megapixels"] == 0.02  # smaller stays
    assert for_tiny_models(_prompt(["9", 0]), None)["1"]["inputs"]["megapixels"] == ["9", 0]  # a linked value is left alone
