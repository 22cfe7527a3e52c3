"""Training target ``restoration_guide``: Dual-Pivot Tuning's stage 2, a ControlNet guide for face restoration.

Dual-Pivot Tuning restores a degraded photo of a known person in two stages. Stage 1 personalizes
the generative model around a fixed text *pivot* (the pack's Personalize identity, or a LoRA,
trained with one fixed prompt). Stage 2, this target, tunes the *guiding network* of the blind
restoration system generically, on degraded -> clean pairs of many people, with the (optionally
personalized) generative model held fixed as the other pivot, so personalization never leaks into
the restoration process.

The guide is the host's own ControlNet (``comfy.cldm.cldm.ControlNet``) fed the degraded photo as
its hint, so the file it writes is an ordinary ControlNet: ComfyUI's Load ControlNet Model reads it
and Apply ControlNet uses it at restore time. Per micro-batch:

- the clean photos are encoded (the denoising target, as for every target);
- each photo is degraded by ``adapters/training/degradation.py`` from a generator seeded by
  ``(seed, stream position)``: the pairs are a pure function of the seed and position, so
  ``--resume`` continues exactly;
- every caption is replaced by the **pivot prompt** (``pivot_prompt``, else ``data.caption``):
  the fixed text pivot of stage 1; condition dropout still empties some captions, as ControlNet
  training does;
- the guide runs on ``(calculate_input(sigma, x_noisy), hint, timestep(sigma), context, y)`` as the
  host's ControlNet does when sampling, and its 13 (SD1.5) / 10 (SDXL) zero-conv outputs and the
  middle one are added, times ``strength``, to the UNet's skip connections and middle output.

The additions go through ``output_block_patch`` (``hsp + control``), not the UNet's ``control``
argument, because the host adds control in place into the skip tensors, which the next input
block saved for its backward: out of place, the sum is the same (tested against the host's
ControlNet at inference), and gradients flow on both hosts.

Only the guide trains: the trainer's optimizer holds the guide's parameters alone, the generative
model (and a LoRA on it) is never an optimizer parameter (tested: the UNet's weights are bit for
bit the same after training).

Initialisation (``controlnet``): an existing ControlNet file (a tile / blur ControlNet is a good
start; loaded by the host's ``comfy.controlnet.load_controlnet``), or, without one, the UNet's own
encoder as the ControlNet paper does: time / class embedding, input blocks and middle block copied
from the model, the hint encoder freshly initialised (seeded) with its last convolution zero, and
every zero convolution zero, so before training the guide adds exactly nothing.

Settings: ``controlnet`` (file; default: from the UNet), ``pivot_prompt``, ``strength`` (1.0),
``degradation_strength`` (1.0, scales the top of every degradation range), ``lora`` (a LoRA file
making the fixed model the personalized prior; ``lora_strength`` 1.0), ``save_dtype``
("float16" or "float32"), ``learning_rate`` (default 1e-5, ControlNet's).
"""

from __future__ import annotations

import copy
import inspect
import os
from typing import Any, Dict, List, Mapping, Optional

import torch

from ...adapters.training.degradation import DegradationSettings, degrade
from ..common.host import model_sampling
from .training_targets import PROJECTION_LR, TrainingFeed, TrainingTarget, register_target

CONTROLNET_PREFIX = "control_model."
"""The ldm ControlNet layout's prefix, which every host's loader detects."""
CONTROL_KEY = "restoration_guide_control"


def _unet_config(model_patcher) -> dict:
    return dict(model_patcher.model.model_config.unet_config)


def _differentiable(module: torch.nn.Module) -> torch.nn.Module:
    """The guide, made trainable: host layers that cast weights per call (``comfy_cast_weights``) ->
    plain ones, float32, and on hosts whose transformer blocks add residuals in place, each block
    wrapped in the trainer's out-of-place :class:`TrainingBlock` (same parameters, same names)."""
    import comfy.ldm.modules.attention as comfy_attention

    from ..dispatch.differentiable_unet import TrainingBlock, host_block_is_autograd_safe

    for m in module.modules():
        if hasattr(m, "comfy_cast_weights"):
            m.comfy_cast_weights = False
    if not host_block_is_autograd_safe():
        checkpoint = torch.cuda.is_available()
        for parent in list(module.modules()):
            for name, child in list(parent._modules.items()):
                if isinstance(child, comfy_attention.BasicTransformerBlock):
                    parent._modules[name] = TrainingBlock(child, out_of_place=True, checkpoint=checkpoint)
    module = module.float()
    for p in module.parameters():
        p.requires_grad_(True)
    return module.train()


def controlnet_from_unet(model_patcher, seed: int = 0) -> torch.nn.Module:
    """A ControlNet of the UNet's layout, its encoder copied from the UNet, zero convolutions zero (float32)."""
    import comfy.cldm.cldm
    import comfy.ops

    config = _unet_config(model_patcher)
    accepted = inspect.signature(comfy.cldm.cldm.ControlNet.__init__).parameters
    config = {k: v for k, v in config.items() if k in accepted and k not in ("out_channels", "transformer_depth_output", "hint_channels", "operations", "device", "dtype")}
    with torch.inference_mode(False):
        net = comfy.cldm.cldm.ControlNet(hint_channels=3, operations=comfy.ops.disable_weight_init, device="cpu", dtype=torch.float32, **config)
        unet = {k: v.detach().float().cpu() for k, v in model_patcher.model.diffusion_model.state_dict().items()}
        own = net.state_dict()
        copied = {k: unet[k] for k in own if k in unet and unet[k].shape == own[k].shape}
        if not any(k.startswith("input_blocks.") for k in copied):
            raise ValueError("the model's UNet does not match a ControlNet of its own config: give the restoration_guide target a 'controlnet' file")
        g = torch.Generator().manual_seed(int(seed))
        fresh = {}
        for k, t in own.items():
            if k in copied:
                continue
            if k.startswith(("zero_convs.", "middle_block_out.")) or k.endswith(".bias"):
                fresh[k] = torch.zeros(t.shape)
            else:  # the hint encoder: uniform in +-1/sqrt(fan_in), torch's default conv init (seeded)
                fan_in = max(t[0].numel(), 1)
                bound = (1.0 / fan_in) ** 0.5
                fresh[k] = (torch.rand(t.shape, generator=g) * 2 - 1) * bound
        last = max(int(k.split(".")[1]) for k in own if k.startswith("input_hint_block.") and k.endswith(".weight"))
        for k in own:
            if k.startswith(f"input_hint_block.{last}."):
                fresh[k] = torch.zeros(own[k].shape)
        net.load_state_dict({**copied, **fresh}, strict=True)
    return _differentiable(net)


def controlnet_from_file(path: str) -> torch.nn.Module:
    """The ``cldm.ControlNet`` of a ControlNet file, through the host's own loader (float32, trainable)."""
    import comfy.controlnet

    loaded = comfy.controlnet.load_controlnet(path)
    module = getattr(loaded, "control_model", None)
    if module is None or not hasattr(module, "zero_convs"):
        raise ValueError(f"{os.path.basename(path)} is not a UNet-style ControlNet (no zero convolutions): the restoration guide needs one")
    with torch.inference_mode(False):
        module = copy.deepcopy(module).cpu()
        module = _differentiable(module)
    return module


def split_outputs(outputs) -> tuple:
    """A ControlNet's forward -> ``(per input block [..], middle)``: hosts return a list (last = middle) or a dict."""
    if isinstance(outputs, dict):
        return list(outputs["output"]), outputs["middle"][0]
    outputs = list(outputs)
    return outputs[:-1], outputs[-1]


def guide_control(module: torch.nn.Module, model_patcher, x_noisy: torch.Tensor, sigma: torch.Tensor, hint: torch.Tensor, context: torch.Tensor, y: Optional[torch.Tensor], strength: float = 1.0) -> Dict[str, Any]:
    """The guide's additions for one model call, as the host's ControlNet computes them when sampling.

    x_noisy ``[B, 4, h, w]`` (x0 + sigma eps), sigma ``[B]``, hint ``[B, 3, 8h, 8w]`` in ``[0, 1]``,
    context ``[B, M, D]``. Returns ``{"skips": [per input block, in input order], "middle": t}``.
    """
    ms = model_sampling(model_patcher)
    dtype = next(module.parameters()).dtype
    xc = ms.calculate_input(sigma, x_noisy)
    t = ms.timestep(sigma).float()
    outs, middle = split_outputs(module(x=xc.to(dtype), hint=hint.to(device=xc.device, dtype=dtype), timesteps=t, context=context.to(dtype), y=None if y is None else y.to(dtype)))
    return {"skips": [o * strength for o in outs], "middle": middle * strength}


class GuideOutputPatch:
    """``output_block_patch``: adds the current control to the skips (and, at the first block, the middle) out of place."""

    def __init__(self, feed: TrainingFeed):
        self.feed = feed

    def __deepcopy__(self, memo):  # ModelPatcher.clone deep-copies model_options: keep the one shared feed
        return self

    def __call__(self, h, hsp, transformer_options):
        state = self.feed.extras.get(CONTROL_KEY)
        if not state:
            return h, hsp
        if state["next"] == 0:
            h = h + state["middle"].to(h.dtype)
        skips: List[torch.Tensor] = state["skips"]
        index = len(skips) - 1 - state["next"]  # output blocks pop the skips last-first
        state["next"] += 1
        if index >= 0:
            hsp = hsp + skips[index].to(hsp.dtype)
        return h, hsp


class RestorationGuideTarget(TrainingTarget):
    name = "restoration_guide"
    default_learning_rate = PROJECTION_LR  # ControlNet's 1e-5

    def __init__(self, model_patcher, module: torch.nn.Module, pivot_prompt: Optional[str], seed: int = 0, strength: float = 1.0,
                 degradation: Optional[DegradationSettings] = None, lora: Optional[str] = None, lora_strength: float = 1.0, save_dtype: str = "float16"):
        self.model = model_patcher
        self.module = module
        self.pivot_prompt = pivot_prompt
        self.seed = int(seed)
        self.strength = float(strength)
        self.degradation = degradation or DegradationSettings()
        self.lora = lora
        self.lora_strength = float(lora_strength)
        if save_dtype not in ("float16", "float32"):
            raise ValueError(f"restoration_guide: save_dtype must be 'float16' or 'float32', not {save_dtype!r}")
        self.save_dtype = getattr(torch, save_dtype)
        self.feed: Optional[TrainingFeed] = None

    def install(self, model_patcher, feed: TrainingFeed):
        self.feed = feed
        patched = model_patcher.clone()
        if self.lora:
            patched = personalized_prior(patched, self.lora, self.lora_strength)
        patched.set_model_output_block_patch(GuideOutputPatch(feed))
        return patched

    def batch_inputs(self, batch: dict, repeat: int) -> Dict[str, torch.Tensor]:
        if self.pivot_prompt is not None:
            batch["captions"] = [self.pivot_prompt for _ in batch["captions"]]
        degraded, _ = degrade(batch["images"], self.seed, indices=batch["positions"], settings=self.degradation)
        return {"restoration_hint": degraded.permute(0, 3, 1, 2).contiguous().repeat_interleave(repeat, dim=0)}

    def before_forward(self, feed: TrainingFeed, x_noisy, sigma, context, y) -> None:
        hint = feed.extras["restoration_hint"]
        state = guide_control(self.module, self.model, x_noisy, sigma, hint, context, y, self.strength)
        state["next"] = 0
        feed.extras[CONTROL_KEY] = state

    def export_files(self, base: str, context_dim: int, metadata: Optional[Dict[str, str]] = None):
        tensors = {CONTROLNET_PREFIX + k: v.detach().to(self.save_dtype).cpu().contiguous() for k, v in self.module.state_dict().items()}
        header = {"identity_attention": "restoration_guide", "method": "Dual-Pivot Tuning stage 2", "pivot_prompt": self.pivot_prompt or ""}
        header.update(metadata or {})
        return {"": (tensors, header)}


def personalized_prior(model_patcher, path: str, strength: float):
    """The fixed model with a LoRA applied (stage 1's personalized prior): a patched clone, the weights untouched."""
    import comfy.sd

    from ...adapters.weights.safe_load import read_weight_file

    from ...adapters.weights.weight_dtypes import check_magnitude

    lora = read_weight_file(path).tensors  # safetensors, or a pickle read with weights_only
    for key, t in lora.items():  # |w| <= 65504, no NaN / inf (adapters/weights/weight_dtypes.py)
        check_magnitude(key, t, f"the LoRA '{os.path.basename(path)}'")
    model, _ = comfy.sd.load_lora_for_models(model_patcher, None, lora, strength, 0.0)
    return model


def _find(path: str, folder: str, base_dir: str) -> str:
    from .trainer_models import resolve

    try:
        return resolve(path, folder, base_dir)
    except (FileNotFoundError, ValueError):
        import folder_paths

        found = folder_paths.get_full_path("controlnet" if folder == "controlnet" else "loras", path)
        if not found:
            raise FileNotFoundError(f"restoration_guide: cannot find the {folder} file {path!r} (as given, next to the config, or in ComfyUI's models/{folder} folder)")
        return found


@register_target("restoration_guide")
def make_restoration_guide_target(model_patcher, adapter, settings: Mapping, seed: int = 0, config_dir: str = "", caption: str = "", **_):
    """Trainer factory (see the module docstring for the settings)."""
    if adapter is not None:
        raise ValueError("restoration_guide takes no identity 'adapter': name the starting ControlNet as 'controlnet' and the personalized prior as 'lora'")
    controlnet = settings.get("controlnet")
    if controlnet:
        module = controlnet_from_file(_find(str(controlnet), "controlnet", config_dir))
    else:
        module = controlnet_from_unet(model_patcher, seed=int(settings.get("seed", seed)))
    lora = settings.get("lora")
    return RestorationGuideTarget(
        model_patcher, module,
        pivot_prompt=str(settings.get("pivot_prompt") or caption or "") or None,
        seed=int(settings.get("seed", seed)),
        strength=float(settings.get("strength", 1.0)),
        degradation=DegradationSettings().with_strength(float(settings.get("degradation_strength", 1.0))),
        lora=_find(str(lora), "loras", config_dir) if lora else None,
        lora_strength=float(settings.get("lora_strength", 1.0)),
        save_dtype=str(settings.get("save_dtype", "float16")),
    )
