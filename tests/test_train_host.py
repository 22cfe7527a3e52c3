"""The Personalize identity node in a real headless ComfyUI: /prompt, saving, Cancel."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import pack
from harness.prompts import Graph, run_for_latent
from harness.server import PromptFailed
from training_fixtures import photos, tiny_pva_adapter

pytestmark = pytest.mark.host

NODE = "IdentityAttentionPersonalizeIdentity"
ADAPTER_FILE = "identity_attention_test_tiny_pva.safetensors"
SAVE_NAME = "identity_attention_test_person"


@pytest.fixture(scope="module")
def inputs(instance, tiny):
    """A tiny PVA adapter file for the test kit's SD1.5 model, and a reference photo."""
    from PIL import Image

    native = pack("adapters.formats.native_format")
    native.write_native(tiny_pva_adapter(tiny.unet("sd15", 0), seed=3), str(instance.models / "identity_attention" / ADAPTER_FILE))
    img = (photos(1, 64, seed=5)[0].numpy() * 255).round().astype(np.uint8)
    Image.fromarray(img).save(instance.input / "identity_attention_person.png")
    return {"image": "identity_attention_person.png"}


def personalize_graph(steps: int, save_name: str = "", sample: bool = True, seed: int = 0) -> Graph:
    g = Graph()
    models = g.add("IdentityAttentionTestKit_TinyModels", arch="sd15", seed=0)
    model, clip, vae = g.out(models, 0), g.out(models, 1), g.out(models, 2)
    ident = g.add("IdentityAttentionTestKit_SyntheticIdentity", references=1, seed=0, with_clip=False, with_face_tokens=False)
    adapter = g.add("IdentityAttentionLoadIdentityAdapter", adapter=f"identity_attention/{ADAPTER_FILE}", model=model, verify_sha256=False)
    image = g.add("LoadImage", image="identity_attention_person.png")
    trained = g.add(
        NODE, model=model, clip=clip, vae=vae, images=g.out(image), id_adapter=g.out(adapter), identity=g.out(ident),
        steps=steps, learning_rate=1e-3, token_learning_rate=1e-2, seed=seed, resolution=64, prompt="photo of a <new1> person",
        references="fused", save_name=save_name,
    )
    g.add("SaveImage", images=g.out(trained, 1), filename_prefix="identity_attention_loss")
    if sample:
        patched = g.add(
            "IdentityAttentionApplyParallelAttention", model=model, id_adapter=g.out(trained), identity=g.out(ident), weight=1.0,
            start_percent=0.0, end_percent=1.0, apply_to="both", mode="joint", projections="adapter", references="fused",
        )
        pos = g.add("IdentityAttentionIdentityPrompt", clip=clip, id_adapter=g.out(trained), text="a photo of a <new1> person")
        neg = g.add("CLIPTextEncode", clip=clip, text="blurry")
        latent = g.add("EmptyLatentImage", width=64, height=64, batch_size=1)
        sampled = g.add("KSampler", model=g.out(patched), seed=1, steps=2, cfg=5.0, sampler_name="euler", scheduler="normal", positive=g.out(pos), negative=g.out(neg), latent_image=g.out(latent), denoise=1.0)
        g.add("SaveLatent", samples=g.out(sampled), filename_prefix="latents/identity_attention_personalized")
    return g


def plain_sampling_graph(offset: int) -> dict:
    """Unpatched txt2img on the cached tiny models; node ids shifted so nothing is reused from ComfyUI's cache."""
    g = Graph()
    models = g.add("IdentityAttentionTestKit_TinyModels", arch="sd15", seed=0)
    pos = g.add("CLIPTextEncode", clip=g.out(models, 1), text="a portrait photo of a person")
    neg = g.add("CLIPTextEncode", clip=g.out(models, 1), text="blurry")
    latent = g.add("EmptyLatentImage", width=64, height=64, batch_size=1)
    sampled = g.add("KSampler", model=g.out(models), seed=3, steps=2, cfg=5.0, sampler_name="euler", scheduler="normal", positive=g.out(pos), negative=g.out(neg), latent_image=g.out(latent), denoise=1.0)
    g.add("SaveLatent", samples=g.out(sampled), filename_prefix=f"latents/identity_attention_plain_{offset}")
    shifted = Graph()
    shifted.nodes = {str(int(k) + offset): {"class_type": v["class_type"], "inputs": {n: ([str(int(x[0]) + offset), x[1]] if isinstance(x, list) else x) for n, x in v["inputs"].items()}} for k, v in g.nodes.items()}
    return shifted


def test_node_is_listed_with_tooltips(server):
    info = server.object_info()
    for node_id, category in ((NODE, "identity_attention/train"), ("IdentityAttentionIdentityPrompt", "identity_attention/encode")):
        node = info[node_id]
        assert node["category"] == category and node["description"]
        for section in ("required", "optional"):
            for name, spec in node["input"].get(section, {}).items():
                assert spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
    assert info[NODE]["output"] == ["ID_ADAPTER", "IMAGE"]
    assert info[NODE]["input"]["required"]["steps"][1]["default"] == 40


def test_personalize_through_prompt_saves_and_plugs_into_joint_attention(server, instance, inputs):
    import folder_paths  # the in-process host's defaults name the same folders the server uses

    embedding_candidates = [instance.models / "embeddings", *(__import__("pathlib").Path(p) for p in folder_paths.get_folder_paths("embeddings"))]
    g = personalize_graph(steps=2, save_name=SAVE_NAME)
    try:
        entry = server.run(g.prompt())
        latent = load_file(str(server.output_files(entry, "latents")[0]))["latent_tensor"]
        assert latent.shape == (1, 4, 8, 8) and torch.isfinite(latent).all()
        node_id = next(k for k, v in g.prompt().items() if v["class_type"] == NODE)
        assert entry["outputs"][node_id]["images"][0]["type"] == "temp"  # the loss curve shown on the node
        saved = instance.models / "identity_attention" / f"{SAVE_NAME}.safetensors"
        assert saved.is_file()
        loaded = pack("adapters.formats.native_format").read_native(str(saved))
        assert loaded.mechanism == "joint" and len(loaded.layers) == 16 and "modifier_vec.l" in loaded.extras
        assert any(p.joinpath(f"{SAVE_NAME}.safetensors").is_file() for p in embedding_candidates)
        # the saved file through the loader, in the same graph shape
        again = personalize_graph(steps=2, save_name="")
        prompt = again.prompt()
        loader = next(k for k, v in prompt.items() if v["class_type"] == "IdentityAttentionLoadIdentityAdapter")
        prompt[loader]["inputs"]["adapter"] = f"identity_attention/{SAVE_NAME}.safetensors"
        entry = server.run(prompt)
        assert entry["outputs"]
    finally:
        for p in embedding_candidates:
            f = p / f"{SAVE_NAME}.safetensors"
            if f.is_file():
                f.unlink()


def test_cancel_stops_training_and_the_next_prompt_is_unchanged(server, instance, inputs):
    before = run_for_latent(server, plain_sampling_graph(100))
    prompt_id = server.queue(personalize_graph(steps=400, sample=False, seed=11).prompt())
    deadline = time.time() + 120
    while "Personalize identity: step 2/400" not in server.log_tail(20000):
        assert time.time() < deadline, "training did not start:\n" + server.log_tail()
        time.sleep(0.2)
    server.interrupt()
    started = time.time()
    with pytest.raises(PromptFailed) as err:
        server.wait(prompt_id, timeout=120)
    assert time.time() - started < 30  # it stopped, it did not run the 400 steps
    assert any(kind == "execution_interrupted" for kind, _ in (err.value.messages or [])), err.value.messages
    after = run_for_latent(server, plain_sampling_graph(200))
    assert torch.equal(after, before)
