"""Example workflows: FaceChain-FACT's face adapter, and SeFi-IDE's per-stage identity tokens.

- ``face_adapter_fact``: reference photo -> Encode identity -> TransFace face tokens (face and hair
  only, as FACT reads them) -> FACT adapter through gated self-attention -> sample -> score.
- ``per_stage_identity_tokens``: identity tokens fresh from a word (and saved) next to tokens the
  trainer made for one person (Load identity tokens) -> the prompt encoded once per stage with each
  stage's key and value token -> Apply per-stage identity tokens -> two pictures side by side,
  scored against the person's photo.
- ``identity_from_many_photos``: three reference photos of one person (one batch) -> Encode identity ->
  FaceID-PlusV2 wrapped by Pool reference photos (attention; Omni-ID style, training-free) -> parallel
  identity attention -> sample -> score against the pooled identity.
"""

from __future__ import annotations

from workflow_specs import (
    ADAPTER_BLUE,
    CHECK_YELLOW,
    IDENTITY_GREEN,
    MODEL_BLUE,
    SD15_CHECKPOINT,
    download_note,
    face_analysis,
    identity_from_photo,
    manifest_file,
    similarity_check,
    text_to_image,
)

REFERENCE_PHOTOS = ("person_photo_1.png", "person_photo_2.png", "person_photo_3.png")

TRAIN_COMMAND = "python -m comfyui-identity-attention.train my_person.json"


def face_adapter_fact(wb) -> str:
    who = identity_from_photo(wb, clip_vision=False)
    encoder = wb.node("IdentityAttentionLoadFaceEncoder", title="Face encoder TransFace-S (how FACT reads a face)",
                      encoder_name=manifest_file("transface-s"))
    face_tokens = wb.node("IdentityAttentionEncodeFaceTokens", title="Encode face tokens (face and hair only)",
                          face_encoder=encoder[0], identity=who["encode"][0], head_mask=who["encode"][2])
    seen = wb.node("PreviewImage", title="What TransFace saw (aligned, background masked)", images=face_tokens[1])
    ckpt = wb.node("CheckpointLoaderSimple", title="Load checkpoint (SD1.5; FACT was trained on majicMIX realistic)", ckpt_name=SD15_CHECKPOINT)
    adapter = wb.node("IdentityAttentionLoadIdentityAdapter", title="FaceChain-FACT face adapter (SD1.5)",
                      adapter="identity_attention/" + manifest_file("fact-adapter-majicmix"), model=ckpt[0])
    info = wb.node("IdentityAttentionShowText", title="What the FACT file is", text=adapter[1])
    face = wb.node("IdentityAttentionApplyFaceAdapter", title="Face adapter (gated self-attention)",
                   model=ckpt[0], adapter=adapter[0], identity=face_tokens[0], weight=0.5)
    report = wb.node("IdentityAttentionModelInfo", title="What is applied", model=face[0])
    shown = wb.node("IdentityAttentionShowText", title="Applied effects", text=report[0])
    gen = text_to_image(wb, SD15_CHECKPOINT, model_patch=lambda _: face[0], ckpt=ckpt, title="Sample",
                        prompt="a photo of a woman in a red wool coat, snowy street at dusk, bokeh, 85mm")
    score, scored = similarity_check(wb, gen["decode"][0], who["encode"][0], who["faces"][0])
    wb.group("1. Who: a reference photo becomes an identity", [who[k] for k in ("image", "faces", "encode", "crops", "found", "mask", "mask_preview")], IDENTITY_GREEN)
    wb.group("2. Face tokens: TransFace reads the face, the face mask hides the background", [encoder, face_tokens, seen], IDENTITY_GREEN)
    wb.group("3. The model learns the face: FACT adapter, gated self-attention", [ckpt, adapter, info, face, report, shown], ADAPTER_BLUE)
    wb.group("4. Generate", [gen[k] for k in ("pos", "neg", "latent", "sampler", "decode", "save")], MODEL_BLUE)
    wb.group("5. Check: how close is it to the person?", [score, scored], CHECK_YELLOW)
    wb.note(download_note(["antelopev2", "transface-s", "fact-adapter-majicmix"], extra=(
        "ModelScope publishes no checksum for the FACT and TransFace files: add --allow-unverified to the command "
        "(it prints the sha256 it got). fact-adapter-film is the same adapter trained on a film-look checkpoint; "
        "swap it in Load identity adapter. The FACT adapter works best with the checkpoint it was trained on "
        "(majicMIX realistic), but any SD1.5 checkpoint runs.")), title="Download first")
    wb.note(
        "FACT reads the face with TransFace, a face-recognition network: Encode face tokens keeps its 144 patch tokens "
        "(a grid of 12x12 small face regions), and the adapter turns them into 16 face tokens.\n\n"
        "Face mask (into Encode face tokens): FACT blacks out everything but face and hair before reading the face, so "
        "background, clothes and light of the photo do not leak into the picture. Here Encode identity's face mask (an "
        "ellipse over the face) does that; raise its mask_grow to keep more hair, or disconnect it to read the whole "
        "aligned crop. 'What TransFace saw' shows the result.",
        title="How to read this workflow", near=face_tokens)
    wb.note(
        "Gated self-attention: in every block, right after the picture looks at itself, it also looks at the face "
        "tokens, and a gate (weight) says how much of that to keep. The prompt's own attention is left alone, so the "
        "prompt still decides scene, clothes and style.\n\n"
        "weight: 0.5 is what FACT uses; higher = closer likeness but stiffer faces and less prompt; 0 = off, exactly "
        "the plain model. start/end: let the first steps build the composition without the face (start 0.1-0.2).\n\n"
        "mask (optional, on the face adapter): white = where in the picture the face may be imposed; not connected = "
        "everywhere. Use it for a face in a set place, or to keep the face off other people.",
        title="The face adapter's knobs", near=face)
    return "A portrait of the person through FaceChain-FACT's face adapter: TransFace face tokens through gated self-attention."


def _token_lane(wb, ckpt, tokens, label, prompt):
    """Encode prompt with identity tokens -> Apply per-stage identity tokens; returns (encode, apply)."""
    encode = wb.node("IdentityAttentionEncodePromptWithIdentityTokens", title=f"{label}: prompt encoded per stage (V* = the tokens)",
                     clip=ckpt[1], tokens=tokens[0], text=prompt, placeholder="V*", class_word="person")
    apply = wb.node("IdentityAttentionApplyStageTokens", title=f"{label}: per-stage identity tokens", model=ckpt[0],
                    stage_contexts=encode[1], weight=1.0, stage_boundaries="0.2, 0.4, 0.6, 0.8")
    return encode, apply


def per_stage_identity_tokens(wb) -> str:
    prompt = "a photo of V* person as an astronaut, helmet under the arm, hangar, 85mm"
    ckpt = wb.node("CheckpointLoaderSimple", title="Load checkpoint (SD1.5)", ckpt_name=SD15_CHECKPOINT)
    fresh = wb.node("IdentityAttentionCreateIdentityTokens", title="A: new identity tokens, from the word 'person'",
                    base="sd15", init="word", init_word="person", seed=0, stages=5, vectors=1, noise=0.0, clip=ckpt[1])
    saved = wb.node("IdentityAttentionSaveIdentityTokens", title="Save tokens (models/identity_attention/)", tokens=fresh[0],
                    filename_prefix="identity_tokens/person")
    saved_name = wb.node("IdentityAttentionShowText", title="Saved as", text=saved[0])
    trained = wb.node("IdentityAttentionLoadIdentityTokens", title="B: tokens trained on your person",
                      tokens_name="identity_tokens/my_person_tokens.safetensors")
    encode_a, apply_a = _token_lane(wb, ckpt, fresh, "A", prompt)
    encode_b, apply_b = _token_lane(wb, ckpt, trained, "B", prompt)
    report = wb.node("IdentityAttentionModelInfo", title="What is applied (B)", model=apply_b[0])
    shown = wb.node("IdentityAttentionShowText", title="Applied effects", text=report[0])
    neg = wb.node("CLIPTextEncode", title="Negative prompt", text="blurry, lowres, deformed", clip=ckpt[1])
    latent = wb.node("EmptyLatentImage", title="Image size", width=512, height=512, batch_size=1)
    samples = {}
    for label, encode, apply in (("A", encode_a, apply_a), ("B", encode_b, apply_b)):
        sampler = wb.node("KSampler", title=f"Sample {label}", model=apply[0], positive=encode[0], negative=neg[0], latent_image=latent[0],
                          seed=42, steps=30, cfg=6.0, sampler_name="dpmpp_2m", scheduler="karras")
        decode = wb.node("VAEDecode", title=f"Decode {label}", samples=sampler[0], vae=ckpt[2])
        samples[label] = (sampler, decode)
    both = wb.node("ImageBatch", title="A and B side by side", image1=samples["A"][1][0], image2=samples["B"][1][0])
    save = wb.node("SaveImage", title="Save A (untrained) and B (trained)", images=both[0], filename_prefix="identity_tokens")
    photo = wb.node("LoadImage", title="A photo of your person (not used to generate)", image="reference_face.png")
    faces = wb.node("IdentityAttentionLoadFaceAnalysis", title="Face detector + recognizer (antelopev2)", pack="antelopev2", provider="auto", det_size=640)
    person = wb.node("IdentityAttentionEncodeIdentity", title="Encode the person, to compare", face_analysis=faces[0], images=photo[0])
    score = wb.node("IdentityAttentionIdentitySimilarity", title="Does A / B look like the person?", images=both[0],
                    identity=person[0], face_analysis=faces[0], face="largest")
    scored = wb.node("SaveImage", title="Similarity of A and B", images=score[2], filename_prefix="identity_similarity")
    wb.group("1. Shared by A and B: the model, the negative prompt, the image size", [ckpt, neg, latent], MODEL_BLUE)
    wb.group("2. Who: A = fresh tokens from a word (saved too), B = tokens trained on one person", [fresh, saved, saved_name, trained], IDENTITY_GREEN)
    wb.group("3. A: untrained tokens, the baseline (draws what 'person' draws)", [encode_a, apply_a, *samples["A"]], ADAPTER_BLUE)
    wb.group("4. B: your trained tokens, same prompt and seed", [encode_b, apply_b, report, shown, *samples["B"]], ADAPTER_BLUE)
    wb.group("5. Check: B should look like the person, A like anyone", [both, save, photo, faces, person, score, scored], CHECK_YELLOW)
    wb.note(download_note(["antelopev2"], extra=(
        "The identity tokens are not downloaded: you train them for your person (see 'Train your own tokens'). The "
        "face models only score the result.")), title="Download first")
    wb.note(
        "The identity is a set of learned words, one pair per stage of denoising (5 here). Write V* in the prompt where "
        "the person goes; Encode prompt with identity tokens encodes the prompt once per stage with that stage's words, "
        "and Apply per-stage identity tokens swaps those prompts into the model's cross-attention at that stage. Its "
        "'conditioning' (V* replaced by class_word) is the sampler's positive prompt.\n\n"
        "A starts from the word 'person' and is not trained: it draws what 'person' draws, the baseline. B is the same "
        "graph with trained tokens, same prompt and seed (edit both prompts). weight 1 = the identity prompts replace "
        "the prompt in cross-attention, 0.5 blends, 0 = off.",
        title="How to read this workflow", near=fresh)
    wb.note(
        f"Train tokens for one person with the pack's trainer, from ComfyUI/custom_nodes:\n{TRAIN_COMMAND}\n\n"
        "my_person.json: {\"models\": {\"checkpoint\": \"v1-5-pruned-emaonly.safetensors\"}, \"data\": {\"folder\": "
        "\"my_person_photos/\", \"caption\": \"photo of a <new1> person\"}, \"targets\": {\"stage_tokens\": {\"stages\": 5}}, "
        "\"output\": {\"dir\": \"runs/my_person\", \"name\": \"my_person_tokens\"}}\n\n"
        "Copy runs/my_person/my_person_tokens.safetensors into models/identity_attention/identity_tokens/ and refresh. "
        "Save tokens writes A's tokens there too (identity_tokens/person_00001.safetensors...).",
        title="Train your own tokens", near=trained)
    wb.note(
        "Stages are counted in noise, not steps. stage_boundaries '0.2, 0.4, 0.6, 0.8' cut the way from pure noise (0) to "
        "a clean picture (1) into five equal parts; on SD1.5 the cuts sit at noise levels (sigma) of about 5.1, 2.3, 1.2 "
        "and 0.57 (sampling starts near 14.6). Stage 1 decides layout and pose, the middle stages face shape, the last "
        "ones skin, eyes and hair strands. With a Karras schedule more steps fall in the later, finer stages.\n\n"
        "Each stage has two words: the key word decides where and how strongly the picture looks at the person (it "
        "carries texture and lighting), the value word what it finds there: the person's features. Kept apart, and "
        "per stage, they add the person without taking over the picture: the prompt still decides pose, clothes and scene.",
        title="Stages, keys and values", near=apply_a)
    return "Per-stage K/V identity tokens (SeFi-IDE): untrained tokens from a word next to tokens trained on one person, same seed."


def identity_from_many_photos(wb) -> str:
    photos = [wb.node("LoadImage", title=f"Reference photo {i + 1} (same person)", image=name) for i, name in enumerate(REFERENCE_PHOTOS)]
    batch = wb.node("ImageBatch", title="Photos 1 + 2", image1=photos[0][0], image2=photos[1][0])
    batch_all = wb.node("ImageBatch", title="Photos 1 + 2 + 3", image1=batch[0], image2=photos[2][0])
    faces = face_analysis(wb, "buffalo_l")
    vision = wb.node("CLIPVisionLoader", title="CLIP vision ViT-H (FaceID-Plus reads it)", clip_name=manifest_file("clip-vit-h"))
    encode = wb.node("IdentityAttentionEncodeIdentity", title="Encode identity (one face per photo)", face="largest", flip_augment=False,
                     face_analysis=faces[0], images=batch_all[0], clip_vision=vision[0])
    crops = wb.node("PreviewImage", title="Aligned faces used (one per photo)", images=encode[1])
    found = wb.node("PreviewImage", title="Faces found (green = used)", images=encode[3])
    ckpt = wb.node("CheckpointLoaderSimple", title="Load checkpoint (SD1.5)", ckpt_name=SD15_CHECKPOINT)
    lora = wb.node("LoraLoaderModelOnly", title="FaceID-PlusV2 LoRA (comes with the adapter)", model=ckpt[0],
                   lora_name=manifest_file("ip-adapter-faceid-plusv2_sd15_lora"), strength_model=0.6)
    adapter = wb.node("IdentityAttentionLoadIdentityAdapter", title="IP-Adapter FaceID-PlusV2 (SD1.5)",
                      adapter="ipadapter/" + manifest_file("ip-adapter-faceid-plusv2_sd15"), model=lora[0])
    pooled = wb.node("IdentityAttentionPoolReferencePhotos", title="Pool reference photos (attention over all photos)", id_adapter=adapter[0])
    parallel = wb.node("IdentityAttentionApplyParallelAttention", title="Identity attention (parallel, decoupled)",
                       model=lora[0], id_adapter=pooled[0], identity=encode[0], weight=0.8)
    report = wb.node("IdentityAttentionModelInfo", title="What is applied", model=parallel[0])
    shown = wb.node("IdentityAttentionShowText", title="Applied effects", text=report[0])
    gen = text_to_image(wb, SD15_CHECKPOINT, model_patch=lambda _: parallel[0], ckpt=ckpt, title="Sample",
                        prompt="a photo of a man hiking on a mountain ridge at sunrise, backpack, wind in the hair, 35mm")
    score, scored = similarity_check(wb, gen["decode"][0], encode[0], faces[0])
    wb.group("1. Who: several photos of one person become one identity", [*photos, batch, batch_all, faces, vision, encode, crops, found], IDENTITY_GREEN)
    wb.group("2. The model learns the identity: adapter + LoRA, photos pooled by attention, parallel attention",
             [ckpt, lora, adapter, pooled, parallel, report, shown], ADAPTER_BLUE)
    wb.group("3. Generate", [gen[k] for k in ("pos", "neg", "latent", "sampler", "decode", "save")], MODEL_BLUE)
    wb.group("4. Check: how close is it to the person (all photos)?", [score, scored], CHECK_YELLOW)
    wb.note(download_note(["buffalo_l", "clip-vit-h", "ip-adapter-faceid-plusv2_sd15", "ip-adapter-faceid-plusv2_sd15_lora"], extra=(
        "Same files as the first portrait workflow (identity_portrait_faceid_moa): only your photos change.")), title="Download first")
    wb.note(
        "Put 3-10 photos of the same person in the Load image nodes (different light, angles and expressions help; one "
        "face per photo, or the largest face is used). Image batch needs photos of the same size: it stretches the second "
        "one to the first one's size, so crop them to one size first (or add more Load image + Image batch pairs).\n\n"
        "Pool reference photos makes the adapter read every photo separately and combine their tokens by attention: photos "
        "that agree with the others count more, an odd photo (a bad angle, a shadow) counts less. Without it the adapter "
        "averages the photos' features. It is training-free (Omni-ID's idea without its trained encoder) and works with any "
        "adapter that has a token projector.\n\nThe similarity score is against the identity of all photos together.",
        title="How to read this workflow", near=pooled)
    return "A portrait from several photos of one person: their FaceID-PlusV2 tokens pooled by attention (Omni-ID style), then parallel attention."


SPECS = {
    "face_adapter_fact": face_adapter_fact,
    "identity_from_many_photos": identity_from_many_photos,
    "per_stage_identity_tokens": per_stage_identity_tokens,
}
