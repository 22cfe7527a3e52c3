"""A tiny random-weight Flux.1 (dev: guidance embedding) built through ComfyUI's own classes.

Only hosts with ``comfy.ldm.flux`` (ComfyUI 0.3.x, the newer test host) have Flux;
:func:`flux_available` feature-detects it and tests skip with :data:`SKIP_REASON`.

- :func:`build_flux` makes ``comfy.supported_models.Flux(config).get_model()`` (so the
  model is ``comfy.model_base.Flux`` and the ModelPatcher, samplers, ``model_sampling``
  and latent format treat it as Flux) around ``comfy.ldm.flux.model.Flux`` with the real
  block structure: ``DEPTH`` double-stream blocks (separate txt / img projections, joint
  attention), ``DEPTH_SINGLE`` single-stream blocks over ``[txt; img]``, 3-axis RoPE
  (``axes_dim`` sums to the head width, as the real 16/56/56 sum to 128), the guidance and
  pooled-vector embedders, 2x2 patches of 16 latent channels. Only widths are small:
  hidden 64, 2 heads of 32 (real: 3072, 24 of 128), context 64 (real T5-XXL: 4096),
  pooled 32 (real CLIP-L: 768).
- :func:`flux_state_dict` is the same model in the published key layout (``double_blocks.0
  .img_attn.qkv.weight`` ...). ComfyUI's detector (``model_detection``) reads every width
  from the keys' shapes but hard-codes ``num_heads = 24`` and ``axes_dim = [16, 56, 56]``
  for Flux, which no 64-wide model can satisfy (hidden must be 24 * 128 for those RoPE
  axes); so a detectable Flux file would be 3072 wide (~hundreds of MB per block). That is
  why the workflows use the test kit's loader nodes (TinyFlux / TinyFluxClip / TinyFluxVae,
  see testkit/__init__.py) instead of UNETLoader / DualCLIPLoader / VAELoader.
- :class:`TinyFluxTextEncoder`: a deterministic stand-in for CLIP-L + T5 driven by the
  host's CLIP-L tokenizer: context ``[1, 77*k, CONTEXT]``, pooled ``[1, POOLED]``; wrapped
  in the host's own ``comfy.sd.CLIP``.
- The VAE is a random 16-channel TAESD (what ``taef1`` is) through ``comfy.sd.VAE``.
"""

from __future__ import annotations

import importlib.util
from typing import Dict

import torch

HIDDEN = 64
HEADS = 2
AXES_DIM = [8, 12, 12]  # sums to HIDDEN // HEADS, like the real [16, 56, 56] sums to 128
DEPTH = 2
DEPTH_SINGLE = 2
CONTEXT = 64
POOLED = 32
LATENT_CHANNELS = 16

SKIP_REASON = "this host has no Flux (comfy.ldm.flux appeared in ComfyUI 0.3.x; the 2024 host lacks it)"


def flux_available() -> bool:
    """Whether the running host has ComfyUI's Flux model classes."""
    try:
        return importlib.util.find_spec("comfy.ldm.flux.model") is not None
    except (ImportError, ValueError):
        return False


def flux_config(guidance: bool = True) -> dict:
    """The unet_config of the tiny Flux (keys as ``model_detection`` would produce them)."""
    return {
        "image_model": "flux",
        "in_channels": LATENT_CHANNELS,
        "out_channels": LATENT_CHANNELS,
        "vec_in_dim": POOLED,
        "context_in_dim": CONTEXT,
        "hidden_size": HIDDEN,
        "mlp_ratio": 4.0,
        "num_heads": HEADS,
        "depth": DEPTH,
        "depth_single_blocks": DEPTH_SINGLE,
        "axes_dim": list(AXES_DIM),
        "theta": 10000,
        "patch_size": 2,
        "qkv_bias": True,
        "guidance_embed": guidance,
    }


def build_flux(seed: int = 0, guidance: bool = True, device=None, dtype=torch.float32):
    """A ComfyUI ModelPatcher around a random-weight tiny Flux (dev when ``guidance``, else schnell)."""
    import comfy.model_patcher
    import comfy.supported_models

    from .tiny_models import randomize_

    cls = comfy.supported_models.Flux if guidance else comfy.supported_models.FluxSchnell
    config = flux_config(guidance)
    model_config = cls(dict(config))
    if hasattr(model_config, "set_inference_dtype"):
        model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({}, "", device=torch.device("cpu"))
    model.diffusion_model.to(dtype=dtype)
    randomize_(model.diffusion_model, seed)
    load_device = device or torch.device("cpu")
    model.diffusion_model.to(load_device)
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=torch.device("cpu"))


def flux_state_dict(seed: int = 0) -> Dict[str, torch.Tensor]:
    """The tiny Flux's weights in the published (BFL) key layout, float32."""
    patcher = build_flux(seed)
    return {k: v.detach().clone() for k, v in patcher.model.diffusion_model.state_dict().items()}


# --- text encoder --------------------------------------------------------------------------------


class TinyFluxTextEncoder(torch.nn.Module):
    """CLIP-L + T5 stand-in: hashed token table + positions + LayerNorm + Linear.

    ``encode_token_weights`` returns ``(cond [1, 77*k, CONTEXT], pooled [1, POOLED])``,
    the shapes Flux's ``txt_in`` / ``vector_in`` take.
    """

    TABLE = 2048

    def __init__(self, device="cpu", dtype=None, seed: int = 1, **kwargs):
        super().__init__()
        from .tiny_models import randomize_

        self.embed = torch.nn.Embedding(self.TABLE, CONTEXT)
        self.position = torch.nn.Parameter(torch.zeros(77, CONTEXT))
        self.norm = torch.nn.LayerNorm(CONTEXT)
        self.proj = torch.nn.Linear(CONTEXT, CONTEXT)
        self.pool = torch.nn.Linear(CONTEXT, POOLED)
        randomize_(self, seed)
        self.dtypes = {torch.float32}
        self.to(device)

    def set_clip_options(self, options):
        pass

    def reset_clip_options(self):
        pass

    def load_sd(self, sd):
        return self.load_state_dict(sd, strict=False)

    def encode_token_weights(self, token_weight_pairs):
        sections = token_weight_pairs.get("l", token_weight_pairs) if isinstance(token_weight_pairs, dict) else token_weight_pairs
        device = self.embed.weight.device
        outs = []
        for section in sections:
            weights = torch.tensor([float(t[1]) for t in section], device=device)
            ids = torch.tensor([int(t[0]) % self.TABLE if not torch.is_tensor(t[0]) else 0 for t in section], device=device)
            x = self.embed(ids) + self.position[: ids.shape[0]]
            outs.append(self.proj(self.norm(x)) * weights[:, None])
        cond = torch.cat(outs, dim=0).unsqueeze(0)
        return cond, self.pool(cond[:, -1])


class _FluxTextTarget:
    def __init__(self, seed: int):
        import comfy.sd1_clip

        self.params = {"seed": seed}
        self.clip = TinyFluxTextEncoder
        self.tokenizer = comfy.sd1_clip.SD1Tokenizer


def build_flux_clip(seed: int = 1):
    """The host's own ``comfy.sd.CLIP`` around a :class:`TinyFluxTextEncoder`."""
    import comfy.sd

    return comfy.sd.CLIP(target=_FluxTextTarget(seed))


def build_flux_vae(seed: int = 2):
    """The host's own ``comfy.sd.VAE`` around a random 16-channel TAESD (taef1's shape), 8x."""
    import comfy.sd
    import comfy.taesd.taesd as taesd

    from .tiny_models import randomize_

    module = taesd.TAESD(latent_channels=LATENT_CHANNELS)
    randomize_(module, seed)
    return comfy.sd.VAE(sd={k: v.detach().clone() for k, v in module.state_dict().items()})


def random_flux_conditioning(seed: int, batch: int = 1, tokens: int = 8, guidance: float = 3.5):
    """A CONDITIONING list like CLIPTextEncode + FluxGuidance's, from random tensors."""
    gen = torch.Generator().manual_seed(seed)
    cond = torch.randn(batch, tokens, CONTEXT, generator=gen)
    pooled = torch.randn(batch, POOLED, generator=gen)
    return [[cond, {"pooled_output": pooled, "guidance": guidance}]]


def flux_inputs(seed: int, batch: int = 1, size: int = 8, tokens: int = 8):
    """Raw diffusion-model inputs: ``x [B, 16, size, size]``, timestep, context, y, guidance."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, LATENT_CHANNELS, size, size, generator=gen)
    t = torch.full((batch,), 0.5)
    context = torch.randn(batch, tokens, CONTEXT, generator=gen)
    y = torch.randn(batch, POOLED, generator=gen)
    guidance = torch.full((batch,), 3.5)
    return x, t, context, y, guidance
