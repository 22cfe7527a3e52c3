"""Example workflows: local face editing with CA-Edit's two mechanisms (CA² gate, STFG guidance).

One inpainting graph, built three ways: both mechanisms (what an artist would use), and
each alone so its knobs can be learned one at a time. The original photo is fitted to the
model's size, Encode identity finds the face (its face_mask is the edit region, and its
identity checks afterwards that the edited face is still the same person), the photo is
VAE-encoded with that mask as the latent noise mask and resampled with denoise < 1.
"""

from __future__ import annotations

from workflow_specs import (
    ADAPTER_BLUE,
    CHECK_YELLOW,
    IDENTITY_GREEN,
    MODEL_BLUE,
    SD15_CHECKPOINT,
    download_note,
    manifest_file,
)

PHOTO = "portrait_to_edit.png"
EDIT_PROMPT = "portrait photo of a man with a short grey beard, natural skin texture, soft window light"

CA2_NOTE = (
    "CA² gate (CA-Edit's causality-aware condition adapter): the original photo goes through CLIP vision and an "
    "image adapter (IP-Adapter plus-face) into every cross-attention layer, so the model keeps seeing the person's "
    "skin tone, light and texture. Inside the mask it is turned down wherever the prompt drives the picture (the "
    "beard), so the edit follows the text instead of copying the old chin back.\n"
    "- weight: strength of the original photo as a condition (0 = off exactly, 1 = the paper).\n"
    "- sharpness: 1 = the scores as computed; higher keeps the photo except where the text clearly wins, lower "
    "turns the photo down across more of the mask (bigger changes).\n"
    "- score_source: 'text attention (training-free)' reads the prompt's own attention and works with any "
    "image IP-Adapter (plus, plus-face, full-face); 'native score weights' needs CA² weights with the trained score predictor (none are published).\n"
    "- Inspect CA² scores: one frame per step, light = the text won there and the photo was turned down."
)
STFG_NOTE = (
    "STFG guidance (skin transition frequency guidance): every step, in the ring inside the mask where the prompt "
    "barely reaches (the edge between edited and untouched skin), the coarse colours and shading of the picture "
    "being made are pulled toward the original's, so the edit blends in without a visible seam.\n"
    "- strength: how hard (0 = off exactly; 10 is the default: raise it if a seam stays visible).\n"
    "- mode: 'fast' skips the model's own reaction and costs almost nothing; 'exact' is the paper's gradient "
    "through the UNet on every 'exact_every'-th step, fast between (every 3rd: about 2x slower; 1 = every step as in the "
    "paper, about 4x; needs ComfyUI from June 2025 or newer, refused with a message on older).\n"
    "- band: how coarse 'coarse' is (0.5 = the paper; lower = only broad colour).\n"
    "- Inspect STFG boundary: the prompt's attention in grey, the guided ring in red, one frame per step."
)
INPAINT_NOTE = (
    "The edit is an inpainting pass on the photo itself: VAE Encode the original, Set Latent Noise Mask limits the "
    "change to the mask, and the sampler's denoise (0.75 here) says how far the face may move: 0.5-0.6 for "
    "expressions ('make her smile'), 0.7-0.85 for new hair or a beard. Write the prompt as the whole picture "
    "after the edit.\n\n"
    "The mask here is Encode identity's face mask (mask_grow 1.4 takes in chin and jaw for a beard; 1.1 keeps to "
    "the face for lipstick or eyes). To edit one part only, paint it instead: right-click the photo > Open in "
    "MaskEditor, paint the region, save, and connect the photo node's MASK output wherever face_mask goes now "
    "(Set Latent Noise Mask and the CA² / STFG node: they all take the same mask)."
)


def _face_edit(wb, ca2: bool, stfg: bool) -> dict:
    """The shared graph; returns node refs by role (keys present only for the mechanisms used)."""
    r = {}
    r["photo"] = wb.node("LoadImage", title="Original portrait (the photo to edit)", image=PHOTO)
    r["fit"] = wb.node("ImageScaleToTotalPixels", title="Fit the photo to SD1.5 size (0.4 megapixels)", image=r["photo"][0],
                       upscale_method="lanczos", megapixels=0.4)
    r["faces"] = wb.node("IdentityAttentionLoadFaceAnalysis", title="Face detector + recognizer (antelopev2)", pack="antelopev2",
                         provider="auto", det_size=640)
    r["encode"] = wb.node("IdentityAttentionEncodeIdentity", title="Find the face: edit mask + identity to check against",
                          face_analysis=r["faces"][0], images=r["fit"][0], face="largest", mask_grow=1.4, mask_feather=0.25)
    r["found"] = wb.node("PreviewImage", title="Face found (green = edited)", images=r["encode"][3])
    r["mask_image"] = wb.node("MaskToImage", title="Edit mask as image", mask=r["encode"][2])
    r["mask_preview"] = wb.node("PreviewImage", title="Edit mask (white = may change)", images=r["mask_image"][0])
    mask = r["encode"][2]

    r["ckpt"] = wb.node("CheckpointLoaderSimple", title="Load checkpoint (SD1.5)", ckpt_name=SD15_CHECKPOINT)
    model = r["ckpt"][0]
    r["original"] = wb.node("VAEEncode", title="Original photo to latent (plain VAE Encode)", pixels=r["fit"][0], vae=r["ckpt"][2])
    if ca2:
        r["vision"] = wb.node("CLIPVisionLoader", title="CLIP vision ViT-H (reads the original photo)", clip_name=manifest_file("clip-vit-h"))
        r["adapter"] = wb.node("IdentityAttentionLoadIdentityAdapter", title="IP-Adapter plus-face (SD1.5): the photo's K/V",
                               adapter="ipadapter/" + manifest_file("ip-adapter-plus-face_sd15"), model=model)
        r["ca2"] = wb.node("IdentityAttentionApplyCA2Gate", title="CA² gate: the photo as condition, turned down where the text edits",
                           model=model, id_adapter=r["adapter"][0], mask=mask, score_source="text attention (training-free)",
                           sharpness=1.0, weight=1.0, clip_vision=r["vision"][0], image=r["fit"][0])
        model = r["ca2"][0]
    if stfg:
        r["stfg"] = wb.node("IdentityAttentionApplySTFG", title="STFG: blend the skin at the edge of the edit",
                            model=model, original_latent=r["original"][0], mask=mask, strength=10.0, mode="fast", band=0.5)
        model = r["stfg"][0]

    r["pos"] = wb.node("CLIPTextEncode", title="Prompt: the picture after the edit", text=EDIT_PROMPT, clip=r["ckpt"][1])
    r["neg"] = wb.node("CLIPTextEncode", title="Negative prompt", text="blurry, lowres, deformed, plastic skin, seam", clip=r["ckpt"][1])
    r["noise_mask"] = wb.node("SetLatentNoiseMask", title="Change only inside the mask", samples=r["original"][0], mask=mask)
    r["sampler"] = wb.node("KSampler", title="Edit (denoise 0.75: how far the face may change)", model=model, positive=r["pos"][0],
                           negative=r["neg"][0], latent_image=r["noise_mask"][0], seed=42, steps=30, cfg=6.0,
                           sampler_name="dpmpp_2m", scheduler="karras", denoise=0.75)
    r["decode"] = wb.node("VAEDecode", title="Decode to pixels", samples=r["sampler"][0], vae=r["ckpt"][2])
    r["save"] = wb.node("SaveImage", title="Save the edited photo", images=r["decode"][0], filename_prefix="face_edit")

    if ca2:
        r["scores"] = wb.node("IdentityAttentionInspectCA2Scores", title="Inspect CA² scores", model=model, samples=r["sampler"][0],
                              layers="mean of all layers")
        r["scores_preview"] = wb.node("PreviewImage", title="CA² scores per step (light = text won, photo turned down)", images=r["scores"][0])
    if stfg:
        r["boundary"] = wb.node("IdentityAttentionInspectSTFGBoundary", title="Inspect STFG boundary", model=model, samples=r["sampler"][0])
        r["boundary_preview"] = wb.node("PreviewImage", title="STFG ring per step (red = guided, grey = prompt attention)", images=r["boundary"][1])
    r["score"] = wb.node("IdentityAttentionIdentitySimilarity", title="Still the same person? (edited vs original)",
                         images=r["decode"][0], identity=r["encode"][0], face_analysis=r["faces"][0], face="largest")
    r["scored"] = wb.node("PreviewImage", title="Similarity written on the edited photo", images=r["score"][2])
    return r


def _groups_and_notes(wb, r: dict, ca2: bool, stfg: bool, mechanisms: str) -> None:
    pick = lambda *keys: [r[k] for k in keys if k in r]  # noqa: E731
    wb.group("1. The photo: fit it, find the face, make the edit mask", pick("photo", "fit", "faces", "encode", "found", "mask_image", "mask_preview"),
             IDENTITY_GREEN)
    wb.group(f"2. The model: {mechanisms}", pick("ckpt", "original", "vision", "adapter", "ca2", "stfg"), ADAPTER_BLUE)
    wb.group("3. Edit: inpaint the masked face with the new prompt", pick("pos", "neg", "noise_mask", "sampler", "decode", "save"), MODEL_BLUE)
    wb.group("4. Check: what " + " and ".join(n for n, on in (("CA²", ca2), ("STFG", stfg)) if on) + " did, step by step",
             pick("scores", "scores_preview", "boundary", "boundary_preview"), CHECK_YELLOW)
    wb.group("5. Check: is the edited face still the same person?", pick("score", "scored"), CHECK_YELLOW)
    ids = ["antelopev2"] + (["clip-vit-h", "ip-adapter-plus-face_sd15"] if ca2 else [])
    extra = ("antelopev2 finds the face (the edit mask) and scores the result. "
             + ("The CA² gate reads the original photo through CLIP ViT-H and IP-Adapter plus-face; ip-adapter-plus_sd15 "
                "works too (better for half-body photos). SDXL: ip-adapter-plus-face_sdxl_vit-h with the same CLIP ViT-H, and fit the photo to 1.0 megapixels. " if ca2 else "")
             + ("STFG needs no weights." if stfg else ""))
    wb.note(download_note(ids, extra=extra.strip()), title="Download first")
    check = "Identity similarity (group 5) scores the edited face against the original photo's: if it drops, lower denoise"
    check += " or raise the CA² weight." if ca2 else "."
    wb.note(INPAINT_NOTE + "\n\n" + check, title="How to read this workflow", near=r["photo"])
    if ca2:
        wb.note(CA2_NOTE, title="CA² gate: what it does, its knobs", near=r["ca2"])
    if stfg:
        text = STFG_NOTE
        if ca2:
            text += ("\n\nTogether: CA² decides how much of the original photo each pixel of the face still sees (the "
                     "edit vs the person's look); STFG smooths the skin where the edit meets the untouched face.")
        wb.note(text, title="STFG guidance: what it does, its knobs", near=r["stfg"])


def face_edit_ca2_stfg(wb) -> str:
    r = _face_edit(wb, ca2=True, stfg=True)
    _groups_and_notes(wb, r, True, True, "CA² gate keeps the person's look, STFG blends the skin at the edge")
    return "Local face edit (add a grey beard) on a photo: CA² gate keeps the person's look, STFG blends the edit's edge into the skin."


def face_edit_ca2_gate(wb) -> str:
    r = _face_edit(wb, ca2=True, stfg=False)
    _groups_and_notes(wb, r, True, False, "CA² gate: the photo as a condition, turned down where the text edits")
    return "Local face edit with the CA² gate alone: the original photo conditions the model except where the prompt edits."


def face_edit_stfg(wb) -> str:
    r = _face_edit(wb, ca2=False, stfg=True)
    _groups_and_notes(wb, r, False, True, "STFG guidance pulls the edit's edge toward the original skin")
    return "Local face edit with STFG guidance alone: the ring where the edit meets the untouched skin keeps the original's colours."


SPECS = {
    "face_edit_ca2_stfg": face_edit_ca2_stfg,
    "face_edit_ca2_gate": face_edit_ca2_gate,
    "face_edit_stfg": face_edit_stfg,
}
