"""A gradient through the UNet during sampling: whether the host can, and how.

Every prompt runs under ``torch.inference_mode()`` and the k-diffusion samplers
under ``torch.no_grad()``; weights loaded by ComfyUI's loaders are inference
tensors, which autograd cannot save. What works (comfyui-hooks.md §4.1):

1. leave inference mode and enable grad around the extra model call;
2. give every weighted module an identity *weight wrapper*
   (``ModelPatcher.add_weight_wrapper``, as ComfyUI's own LoRA trainer does):
   comfy.ops then copies each weight per forward, and a copy made outside
   inference mode is a normal tensor. Ours also detaches it, so autograd
   never tracks weight gradients;
3. the UNet must add its residuals out of place (``x = n + x``). ComfyUI did
   ``x += n`` until mid-June 2025 (#8446), which makes any backward pass
   through a transformer block fail.

:func:`gradient_support` checks 2 and 3 on the running host (3 with a real
backward pass through one tiny ``BasicTransformerBlock`` of the host's own
code) and says why not, so the node refuses at graph time instead of failing
in the middle of sampling.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

_SUPPORT: Optional[Tuple[bool, str]] = None


def gradient_support() -> Tuple[bool, str]:
    """``(True, "")`` when a backward pass through the UNet works here, else ``(False, reason)``."""
    global _SUPPORT
    if _SUPPORT is None:
        _SUPPORT = _probe()
    return _SUPPORT


def _probe() -> Tuple[bool, str]:
    import comfy.model_patcher
    import comfy.samplers

    if not hasattr(comfy.model_patcher.ModelPatcher, "add_weight_wrapper"):
        return False, "this ComfyUI has no weight wrappers (added in February 2025), so its inference-mode weights cannot take part in a gradient"
    if not hasattr(comfy.samplers, "calc_cond_batch"):
        return False, "this ComfyUI has no calc_cond_batch (added in April 2024)"
    try:
        _backward_through_transformer_block()
    except RuntimeError as err:
        return False, f"its transformer blocks modify tensors in place, which breaks the backward pass ({str(err).splitlines()[0]})"
    return True, ""


def _backward_through_transformer_block() -> None:
    import comfy.ldm.modules.attention as attention
    import comfy.ops

    with torch.inference_mode(False), torch.enable_grad():
        block = attention.BasicTransformerBlock(8, 1, 8, context_dim=8, checkpoint=False, operations=comfy.ops.disable_weight_init)
        with torch.no_grad():
            for p in block.parameters():
                p.copy_(torch.full_like(p, 0.05))
        leaf = torch.ones(1, 4, 8, requires_grad=True)
        out = block(leaf * 1.0, context=torch.ones(1, 3, 8), transformer_options={})
        out.sum().backward()


def _detached(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach()


def add_identity_weight_wrappers(model_patcher) -> int:
    """Wrap every weight and bias of the diffusion model (on this clone); returns how many.

    The wrapper returns the per-forward copy comfy.ops makes, detached: values
    and dtypes are unchanged, so sampling results are identical.
    """
    count = 0
    for name, module in model_patcher.model.named_modules():
        if not hasattr(module, "weight_function"):
            continue
        if not name.startswith("diffusion_model."):
            continue
        for attr in ("weight", "bias"):
            if getattr(module, attr, None) is not None:
                model_patcher.add_weight_wrapper(f"{name}.{attr}", _detached)
                count += 1
    return count


def cfg_denoiser(args: dict) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> x0`` as the sampler computes it this step (conds, CFG), for a post-CFG function's ``args``.

    Re-runs ``calc_cond_batch`` on the same conds, sigma and model options and
    combines cond and uncond with the host's ``sampler_cfg_function`` if one is
    set, else ``uncond + (cond - uncond) * cond_scale``. Post-CFG functions are
    not part of it (their effect is already in ``args["denoised"]``).
    """
    import comfy.samplers

    model = args["model"]
    cond, uncond = args["cond"], args.get("uncond")
    model_options = args["model_options"]
    sigma = args["sigma"]
    cond_scale = args.get("cond_scale")

    def denoise(x: torch.Tensor) -> torch.Tensor:
        timestep = sigma.detach().clone()
        if uncond is None:
            return comfy.samplers.calc_cond_batch(model, [cond], x, timestep, model_options)[0]
        cond_pred, uncond_pred = comfy.samplers.calc_cond_batch(model, [cond, uncond], x, timestep, model_options)
        if "sampler_cfg_function" in model_options:
            cfg_args = {
                "cond": x - cond_pred,
                "uncond": x - uncond_pred,
                "cond_scale": cond_scale,
                "timestep": timestep,
                "input": x,
                "sigma": timestep,
                "cond_denoised": cond_pred,
                "uncond_denoised": uncond_pred,
                "model": model,
                "model_options": model_options,
                "input_cond": cond,
                "input_uncond": uncond,
            }
            return x - model_options["sampler_cfg_function"](cfg_args)
        return uncond_pred + (cond_pred - uncond_pred) * cond_scale

    return denoise
