"""Gradients through ComfyUI's UNet on the running host, and nothing of the MODEL changes."""

from __future__ import annotations

import pytest
import torch

from conftest import pack
from training_fixtures import all_inference, assert_same, inference_models, snapshot

du = pack("nodes.dispatch.differentiable_unet")
disp = pack("nodes.dispatch.dispatcher")
host = pack("nodes.common.host")


@pytest.fixture(scope="module")
def models():
    return inference_models("sd15", seed=0)


def _patches(layer_key):
    """One patch of every kind the host's block runs, each visibly changing the result."""

    def attn1_patch(n, context, value, eo):
        return n * 1.01, context, value

    def attn1_replace(q, k, v, eo):
        return host.host_attention(q, k, v, eo["n_heads"], eo) + 0.1 * torch.tanh(q)

    def attn1_output(n, eo):
        return n * 0.9

    def middle(x, eo):
        return x + 0.01 * torch.tanh(x)

    def attn2_patch(n, context, value, eo):
        return n, context * 1.1, value

    def attn2_replace(q, k, v, eo):
        return host.host_attention(q, k, v, eo["n_heads"], eo) * 0.8

    def attn2_output(n, eo):
        return n - 0.05

    return {
        "patches": {
            "attn1_patch": [attn1_patch],
            "attn1_output_patch": [attn1_output],
            "middle_patch": [middle],
            "attn2_patch": [attn2_patch, disp.HiddenStateStash()],
            "attn2_output_patch": [attn2_output],
        },
        "patches_replace": {"attn1": {layer_key: attn1_replace}, "attn2": {layer_key[:2]: attn2_replace}},  # 3-tuple and block-wide keys
    }


@pytest.mark.parametrize("with_patches", [False, True])
def test_out_of_place_forward_equals_the_hosts_block_bit_for_bit(models, with_patches):
    model = models[0]
    block = model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0]
    key = ("input", 1, 0)
    options = {"block": key[:2], "block_index": 0, "transformer_index": 0, "original_shape": [2, 4, 8, 8], "cond_or_uncond": [1, 0]}
    if with_patches:
        options.update(_patches(key))
    gen = torch.Generator().manual_seed(0)
    channels = block.attn1.to_q.in_features
    x = torch.randn(2, 64, channels, generator=gen)
    context = torch.randn(2, 77, 768, generator=gen)
    with torch.inference_mode():
        expected = block(x.clone(), context=context, transformer_options=dict(options))
        ours = du.out_of_place_block_forward(block, x.clone(), context, dict(options))
        wrapped = du.TrainingBlock(block, out_of_place=True, checkpoint=True)(x.clone(), context, dict(options))
        plain = du.out_of_place_block_forward(block, x.clone(), context, {})
    assert torch.equal(ours, expected)
    assert torch.equal(wrapped, expected)
    if with_patches:
        assert not torch.equal(plain, expected)  # the patches did act


def test_probe_says_what_the_hosts_block_can_do(models):
    """The host probe predicts whether the host's own block survives a backward pass."""
    model = models[0]
    block = model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0]
    with torch.inference_mode(False), torch.enable_grad(), du.autograd_weights(block):
        x = torch.randn(1, 64, block.attn1.to_q.in_features).requires_grad_(True)
        context = torch.randn(1, 77, 768)
        if du.host_block_is_autograd_safe():
            block(x * 1.0, context=context, transformer_options={}).sum().backward()
            assert x.grad is not None
        else:
            with pytest.raises(RuntimeError, match="inplace"):
                block(x * 1.0, context=context, transformer_options={}).sum().backward()
        x.grad = None
        out = du.out_of_place_block_forward(block, x * 1.0, context, {})
        out.sum().backward()  # ours always can
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


class _ScaleStage(disp.AttentionStage):
    """A trainable stage: ``out * (1 + w[layer])``."""

    def __init__(self, w):
        super().__init__(disp.StageSchedule())
        self.w = w

    def forward(self, call, out, region):
        return out * (1.0 + self.w)


def _grad(model, checkpoint, out_of_place=None):
    w = torch.nn.Parameter(torch.zeros(()))
    gen = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    context = torch.randn(2, 77, 768, generator=gen)
    sigma = torch.tensor([0.8, 4.0])
    with torch.inference_mode():  # as inside a ComfyUI prompt
        clone = du.differentiable_clone(disp.apply_attention_stage(model, _ScaleStage(w)), checkpoint=checkpoint, out_of_place=out_of_place)
        with torch.inference_mode(False), torch.enable_grad(), du.TrainingModels([clone]):
            x = x0 + sigma.reshape(-1, 1, 1, 1) * eps
            pred = du.predict_x0(clone, x, sigma, context)
            loss = (pred - x0).pow(2).mean()
            loss.backward()
    return float(loss.detach()), w.grad.clone()


def test_gradient_reaches_a_trained_parameter_in_inference_mode(models):
    model = models[0]
    before = snapshot(model.model)
    loss, grad = _grad(model, checkpoint=False)
    assert torch.isfinite(grad) and grad.abs() > 0
    loss_ckpt, grad_ckpt = _grad(model, checkpoint=True)
    assert loss_ckpt == loss
    assert torch.allclose(grad_ckpt, grad, rtol=1e-5, atol=0)  # recomputation sees the same block options
    # the shared model: same values, original inference tensors, original blocks, nothing loaded
    assert_same(before, snapshot(model.model))
    assert all_inference(model.model)
    assert all(type(b).__name__ != "TrainingBlock" for b in model.model.modules())
    import comfy.model_management as mm

    assert not any(type(getattr(e, "model", None)).__name__ == "ModelPatcher" and e.model.object_patches for e in mm.current_loaded_models)


def test_weight_aliases_share_storage_and_are_restored(models):
    model = models[0]
    p = model.model.diffusion_model.out[2].weight
    with torch.inference_mode(False), du.autograd_weights(model.model) as count:
        alias = model.model.diffusion_model.out[2].weight
        assert count > 0 and not alias.is_inference() and not alias.requires_grad
        assert alias.data_ptr() == p.data_ptr()
    assert model.model.diffusion_model.out[2].weight is p


def test_exception_inside_training_restores_everything(models):
    model = models[0]
    before = snapshot(model.model)
    clone = du.differentiable_clone(model, checkpoint=True)
    with pytest.raises(KeyboardInterrupt):
        with torch.inference_mode():
            with torch.inference_mode(False), du.TrainingModels([clone]):
                assert type(model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0]).__name__ == "TrainingBlock"
                raise KeyboardInterrupt
    assert type(model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0]).__name__ == "BasicTransformerBlock"
    assert all_inference(model.model)
    assert_same(before, snapshot(model.model))
