"""The example workflows, as code (scripts/build_workflows.py writes the JSON).

Each spec gets a :class:`WorkflowBuilder`, adds titled nodes, groups and notes
(which weight files to download, by their id in weights_manifest.json) and
returns a one-line description. Model file names are the real ones from the
manifest; tests swap them for tiny models (tests/harness/tiny_swap.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from workflow_models import download_note_lines

REPO = Path(__file__).resolve().parents[1]

SD15_CHECKPOINT = "v1-5-pruned-emaonly-fp16.safetensors"  # the file ComfyUI's own SD1.5 templates download
SDXL_CHECKPOINT = "sd_xl_base_1.0.safetensors"


def text_to_image(wb, checkpoint, model_patch=None, prompt="a portrait photo of a person, studio light", size=512, title="Sample", ckpt=None, width=None, height=None):
    """The standard txt2img tail shared by the examples; returns the node refs (``ckpt``: reuse a loader; ``width``/``height``: not square)."""
    if ckpt is None:
        ckpt = wb.node("CheckpointLoaderSimple", title="Load checkpoint", ckpt_name=checkpoint)
    model = ckpt[0]
    if model_patch is not None:
        model = model_patch(ckpt)
    pos = wb.node("CLIPTextEncode", title="Prompt", text=prompt, clip=ckpt[1])
    neg = wb.node("CLIPTextEncode", title="Negative prompt", text="blurry, lowres, deformed", clip=ckpt[1])
    latent = wb.node("EmptyLatentImage", title="Image size", width=width or size, height=height or size, batch_size=1)
    sampler = wb.node(
        "KSampler", title=title, model=model, positive=pos[0], negative=neg[0], latent_image=latent[0], seed=42, steps=30, cfg=6.0, sampler_name="dpmpp_2m", scheduler="karras"
    )
    decode = wb.node("VAEDecode", title="Decode to pixels", samples=sampler[0], vae=ckpt[2])
    save = wb.node("SaveImage", title="Save image", images=decode[0], filename_prefix="identity_attention")
    return {"ckpt": ckpt, "pos": pos, "neg": neg, "latent": latent, "sampler": sampler, "decode": decode, "save": save}


def similarity_check(wb, images, identity, faces, title="How much does it look like the person?", prefix="identity_similarity"):
    """Identity similarity of generated images against an identity, the scored image saved; returns both refs."""
    score = wb.node("IdentityAttentionIdentitySimilarity", title=title, images=images, identity=identity, face_analysis=faces, face="largest")
    shown = wb.node("SaveImage", title="Similarity written on the image", images=score[2], filename_prefix=prefix)
    return score, shown


# --- weights: notes that say what to download, from weights_manifest.json ------------------------

DOWNLOAD_COMMAND = "python -m comfyui-identity-attention.weights download"


def manifest_entries() -> dict:
    with open(REPO / "weights_manifest.json") as f:
        return {e["id"]: e for e in json.load(f)["entries"]}


def manifest_file(entry_id: str) -> str:
    """The name a loader node shows for a manifest entry (adapter loaders show <folder>/<file>)."""
    return manifest_entries()[entry_id]["file"]


def download_note(ids, extra: str = "", base: str = "sd15") -> str:
    """Which files to download (manifest ids), where they go, their links and the command that fetches them;
    ``base``: the checkpoint family, whose checkpoint (manifest format "checkpoint") is listed too."""
    lines = download_note_lines(list(ids), base, list(manifest_entries().values()))
    if extra:
        lines += ["", extra]
    return "\n".join(lines)


# --- the workflows -------------------------------------------------------------------------------

IDENTITY_GREEN = "#8A8"
CHECK_YELLOW = "#b58b2a"
MODEL_BLUE = "#88A"
ADAPTER_BLUE = "#3f789e"


def face_analysis(wb, pack: str):
    """Load face analysis model for ``pack``: buffalo_l for FaceID adapters, antelopev2 for InstantID / PuLID (and scoring)."""
    return wb.node("IdentityAttentionLoadFaceAnalysis", title=f"Face detector + recognizer ({pack})", pack=pack, provider="auto", det_size=640)


def identity_from_photo(wb, photo="reference_face.png", clip_vision=True, vision_title="CLIP vision ViT-H (optional)", pack="antelopev2"):
    """Reference photo -> IDENTITY, with the three pictures Encode identity gives; returns refs.

    ``pack``: the face pack whose embedding the workflow's adapter was trained on (buffalo_l for FaceID)."""
    image = wb.node("LoadImage", title="Reference photo (one person)", image=photo)
    faces = face_analysis(wb, pack)
    links = {"face_analysis": faces[0], "images": image[0]}
    refs = {"image": image, "faces": faces}
    if clip_vision:
        vision = wb.node("CLIPVisionLoader", title=vision_title, clip_name=manifest_file("clip-vit-h"))
        links["clip_vision"] = vision[0]
        refs["vision"] = vision
    encode = wb.node("IdentityAttentionEncodeIdentity", title="Encode identity", face="largest", flip_augment=False, **links)
    crops = wb.node("PreviewImage", title="Aligned faces used", images=encode[1])
    found = wb.node("PreviewImage", title="Faces found (green = used)", images=encode[3])
    mask = wb.node("MaskToImage", title="Face mask as image", mask=encode[2])
    mask_preview = wb.node("PreviewImage", title="Face mask", images=mask[0])
    refs.update(encode=encode, crops=crops, found=found, mask=mask, mask_preview=mask_preview)
    return refs


def encode_identity_and_check_similarity(wb) -> str:
    who = identity_from_photo(wb)
    pack_info = wb.node("IdentityAttentionShowText", title="Face pack: files, provider, recognizer", text=who["faces"][1])
    gen = text_to_image(wb, SD15_CHECKPOINT, prompt="a portrait photo of a woman, studio light, 85mm", title="Sample (no identity yet)")
    score, shown = similarity_check(wb, gen["decode"][0], who["encode"][0], who["faces"][0])
    wb.group("1. Who: a reference photo becomes an identity", [who[k] for k in ("image", "faces", "vision", "encode", "crops", "found", "mask", "mask_preview")] + [pack_info], IDENTITY_GREEN)
    wb.group("2. Generate (identity attention nodes go between Load checkpoint and the sampler)", [gen[k] for k in ("ckpt", "pos", "neg", "latent", "sampler", "decode", "save")], MODEL_BLUE)
    wb.group("3. Check: score the result against the identity", [score, shown], CHECK_YELLOW)
    wb.note(download_note(["antelopev2", "clip-vit-h"], extra=(
        "CLIP vision is optional here: Encode identity keeps its features for IP-Adapter plus-face and FaceID-Plus adapters; "
        "delete the node (or its link) when your adapter reads only the face embedding.")), title="Download first")
    wb.note(
        "Encode identity finds the face in each reference photo, aligns it and keeps its face embedding. "
        "Several photos of the same person (a batch or an image list) give a steadier identity.\n\n"
        "Identity similarity compares the faces in generated images with the identity: 1 = the same embedding, "
        "unrelated people score near 0, images without a face score 0. Use it to compare settings and seeds.\n\n"
        "No face found? Use a clearer frontal photo, or lower det_size for close-ups.\n\n"
        "Which face pack: IP-Adapter-FaceID / FaceID-Plus(V2) were trained on buffalo_l's face embedding, InstantID and PuLID "
        "on antelopev2's; the face-pack text shows which recognizer was loaded (and where it runs), and the identity "
        "attention nodes stop with the fix when an identity comes from the wrong pack.",
        title="How to read this workflow", near=who["encode"])
    return "Encode a person from a reference photo and score generated images against the identity."


def load_identity_adapter(wb) -> str:
    ckpt = wb.node("CheckpointLoaderSimple", title="Load checkpoint (SD1.5)", ckpt_name=SD15_CHECKPOINT)
    plus_face = wb.node("IdentityAttentionLoadIdentityAdapter", title="IP-Adapter plus-face (SD1.5)",
                        adapter="ipadapter/" + manifest_file("ip-adapter-plus-face_sd15"), model=ckpt[0])
    faceid = wb.node("IdentityAttentionLoadIdentityAdapter", title="IP-Adapter FaceID-PlusV2 (SD1.5)",
                     adapter="ipadapter/" + manifest_file("ip-adapter-faceid-plusv2_sd15"), model=ckpt[0])
    info_a = wb.node("IdentityAttentionShowText", title="What the plus-face file is", text=plus_face[1])
    info_b = wb.node("IdentityAttentionShowText", title="What the FaceID-PlusV2 file is", text=faceid[1])
    gen = text_to_image(wb, SD15_CHECKPOINT, prompt="a portrait photo of a man, studio light, 85mm", title="Sample (no identity yet)", ckpt=ckpt)
    wb.group("Identity adapters: recognised from the file, checked against the model", [ckpt, plus_face, faceid, info_a, info_b], ADAPTER_BLUE)
    wb.group("Generate (connect id_adapter and an identity to an attention node, then its model here)", [gen[k] for k in ("pos", "neg", "latent", "sampler", "decode", "save")], MODEL_BLUE)
    wb.note(download_note(["ip-adapter-plus-face_sd15", "ip-adapter-faceid-plusv2_sd15"], extra=(
        "The loader lists files from models/ipadapter, models/instantid, models/pulid and models/identity_attention as "
        "<folder>/<file>; refresh the page after downloading. Turn on verify_sha256 to compare a file with the published one.")),
        title="Download first")
    wb.note(
        "Load identity adapter reads IP-Adapter (plus, plus-face, full-face), FaceID / FaceID-Plus(V2), InstantID, PuLID, "
        "FaceChain-FACT and PVA files and this pack's own. It tells them apart by their contents, checks that they fit "
        "the model (an SDXL adapter on an SD1.5 checkpoint is refused with a message), and Show text tells what it found: "
        "format, base model, token count, which identity features it reads, and what else it needs (CLIP vision, a LoRA).",
        title="How to read this workflow", near=plus_face)
    return "Load identity-adapter files, see what each one is, and check them against the model."


def identity_portrait_faceid_moa(wb) -> str:
    who = identity_from_photo(wb, vision_title="CLIP vision ViT-H (FaceID-Plus reads it)", pack="buffalo_l")
    ckpt = wb.node("CheckpointLoaderSimple", title="Load checkpoint (SD1.5)", ckpt_name=SD15_CHECKPOINT)
    lora = wb.node("LoraLoaderModelOnly", title="FaceID-PlusV2 LoRA (comes with the adapter)", model=ckpt[0],
                   lora_name=manifest_file("ip-adapter-faceid-plusv2_sd15_lora"), strength_model=0.6)
    adapter = wb.node("IdentityAttentionLoadIdentityAdapter", title="IP-Adapter FaceID-PlusV2 (SD1.5)",
                      adapter="ipadapter/" + manifest_file("ip-adapter-faceid-plusv2_sd15"), model=lora[0])
    parallel = wb.node("IdentityAttentionApplyParallelAttention", title="Identity attention (parallel, decoupled)",
                       model=lora[0], id_adapter=adapter[0], identity=who["encode"][0], weight=0.8)
    routed = wb.node("IdentityAttentionApplyMixtureOfAttention", title="Mixture-of-attention: identity only where it belongs",
                     model=parallel[0], router="identity_attention")
    report = wb.node("IdentityAttentionModelInfo", title="What is applied", model=routed[0])
    shown = wb.node("IdentityAttentionShowText", title="Applied effects", text=report[0])
    gen = text_to_image(wb, SD15_CHECKPOINT, model_patch=lambda _: routed[0], ckpt=ckpt,
                        prompt="a portrait photo of a woman as an astronaut, helmet under her arm, NASA hangar, 85mm", title="Sample")
    maps = wb.node("IdentityAttentionInspectRouter", title="Where the identity went (router maps)", model=routed[0], latent=gen["sampler"][0])
    maps_preview = wb.node("PreviewImage", title="Router maps (white = identity)", images=maps[0])
    score, scored = similarity_check(wb, gen["decode"][0], who["encode"][0], who["faces"][0])
    wb.group("1. Who: a reference photo becomes an identity", [who[k] for k in ("image", "faces", "vision", "encode", "crops", "found", "mask", "mask_preview")], IDENTITY_GREEN)
    wb.group("2. The model learns the identity: adapter + LoRA, parallel attention, MoA routing", [ckpt, lora, adapter, parallel, routed, report, shown], ADAPTER_BLUE)
    wb.group("3. Generate", [gen[k] for k in ("pos", "neg", "latent", "sampler", "decode", "save")], MODEL_BLUE)
    wb.group("4. Check: where the identity went, and how close it is", [maps, maps_preview, score, scored], CHECK_YELLOW)
    wb.note(download_note(["buffalo_l", "clip-vit-h", "ip-adapter-faceid-plusv2_sd15", "ip-adapter-faceid-plusv2_sd15_lora"], extra=(
        "FaceID-PlusV2 reads the face embedding and CLIP ViT-H features of the aligned face, so Encode identity needs the "
        "CLIP vision model here. Its LoRA goes on the model before the identity attention (strength about 0.6-1.0).")),
        title="Download first")
    wb.note(
        "Identity attention adds the person's tokens to every cross-attention layer (decoupled: a separate attention on top "
        "of the prompt's, as IP-Adapter / FaceID were trained). weight 0 turns it off exactly; start/end limit it to part "
        "of the sampling.\n\nMixture-of-attention then decides per pixel whether the identity attention or the model's own "
        "is used, so the face takes the identity and the rest of the picture (suit, hangar, light) follows the prompt. "
        "'Show router maps' shows that split after sampling (white = identity).\n\nMore people: one Encode identity and one "
        "parallel attention node per person, each with a mask.",
        title="How to read this workflow", near=parallel)
    return "A portrait of the person from one reference photo: FaceID-PlusV2 through parallel attention, routed by mixture-of-attention."


def half_mask(wb, side: str, width: int, height: int):
    """A white left or right half on black, from ComfyUI's own mask nodes; returns (nodes, mask ref)."""
    black = wb.node("SolidMask", title=f"Black {width}x{height}", value=0.0, width=width, height=height)
    white = wb.node("SolidMask", title=f"White half ({side})", value=1.0, width=width // 2, height=height)
    mask = wb.node("MaskComposite", title=f"{side.capitalize()} half", destination=black[0], source=white[0],
                   x=0 if side == "left" else width // 2, y=0, operation="add")
    return [black, white, mask], mask


def two_people_with_masks(wb) -> str:
    width, height = 768, 512
    faces = face_analysis(wb, "buffalo_l")  # FaceID-PlusV2 was trained on buffalo_l's embedding
    vision = wb.node("CLIPVisionLoader", title="CLIP vision ViT-H (FaceID-Plus reads it)", clip_name=manifest_file("clip-vit-h"))
    people = {}
    for name, photo in (("A", "person_a.png"), ("B", "person_b.png")):
        image = wb.node("LoadImage", title=f"Person {name}: reference photo", image=photo)
        encode = wb.node("IdentityAttentionEncodeIdentity", title=f"Encode person {name}", face_analysis=faces[0], images=image[0], clip_vision=vision[0])
        crops = wb.node("PreviewImage", title=f"Person {name}: aligned face", images=encode[1])
        people[name] = {"image": image, "encode": encode, "crops": crops}
    left_nodes, left = half_mask(wb, "left", width, height)
    right_nodes, right = half_mask(wb, "right", width, height)
    ckpt = wb.node("CheckpointLoaderSimple", title="Load checkpoint (SD1.5)", ckpt_name=SD15_CHECKPOINT)
    lora = wb.node("LoraLoaderModelOnly", title="FaceID-PlusV2 LoRA (comes with the adapter)", model=ckpt[0],
                   lora_name=manifest_file("ip-adapter-faceid-plusv2_sd15_lora"), strength_model=0.6)
    adapter = wb.node("IdentityAttentionLoadIdentityAdapter", title="IP-Adapter FaceID-PlusV2 (SD1.5)",
                      adapter="ipadapter/" + manifest_file("ip-adapter-faceid-plusv2_sd15"), model=lora[0])
    first = wb.node("IdentityAttentionApplyParallelAttention", title="Person A, left half", model=lora[0], id_adapter=adapter[0],
                    identity=people["A"]["encode"][0], weight=0.8, mask=left[0])
    second = wb.node("IdentityAttentionApplyParallelAttention", title="Person B, right half", model=first[0], id_adapter=adapter[0],
                     identity=people["B"]["encode"][0], weight=0.8, mask=right[0])
    gen = text_to_image(wb, SD15_CHECKPOINT, model_patch=lambda _: second[0], ckpt=ckpt, title="Sample", width=width, height=height,
                        prompt="photo of two women standing side by side in a cafe, looking at the camera, 35mm")
    checks = []
    for name in ("A", "B"):
        score = wb.node("IdentityAttentionIdentitySimilarity", title=f"Is person {name} in the picture?", images=gen["decode"][0],
                        identity=people[name]["encode"][0], face_analysis=faces[0], face="best match")
        saved = wb.node("SaveImage", title=f"Person {name}: best-matching face and score", images=score[2], filename_prefix=f"similarity_{name}")
        checks += [score, saved]
    wb.group("1. Who: two people, one photo each", [faces, vision] + [people[n][k] for n in ("A", "B") for k in ("image", "encode", "crops")], IDENTITY_GREEN)
    wb.group("2. Where: one mask per person (white = that person)", left_nodes + right_nodes, IDENTITY_GREEN)
    wb.group("3. Model: one identity attention node per person, each with its mask", [ckpt, lora, adapter, first, second], ADAPTER_BLUE)
    wb.group("4. Generate", [gen[k] for k in ("pos", "neg", "latent", "sampler", "decode", "save")], MODEL_BLUE)
    wb.group("5. Check: each person's best-matching face", checks, CHECK_YELLOW)
    wb.note(download_note(["buffalo_l", "clip-vit-h", "ip-adapter-faceid-plusv2_sd15", "ip-adapter-faceid-plusv2_sd15_lora"]), title="Download first")
    wb.note(
        "Each identity attention node adds one person, only inside its mask (any size: it is resized to every layer; soft "
        "edges blend). Chain one node per person; the order does not matter for masks that do not overlap.\n\n"
        "The masks here are halves of the picture made with ComfyUI's own mask nodes; any MASK works: painted in the mask "
        "editor, from a segmentation node, or Encode identity's face_mask of a layout photo.\n\n"
        "Ask the prompt for as many people as there are masks.",
        title="How to read this workflow", near=first)
    return "Two people in one picture: one identity attention node per person, each limited to its half by a mask."


SPECS = {
    "identity_encode_and_similarity": encode_identity_and_check_similarity,
    "identity_adapter_load": load_identity_adapter,
    "identity_portrait_faceid_moa": identity_portrait_faceid_moa,
    "two_people_with_masks": two_people_with_masks,
}
