"""Bounded memory for training (issue 21, class 6): checkpointing on every device, an estimate before
anything is computed, and a refusal that names the resolution that fits."""

from __future__ import annotations

import pytest
import torch

from conftest import pack
from training_fixtures import identity, inference_models, photos, tiny_pva_adapter

pers = pack("nodes.training.personalization")
errors = pack("nodes.common.errors")
Recipe = pack("adapters.training.training_schedule").PersonalizeRecipe


@pytest.fixture(scope="module")
def setup():
    model, clip, vae = inference_models("sd15", seed=0)
    return {"model": model, "clip": clip, "vae": vae, "adapter": tiny_pva_adapter(model), "identity": identity(2), "images": photos(2)}


def _budget_for(model, resolution, checkpoint=True):
    return pers.training_bytes(model, 2, (resolution // 8, resolution // 8), checkpoint) + int(model.model_size())


@pytest.mark.parametrize("resolution,fits", [(1024, 512), (2048, 1024), (512, 256), (2048, 128)])
def test_a_run_that_cannot_fit_is_refused_before_training_naming_the_resolution(setup, monkeypatch, resolution, fits):
    import comfy.model_management as mm

    model = setup["model"]
    budget = _budget_for(model, fits)
    monkeypatch.setattr(mm, "get_total_memory", lambda *a, **k: budget)
    called = []
    monkeypatch.setattr(pers, "encode_latents", lambda *a, **k: called.append(1))
    recipe = Recipe(steps=1, time_resample=2)
    with pytest.raises(errors.IdentityAttentionError) as info:
        with torch.inference_mode():
            pers.personalize_identity(model, setup["clip"], setup["vae"], setup["images"], setup["adapter"], setup["identity"], recipe=recipe, resolution=resolution)
    assert info.value.input_name == "resolution" and f"use resolution {fits} or lower" in str(info.value)
    assert not called  # refused before any VAE or training work


def test_the_estimate_grows_with_resolution_and_checkpointing_halves_nothing_else(setup):
    model = setup["model"]
    sizes = [pers.training_bytes(model, 2, (r // 8, r // 8), True) for r in (256, 512, 1024)]
    assert sizes[0] < sizes[1] < sizes[2]
    assert abs(pers.training_bytes(model, 2, (64, 64), False) - 3 * pers.training_bytes(model, 2, (64, 64), True)) <= 3


def test_checkpointing_is_on_by_default_on_every_device(setup, monkeypatch):
    seen = []
    real = pers.differentiable_clone

    def spy(model, checkpoint=False):
        seen.append(checkpoint)
        return real(model, checkpoint=checkpoint)

    monkeypatch.setattr(pers, "differentiable_clone", spy)
    with torch.inference_mode():
        pers.personalize_identity(setup["model"], setup["clip"], setup["vae"], setup["images"], setup["adapter"], setup["identity"],
                                  recipe=Recipe(steps=1, grad_accum=1, time_resample=1), resolution=64)
    assert seen == [True] and setup["model"].load_device.type == "cpu"
