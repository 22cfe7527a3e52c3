"""Test-kit nodes that make the wrong values an artist's graph can send into the pack's nodes.

- ``IdentityAttentionTestKit_Tensor``: one tensor of any shape, dtype and fill (NaN, inf, random,
  an empty batch...) as IMAGE, MASK and LATENT at once, for the bad-input table of the reliability
  tests (what another pack's node, a broken upscale or a corrupt file could hand over).
- ``IdentityAttentionTestKit_DamagedIdentity``: an IDENTITY with one field replaced by something
  another encoder (or a wrong CLIP vision model) would give: NaN embeddings, features of another
  width.
- ``IdentityAttentionTestKit_Number``: a FLOAT and an INT from text (``nan``, ``inf``, ``1e30``,
  ``-5``), linked into a node's number input: ComfyUI checks ranges (and never NaN) only for
  values typed into a widget, so a linked value reaches the node as sent.
"""

from __future__ import annotations

import dataclasses

import torch

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "uint8": torch.uint8,
    "int64": torch.int64,
    "bool": torch.bool,
}
FILLS = ("zeros", "ones", "half", "random", "nan", "inf", "-inf", "one_nan")


class Tensor:
    NODE_ID = "IdentityAttentionTestKit_Tensor"
    DISPLAY_NAME = "Any tensor (test kit)"
    CATEGORY = "identity_attention/testkit"
    DESCRIPTION = "A tensor of any shape, dtype and fill, as IMAGE, MASK and LATENT. Test hosts only."
    RETURN_TYPES = ("IMAGE", "MASK", "LATENT")
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "shape": ("STRING", {"default": "1,32,32,3", "tooltip": "Comma-separated sizes, e.g. 1,64,64,3 (IMAGE), 2,64,64 (MASK), 1,4,8,8 (LATENT). 0 makes an empty batch."}),
                "dtype": (list(DTYPES), {"default": "float32", "tooltip": "The tensor's dtype."}),
                "fill": (list(FILLS), {"default": "half", "tooltip": "zeros, ones, 0.5, uniform random, all NaN / inf / -inf, or 0.5 with one NaN."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip": "For random fills."}),
            }
        }

    def make(self, shape, dtype, fill, seed):
        sizes = [int(s) for s in shape.replace(" ", "").split(",") if s != ""]
        gen = torch.Generator().manual_seed(seed)
        t = torch.rand(sizes, generator=gen) if fill == "random" else torch.full(sizes, 0.5)
        if fill in ("zeros", "ones"):
            t.fill_(0.0 if fill == "zeros" else 1.0)
        elif fill in ("nan", "inf", "-inf"):
            t.fill_(float(fill))
        elif fill == "one_nan" and t.numel():
            t.view(-1)[t.numel() // 2] = float("nan")
        t = t.to(DTYPES[dtype])
        return (t, t, {"samples": t})


DAMAGES = ("nan_embedding", "inf_clip_embeds", "clip_embeds_width_1280", "clip_hidden_width_1664", "face_tokens_width_768", "empty_face_tokens")


class DamagedIdentity:
    NODE_ID = "IdentityAttentionTestKit_DamagedIdentity"
    DISPLAY_NAME = "Damaged identity (test kit)"
    CATEGORY = "identity_attention/testkit"
    DESCRIPTION = "An IDENTITY with one field replaced by a wrong value. Test hosts only."
    RETURN_TYPES = ("IDENTITY",)
    FUNCTION = "damage"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "identity": ("IDENTITY", {"tooltip": "The identity to damage."}),
                "damage": (list(DAMAGES), {"tooltip": "What to break."}),
            }
        }

    def damage(self, identity, damage):
        r = identity.count
        if damage == "nan_embedding":
            faces = tuple(dataclasses.replace(f, embedding=torch.full_like(f.embedding, float("nan"))) for f in identity.faces)
            return (dataclasses.replace(identity, faces=faces),)
        if damage == "inf_clip_embeds":
            return (dataclasses.replace(identity, clip_embeds=torch.full((r, 1024), float("inf"))),)
        if damage == "clip_embeds_width_1280":  # ViT-bigG image embeds where a ViT-H adapter expects 1024
            return (dataclasses.replace(identity, clip_embeds=torch.randn(r, 1280), clip_embeds_uncond=torch.zeros(1, 1280)),)
        if damage == "clip_hidden_width_1664":
            return (dataclasses.replace(identity, clip_hidden=torch.randn(r, 257, 1664), clip_hidden_uncond=torch.zeros(1, 257, 1664)),)
        if damage == "face_tokens_width_768":
            return (dataclasses.replace(identity, face_tokens=torch.randn(r, 144, 768)),)
        if damage == "empty_face_tokens":
            return (dataclasses.replace(identity, face_tokens=torch.zeros(r, 0, 512)),)
        raise ValueError(damage)


class Number:
    NODE_ID = "IdentityAttentionTestKit_Number"
    DISPLAY_NAME = "Any number (test kit)"
    CATEGORY = "identity_attention/testkit"
    DESCRIPTION = "A FLOAT and an INT from text (nan, inf, -inf, 1e30, -5...), to link into number inputs. Test hosts only."
    RETURN_TYPES = ("FLOAT", "INT")
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("STRING", {"default": "nan", "tooltip": "Any float Python reads: nan, inf, -inf, 1e30, -5. The INT output is its whole part (10**40 for non-finite values)."})}}

    def make(self, value):
        number = float(value)
        whole = int(number) if number == number and abs(number) != float("inf") else 10**40
        return (number, whole)
