"""The trainer's ``pva`` target on the tiny Flux.1 (nodes/training/flux_training.py): PVA's identity transformer
trained through joint identity attention with the rectified-flow loss.

Checked: the loss convention against the host's CONST sampling and a float64 reference; the training
forward equals the inference node's joint identity attention; the norm-on-copy clone is the unpatched
model bit for bit and makes Flux back-propagatable; gradients reach the projector and the loss on a fixed
micro-batch goes down; resume reproduces the uninterrupted run; the file loads in *Apply parallel visual
attention* on Flux and changes its output; the refusals. UNet targets: tests/test_trainer.py.
"""

from __future__ import annotations

import copy

import pytest
import torch

import training_data_fixtures as tdf
from conftest import pack
from testkit import tiny_flux
from training_fixtures import identity

pytestmark = pytest.mark.skipif(not tiny_flux.flux_available(), reason=tiny_flux.SKIP_REASON)

T_ID = 3


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tdf.make_folder(tmp_path_factory.mktemp("flux_train") / "data")


@pytest.fixture(scope="module")
def models():
    return tdf.tiny_flux_models(0)


def flux_config(tmp_path, folder, steps=4, out="out", caption="photo of a person", targets=None, **train):
    return tdf.write_config(
        tmp_path / f"{out}.json",
        models={"factory": "training_data_fixtures:tiny_flux_models"},
        data={"folder": str(folder), "resolution": 64, "caption": caption, "max_references": 2},
        targets=targets or {"pva": {"tokens": T_ID, "layers": 1, "ff_dim": 64, "heads": 2}},
        train={"steps": steps, "batch_size": 2, "grad_accum": 2, "learning_rate": 1e-3, "log_every": 1, "checkpoint_every": 0, **train},
        output={"dir": str(tmp_path / out), "name": "flux_pva"},
    )


def run_model(model, x, t, context, y, guidance, grad=False):
    """One diffusion-model call with the MODEL's options and wrappers, as the sampler passes them."""
    options = copy.copy(model.model_options.get("transformer_options", {}))
    options["cond_or_uncond"] = [0] * x.shape[0]
    options["wrappers"] = model.wrappers
    with torch.enable_grad() if grad else torch.no_grad():
        return model.model.apply_model(x, t, c_crossattn=context, y=y, guidance=guidance, transformer_options=options)


def test_flow_loss_follows_the_hosts_const_sampling_and_a_float64_reference():
    import comfy.model_sampling

    losses = pack("adapters.training.training_losses")
    gen = torch.Generator().manual_seed(0)
    x0, noise, v_hat = (torch.randn(2, 16, 4, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    sigma = torch.tensor([0.3, 0.8], dtype=torch.float64)
    weight = torch.rand(2, 1, 4, 4, generator=gen, dtype=torch.float64)

    class Const(comfy.model_sampling.CONST, comfy.model_sampling.ModelSamplingFlux):
        pass

    host = Const()
    x_t = losses.flow_noisy(x0, sigma, noise)
    assert torch.allclose(x_t, host.noise_scaling(sigma, noise, x0), atol=1e-12)  # x_t = (1 - s) x0 + s noise
    x0_hat = host.calculate_denoised(sigma, v_hat, x_t)  # what apply_model returns for a velocity v_hat
    err = (v_hat - (noise - x0)) ** 2
    assert torch.allclose(losses.flow_matching_loss(x0_hat, x_t, sigma, x0, noise), err.mean().float(), rtol=1e-6)
    weighted = (err * weight).sum() / (weight.sum() * 16)
    assert torch.allclose(losses.flow_matching_loss(x0_hat, x_t, sigma, x0, noise, weight), weighted.float(), rtol=1e-6)
    flux = tiny_flux.build_flux(0)
    assert pack("nodes.training.flux_training").is_rectified_flow(flux) and not pack("nodes.training.flux_training").is_rectified_flow(tdf.tiny_models("sd15", 0)[0])


def test_training_forward_is_the_inference_nodes_joint_attention_and_norm_copies_change_nothing():
    ft = pack("nodes.training.flux_training")
    dispatcher = pack("nodes.dispatch.dispatcher")
    dit_dispatcher = pack("nodes.dispatch.dit_dispatcher")
    joint = pack("nodes.pva.dit_joint_identity")
    layout = pack("nodes.common.dit_layout")
    IdentityTokens = pack("adapters.projectors.id_adapter").IdentityTokens
    targets = pack("nodes.training.training_targets")
    flux = tiny_flux.build_flux(0)
    gen = torch.Generator().manual_seed(5)
    tok = torch.randn(2, T_ID, tiny_flux.CONTEXT, generator=gen)  # one identity per row
    x, t, c, y, g = tiny_flux.flux_inputs(1, batch=2)

    feed = targets.TrainingFeed(tokens=tok)
    trained = dit_dispatcher.apply_dit_stage(ft.autograd_safe_flux(flux), ft.TrainableFluxJointStage(flux, feed))
    trained.patch_model()
    try:
        out = run_model(trained, x, t, c, y, g)
        out_grad = run_model(trained, x, t, c, y, g, grad=True)  # the norm copies act only while recording
    finally:
        trained.unpatch_model()
    for row in range(2):
        ident = IdentityTokens(cond=tok[row : row + 1], uncond=tok[row : row + 1])
        stage = joint.DitJointIdentityStage(dispatcher.StageSchedule(weight=1.0), ident, lambda z: layout.identity_hidden(flux, z))
        node = dit_dispatcher.apply_dit_stage(flux, stage)
        ref = run_model(node, x[row : row + 1], t[row : row + 1], c[row : row + 1], y[row : row + 1], g[row : row + 1])
        assert torch.allclose(out[row : row + 1], ref, atol=1e-5, rtol=1e-5), (out[row] - ref[0]).abs().max()
    assert torch.equal(out, out_grad)
    plain = run_model(flux, x, t, c, y, g)
    assert not torch.allclose(out, plain)  # the identity tokens take part
    # the upstream MODEL has no norm copies and no stage
    assert not any(type(m).__name__ == "NormOnCopy" for m in flux.model.diffusion_model.modules())
    assert "patches_replace" not in flux.model_options.get("transformer_options", {})


def test_gradients_reach_the_projector_and_the_loss_on_a_fixed_batch_goes_down(tmp_path, models):
    trainer_mod = pack("nodes.training.trainer")
    one = tdf.make_folder(tmp_path / "one", identities=1, per_identity=2, seed=3)
    cfg = flux_config(tmp_path, one, steps=8, out="down", grad_accum=1, condition_dropout=0, learning_rate=1e-2)
    tr = trainer_mod.Trainer(trainer_mod.load_config(str(cfg)), models, config_dir=str(tmp_path))
    try:
        target = tr.targets[0]
        assert type(target).__name__ == "FluxPVATarget" and tr.flow and tr.base == "flux"
        mb = tr._micro_batch(0, 0)
        tr.samples = 0
        with torch.inference_mode(False), torch.enable_grad(), tr.models:
            value, _ = tr.ddp(mb)
            value.backward()
            before = float(value.detach())
        grads = [p.grad for p in target.projector.parameters()]
        assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
        tr.optimizer.zero_grad(set_to_none=True)
        tr.train(progress=False)
        with torch.inference_mode(False), torch.no_grad(), tr.models:
            after = float(tr._loss(mb)[0])
    finally:
        tr.close()
    assert after < before, (before, after, tr.history["loss"])


def test_resume_reproduces_the_uninterrupted_run_and_the_file_loads_in_apply_parallel_attention(tmp_path, folder, models):
    from safetensors.torch import load_file

    from training_fixtures import assert_same, snapshot

    trainer_mod = pack("nodes.training.trainer")
    flux = models[0]
    x, t, c, y, g = tiny_flux.flux_inputs(3)
    weights, options, plain = snapshot(flux.model.diffusion_model), copy.deepcopy(flux.model_options), run_model(flux, x, t, c, y, g)
    whole = trainer_mod.run(str(flux_config(tmp_path, folder, out="whole")), models=models)
    # the upstream MODEL is as before: weights, options, modules (no norm copies left), output
    assert_same(weights, snapshot(flux.model.diffusion_model))
    assert flux.model_options.keys() == options.keys() and "patches_replace" not in flux.model_options.get("transformer_options", {})
    assert not any(type(m).__name__ == "NormOnCopy" for m in flux.model.diffusion_model.modules())
    assert torch.equal(run_model(flux, x, t, c, y, g), plain)
    cfg = flux_config(tmp_path, folder, out="parts")
    trainer_mod.run(str(cfg), stop_at=2, models=models)
    second = trainer_mod.run(str(cfg), resume=str(tmp_path / "parts"), models=models)
    assert second.step == 4 and second.history == whole.history
    a = load_file(str(tmp_path / "whole" / "flux_pva.safetensors"))
    b = load_file(str(tmp_path / "parts" / "flux_pva.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(k.startswith("projector.") for k in a)  # no layer projections on Flux

    read = pack("adapters.weights.safe_load").read_weight_file(str(tmp_path / "whole" / "flux_pva.safetensors"))
    adapter = pack("adapters.formats.weight_formats").convert(read.tensors, read.metadata)
    assert adapter.base == "flux" and adapter.mechanism == "joint" and adapter.token_dim == tiny_flux.CONTEXT
    ApplyParallelAttention = pack("nodes.pva.parallel_attention_nodes").ApplyParallelAttention
    with torch.inference_mode():
        patched = ApplyParallelAttention().apply(flux, adapter, identity(2), 1.0, 0.0, 1.0, "both", "joint", "layer", "per_reference")[0]
    assert not torch.allclose(run_model(patched, x, t, c, y, g), run_model(flux, x, t, c, y, g))


def test_flux_refuses_the_prompt_word_and_unet_only_targets(tmp_path, folder, models):
    trainer_mod = pack("nodes.training.trainer")
    errors = pack("nodes.common.errors")
    with pytest.raises(errors.IdentityAttentionError, match="<new1>"):
        trainer_mod.Trainer(trainer_mod.load_config(str(flux_config(tmp_path, folder, out="word", caption="photo of a <new1> person"))), models, config_dir=str(tmp_path))
    cfg = flux_config(tmp_path, folder, out="router", targets={"router": {"hidden": 8}})
    with pytest.raises(ValueError, match="only 'pva'"):
        trainer_mod.Trainer(trainer_mod.load_config(str(cfg)), models, config_dir=str(tmp_path))


def test_gradient_checkpointing_of_flux_blocks_gives_the_same_loss_and_gradients(tmp_path, folder, models):
    trainer_mod = pack("nodes.training.trainer")
    results = {}
    for mode in (False, True):
        cfg = flux_config(tmp_path, folder, out=f"ckpt_{mode}", grad_accum=1, gradient_checkpointing=mode)
        tr = trainer_mod.Trainer(trainer_mod.load_config(str(cfg)), models, config_dir=str(tmp_path))
        try:
            wrapped = [type(p).__name__ for p in tr.unet.model_options["transformer_options"]["patches_replace"]["dit"].values()]
            assert (set(wrapped) == {"CheckpointedBlock"}) == mode and len(wrapped) == tiny_flux.DEPTH + tiny_flux.DEPTH_SINGLE
            mb = tr._micro_batch(0, 0)
            with torch.inference_mode(False), torch.enable_grad(), tr.models:
                value, _ = tr.ddp(mb)
                value.backward()
            results[mode] = (value.detach(), [p.grad.clone() for p in tr.targets[0].projector.parameters()])
        finally:
            tr.close()
    (loss_a, grads_a), (loss_b, grads_b) = results[False], results[True]
    assert torch.equal(loss_a, loss_b)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(grads_a, grads_b))
    assert sum(float(g.abs().sum()) for g in grads_b) > 0


def test_split_text_encoders_of_a_flux_model_load_as_flux(models):
    import comfy.sd

    trainer_models = pack("nodes.training.trainer_models")
    assert trainer_models.clip_type(None, models[0]) == comfy.sd.CLIPType.FLUX  # CLIP-L + T5-XXL, as DualCLIPLoader "flux"
    assert trainer_models.clip_type(None, tdf.tiny_models("sd15", 0)[0]) is None  # ComfyUI's default
    assert trainer_models.clip_type("SD3", models[0]) == comfy.sd.CLIPType.SD3
    with pytest.raises(ValueError, match="clip_type"):
        trainer_models.clip_type("t5-only", models[0])
