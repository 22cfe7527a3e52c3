"""Example workflow: PVA's per-identity personalization, then generation with the personalized adapter.

PVA (Personalized Face Inpainting by Parallel Visual Attention) fine-tunes, for one person,
the visual query/key/value projections of every cross-attention layer and a learned prompt
word <new1> in 40 steps. Its released weights are for SD2 inpainting and are not in
weights_manifest.json, so this workflow starts from the SD1.5 IP-Adapter FaceID-PlusV2 (the
manifest's strongest SD1.5 face adapter, the one the other examples use): its identity
projector makes the identity tokens, its key/value projections seed the visual ones, and each
layer's own query projection seeds the visual query (as PVA does).
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
    manifest_file,
    similarity_check,
)

TRAIN_ORANGE = "#a1683a"
PHOTOS = ("person_photo_1.png", "person_photo_2.png", "person_photo_3.png")
SAVE_NAME = "my_person"


def reference_photos(wb, names=PHOTOS):
    """Several photos of one person as one IMAGE batch (ComfyUI's Batch images); returns (loaders, batchers, batch ref)."""
    loaders = [wb.node("LoadImage", title=f"Photo {i + 1} of the person", image=name) for i, name in enumerate(names)]
    batchers, batch = [], loaders[0][0]
    for i, loader in enumerate(loaders[1:], start=2):
        joined = wb.node("ImageBatch", title=f"Batch photos 1-{i}", image1=batch, image2=loader[0])
        batchers.append(joined)
        batch = joined[0]
    return loaders, batchers, batch


def personalize_then_generate(wb) -> str:
    loaders, batchers, photos = reference_photos(wb)
    faces = face_analysis(wb, "buffalo_l")  # FaceID-PlusV2 was trained on buffalo_l's embedding
    vision = wb.node("CLIPVisionLoader", title="CLIP vision ViT-H (FaceID-Plus reads it)", clip_name=manifest_file("clip-vit-h"))
    encode = wb.node("IdentityAttentionEncodeIdentity", title="Encode identity (all photos)", face_analysis=faces[0], images=photos,
                     clip_vision=vision[0], face="largest", flip_augment=False)
    crops = wb.node("PreviewImage", title="Aligned faces used", images=encode[1])
    found = wb.node("PreviewImage", title="Faces found (green = used)", images=encode[3])

    ckpt = wb.node("CheckpointLoaderSimple", title="Load checkpoint (SD1.5)", ckpt_name=SD15_CHECKPOINT)
    lora = wb.node("LoraLoaderModelOnly", title="FaceID-PlusV2 LoRA (comes with the adapter)", model=ckpt[0],
                   lora_name=manifest_file("ip-adapter-faceid-plusv2_sd15_lora"), strength_model=0.6)
    start = wb.node("IdentityAttentionLoadIdentityAdapter", title="Adapter to start from: FaceID-PlusV2 (SD1.5)",
                    adapter="ipadapter/" + manifest_file("ip-adapter-faceid-plusv2_sd15"), model=lora[0])
    train = wb.node(
        "IdentityAttentionPersonalizeIdentity", title="Personalize identity (PVA, 40 steps)",
        model=lora[0], clip=ckpt[1], vae=ckpt[2], images=photos, id_adapter=start[0], identity=encode[0], masks=encode[2],
        steps=40, learning_rate=2e-5, token_learning_rate=1e-3, seed=0, resolution=512,
        prompt="photo of a <new1> person", references="fused", save_name=SAVE_NAME,
    )
    loss = wb.node("PreviewImage", title="Training loss (should trend down)", images=train[1])

    parallel = wb.node("IdentityAttentionApplyParallelAttention", title="Parallel visual attention (joint, personalized)",
                       model=lora[0], id_adapter=train[0], identity=encode[0], weight=1.0,
                       mode="joint", projections="adapter", references="fused")
    report = wb.node("IdentityAttentionModelInfo", title="What is applied", model=parallel[0])
    shown = wb.node("IdentityAttentionShowText", title="Applied effects", text=report[0])

    pos = wb.node("IdentityAttentionIdentityPrompt", title="Identity prompt (<new1> = the person)", clip=ckpt[1], id_adapter=train[0],
                  text="photo of a <new1> person as an astronaut, helmet under the arm, NASA hangar, 85mm")
    neg = wb.node("CLIPTextEncode", title="Negative prompt", text="blurry, lowres, deformed", clip=ckpt[1])
    latent = wb.node("EmptyLatentImage", title="Image size", width=512, height=512, batch_size=1)
    sampler = wb.node("KSampler", title="Sample", model=parallel[0], positive=pos[0], negative=neg[0], latent_image=latent[0],
                      seed=42, steps=30, cfg=6.0, sampler_name="dpmpp_2m", scheduler="karras")
    decode = wb.node("VAEDecode", title="Decode to pixels", samples=sampler[0], vae=ckpt[2])
    save = wb.node("SaveImage", title="Save image", images=decode[0], filename_prefix="personalized")

    score, scored = similarity_check(wb, decode[0], encode[0], faces[0])

    wb.group("1. Who: several photos of one person become an identity (+ face masks)", loaders + batchers + [faces, vision, encode, crops, found], IDENTITY_GREEN)
    wb.group("2. Train: personalize the adapter on these photos (PVA, 40 steps)", [ckpt, lora, start, train, loss], TRAIN_ORANGE)
    wb.group("3. Apply: the personalized adapter in joint parallel attention", [parallel, report, shown], ADAPTER_BLUE)
    wb.group("4. Generate: <new1> in the prompt is the person", [pos, neg, latent, sampler, decode, save], MODEL_BLUE)
    wb.group("5. Check: score the result against the identity", [score, scored], CHECK_YELLOW)
    wb.note(download_note(["buffalo_l", "clip-vit-h", "ip-adapter-faceid-plusv2_sd15", "ip-adapter-faceid-plusv2_sd15_lora"], extra=(
        "PVA's own weights (for SD2 inpainting) are not in the list; this workflow starts from IP-Adapter FaceID-PlusV2 "
        "(SD1.5): its face projector turns the identity into tokens, its key/value projections are the starting point of "
        "the trained ones. Its LoRA goes on the model for training and generation alike.")), title="Download first")
    wb.note(
        "Personalize identity teaches the adapter one person, as PVA does. Trained: the visual query/key/value projections "
        "of every cross-attention layer and one new prompt word, <new1>; the checkpoint, text encoder, VAE and face "
        "projector are not changed. 40 steps as in PVA's paper, each a forward and backward pass over 2 photos x 2 noise "
        "levels: longer than making a picture (use a GPU). The progress bar counts the steps and the loss curve updates "
        "each step; Cancel stops it and changes nothing.\n\n"
        "Photos: 3-10 of the person, the face large; each is cropped square around its face mask.\n\n"
        f"Saved as models/identity_attention/{SAVE_NAME}.safetensors (the word: models/embeddings/{SAVE_NAME}.safetensors). "
        f"Reuse it without training: refresh the page, pick identity_attention/{SAVE_NAME}.safetensors in 'Load identity "
        "adapter' and connect it where Personalize identity is connected. Empty save_name: nothing is saved.\n\n"
        "<new1> is the learned word for the person: write it in 'Identity prompt' ('a painting of a <new1> person'), or "
        f"embedding:{SAVE_NAME} in a plain prompt. Keep mode joint, projections adapter.",
        title="How to read this workflow", near=train)
    return "Personalize an identity adapter on several photos of one person (PVA, 40 steps), then generate with it and the learned word `<new1>`."


SPECS = {
    "personalize_then_generate": personalize_then_generate,
}
