"""The example workflows, as code (scripts/build_workflows.py writes the JSON).

Each spec gets a :class:`WorkflowBuilder`, adds titled nodes, groups and notes
(which weight files to download, by their id in weights_manifest.json) and
returns a one-line description. Model file names are the real ones from the
manifest; tests swap them for tiny models (tests/harness/tiny_swap.py).
"""

from __future__ import annotations

SD15_CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
SDXL_CHECKPOINT = "sd_xl_base_1.0.safetensors"


def text_to_image(wb, checkpoint, model_patch=None, prompt="a portrait photo of a person, studio light", size=512, title="Sample"):
    """The standard txt2img tail shared by the examples; returns the node refs."""
    ckpt = wb.node("CheckpointLoaderSimple", title="Load checkpoint", ckpt_name=checkpoint)
    model = ckpt[0]
    if model_patch is not None:
        model = model_patch(ckpt)
    pos = wb.node("CLIPTextEncode", title="Prompt", text=prompt, clip=ckpt[1])
    neg = wb.node("CLIPTextEncode", title="Negative prompt", text="blurry, lowres, deformed", clip=ckpt[1])
    latent = wb.node("EmptyLatentImage", width=size, height=size, batch_size=1)
    sampler = wb.node(
        "KSampler", title=title, model=model, positive=pos[0], negative=neg[0], latent_image=latent[0], seed=42, steps=30, cfg=6.0, sampler_name="dpmpp_2m", scheduler="karras"
    )
    decode = wb.node("VAEDecode", samples=sampler[0], vae=ckpt[2])
    save = wb.node("SaveImage", images=decode[0], filename_prefix="identity_attention")
    return {"ckpt": ckpt, "pos": pos, "neg": neg, "sampler": sampler, "decode": decode, "save": save}


SPECS = {}
