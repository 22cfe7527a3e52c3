"""PVA's per-identity personalization on the tiny models, in-process (the node's work without the server)."""

from __future__ import annotations

import pytest
import torch

from conftest import pack
from training_fixtures import all_inference, assert_same, fixed_batch, identity, inference_models, photos, snapshot, tiny_pva_adapter, x0_prediction

pers = pack("nodes.training.personalization")
pt = pack("nodes.dispatch.prompt_token")
du = pack("nodes.dispatch.differentiable_unet")
losses_mod = pack("adapters.training.training_losses")
Recipe = pack("adapters.training.training_schedule").PersonalizeRecipe
ApplyParallelAttention = pack("nodes.pva.parallel_attention_nodes").ApplyParallelAttention
TEMPLATE = "photo of a <new1> person"


@pytest.fixture(scope="module")
def setup():
    model, clip, vae = inference_models("sd15", seed=0)
    return {"model": model, "clip": clip, "vae": vae, "adapter": tiny_pva_adapter(model), "identity": identity(2), "images": photos(2)}


def run(s, steps=2, seed=0, progress=None, **kw):
    recipe = Recipe(steps=steps, learning_rate=kw.pop("learning_rate", 1e-3), token_learning_rate=kw.pop("token_learning_rate", 1e-2), seed=seed, **kw.pop("recipe", {}))
    with torch.inference_mode():  # as in a prompt
        return pers.personalize_identity(s["model"], s["clip"], s["vae"], kw.pop("images", s["images"]), kw.pop("adapter", s["adapter"]), s["identity"], recipe=recipe, resolution=64, progress=progress, **kw)


@pytest.fixture(scope="module")
def two_steps(setup):
    before = snapshot(setup["model"].model, setup["clip"].cond_stage_model, setup["vae"].first_stage_model, setup["adapter"].projector)
    adapter_layers = {k: {n: t.clone() for n, t in v.items()} for k, v in setup["adapter"].layers.items()}
    result = run(setup, steps=2, seed=7)
    return result, before, adapter_layers


def apply_joint(model, adapter, ident):
    with torch.inference_mode():
        return ApplyParallelAttention().apply(model, adapter, ident, 1.0, 0.0, 1.0, "both", "joint", "adapter", "fused")[0]


def prompt_context(clip, vectors):
    with torch.inference_mode():
        return pt.encode_prompt(clip, TEMPLATE, vectors)[0][0]


def test_only_the_visual_projections_and_the_token_change(setup, two_steps):
    result, before, adapter_layers = two_steps
    s = setup
    # the model, text encoder, VAE and the input adapter are bit-identical, still inference tensors
    assert_same(before, snapshot(s["model"].model, s["clip"].cond_stage_model, s["vae"].first_stage_model, s["adapter"].projector))
    assert all(torch.equal(s["adapter"].layers[k][n], t) for k, v in adapter_layers.items() for n, t in v.items())
    assert all_inference(s["model"].model)
    # the result: every layer's visual q/k/v moved, nothing else
    out = result.adapter
    assert out.format == "native" and out.mechanism == "joint" and out.base == "sd15"
    assert set(out.layers) == set(adapter_layers)
    for key, entries in out.layers.items():
        assert set(entries) == {"to_q", "to_k", "to_v"}
        for name in ("to_q", "to_k", "to_v"):
            assert entries[name].shape == adapter_layers[key][name].shape
            assert not torch.equal(entries[name], adapter_layers[key][name].float()), (key, name)
    assert out.projector is s["adapter"].projector  # frozen identity transformer, shared
    assert set(result.vectors) == {"l"} and result.vectors["l"].abs().sum() > 0  # the token left zero
    assert torch.equal(out.extras["modifier_vec.l"], result.vectors["l"])
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))


def test_same_seed_same_adapter(setup, two_steps):
    again = run(setup, steps=2, seed=7)
    first = two_steps[0]
    assert first.losses == again.losses
    for key, entries in first.adapter.layers.items():
        for name, t in entries.items():
            assert torch.equal(t, again.adapter.layers[key][name])
    other = run(setup, steps=1, seed=8)
    assert other.losses[0] != first.losses[0]


def test_training_computes_what_the_inference_node_computes(setup):
    """At the start, the training forward equals 'Apply parallel visual attention' (joint, adapter projections)."""
    s = setup
    model, adapter = s["model"], s["adapter"]
    x0, sigma, eps = fixed_batch(model, s["vae"])
    context = prompt_context(s["clip"], {"l": torch.zeros(768)})
    expected = x0_prediction(apply_joint(model, adapter, s["identity"]), x0, sigma, eps, context)
    target = pack("nodes.training.pva_training").PVATarget(model, adapter)
    feed = pack("nodes.training.training_targets").TrainingFeed()
    with torch.inference_mode():
        feed.tokens = du.as_normal(adapter.identity_tokens(s["identity"]).cond)
        clone = du.differentiable_clone(target.install(model, feed), checkpoint=False)
        with torch.inference_mode(False), torch.no_grad(), du.TrainingModels([clone]):
            ours = du.predict_x0(clone, du.as_normal(x0 + sigma.reshape(-1, 1, 1, 1) * eps), du.as_normal(sigma), du.as_normal(context).expand(2, -1, -1))
    assert torch.allclose(ours, expected, atol=1e-5, rtol=1e-5)
    unpatched = x0_prediction(model, x0, sigma, eps, context)
    assert not torch.allclose(unpatched, expected, atol=1e-4)


def test_a_few_steps_lower_the_loss_on_a_fixed_batch(setup):
    """Measured through the inference path: the trained adapter with 'Apply parallel visual attention' and the learned word."""
    s = setup
    image = photos(1, seed=123)
    x0, sigma, eps = fixed_batch(s["model"], s["vae"], seed=123)
    result = run(s, steps=8, seed=1, images=image, learning_rate=3e-3, token_learning_rate=3e-2, recipe={"background_weight": 1.0})

    def loss(adapter, vectors):
        pred = x0_prediction(apply_joint(s["model"], adapter, s["identity"]), x0, sigma, eps, prompt_context(s["clip"], vectors))
        return float(losses_mod.denoising_loss(pred, x0 + sigma.reshape(-1, 1, 1, 1) * eps, sigma, eps))

    before = loss(s["adapter"], {"l": torch.zeros(768)})
    after = loss(result.adapter, result.vectors)
    assert after < before * 0.95, (before, after, result.losses)


def test_adapter_without_projections_starts_as_copies_of_the_layers(setup):
    s = setup
    bare = tiny_pva_adapter(s["model"], with_layers=False)
    result = run(s, steps=1, adapter=bare, learning_rate=0.0, token_learning_rate=0.0)
    assert result.copied_layers == 16
    diffusion = s["model"].model.diffusion_model
    for info in pack("nodes.common.host").cross_attention_layers(s["model"]):
        attn2 = diffusion.get_submodule(info.module_path).attn2
        for name in ("to_q", "to_k", "to_v"):
            assert torch.equal(result.adapter.layers[info.key][name], getattr(attn2, name).weight.float())


def test_inpainting_model_trains_with_a_masked_image_input():
    model, clip, vae = inference_models("sd15", seed=3, in_channels=9)
    s = {"model": model, "clip": clip, "vae": vae, "adapter": tiny_pva_adapter(model), "identity": identity(1), "images": photos(1)}
    assert pers.is_inpainting(model)
    masks = torch.zeros(1, 64, 64)
    masks[:, 16:48, 20:44] = 1.0
    result = run(s, steps=1, masks=masks)
    assert torch.isfinite(torch.tensor(result.losses)).all()
    assert any(not torch.equal(result.adapter.layers[k]["to_q"], s["adapter"].layers[k]["to_q"]) for k in result.adapter.layers)


@pytest.mark.slow
def test_sdxl_trains_all_70_layers():
    model, clip, vae = inference_models("sdxl", seed=0)
    s = {"model": model, "clip": clip, "vae": vae, "adapter": tiny_pva_adapter(model), "identity": identity(1), "images": photos(1)}
    result = run(s, steps=1, recipe={"grad_accum": 1, "time_resample": 1}, gradient_checkpointing=True)
    assert len(result.adapter.layers) == 70 and result.adapter.base == "sdxl"
    assert torch.isfinite(torch.tensor(result.losses)).all()
    assert all(not torch.equal(result.adapter.layers[k]["to_k"], s["adapter"].layers[k]["to_k"]) for k in result.adapter.layers)


def test_interrupt_leaves_everything_clean_and_a_rerun_is_exact(setup, two_steps):
    import comfy.model_management as mm

    s = setup
    before = snapshot(s["model"].model, s["clip"].cond_stage_model)
    x0, sigma, eps = fixed_batch(s["model"], s["vae"])
    context = prompt_context(s["clip"], {"l": torch.zeros(768)})
    upstream = x0_prediction(s["model"], x0, sigma, eps, context)

    def interrupt(step, total, loss, losses):
        mm.interrupt_current_processing(True)  # what ComfyUI's Cancel button does

    with pytest.raises(mm.InterruptProcessingException):
        run(s, steps=2, seed=7, progress=interrupt)
    assert_same(before, snapshot(s["model"].model, s["clip"].cond_stage_model))
    assert all_inference(s["model"].model) and all_inference(s["clip"].cond_stage_model)
    assert all(type(m).__name__ not in ("TrainingBlock", "PlaceholderEmbedding", "TrainingCLIPLayer") for m in s["model"].model.modules())
    assert all(type(m).__name__ not in ("PlaceholderEmbedding", "TrainingCLIPLayer") for m in s["clip"].cond_stage_model.modules())
    assert torch.equal(x0_prediction(s["model"], x0, sigma, eps, context), upstream)
    rerun = run(s, steps=2, seed=7)
    assert rerun.losses == two_steps[0].losses


def test_saved_adapter_loads_through_the_weights_loader_and_patches(setup, two_steps, tmp_path):
    s = setup
    result = two_steps[0]
    native = pack("adapters.formats.native_format")
    convert = pack("adapters.formats.weight_formats").convert
    read = pack("adapters.weights.safe_load").read_weight_file
    path = str(tmp_path / "person.safetensors")
    native.write_native(result.adapter, path)
    loaded_file = read(path)
    loaded = convert(loaded_file.tensors, loaded_file.metadata, source="person.safetensors")
    assert loaded.format == "native" and loaded.mechanism == "joint"
    pack("adapters.formats.weight_formats").check_against_model(loaded, pack("nodes.common.host").cross_attention_layers(s["model"]))
    assert torch.equal(loaded.extras["modifier_vec.l"], result.vectors["l"])
    x0, sigma, eps = fixed_batch(s["model"], s["vae"])
    context = prompt_context(s["clip"], result.vectors)
    in_memory = x0_prediction(apply_joint(s["model"], result.adapter, s["identity"]), x0, sigma, eps, context)
    from_file = x0_prediction(apply_joint(s["model"], loaded, s["identity"]), x0, sigma, eps, context)
    assert torch.equal(from_file, in_memory)
    assert not torch.equal(from_file, x0_prediction(s["model"], x0, sigma, eps, context))
    # the learned word through the prompt node
    IdentityPrompt = pack("nodes.training.prompt_token_nodes").IdentityPrompt
    with torch.inference_mode():
        cond = IdentityPrompt().encode(s["clip"], loaded, TEMPLATE)[0]
    assert torch.equal(cond[0][0], context)


def test_square_crop_is_centred_on_the_face_and_stays_inside_the_photo():
    crop = pack("adapters.training.training_masks").square_crop_resize
    images = torch.rand(3, 40, 100, 3, generator=torch.Generator().manual_seed(0))
    out = crop(images, 40, [(20.0, 10.0), None, (5.0, 90.0)])
    assert torch.equal(out[0], images[0, :, 0:40])  # face at the left edge: the square starts at the edge
    assert torch.equal(out[1], images[1, :, 30:70])  # no face: the middle
    assert torch.equal(out[2], images[2, :, 60:100])  # face at the right edge
    assert torch.equal(crop(images, 40), images[:, :, 30:70])
    mid = crop(images[:1], 40, [(20.0, 45.0)])
    assert torch.equal(mid[0], images[0, :, 25:65])


def test_training_photos_are_cropped_around_the_face_mask(setup, monkeypatch):
    """A face at the left edge of a wide photo stays in the training crop (a centre crop would cut it off)."""
    s = setup
    wide = torch.rand(2, 64, 160, 3, generator=torch.Generator().manual_seed(4))
    masks = torch.zeros(2, 64, 160)
    masks[0, 20:40, 4:24] = 1.0  # photo 1: face at the left edge
    masks[1, 20:40, 130:150] = 1.0  # photo 2: face at the right edge
    seen = []
    encode = pers.encode_latents

    def spy(vae, model, pixels, batch=4):
        seen.append(pixels.clone())
        return encode(vae, model, pixels, batch)

    monkeypatch.setattr(pers, "encode_latents", spy)
    run(s, steps=1, images=wide, masks=masks, learning_rate=0.0, token_learning_rate=0.0)
    assert torch.equal(seen[0][0], wide[0, :, 0:64]) and torch.equal(seen[0][1], wide[1, :, 96:160])
    seen.clear()
    run(s, steps=1, images=wide, learning_rate=0.0, token_learning_rate=0.0)
    assert torch.equal(seen[0], wide[:, :, 48:112])  # without masks: the middle
