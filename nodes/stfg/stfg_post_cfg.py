"""STFG's sampler hook: a post-CFG function, so it acts once per model evaluation on the CFG result.

``sampler_post_cfg_function`` exists on every supported host and sees the
CFG-combined x0 (``denoised``), the sampler's ``x`` and ``sigma``, and the
conds; it runs after the step's model call, so the text-attention map that
call recorded (:class:`~.stfg_attention_stage.STFGAttentionStage`) is ready.
The math is in ``adapters/attention/stfg_guidance.py``; this file finds the boundary,
picks ``fast`` or ``exact`` and keeps the boundary per step for the inspect
node.

Cost of ``exact``: one more model pass with gradients and a backward pass
(about 3 model passes) on top of the step's own, i.e. about 4x an unguided
step. ``exact_every = k`` takes that gradient on every k-th guided call only
and the closed-form ``fast`` update (the same guidance with the model's
Jacobian left out, ~free) on the calls between: about ``(4 + (k - 1)) / k``
x, so 2x at k = 3, the node's default (issue #7's budget is 2.2x). The paper
guides every step (k = 1). Nothing here reads a GPU value back to the CPU.
"""

from __future__ import annotations

from typing import Optional

import torch

from ...adapters.projectors.id_adapter import DeviceCache
from ...adapters.attention.spatial import mask_to_tokens
from ...adapters.attention.stfg_guidance import (
    boundary_from_weights,
    exact_update,
    fast_update,
    fast_update_fused,
    frequency_box,
    low_pass_matrices,
    masked_mean_weights,
)
from ..common.errors import IdentityAttentionError
from ..dispatch.gradient_support import cfg_denoiser
from .stfg_attention_stage import STFGAttentionStage
from ..dispatch.step_recorder import StepRecorder

MODES = ("fast", "exact")
NODE = "Apply STFG guidance"


class STFGGuidance:
    """``z0``: ``[Bz, C, H, W]`` original latent in the model's latent space; ``mask``: ``[Bm, H', W']`` edit mask."""

    identity_attention_stfg = True

    def __init__(
        self,
        stage: STFGAttentionStage,
        z0: torch.Tensor,
        mask: torch.Tensor,
        strength: float,
        mode: str = "fast",
        band: float = 0.5,
        layout: str = "centred",
        exact_every: int = 1,
        mask_update: bool = False,
        step_cap: bool = True,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        if int(exact_every) < 1:
            raise ValueError("exact_every must be at least 1")
        self.stage = stage
        self.z0 = z0
        self.mask = mask
        self.strength = float(strength)
        self.mode = mode
        self.band = float(band)
        self.layout = layout
        self.exact_every = int(exact_every)
        self.mask_update = bool(mask_update)
        self.step_cap = bool(step_cap)
        self.recorder = StepRecorder(dtype=torch.float16)
        self._cache = DeviceCache()
        self._guided = 0  # guided model calls in this sampling run
        self._last_sigma: Optional[float] = None

    def __deepcopy__(self, memo):
        return self

    # --- inputs at the sampler's grid ----------------------------------------------------------
    def _original(self, denoised: torch.Tensor) -> torch.Tensor:
        b, c, h, w = denoised.shape
        z0 = self.z0
        if tuple(z0.shape[1:]) != (c, h, w) or z0.shape[0] not in (1, b):
            raise IdentityAttentionError(
                f"the original latent is {tuple(z0.shape)} but the sampler's latent is {tuple(denoised.shape)}",
                node=NODE,
                input_name="original_latent",
                fix="connect a VAE Encode of the same original image at the same size (and batch) as the latent being sampled",
            )
        return self._cache.get("z0", denoised.device, torch.float32, lambda: z0)

    def _mask(self, denoised: torch.Tensor) -> torch.Tensor:
        b, _, h, w = denoised.shape
        if self.mask.shape[0] not in (1, b):
            raise IdentityAttentionError(
                f"the mask has {self.mask.shape[0]} frames but the latent batch has {b} images",
                node=NODE,
                input_name="mask",
                fix="give one mask for all images, or exactly one mask per image in the batch",
            )
        return self._cache.get(("mask", h, w), denoised.device, torch.float32, lambda: mask_to_tokens(self.mask, (h, w)).reshape(-1, h, w))

    def _box(self, denoised: torch.Tensor) -> torch.Tensor:
        h, w = denoised.shape[-2:]
        return self._cache.get(("box", h, w), denoised.device, torch.float32, lambda: frequency_box(h, w, self.band, self.layout))

    def _boundary(self, attention: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
        """Eq. 7's boundary ``[B, H, W]`` bool, from the mask's weights made once per grid and device."""
        h, w = denoised.shape[-2:]
        cpu_mask = lambda: mask_to_tokens(self.mask, (h, w)).reshape(-1, h, w)  # noqa: E731
        inside = self._cache.get(("inside", h, w), attention.device, torch.bool, lambda: masked_mean_weights(cpu_mask())[0])
        weights, root = self._cache.get(("weights", h, w), attention.device, attention.dtype, lambda: masked_mean_weights(cpu_mask(), torch.float64)[1:])
        return boundary_from_weights(attention, inside, weights, root)

    def _fast(self, denoised, z0, boundary, mask, sigma, box) -> torch.Tensor:
        """The closed-form update: the fused low-pass matrices where the box is real (``centred``), else the FFT."""
        b, _, h, w = denoised.shape
        if self.layout != "centred" or denoised.dtype not in (torch.float32, torch.float64) or (torch.is_grad_enabled() and not torch.is_inference_mode_enabled()):
            return fast_update(denoised, z0, boundary, mask, sigma, self.strength, box, self.step_cap)
        p_y, p_x = self._cache.get(("low_pass", h, w), denoised.device, denoised.dtype, lambda: low_pass_matrices(h, w, self.band, self.layout))

        def low_z0():  # LP(z0) at the batch size, once
            py, px = low_pass_matrices(h, w, self.band, self.layout)
            return (py @ self.z0.double() @ px).expand(b, -1, -1, -1).contiguous()

        low = self._cache.get(("low_z0", b, h, w), denoised.device, denoised.dtype, low_z0)
        return fast_update_fused(denoised, low, boundary, mask, sigma, self.strength, p_y, p_x, self.step_cap)

    # --- the hook ------------------------------------------------------------------------------
    def __call__(self, args: dict) -> torch.Tensor:
        denoised = args["denoised"]
        taken = self.stage.take()
        if taken is None or self.strength == 0.0:
            return denoised
        sigma_value, attention = taken
        if attention.shape[0] != denoised.shape[0]:
            if attention.shape[0] != 1:
                return denoised  # the prompt's rows did not come as one batch: nothing sound to guide with
            attention = attention.expand(denoised.shape[0], -1, -1)
        z0, mask, box = self._original(denoised), self._mask(denoised), self._box(denoised)
        boundary = self._boundary(attention, denoised)
        self.recorder.record(sigma_value, "boundary", boundary)
        self.recorder.record(sigma_value, "attention", attention)
        sigma = args["sigma"]
        update_mask = mask if self.mask_update else None  # the boundary always lies inside the mask
        if self.mode == "fast" or not self.exact_now(sigma_value):
            return self._fast(denoised, z0, boundary, update_mask, sigma, box)
        return self._exact(args, denoised, z0, boundary, update_mask, sigma, box)

    def exact_now(self, sigma: Optional[float]) -> bool:
        """Whether this guided model call takes the exact gradient: the 1st, (k+1)th, (2k+1)th...
        of a sampling run (k = ``exact_every``), the closed-form update on the calls between.

        A sigma higher than the previous call's starts a new run (samplers lower sigma).
        """
        if sigma is not None and self._last_sigma is not None and sigma > self._last_sigma:
            self._guided = 0
        self._last_sigma = sigma
        exact = self._guided % self.exact_every == 0
        self._guided += 1
        return exact

    def _exact(self, args, denoised, z0, boundary, mask, sigma, box) -> torch.Tensor:
        if args.get("uncond") is not None and args.get("cond_scale") is None:
            raise IdentityAttentionError(
                "this ComfyUI does not pass the CFG scale to post-CFG functions, which mode 'exact' needs",
                node=NODE,
                input_name="mode",
                fix="set mode to 'fast', or update ComfyUI",
            )
        self.stage.paused = True
        try:
            with torch.inference_mode(False):
                return exact_update(args["input"], denoised, cfg_denoiser(args), z0, boundary, mask, sigma, self.strength, box, self.step_cap)
        except RuntimeError as err:
            text = str(err)
            if "inplace" in text or "Inference tensors" in text or "does not require grad" in text:
                raise IdentityAttentionError(
                    f"mode 'exact' could not take a gradient through this model ({text.splitlines()[0]}); "
                    "a patch applied to this MODEL keeps tensors autograd cannot use, or ComfyUI modifies them in place",
                    node=NODE,
                    input_name="mode",
                    fix="set mode to 'fast', or apply STFG to the model before other patches, or update ComfyUI",
                ) from err
            raise
        finally:
            self.stage.paused = False


def installed_guidance(model_patcher) -> Optional[STFGGuidance]:
    """The last STFG guidance applied to a MODEL, if any."""
    found = None
    for fn in model_patcher.model_options.get("sampler_post_cfg_function", []):
        if getattr(fn, "identity_attention_stfg", False) is True:
            found = fn
    return found
