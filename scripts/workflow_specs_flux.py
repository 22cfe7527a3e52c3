"""Example workflows on Flux.1 (ComfyUI 0.3.x hosts only: the early-2024 ComfyUI has no Flux).

- ``flux_portrait_pulid``: reference photo -> Encode identity (antelopev2) -> Encode PuLID face features
  (EVA02-CLIP-L + face parsing) -> Apply PuLID-Flux on FLUX.1-dev, loaded the way ComfyUI loads Flux
  (Load Diffusion Model + DualCLIPLoader type flux + Load VAE ae.safetensors) -> FluxGuidance 3.5,
  CFG 1 -> score against the person.
- ``flux_image_prompt_xlabs``: a reference picture -> CLIP ViT-L/14 -> XLabs' Flux IP-Adapter on
  FLUX.1-dev (the same three loaders) -> a Flux image prompted by text and picture.
- ``flux_image_prompt_instantx``: the same with InstantX's Flux IP-Adapter, which reads SigLIP so400m
  (Load CLIP Vision, and its pooling head through the adapter's loader).

The tests and `make demo` swap Flux's three loaders for the tiny Flux (tests/harness/provisioning_flux.py)
and skip these workflows on a host without Flux; scripts/build_workflows.py builds them only on a host with
ComfyUI's Flux nodes (``requires_nodes``).
"""

from __future__ import annotations

from workflow_specs import (
    ADAPTER_BLUE,
    CHECK_YELLOW,
    IDENTITY_GREEN,
    MODEL_BLUE,
    download_note,
    identity_from_photo,
    manifest_entries,
    manifest_file,
    similarity_check,
)


def _choice(entry_id: str) -> str:
    """What a folder-prefixed loader shows for a manifest entry: ``<folder>/<file>``."""
    e = manifest_entries()[entry_id]
    return f"{e['folder']}/{e['file']}"


def flux_base(wb, prompt: str, model_patch, size=1024, guidance=3.5):
    """Flux.1-dev as ComfyUI loads it (three loaders), a FluxGuidance prompt and CFG 1 sampling; returns refs.

    ``model_patch(unet) -> model ref`` puts the identity nodes between the model loader and the sampler."""
    unet = wb.node("UNETLoader", title="Load Flux.1-dev (diffusion model)", unet_name=manifest_file("flux1-dev"), weight_dtype="default")
    clip = wb.node("DualCLIPLoader", title="Load Flux text encoders (T5-XXL + CLIP-L)", clip_name1=manifest_file("flux-t5xxl-fp16"),
                   clip_name2=manifest_file("flux-clip-l"), type="flux")
    vae = wb.node("VAELoader", title="Load Flux VAE (ae)", vae_name=manifest_file("flux-ae"))
    model = model_patch(unet)
    text = wb.node("CLIPTextEncode", title="Prompt", text=prompt, clip=clip[0])
    pos = wb.node("FluxGuidance", title="Flux guidance (dev: 3.5)", conditioning=text[0], guidance=guidance)
    neg = wb.node("CLIPTextEncode", title="Negative prompt (unused at CFG 1)", text="", clip=clip[0])
    latent = wb.node("EmptySD3LatentImage", title="Image size", width=size, height=size, batch_size=1)
    sampler = wb.node("KSampler", title="Sample", model=model, positive=pos[0], negative=neg[0], latent_image=latent[0],
                      seed=42, steps=20, cfg=1.0, sampler_name="euler", scheduler="simple")
    decode = wb.node("VAEDecode", title="Decode to pixels", samples=sampler[0], vae=vae[0])
    save = wb.node("SaveImage", title="Save image", images=decode[0], filename_prefix="identity_attention_flux")
    return {"unet": unet, "clip": clip, "vae": vae, "text": text, "pos": pos, "neg": neg, "latent": latent,
            "sampler": sampler, "decode": decode, "save": save}


def flux_portrait_pulid(wb) -> str:
    who = identity_from_photo(wb, clip_vision=False)
    eva = wb.node("IdentityAttentionLoadEvaClip", title="EVA-CLIP (how PuLID reads a face)", eva_clip_name=_choice("eva02-clip-l-336"))
    parsing = wb.node("IdentityAttentionLoadFaceParsing", title="Face parsing (whitens background, neck, clothes)",
                      parsing_name=_choice("facexlib-parsing-bisenet"))
    features = wb.node("IdentityAttentionEncodePuLIDFeatures", title="Encode PuLID face features",
                       eva_clip=eva[0], identity=who["encode"][0], images=who["image"][0], face_parsing=parsing[0])
    seen = wb.node("PreviewImage", title="What EVA-CLIP saw (grey face, white background)", images=features[1])
    pulid = wb.node("IdentityAttentionLoadPuLIDFlux", title="PuLID-Flux v0.9.1", pulid_file=manifest_file("pulid-flux-v0.9.1"))
    applied = {}

    def patch(unet):
        applied["apply"] = wb.node("IdentityAttentionApplyPuLIDFlux", title="Apply PuLID-Flux", model=unet[0], pulid_flux=pulid[0],
                                   identity=features[0], weight=1.0, start_percent=0.0, end_percent=1.0, apply_to="both")
        return applied["apply"][0]

    gen = flux_base(wb, "portrait of a woman as a 1920s aviator beside her biplane, leather cap and goggles, golden hour, film grain", patch)
    apply = applied["apply"]
    score, scored = similarity_check(wb, gen["decode"][0], who["encode"][0], who["faces"][0])
    wb.group("1. Who: a reference photo becomes an identity (antelopev2)", [who[k] for k in ("image", "faces", "encode", "crops", "found", "mask", "mask_preview")], IDENTITY_GREEN)
    wb.group("2. PuLID's second look at the face: EVA-CLIP on the parsed, grey face", [eva, parsing, features, seen], IDENTITY_GREEN)
    wb.group("3. Model: Flux.1-dev (three loaders) + PuLID-Flux", [gen["unet"], gen["clip"], gen["vae"], pulid, apply], ADAPTER_BLUE)
    wb.group("4. Generate (Flux: guidance in the prompt, CFG 1)", [gen[k] for k in ("text", "pos", "neg", "latent", "sampler", "decode", "save")], MODEL_BLUE)
    wb.group("5. Check: how close is it to the person?", [score, scored], CHECK_YELLOW)
    wb.note(download_note(["antelopev2", "eva02-clip-l-336", "facexlib-parsing-bisenet", "pulid-flux-v0.9.1",
                           "flux1-dev", "flux-t5xxl-fp16", "flux-clip-l", "flux-ae"], base="flux", extra=(
        "FLUX.1-dev is gated: accept its license on the Hugging Face page (logged in) and download flux1-dev.safetensors "
        "in the browser. Fine-tunes of dev and the fp8 files (flux1-dev-fp8, t5xxl_fp8_e4m3fn) load in the same nodes. "
        "Needs ComfyUI 0.3 or newer (Flux).")), title="Download first")
    wb.note(
        "PuLID-Flux reads a face twice: the face embedding of Encode identity (antelopev2) and EVA-CLIP's view of the "
        "parsed face (Encode PuLID face features). Its ID encoder turns both into 32 identity tokens; after every 2nd "
        "double block and every 4th single block of Flux the image attends to them.\n\n"
        "Flux takes its guidance in the prompt (FluxGuidance, 3.5 for dev) and samples at CFG 1, so the negative "
        "prompt is not used; PuLID-Flux's tokens for an empty face go to it anyway, for CFG > 1 setups.",
        title="How to read this workflow", near=features)
    wb.note(
        "weight: PuLID-Flux's id_weight, 1 by default (0.8-1.2 in the official demo); 0 = exactly the plain Flux image.\n\n"
        "start_percent: start later (0.1-0.2) when the face takes over the composition; the official demo starts "
        "at step 0 for photos and later for stylised images.",
        title="PuLID-Flux's knobs", near=apply)
    return "A Flux.1-dev portrait with PuLID-Flux: antelopev2 embedding + EVA-CLIP features of the parsed face."


def flux_image_prompt_xlabs(wb) -> str:
    picture = wb.node("LoadImage", title="Reference picture (face, style or object)", image="reference_face.png")
    vision = wb.node("CLIPVisionLoader", title="CLIP vision ViT-L/14 (what XLabs' adapter reads)", clip_name=manifest_file("clip-vit-l-14"))
    adapter = wb.node("IdentityAttentionLoadFluxIPAdapter", title="XLabs Flux IP-Adapter", adapter_file=manifest_file("xlabs-flux-ip-adapter"))
    applied = {}

    def patch(unet):
        applied["apply"] = wb.node("IdentityAttentionApplyFluxIPAdapter", title="Apply Flux IP-Adapter (XLabs)", model=unet[0],
                                   flux_ip_adapter=adapter[0], clip_vision=vision[0], image=picture[0], weight=0.8,
                                   start_percent=0.0, end_percent=1.0, apply_to="both")
        return applied["apply"][0]

    gen = flux_base(wb, "a portrait photo of a person in a sunlit greenhouse, soft light, 50mm", patch)
    apply = applied["apply"]
    wb.group("1. The picture: CLIP ViT-L/14 reads it", [picture, vision], IDENTITY_GREEN)
    wb.group("2. Model: Flux.1-dev (three loaders) + XLabs' IP-Adapter", [gen["unet"], gen["clip"], gen["vae"], adapter, apply], ADAPTER_BLUE)
    wb.group("3. Generate (Flux: guidance in the prompt, CFG 1)", [gen[k] for k in ("text", "pos", "neg", "latent", "sampler", "decode", "save")], MODEL_BLUE)
    wb.note(download_note(["xlabs-flux-ip-adapter", "clip-vit-l-14", "flux1-dev", "flux-t5xxl-fp16", "flux-clip-l", "flux-ae"], base="flux", extra=(
        "FLUX.1-dev is gated: accept its license on the Hugging Face page (logged in) and download flux1-dev.safetensors "
        "in the browser. XLabs' adapter reads OpenAI's CLIP ViT-L/14 (not the ViT-H of SD1.5 IP-Adapters). "
        "Needs ComfyUI 0.3 or newer (Flux).")), title="Download first")
    wb.note(
        "XLabs' IP-Adapter prompts Flux with a picture: CLIP ViT-L/14 reads it, the adapter turns its embedding into 4 "
        "tokens, and after every double block of Flux the image attends to them and adds the result.\n\n"
        "weight: XLabs' ip_scale (their demos use 0.6-1.0); 0 = exactly the plain Flux image. The negative prompt gets a "
        "black picture's tokens, as XLabs' sampler does; it only matters at CFG > 1.\n\n"
        "For a person's likeness PuLID-Flux (flux_portrait_pulid) is the stronger tool; this adapter carries a picture's "
        "overall look.",
        title="How to read this workflow", near=apply)
    return "A Flux.1-dev image prompted by a picture through XLabs' IP-Adapter (CLIP ViT-L/14 embedding)."


def flux_image_prompt_instantx(wb) -> str:
    picture = wb.node("LoadImage", title="Reference picture (style, object or face)", image="reference_face.png")
    siglip = manifest_file("siglip-so400m-patch14-384")
    vision = wb.node("CLIPVisionLoader", title="CLIP vision SigLIP so400m (what InstantX's adapter reads)", clip_name=siglip)
    adapter = wb.node("IdentityAttentionLoadInstantXFluxIPAdapter", title="InstantX Flux IP-Adapter",
                      adapter_file=manifest_file("instantx-flux-ip-adapter"), siglip_file=siglip)
    applied = {}

    def patch(unet):
        applied["apply"] = wb.node("IdentityAttentionApplyInstantXFluxIPAdapter", title="Apply Flux IP-Adapter (InstantX)",
                                   model=unet[0], flux_ip_adapter=adapter[0], clip_vision=vision[0], image=picture[0], weight=0.7,
                                   start_percent=0.0, end_percent=1.0, apply_to="both")
        return applied["apply"][0]

    gen = flux_base(wb, "a portrait photo of a person in a sunlit greenhouse, soft light, 50mm", patch)
    apply = applied["apply"]
    wb.group("1. The picture: SigLIP reads it", [picture, vision], IDENTITY_GREEN)
    wb.group("2. Model: Flux.1-dev (three loaders) + InstantX's IP-Adapter", [gen["unet"], gen["clip"], gen["vae"], adapter, apply], ADAPTER_BLUE)
    wb.group("3. Generate (Flux: guidance in the prompt, CFG 1)", [gen[k] for k in ("text", "pos", "neg", "latent", "sampler", "decode", "save")], MODEL_BLUE)
    wb.note(download_note(["instantx-flux-ip-adapter", "siglip-so400m-patch14-384", "flux1-dev", "flux-t5xxl-fp16", "flux-clip-l", "flux-ae"],
                          base="flux", extra=(
        "FLUX.1-dev is gated: accept its license on the Hugging Face page (logged in) and download flux1-dev.safetensors "
        "in the browser. InstantX's adapter reads SigLIP so400m (the Flux Redux file); the adapter's loader reads "
        "SigLIP's pooling head from the same file. Needs ComfyUI 0.3 or newer (Flux, SigLIP).")), title="Download first")
    wb.note(
        "InstantX's IP-Adapter prompts Flux with a picture: SigLIP reads it, the adapter turns its pooled feature into 128 "
        "tokens, and in every block of Flux (double and single) the attention also looks at them.\n\n"
        "weight: InstantX's scale (their demo uses 0.7); 0 = exactly the plain Flux image. The negative prompt gets a "
        "black picture's tokens; it only matters at CFG > 1.",
        title="How to read this workflow", near=apply)
    return "A Flux.1-dev image prompted by a picture through InstantX's IP-Adapter (SigLIP so400m feature)."


# ComfyUI's Flux nodes (0.3.x): scripts/build_workflows.py skips these specs on a host without them
FLUX_HOST_NODES = ("UNETLoader", "DualCLIPLoader", "FluxGuidance", "EmptySD3LatentImage")
flux_portrait_pulid.requires_nodes = FLUX_HOST_NODES
flux_image_prompt_xlabs.requires_nodes = FLUX_HOST_NODES
flux_image_prompt_instantx.requires_nodes = FLUX_HOST_NODES

SPECS = {
    "flux_portrait_pulid": flux_portrait_pulid,
    "flux_image_prompt_xlabs": flux_image_prompt_xlabs,
    "flux_image_prompt_instantx": flux_image_prompt_instantx,
}
