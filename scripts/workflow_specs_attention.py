"""Example workflows: KV-mixed attention, nested attention, and an SDXL portrait (parallel attention).

Specs for scripts/build_workflows.py; the shared helpers (txt2img tail, reference photo ->
identity, download notes) come from workflow_specs.py.
"""

from __future__ import annotations

from workflow_specs import (
    ADAPTER_BLUE,
    CHECK_YELLOW,
    IDENTITY_GREEN,
    MODEL_BLUE,
    SD15_CHECKPOINT,
    SDXL_CHECKPOINT,
    download_note,
    face_analysis,
    identity_from_photo,
    manifest_file,
    similarity_check,
    text_to_image,
)


# --- KV-mixed attention ------------------------------------------------------------------------------


def kv_mixed_attention(wb) -> str:
    faces = face_analysis(wb, "buffalo_l")  # the key adapter (FaceID) was trained on buffalo_l's embedding
    vision = wb.node("CLIPVisionLoader", title="CLIP vision ViT-H (plus-face reads it)", clip_name=manifest_file("clip-vit-h"))
    who_photo = wb.node("LoadImage", title="Who: face photo (keys)", image="person_face.png")
    who = wb.node("IdentityAttentionEncodeIdentity", title="Encode who (face embedding)", face="largest", flip_augment=False,
                  face_analysis=faces[0], images=who_photo[0])
    who_crop = wb.node("PreviewImage", title="Who: aligned face", images=who[1])
    look_photo = wb.node("LoadImage", title="Look: appearance photo (values)", image="appearance_reference.png")
    look = wb.node("IdentityAttentionEncodeIdentity", title="Encode look (face embedding + CLIP image tokens)", face="largest", flip_augment=False,
                   face_analysis=faces[0], images=look_photo[0], clip_vision=vision[0])
    look_crop = wb.node("PreviewImage", title="Look: aligned face", images=look[1])

    ckpt = wb.node("CheckpointLoaderSimple", title="Load checkpoint (SD1.5)", ckpt_name=SD15_CHECKPOINT)
    key_adapter = wb.node("IdentityAttentionLoadIdentityAdapter", title="Key adapter: IP-Adapter FaceID (SD1.5, 4 tokens)",
                          adapter="ipadapter/" + manifest_file("ip-adapter-faceid_sd15"), model=ckpt[0])
    value_adapter = wb.node("IdentityAttentionLoadIdentityAdapter", title="Value adapter: IP-Adapter plus-face (SD1.5, 16 tokens)",
                            adapter="ipadapter/" + manifest_file("ip-adapter-plus-face_sd15"), model=ckpt[0])
    mixed = wb.node("IdentityAttentionApplyKVMixedAttention", title="KV-mixed attention: keys = who, values = look",
                    model=ckpt[0], key_adapter=key_adapter[0], key_identity=who[0], value_adapter=value_adapter[0], value_identity=look[0],
                    weight=0.8, mode="decoupled", token_mismatch="resample_values", projections="adapter", references="fused",
                    pairing="two adapters (unrelated tokens, experimental)")
    report = wb.node("IdentityAttentionModelInfo", title="What is applied", model=mixed[0])
    shown = wb.node("IdentityAttentionShowText", title="Applied effects", text=report[0])
    gen = text_to_image(wb, SD15_CHECKPOINT, model_patch=lambda _: mixed[0], ckpt=ckpt, title="Sample",
                        prompt="a candid photo of a woman laughing on a rainy street at night, neon reflections, 50mm")
    who_score, who_shown = similarity_check(wb, gen["decode"][0], who[0], faces[0], title="Close to the face photo (who)?", prefix="similarity_who")
    look_score, look_shown = similarity_check(wb, gen["decode"][0], look[0], faces[0], title="Close to the appearance photo (look)?", prefix="similarity_look")

    wb.group("1. Who and look: one photo for each (the same person twice is fine)", [faces, vision, who_photo, who, who_crop, look_photo, look, look_crop], IDENTITY_GREEN)
    wb.group("2. Model: keys from the face embedding, values from the appearance tokens", [ckpt, key_adapter, value_adapter, mixed, report, shown], ADAPTER_BLUE)
    wb.group("3. Generate", [gen[k] for k in ("pos", "neg", "latent", "sampler", "decode", "save")], MODEL_BLUE)
    wb.group("4. Check: how close to each photo", [who_score, who_shown, look_score, look_shown], CHECK_YELLOW)
    wb.note(download_note(["buffalo_l", "clip-vit-h", "ip-adapter-faceid_sd15", "ip-adapter-plus-face_sd15"], extra=(
        "FaceID reads only the face embedding of buffalo_l (the pack it was trained with) (no CLIP vision for the 'who' photo); plus-face reads CLIP ViT-H tokens of the "
        "aligned face, so Encode look needs the CLIP vision model. FaceID was trained with a LoRA "
        "(ip-adapter-faceid_sd15_lora): adding it (LoraLoaderModelOnly, strength 0.3-0.6) before this node strengthens the likeness.")),
        title="Download first")
    wb.note(
        "KV-mixed attention (VisualComposer) splits the identity attention in two.\n\n"
        "This workflow uses the EXPERIMENTAL pairing 'two adapters (unrelated tokens)': FaceID and plus-face were never trained "
        "together, so key token j and value token j are unrelated. The paper's mechanism is pairing 'trained kv_mixed adapter' "
        "(two encoders trained together by the pack's trainer, target kv_mixed; no public weights exist).\n\n"
        "KEYS (key_adapter + key_identity) decide WHERE the identity goes: which pixels attend to it. A compact encoding "
        "(the face embedding through FaceID, 4 tokens) carries who it is but little about pose or framing, so the prompt "
        "keeps the layout.\n\n"
        "VALUES (value_adapter + value_identity) decide WHAT those pixels receive: the appearance. A detailed encoding (CLIP "
        "image tokens through IP-Adapter plus-face, 16 tokens) carries skin, hair, make-up and light of the 'look' photo.\n\n"
        "Connect one Encode node to both for a single person; use two photos to borrow the look of a second photo.\n\n"
        "weight: 0 = off (exactly the plain model), 0.6-1.0 usual. token_mismatch: FaceID makes 4 tokens, plus-face 16; "
        "resample_values averages the 16 down to 4. mode decoupled = added on top of the prompt (as the adapters were trained); "
        "projections 'layer' uses the model's own K/V (training-free, weaker).",
        title="How to read this workflow", near=mixed)
    return "KV-mixed attention: where the identity goes from one encoding (face embedding), what it looks like from another (CLIP appearance tokens)."


# --- nested attention --------------------------------------------------------------------------------


NESTED_PROMPT = "a portrait photo of a woman reading in a sunlit library, 85mm"


def nested_attention(wb) -> str:
    who = identity_from_photo(wb, vision_title="CLIP vision ViT-H (plus-face reads it)")
    ckpt = wb.node("CheckpointLoaderSimple", title="Load checkpoint (SD1.5)", ckpt_name=SD15_CHECKPOINT)
    adapter = wb.node("IdentityAttentionLoadIdentityAdapter", title="IP-Adapter plus-face (SD1.5)",
                      adapter="ipadapter/" + manifest_file("ip-adapter-plus-face_sd15"), model=ckpt[0])
    find = wb.node("IdentityAttentionFindSubjectToken", title="Find subject token (same text as the prompt)", clip=ckpt[1],
                   prompt=NESTED_PROMPT, subject_word="woman")
    table = wb.node("IdentityAttentionShowText", title="Prompt tokens (> marks the subject)", text=find[1])
    nested = wb.node("IdentityAttentionApplyNestedAttention", title="Nested attention on the subject word",
                     model=ckpt[0], adapter=adapter[0], identity=who["encode"][0], projection="adapter K/V (to_k, to_v)",
                     subject="token index", token_index=find[0], weight=1.0, apply_to="cond", references="fused")
    report = wb.node("IdentityAttentionModelInfo", title="What is applied", model=nested[0])
    shown = wb.node("IdentityAttentionShowText", title="Applied effects", text=report[0])
    gen = text_to_image(wb, SD15_CHECKPOINT, model_patch=lambda _: nested[0], ckpt=ckpt, title="Sample", prompt=NESTED_PROMPT)
    score, scored = similarity_check(wb, gen["decode"][0], who["encode"][0], who["faces"][0])

    wb.group("1. Who: a reference photo becomes an identity", [who[k] for k in ("image", "faces", "vision", "encode", "crops", "found", "mask", "mask_preview")], IDENTITY_GREEN)
    wb.group("2. Which word is the person: find the subject token", [find, table], CHECK_YELLOW)
    wb.group("3. Model: the subject word takes the identity (nested attention)", [ckpt, adapter, nested, report, shown], ADAPTER_BLUE)
    wb.group("4. Generate (the same prompt text as in step 2)", [gen[k] for k in ("pos", "neg", "latent", "sampler", "decode", "save")], MODEL_BLUE)
    wb.group("5. Check: how close to the person", [score, scored], CHECK_YELLOW)
    wb.note(download_note(["antelopev2", "clip-vit-h", "ip-adapter-plus-face_sd15"], extra=(
        "plus-face reads CLIP ViT-H tokens of the aligned face, so Encode identity needs the CLIP vision model here.")),
        title="Download first")
    wb.note(
        "Nested attention (Nested Attention, Patashnik et al. 2025) gives ONE word of the prompt, the subject ('woman'), "
        "the person's features. For every pixel that attends to that word, a small attention of its own picks from the "
        "identity's 16 tokens what that pixel needs (eyes, hair, skin). The other words keep their full power, so "
        "'library', 'sunlit' and the framing follow the prompt.\n\n"
        "Find subject token lists the prompt's tokens with their positions (the subject marked with >) and passes the "
        "subject's position to token_index. Type the SAME text in it as in the Prompt node, or the position is wrong. "
        "Leave subject_word empty to use the last word. In the table '</w>' ends a word; a long word can take two "
        "positions (sun lit), and the subject is its last one.\n\n"
        "weight: how much of the word is replaced (1 = as in the paper, 0 = off exactly). apply_to 'cond': only the "
        "positive prompt has the subject at that position.",
        title="How to read this workflow", near=nested)
    return "Nested attention: the subject word of the prompt ('woman') takes the person's features, picked per pixel."


# --- SDXL portrait -----------------------------------------------------------------------------------


def identity_portrait_sdxl(wb) -> str:
    who = identity_from_photo(wb, vision_title="CLIP vision ViT-H (plus-face SDXL vit-h reads it)")
    ckpt = wb.node("CheckpointLoaderSimple", title="Load checkpoint (SDXL)", ckpt_name=SDXL_CHECKPOINT)
    adapter = wb.node("IdentityAttentionLoadIdentityAdapter", title="IP-Adapter plus-face (SDXL, ViT-H)",
                      adapter="ipadapter/" + manifest_file("ip-adapter-plus-face_sdxl_vit-h"), model=ckpt[0])
    decoupled = wb.node("IdentityAttentionApplyParallelAttention", title="Identity attention (decoupled, as trained)",
                        model=ckpt[0], id_adapter=adapter[0], identity=who["encode"][0], weight=0.7, mode="decoupled", projections="adapter")
    joint = wb.node("IdentityAttentionApplyParallelAttention", title="Identity attention (PVA joint, model's own K/V: training-free)",
                    model=ckpt[0], id_adapter=adapter[0], identity=who["encode"][0], weight=1.0, mode="joint", projections="layer")
    gen = text_to_image(wb, SDXL_CHECKPOINT, model_patch=lambda _: decoupled[0], ckpt=ckpt, size=1024, title="Sample (decoupled)",
                        prompt="a portrait photo of a woman in a wool coat on a windy cliff, overcast light, 85mm, detailed skin")
    joint_sampler = wb.node("KSampler", title="Sample (joint)", model=joint[0], positive=gen["pos"][0], negative=gen["neg"][0],
                            latent_image=gen["latent"][0], seed=42, steps=30, cfg=6.0, sampler_name="dpmpp_2m", scheduler="karras")
    joint_decode = wb.node("VAEDecode", title="Decode to pixels (joint)", samples=joint_sampler[0], vae=ckpt[2])
    joint_save = wb.node("SaveImage", title="Save image (joint)", images=joint_decode[0], filename_prefix="identity_attention_joint")
    score, scored = similarity_check(wb, gen["decode"][0], who["encode"][0], who["faces"][0], title="Decoupled: how close to the person?", prefix="similarity_decoupled")
    joint_score, joint_scored = similarity_check(wb, joint_decode[0], who["encode"][0], who["faces"][0], title="Joint: how close to the person?", prefix="similarity_joint")

    wb.group("1. Who: a reference photo becomes an identity", [who[k] for k in ("image", "faces", "vision", "encode", "crops", "found", "mask", "mask_preview")], IDENTITY_GREEN)
    wb.group("2. Model: SDXL + plus-face adapter, two ways to attend to the identity", [ckpt, adapter, decoupled, joint], ADAPTER_BLUE)
    wb.group("3. Generate 1024x1024: decoupled (top) and joint (bottom), same seed", [gen[k] for k in ("pos", "neg", "latent", "sampler", "decode", "save")]
             + [joint_sampler, joint_decode, joint_save], MODEL_BLUE)
    wb.group("4. Check: how close each is to the person", [score, scored, joint_score, joint_scored], CHECK_YELLOW)
    wb.note(download_note(["antelopev2", "clip-vit-h", "ip-adapter-plus-face_sdxl_vit-h"], base="sdxl", extra=(
        "The _vit-h SDXL adapters read CLIP ViT-H (the same file as the SD1.5 ones), not ViT-bigG.")),
        title="Download first")
    wb.note(
        "Apply parallel visual attention makes every cross-attention layer of SDXL (70 of them) also look at the "
        "person's 16 plus-face tokens.\n\n"
        "decoupled (top sampler): a separate identity attention through the adapter's own K/V, added on top of the "
        "prompt's, as IP-Adapter was trained. weight 0.5-0.8 keeps the prompt in charge; 1.0 pushes the likeness.\n\n"
        "joint (bottom sampler, PVA): the identity tokens join the prompt's words in ONE attention, through the model's "
        "own K/V (projections 'layer'): training-free, the words and the face share every pixel. weight = how much "
        "attention the identity gets next to the words (1 = as many as its tokens earn, 2 = twice).\n\n"
        "Keep the sampler you like and delete the other branch. weight 0 turns either off exactly.",
        title="How to read this workflow", near=decoupled)
    return "An SDXL portrait (1024x1024) with IP-Adapter plus-face through parallel attention: decoupled as trained, and training-free PVA joint mode."


SPECS = {
    "kv_mixed_attention": kv_mixed_attention,
    "nested_attention": nested_attention,
    "identity_portrait_sdxl": identity_portrait_sdxl,
}
