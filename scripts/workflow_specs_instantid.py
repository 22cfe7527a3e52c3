"""Example workflow: InstantID on SDXL, both halves: its image adapter and its IdentityNet (ControlNet).

- ``instantid_identitynet_sdxl``: reference photo -> Encode identity (antelopev2, as InstantID was
  trained) -> InstantID adapter through decoupled identity attention (the model) + the face keypoints
  picture -> InstantID's ControlNet attending to the identity tokens (the prompts) -> sample -> score.
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

SIZE = 1024


def instantid_identitynet_sdxl(wb) -> str:
    who = identity_from_photo(wb, clip_vision=False)
    ckpt = wb.node("CheckpointLoaderSimple", title="Load checkpoint (SDXL)", ckpt_name=SDXL_CHECKPOINT)
    adapter = wb.node("IdentityAttentionLoadIdentityAdapter", title="InstantID adapter (ip-adapter.bin)",
                      adapter="instantid/" + manifest_file("instantid-ip-adapter"), model=ckpt[0])
    info = wb.node("IdentityAttentionShowText", title="What the InstantID file is", text=adapter[1])
    attention = wb.node("IdentityAttentionApplyParallelAttention", title="InstantID adapter: identity attention (decoupled)",
                        model=ckpt[0], id_adapter=adapter[0], identity=who["encode"][0], weight=0.8, mode="decoupled", projections="adapter")
    keypoints = wb.node("IdentityAttentionFaceKeypointsImage", title="Face keypoints (where the face goes)",
                        identity=who["encode"][0], reference=0, width=SIZE, height=SIZE, placement="reference")
    keypoints_seen = wb.node("PreviewImage", title="Face keypoints picture", images=keypoints[0])
    control_net = wb.node("ControlNetLoader", title="InstantID ControlNet (IdentityNet)", control_net_name=manifest_file("instantid-controlnet"))
    pos = wb.node("CLIPTextEncode", title="Prompt", clip=ckpt[1],
                  text="a portrait photo of a woman as a jazz singer on a small stage, warm spotlight, film grain, 85mm")
    neg = wb.node("CLIPTextEncode", title="Negative prompt", text="blurry, lowres, deformed, watermark", clip=ckpt[1])
    identity_net = wb.node("IdentityAttentionApplyInstantIDIdentityNet", title="InstantID IdentityNet (ControlNet on the identity tokens)",
                           positive=pos[0], negative=neg[0], control_net=control_net[0], id_adapter=adapter[0], identity=who["encode"][0],
                           image=keypoints[0], strength=0.8, start_percent=0.0, end_percent=1.0, negative_noise=0.0, noise_seed=0)
    latent = wb.node("EmptyLatentImage", title="Image size", width=SIZE, height=SIZE, batch_size=1)
    sampler = wb.node("KSampler", title="Sample", model=attention[0], positive=identity_net[0], negative=identity_net[1], latent_image=latent[0],
                      seed=42, steps=30, cfg=4.5, sampler_name="dpmpp_2m", scheduler="karras")
    decode = wb.node("VAEDecode", title="Decode to pixels", samples=sampler[0], vae=ckpt[2])
    save = wb.node("SaveImage", title="Save image", images=decode[0], filename_prefix="instantid")
    score, scored = similarity_check(wb, decode[0], who["encode"][0], who["faces"][0])

    wb.group("1. Who: a reference photo becomes an identity (antelopev2, as InstantID was trained)",
             [who[k] for k in ("image", "faces", "encode", "crops", "found", "mask", "mask_preview")], IDENTITY_GREEN)
    wb.group("2. InstantID adapter: the model also attends to the 16 identity tokens", [ckpt, adapter, info, attention], ADAPTER_BLUE)
    wb.group("3. IdentityNet: a ControlNet that follows the face keypoints and attends to the identity tokens",
             [keypoints, keypoints_seen, control_net, pos, neg, identity_net], ADAPTER_BLUE)
    wb.group("4. Generate 1024x1024", [latent, sampler, decode, save], MODEL_BLUE)
    wb.group("5. Check: how close is it to the person?", [score, scored], CHECK_YELLOW)
    wb.note(download_note(["antelopev2", "instantid-ip-adapter", "instantid-controlnet"], base="sdxl", extra=(
        "The ControlNet is InstantX/InstantID's ControlNetModel/diffusion_pytorch_model.safetensors; the command puts it in "
        "models/controlnet/instantid/. No checksum is published for it: add --allow-unverified to the command (it prints the "
        "sha256 it got). InstantID was trained with the antelopev2 face pack: keep it in the face loader.")),
        title="Download first")
    wb.note(
        "InstantID has two halves, and both read the same 16 identity tokens (from the InstantID adapter's resampler):\n\n"
        "1. the adapter (Apply parallel visual attention, decoupled): every cross-attention layer of SDXL also looks at "
        "the tokens. weight 0.8 as InstantID suggests.\n\n"
        "2. IdentityNet (Apply InstantID IdentityNet): a ControlNet that sees only the face keypoints picture and, instead "
        "of the prompt's words, the identity tokens. Most of the likeness comes from it. strength 0.8 as InstantID suggests; "
        "lower it (0.4-0.6) for more freedom of expression and style; end_percent below 1 loosens the pose.\n\n"
        "CFG: InstantID burns at high CFG; 4-5 is a good range. negative_noise 0 is the official negative (an empty face); "
        "ComfyUI_InstantID uses 0.35 by default.",
        title="How to read this workflow", near=identity_net)
    wb.note(
        "Face keypoints draws the reference face's five landmarks (eyes, nose, mouth corners) the way InstantID was "
        "trained to read them. placement 'reference': the face where and as big as in the photo (fitted into the picture); "
        "'custom': put it anywhere (x, y) at any size (face_height). Make the picture the size you generate at. Keypoints "
        "from another photo give another pose: encode that photo and draw its face.",
        title="The keypoints picture", near=keypoints)
    return "InstantID on SDXL with its IdentityNet: the InstantID adapter in the model and its ControlNet on the face keypoints, attending to the identity tokens."


SPECS = {
    "instantid_identitynet_sdxl": instantid_identitynet_sdxl,
}
