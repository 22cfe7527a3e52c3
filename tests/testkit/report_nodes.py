"""Test-kit nodes that move values in and out of a prompt for host tests.

- ``IdentityAttentionTestKit_ImageList``: up to 12 IMAGEs of any sizes as one image list
  (what "Make Image List" nodes of other packs do), e.g. several reference photos for one
  Encode identity.
- ``IdentityAttentionTestKit_Report``: an output node that returns its inputs as the prompt's
  UI output, so a test reads them from ``/history`` (``entry["outputs"][node_id]["report"]``):
  FLOATs (all of a list, in order) and IDENTITYs (each face's box, landmarks, score, embedding).
"""

from __future__ import annotations

MAX_IMAGES = 12


class ImageList:
    NODE_ID = "IdentityAttentionTestKit_ImageList"
    DISPLAY_NAME = "Image list (test kit)"
    CATEGORY = "identity_attention/testkit"
    DESCRIPTION = "Several images of any sizes as one image list. Test and demo hosts only."
    RETURN_TYPES = ("IMAGE",)
    OUTPUT_IS_LIST = (True,)
    FUNCTION = "collect"

    @classmethod
    def INPUT_TYPES(cls):
        optional = {f"image_{i}": ("IMAGE", {"tooltip": f"Image {i} of the list."}) for i in range(2, MAX_IMAGES + 1)}
        return {"required": {"image_1": ("IMAGE", {"tooltip": "Image 1 of the list."})}, "optional": optional}

    def collect(self, **images):
        return ([images[f"image_{i}"] for i in range(1, MAX_IMAGES + 1) if images.get(f"image_{i}") is not None],)


def identity_record(identity) -> dict:
    """An IDENTITY as plain JSON values."""
    return {
        "recognizer": identity.recognizer,
        "faces": [{
            "image_index": f.image_index, "image_size": list(f.image_size), "bbox": f.bbox.tolist(),
            "landmarks": f.landmarks.tolist(), "det_score": f.det_score, "flipped": f.flipped,
            "embedding": f.embedding.tolist(),
        } for f in identity.faces],
    }


class Report:
    NODE_ID = "IdentityAttentionTestKit_Report"
    DISPLAY_NAME = "Report values (test kit)"
    CATEGORY = "identity_attention/testkit"
    DESCRIPTION = "Hands its inputs to the caller through the prompt's history (UI output 'report'). Test hosts only."
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    INPUT_IS_LIST = True  # a FLOAT list arrives whole, not one call per value
    FUNCTION = "report"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"label": ("STRING", {"default": "", "tooltip": "A name for this report."})},
            "optional": {
                "floats": ("FLOAT", {"forceInput": True, "tooltip": "FLOAT values (a list is reported whole)."}),
                "identity": ("IDENTITY", {"tooltip": "An identity: its faces' boxes, landmarks and embeddings."}),
            },
        }

    def report(self, label, floats=None, identity=None):
        payload = {"label": label[0] if isinstance(label, list) else label}
        if floats is not None:
            payload["floats"] = [float(v) for v in floats]
        if identity is not None:
            payload["identities"] = [identity_record(i) for i in identity]
        return {"ui": {"report": [payload]}}
