"""Dual-Pivot stage 2 (nodes/training/restoration_training.py): the restoration_guide target on the micro SDXL model, on CPU.

The guide is the host's ControlNet: zero before training, equal to the host's own ControlNet at
sampling time, trained on degraded -> clean pairs under the fixed pivot prompt, exact on resume,
written as a file the host's Load ControlNet reads, and the generative model never changes.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from safetensors.torch import load_file

import training_data_fixtures as tdf
from conftest import pack
from training_fixtures import assert_same, photos, snapshot

trainer_mod = pack("nodes.training.trainer")
rt = pack("nodes.training.restoration_training")
targets_mod = pack("nodes.training.training_targets")

PIVOT = "a photo of sks person"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tdf.make_folder(tmp_path_factory.mktemp("restore") / "data", identities=2, per_identity=1)


@pytest.fixture(scope="module")
def models():
    return tdf.tiny_models("sdxl", 0)


def guide_config(tmp_path, folder, steps=2, out="out", **target):
    return tdf.write_config(
        tmp_path / f"{out}.json",
        models={"factory": "training_data_fixtures:tiny_models"},
        data={"folder": str(folder), "resolution": 64, "caption": "photo of a person"},
        targets={"restoration_guide": {"pivot_prompt": PIVOT, "seed": 3, **target}},
        train={"steps": steps, "batch_size": 1, "grad_accum": 1, "time_resample": 1, "learning_rate": 1e-3, "log_every": 1, "checkpoint_every": 0, "condition_dropout": 0},
        output={"dir": str(tmp_path / out), "name": "guide"},
    )


def inputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 8, 8, generator=g) * 2
    sigma = torch.tensor([2.0])
    hint = torch.rand(1, 3, 64, 64, generator=g)
    context = torch.randn(1, 77, 2048, generator=g)
    y = torch.randn(1, 2816, generator=g)
    return x, sigma, hint, context, y


def unet_out(model, x, sigma, context, y, options=None, control=None):
    import comfy.model_management

    comfy.model_management.load_models_gpu([model])
    opts = dict(model.model_options.get("transformer_options", {}) if options is None else options)
    opts["cond_or_uncond"] = [0]
    return model.model.apply_model(x, sigma, c_crossattn=context, control=control, transformer_options=opts, y=y).float()


def test_guide_from_the_unet_copies_its_encoder_and_adds_nothing_before_training(models):
    model = models[0]
    target = targets_mod.TARGETS["restoration_guide"](model, None, {}, seed=0, caption="x")
    sd = target.module.state_dict()
    unet = model.model.diffusion_model.state_dict()
    assert torch.equal(sd["input_blocks.1.0.in_layers.2.weight"].float(), unet["input_blocks.1.0.in_layers.2.weight"].float())
    assert all(float(v.abs().max()) == 0 for k, v in sd.items() if k.startswith(("zero_convs.", "middle_block_out.")))
    feed = targets_mod.TrainingFeed()
    patched = target.install(model, feed)
    x, sigma, hint, context, y = inputs(model)
    feed.extras["restoration_hint"] = hint
    with torch.no_grad():
        target.before_forward(feed, x, sigma, context, y)
        with_guide = unet_out(patched, x, sigma, context, y)
        plain = unet_out(model, x, sigma, context, y)
    assert feed.extras[rt.CONTROL_KEY]["next"] == len(model.model.diffusion_model.output_blocks)
    assert torch.equal(with_guide, plain)  # zero convolutions zero: bit for bit the unpatched model
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in target.module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
        target.before_forward(feed, x, sigma, context, y)
        assert not torch.equal(unet_out(patched, x, sigma, context, y), plain)
        target.strength = 0.0  # strength 0: bit for bit the unpatched model again
        target.before_forward(feed, x, sigma, context, y)
        assert torch.equal(unet_out(patched, x, sigma, context, y), plain)


def test_training_path_equals_the_hosts_controlnet_at_sampling_time(tmp_path, models):
    import comfy.controlnet

    model = models[0]
    target = targets_mod.TARGETS["restoration_guide"](model, None, {"save_dtype": "float32"}, seed=0, caption="x")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in target.module.parameters():  # a trained-looking guide: every weight non-zero
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    tensors, header = target.export_files("sdxl", 2048)[""]
    path = tmp_path / "guide.safetensors"
    pack("adapters.weights.write_paths").write_safetensors(str(path), tensors, metadata=header)
    x, sigma, hint, context, y = inputs(model, seed=1)
    feed = targets_mod.TrainingFeed()
    patched = target.install(model, feed)
    feed.extras["restoration_hint"] = hint
    with torch.no_grad():
        target.before_forward(feed, x, sigma, context, y)
        ours = unet_out(patched, x, sigma, context, y)
        host = comfy.controlnet.load_controlnet(str(path)).copy().set_cond_hint(hint, 1.0)
        host.pre_run(model.model, lambda p: 999.0 * (1 - p))
        args = (x, sigma, {"c_crossattn": context, "y": y}, 1)
        takes_options = "transformer_options" in inspect.signature(host.get_control).parameters  # hosts of 2025 on
        control = host.get_control(*args, {}) if takes_options else host.get_control(*args)
        theirs = unet_out(model, x, sigma, context, y, control=control)
        plain = unet_out(model, x, sigma, context, y)
    assert not torch.allclose(theirs, plain, atol=1e-3)
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4), float((ours - theirs).abs().max())


def test_batch_inputs_fix_the_pivot_prompt_and_degrade_per_position():
    target = rt.RestorationGuideTarget(None, torch.nn.Linear(1, 1), pivot_prompt=PIVOT, seed=4)
    images = photos(2, 32)
    batch = {"images": images, "captions": ["a close-up photo", "x"], "positions": [7, 8]}
    out = target.batch_inputs(batch, 2)
    assert batch["captions"] == [PIVOT, PIVOT]
    hint = out["restoration_hint"]
    assert hint.shape == (4, 3, 32, 32) and torch.equal(hint[0], hint[1])
    again = pack("adapters.training.degradation").degrade(images[1:], 4, indices=[8])[0]
    assert torch.equal(hint[2], again[0].permute(2, 0, 1))


def test_guide_trains_resumes_exactly_writes_a_controlnet_file_and_the_model_stays_fixed(tmp_path, folder, models):
    import comfy.controlnet

    model = models[0]
    before = snapshot(model.model.diffusion_model)
    whole = trainer_mod.run(str(guide_config(tmp_path, folder, out="whole")), models=models)
    assert_same(before, snapshot(model.model.diffusion_model))  # the generative pivot is fixed
    init = targets_mod.TARGETS["restoration_guide"](model, None, {"seed": 3}, seed=0, caption="x").module.state_dict()
    trained = whole.targets[0].module.state_dict()
    changed = [k for k in init if not torch.equal(init[k], trained[k])]
    assert any(k.startswith("zero_convs.") for k in changed) and any(k.startswith("input_blocks.") for k in changed)
    assert whole.targets[0].pivot_prompt == PIVOT
    mb = whole._micro_batch(0, 0)
    assert set(mb.captions) == {PIVOT} and mb.extras["restoration_hint"].shape == (1, 3, 64, 64)

    cfg = guide_config(tmp_path, folder, out="parts")
    trainer_mod.run(str(cfg), stop_at=1, models=models)
    parts = trainer_mod.run(str(cfg), resume=str(tmp_path / "parts"), models=models)
    assert parts.step == 2 and parts.history == whole.history
    a, b = load_file(str(tmp_path / "whole" / "guide.safetensors")), load_file(str(tmp_path / "parts" / "guide.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    loaded = comfy.controlnet.load_controlnet(str(tmp_path / "whole" / "guide.safetensors"))  # the host's Load ControlNet
    sd = loaded.control_model.state_dict()
    assert set(sd) == {k[len(rt.CONTROLNET_PREFIX):] for k in a}
    assert all(torch.equal(sd[k].to(torch.float16).cpu(), a[rt.CONTROLNET_PREFIX + k]) for k in sd)


def test_a_bad_starting_controlnet_is_refused_with_what_to_do(tmp_path, models):
    with pytest.raises(FileNotFoundError, match="restoration_guide"):
        targets_mod.TARGETS["restoration_guide"](models[0], None, {"controlnet": "missing.safetensors"}, config_dir=str(tmp_path))
    with pytest.raises(ValueError, match="save_dtype"):
        targets_mod.TARGETS["restoration_guide"](models[0], None, {"save_dtype": "int8"})


def test_guide_starts_from_a_controlnet_file_through_the_hosts_loader(tmp_path, models):
    from testkit.tiny_controlnet import tiny_controlnet_state_dict, write_tiny_controlnet

    path = write_tiny_controlnet(str(tmp_path / "tile.safetensors"), arch="sdxl", seed=21)
    target = targets_mod.TARGETS["restoration_guide"](models[0], None, {"controlnet": "tile.safetensors"}, config_dir=str(tmp_path))
    want = tiny_controlnet_state_dict("sdxl", seed=21)
    got = target.module.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k].to(torch.float16), want[k]) for k in want) and all(v.dtype == torch.float32 for v in got.values())
    assert all(p.requires_grad for p in target.module.parameters())
    assert path.endswith("tile.safetensors")


def test_a_lora_prior_is_on_the_fixed_model_and_never_trains(tmp_path, folder, models):
    from harness.provisioning import lora_state
    from safetensors.torch import save_file

    save_file(lora_state("sdxl", seed=2), str(tmp_path / "pivot_lora.safetensors"))
    model = models[0]
    target = targets_mod.TARGETS["restoration_guide"](model, None, {"lora": "pivot_lora.safetensors", "lora_strength": 1.0}, config_dir=str(tmp_path))
    feed = targets_mod.TrainingFeed()
    patched = target.install(model, feed)
    assert len(patched.patches) > 0 and len(model.patches) == 0  # on a clone: the upstream MODEL is untouched
    x, sigma, hint, context, y = inputs(model, seed=3)
    feed.extras["restoration_hint"] = hint
    with torch.no_grad():
        target.before_forward(feed, x, sigma, context, y)
        with_lora = unet_out(patched, x, sigma, context, y)
        plain = unet_out(model, x, sigma, context, y)
    assert not torch.allclose(with_lora, plain)
    before = snapshot(model.model.diffusion_model)
    trainer = trainer_mod.run(str(guide_config(tmp_path, folder, steps=1, out="lora", lora=str(tmp_path / "pivot_lora.safetensors"))), models=models)
    assert_same(before, snapshot(model.model.diffusion_model))
    names = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert names == {id(p) for p in trainer.targets[0].module.parameters()}  # only the guide is optimized
