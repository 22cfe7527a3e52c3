"""Example workflow: PuLID on SDXL from the files artists have.

- ``identity_portrait_pulid``: reference photo -> Encode identity (antelopev2, as PuLID was trained)
  -> Encode PuLID face features (EVA02-CLIP-L + facexlib's face parsing) -> PuLID v1.1 through
  Apply parallel visual attention (decoupled, PuLID's fidelity method) -> SDXL sample -> score.
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
    manifest_entries,
    similarity_check,
    text_to_image,
)


def _choice(entry_id: str) -> str:
    """What a folder-prefixed loader shows for a manifest entry: ``<folder>/<file>``."""
    e = manifest_entries()[entry_id]
    return f"{e['folder']}/{e['file']}"


def identity_portrait_pulid(wb) -> str:
    who = identity_from_photo(wb, clip_vision=False)
    eva = wb.node("IdentityAttentionLoadEvaClip", title="EVA-CLIP (how PuLID reads a face)", eva_clip_name=_choice("eva02-clip-l-336"))
    parsing = wb.node("IdentityAttentionLoadFaceParsing", title="Face parsing (whitens background, neck, clothes)",
                      parsing_name=_choice("facexlib-parsing-bisenet"))
    features = wb.node("IdentityAttentionEncodePuLIDFeatures", title="Encode PuLID face features",
                       eva_clip=eva[0], identity=who["encode"][0], images=who["image"][0], face_parsing=parsing[0])
    seen = wb.node("PreviewImage", title="What EVA-CLIP saw (grey face, white background)", images=features[1])
    ckpt = wb.node("CheckpointLoaderSimple", title="Load checkpoint (SDXL)", ckpt_name=SDXL_CHECKPOINT)
    adapter = wb.node("IdentityAttentionLoadIdentityAdapter", title="PuLID v1.1 (SDXL)", adapter=_choice("pulid-v1.1"), model=ckpt[0])
    info = wb.node("IdentityAttentionShowText", title="What the PuLID file is", text=adapter[1])
    apply = wb.node("IdentityAttentionApplyParallelAttention", title="Identity attention (PuLID, fidelity)",
                    model=ckpt[0], id_adapter=adapter[0], identity=features[0], weight=0.8, mode="decoupled", projections="adapter",
                    pulid_method="fidelity")
    gen = text_to_image(wb, SDXL_CHECKPOINT, model_patch=lambda _: apply[0], ckpt=ckpt, size=1024, title="Sample",
                        prompt="portrait of a woman as an oil painting, impasto brush strokes, warm museum light")
    score, scored = similarity_check(wb, gen["decode"][0], who["encode"][0], who["faces"][0])
    wb.group("1. Who: a reference photo becomes an identity (antelopev2)", [who[k] for k in ("image", "faces", "encode", "crops", "found", "mask", "mask_preview")], IDENTITY_GREEN)
    wb.group("2. PuLID's second look at the face: EVA-CLIP on the parsed, grey face", [eva, parsing, features, seen], IDENTITY_GREEN)
    wb.group("3. Model: SDXL + PuLID", [ckpt, adapter, info, apply], ADAPTER_BLUE)
    wb.group("4. Generate", [gen[k] for k in ("pos", "neg", "latent", "sampler", "decode", "save")], MODEL_BLUE)
    wb.group("5. Check: how close is it to the person?", [score, scored], CHECK_YELLOW)
    wb.note(download_note(["antelopev2", "eva02-clip-l-336", "facexlib-parsing-bisenet", "pulid-v1.1"], base="sdxl", extra=(
        "facexlib publishes no checksum for parsing_bisenet.pth: add --allow-unverified (the command prints the sha256 it got). "
        "PuLID_ComfyUI's ip-adapter_pulid_sdxl_fp16.safetensors (PuLID v1, in models/pulid) loads in the same loader. "
        "PuLID was shown with SDXL-Lightning (4 steps, CFG 1.2); any SDXL checkpoint runs.")), title="Download first")
    wb.note(
        "PuLID reads a face twice: the face embedding of Encode identity (antelopev2, the recognizer PuLID was trained "
        "with) and EVA-CLIP's view of the face. Encode PuLID face features aligns the face at 512 px, whitens what face "
        "parsing calls background, ears, neck, clothes or hat, turns the rest grey, and stores EVA-CLIP's features in the "
        "identity. 'What EVA-CLIP saw' shows it; without the face parsing node the background stays and the preview "
        "says so in red.",
        title="How to read this workflow", near=features)
    wb.note(
        "pulid_method (PuLID's modes): fidelity = likeness first (PuLID's default); style = the prompt's style wins "
        "(PuLID's 'extremely style'); neutral = plain identity attention.\n\n"
        "weight: PuLID suggests 0.8; 0 = off, exactly the plain model.",
        title="PuLID's knobs", near=apply)
    return "An SDXL portrait with PuLID v1.1: antelopev2 embedding + EVA-CLIP features of the parsed face, fidelity method."


SPECS = {
    "identity_portrait_pulid": identity_portrait_pulid,
}
