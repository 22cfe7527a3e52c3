"""Example workflow: restore an old photo of a known person (Dual-Pivot Tuning's restore wiring).

- ``restore_old_photo_of_person``: the damaged photo -> fit to SDXL size -> VAE Encode (img2img, the
  sampler's denoise is how much may be repainted) and, as the hint, the restoration guide ControlNet
  -> the personalized prior prompted with its fixed text pivot -> sample -> Identity similarity of
  the result against the person (from good reference photos). A side group damages a good photo
  with *Degrade photos* to show what the guide is trained to undo.

The guide here is a generic SDXL tile ControlNet (the manifest's ``controlnet-tile-sdxl``): the
restorer before Dual-Pivot's stage 2; the file the ``restoration_guide`` trainer target writes goes
in its place. The personalized prior is SDXL with InstantID's adapter reading the person's identity
(files anyone can download); a stage-1 LoRA trained around the pivot prompt, or Personalize
identity's output, replaces it (the notes say how).
"""

from __future__ import annotations

from workflow_specs import (
    ADAPTER_BLUE,
    CHECK_YELLOW,
    IDENTITY_GREEN,
    MODEL_BLUE,
    SDXL_CHECKPOINT,
    download_note,
    identity_from_photo,
    manifest_file,
    similarity_check,
)

RESTORE_GRAY = "#777"
OLD_PHOTO = "old_photo_of_person.png"
PIVOT_PROMPT = "a photo of sks person"


def restore_old_photo_of_person(wb) -> str:
    who = identity_from_photo(wb, clip_vision=False)
    old = wb.node("LoadImage", title="Old photo to restore (damaged)", image=OLD_PHOTO)
    fit = wb.node("ImageScaleToTotalPixels", title="Fit the photo to SDXL size (1 megapixel)", image=old[0], upscale_method="lanczos", megapixels=1.0)

    ckpt = wb.node("CheckpointLoaderSimple", title="Load checkpoint (SDXL)", ckpt_name=SDXL_CHECKPOINT)
    adapter = wb.node("IdentityAttentionLoadIdentityAdapter", title="InstantID adapter (the prior's identity)",
                      adapter="instantid/" + manifest_file("instantid-ip-adapter"), model=ckpt[0])
    prior = wb.node("IdentityAttentionApplyParallelAttention", title="Personalized prior: the person in every attention layer",
                    model=ckpt[0], id_adapter=adapter[0], identity=who["encode"][0], weight=0.6, mode="decoupled", projections="adapter")
    pos = wb.node("CLIPTextEncode", title="Text pivot (the fixed prompt of stage 1)", clip=ckpt[1], text=PIVOT_PROMPT)
    neg = wb.node("CLIPTextEncode", title="Negative prompt", clip=ckpt[1], text="blurry, lowres, jpeg artifacts, noise, deformed")

    guide = wb.node("ControlNetLoader", title="Restoration guide (ControlNet; your stage-2 file goes here)",
                    control_net_name=manifest_file("controlnet-tile-sdxl"))
    guided = wb.node("ControlNetApplyAdvanced", title="Guide on the damaged photo", positive=pos[0], negative=neg[0], control_net=guide[0],
                     image=fit[0], strength=0.8, start_percent=0.0, end_percent=1.0)
    latent = wb.node("VAEEncode", title="Damaged photo to latent (img2img start)", pixels=fit[0], vae=ckpt[2])
    sampler = wb.node("KSampler", title="Restore (denoise 0.5: how much may be repainted)", model=prior[0], positive=guided[0], negative=guided[1],
                      latent_image=latent[0], seed=42, steps=30, cfg=4.5, sampler_name="dpmpp_2m", scheduler="karras", denoise=0.5)
    decode = wb.node("VAEDecode", title="Decode to pixels", samples=sampler[0], vae=ckpt[2])
    save = wb.node("SaveImage", title="Restored photo", images=decode[0], filename_prefix="restored")
    before_after = wb.node("ImageBatch", title="Before / after", image1=fit[0], image2=decode[0])
    compare = wb.node("PreviewImage", title="Damaged and restored", images=before_after[0])
    score, scored = similarity_check(wb, before_after[0], who["encode"][0], who["faces"][0], title="Does it look like the person? (before, after)")

    damage = wb.node("IdentityAttentionDegradePhotos", title="Degrade photos: what the guide learns to undo", images=who["image"][0], seed=0, strength=1.0)
    pairs = wb.node("PreviewImage", title="Clean | degraded", images=damage[1])
    report = wb.node("IdentityAttentionShowText", title="Damage done", text=damage[2])

    wb.group("1. Who: good photos of the person become the identity", [who[k] for k in ("image", "faces", "encode", "crops", "found", "mask", "mask_preview")], IDENTITY_GREEN)
    wb.group("2. The personalized prior (pivot 1): the model that knows the person, with its fixed prompt", [ckpt, adapter, prior, pos, neg], ADAPTER_BLUE)
    wb.group("3. Restore: the damaged photo starts the sampler and guides it", [old, fit, guide, guided, latent, sampler, decode, save, before_after, compare], MODEL_BLUE)
    wb.group("4. Check: the restored face against the person", [score, scored], CHECK_YELLOW)
    wb.group("What the guide (pivot 2) is trained on: degraded -> clean pairs", [damage, pairs, report], RESTORE_GRAY)
    wb.note(download_note(["antelopev2", "instantid-ip-adapter", "controlnet-tile-sdxl"], base="sdxl", extra=(
        "The guide here is xinsir's SDXL tile ControlNet, a generic restorer; the command saves it as "
        "models/controlnet/xinsir/controlnet-tile-sdxl-1.0.safetensors. No checksum is published for it: add "
        "--allow-unverified (the command prints the sha256 it got). For the full Dual-Pivot method, train your own guide with "
        "the restoration_guide target of the trainer (README) and pick its file in the guide loader.")), title="Download first")
    wb.note(
        "Dual-Pivot Tuning restores a photo of a person you know with two fixed points:\n\n"
        "1. the prior knows the person, around one fixed prompt (the text pivot). Here: SDXL with InstantID's adapter "
        "reading the good photos. Better: a LoRA trained on 10-20 good photos of the person with one fixed prompt "
        "('a photo of sks person') - put Load LoRA (model only) between the checkpoint and the prior node and write the "
        "same prompt here - or Personalize identity's output (SD1.5, with an SD1.5 guide).\n\n"
        "2. the guide (a ControlNet fed the damaged photo) is trained generically, on many people, with that prior held "
        "fixed: python -m comfyui-identity-attention.train restore.json with the restoration_guide target (README). It "
        "learns to undo blur, downscaling, noise and JPEG like the group on the right makes.\n\n"
        "denoise 0.4-0.6 keeps the photo's pose, light and expression; higher repaints more of the face. Guide strength "
        "0.6-1.0: lower lets the prior invent more detail.",
        title="How to read this workflow", near=sampler)
    return "Restore an old, damaged photo of a person you know: img2img from the photo, a restoration ControlNet on it, a prior that knows the person (Dual-Pivot)."


SPECS = {
    "restore_old_photo_of_person": restore_old_photo_of_person,
}
