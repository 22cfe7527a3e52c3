"""The pack inside a real headless ComfyUI, driven through its HTTP API."""

from __future__ import annotations

import pytest
import torch

from harness.prompts import Graph, run_for_latent, tiny_txt2img

pytestmark = pytest.mark.host

PACK_PREFIX = "IdentityAttention"
TESTKIT_PREFIX = "IdentityAttentionTestKit"


def pack_nodes(info):
    return {k: v for k, v in info.items() if k.startswith(PACK_PREFIX) and not k.startswith(TESTKIT_PREFIX)}


def test_pack_nodes_registered_with_category_and_tooltips(server):
    info = server.object_info()
    nodes = pack_nodes(info)
    assert nodes, "no Identity Attention node registered"
    for name, node in nodes.items():
        assert node["category"].startswith("identity_attention/"), name
        assert node["display_name"] and node["display_name"] != name, name
        for section in ("required", "optional"):
            for input_name, spec in node["input"].get(section, {}).items():
                options = spec[1] if len(spec) > 1 else {}
                assert options.get("tooltip"), f"{name}.{input_name} has no tooltip"
    # the test kit is present in the test host only
    assert "IdentityAttentionTestKit_TinyModels" in info


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_tiny_workflow_writes_an_image(server, arch):
    graph, ids = tiny_txt2img(arch, save="image", prefix=f"tiny_{arch}")
    graph.add("IdentityAttentionModelInfo", model=graph.out(ids["models"]))
    entry = server.run(graph.prompt())
    images = server.output_files(entry, "images")
    assert len(images) == 1 and images[0].is_file() and images[0].stat().st_size > 0


def dummy(kind, weight, apply_to="both", start=0.0, end=1.0):
    def patch(g, model, ids):
        node = g.add(
            "IdentityAttentionTestKit_DummyStage",
            model=model,
            kind=kind,
            weight=weight,
            start_percent=start,
            end_percent=end,
            apply_to=apply_to,
        )
        return g.out(node)

    return patch


def chain(*patches):
    def patch(g, model, ids):
        for p in patches:
            model = p(g, model, ids)
        return model

    return patch


def hand(ops):
    def patch(g, model, ids):
        return g.out(g.add("IdentityAttentionTestKit_HandPatch", model=model, ops=ops))

    return patch


def foreign(factor=0.5, block_wide=False):
    def patch(g, model, ids):
        return g.out(g.add("IdentityAttentionTestKit_ForeignReplace", model=model, factor=factor, block_wide=block_wide))

    return patch


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_weight_zero_leaves_the_sampled_latent_bit_identical(server, arch):
    plain = run_for_latent(server, tiny_txt2img(arch, prefix=f"plain_{arch}")[0])
    zero = run_for_latent(server, tiny_txt2img(arch, prefix=f"zero_{arch}", patch=dummy("add_tanh_q", 0.0))[0])
    assert torch.equal(plain, zero)
    active = run_for_latent(server, tiny_txt2img(arch, prefix=f"active_{arch}", patch=dummy("add_tanh_q", 0.5))[0])
    assert not torch.equal(plain, active)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_two_stages_equal_their_contributions_by_hand(server, arch):
    stacked = run_for_latent(
        server, tiny_txt2img(arch, prefix=f"stack_{arch}", patch=chain(dummy("add_tanh_q", 0.5), dummy("scale_out", 0.3)))[0]
    )
    by_hand = run_for_latent(server, tiny_txt2img(arch, prefix=f"hand_{arch}", patch=hand("add_tanh_q:0.5,scale_out:0.3"))[0])
    torch.testing.assert_close(stacked, by_hand, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_wide", [False, True])
def test_foreign_attn2_replace_still_runs_under_ours(server, block_wide):
    ours_on_foreign = run_for_latent(
        server,
        tiny_txt2img(prefix=f"foreign_ours_{block_wide}", patch=chain(foreign(0.5, block_wide), dummy("add_tanh_q", 0.5)))[0],
    )
    expected = run_for_latent(
        server,
        tiny_txt2img(prefix=f"foreign_hand_{block_wide}", patch=chain(foreign(0.5, block_wide), hand("add_tanh_q:0.5")))[0],
    )
    without_foreign = run_for_latent(server, tiny_txt2img(prefix=f"foreign_none_{block_wide}", patch=dummy("add_tanh_q", 0.5))[0])
    torch.testing.assert_close(ours_on_foreign, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours_on_foreign, without_foreign)


def test_real_loaders_detect_the_tiny_sd15_files(server, instance):
    """The 320-channel SD1.5 UNet, random CLIP-L and TAESD files through ComfyUI's own loaders."""
    from testkit import tiny_models

    names = tiny_models.write_detectable_sd15_files(str(instance.models))
    g = Graph()
    unet = g.add("UNETLoader", unet_name=names["unet"], weight_dtype="default")
    clip = g.add("CLIPLoader", clip_name=names["clip"], type="stable_diffusion")
    vae = g.add("VAELoader", vae_name="taesd")
    pos = g.add("CLIPTextEncode", clip=g.out(clip), text="a photo of a person")
    neg = g.add("CLIPTextEncode", clip=g.out(clip), text="")
    latent = g.add("EmptyLatentImage", width=64, height=64, batch_size=1)
    patched = g.add(
        "IdentityAttentionTestKit_DummyStage", model=g.out(unet), kind="add_tanh_q", weight=0.5, start_percent=0.0, end_percent=1.0, apply_to="both"
    )
    sampled = g.add(
        "KSampler",
        model=g.out(patched),
        seed=3,
        steps=2,
        cfg=5.0,
        sampler_name="euler",
        scheduler="normal",
        positive=g.out(pos),
        negative=g.out(neg),
        latent_image=g.out(latent),
        denoise=1.0,
    )
    decoded = g.add("VAEDecode", samples=g.out(sampled), vae=g.out(vae))
    g.add("SaveImage", images=g.out(decoded), filename_prefix="real_loaders")
    info = g.add("IdentityAttentionModelInfo", model=g.out(patched))
    entry = server.run(g.prompt())
    assert len(server.output_files(entry, "images")) == 1
