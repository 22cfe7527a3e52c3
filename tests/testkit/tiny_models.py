"""Tiny random-weight models of the real SD1.5 / SDXL architectures, built through ComfyUI.

Used by the test kit's loader node (inside a test or demo host) and by in-process
tests. Everything is deterministic for a seed, so two processes build the same
weights bit for bit.

- ``micro`` UNets keep the real block layout, transformer depths, heads rule and
  context dims (so the cross-attention keys are the real ones: 16 for SD1.5, 70
  for SDXL) with few channels, built with ComfyUI's own ``supported_models``
  classes (no detection needed).
- ``full_size`` builds the real channel counts (for benchmarks on a GPU).
- :class:`TinyTextEncoder` is a small CLIP stand-in driven by the host's real
  tokenizers, giving ``[1, 77, 768]`` (SD1.5) or ``[1, 77, 2048]`` + pooled
  ``[1, 1280]`` (SDXL) contexts; wrapped in the host's own ``comfy.sd.CLIP``.
- The VAE is a random TAESD through the host's own ``comfy.sd.VAE``.
- :func:`write_detectable_sd15_files` writes a 320-channel single-level SD1.5
  UNet, a full-size random CLIP-L and a random TAESD that ComfyUI's real loaders
  (UNETLoader, CLIPLoader, VAELoader) detect and load.
"""

from __future__ import annotations

import math
import os
from typing import Dict, Optional, Tuple

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.supported_models

ARCHES = ("sd15", "sdxl")


# --- deterministic initialisation ---------------------------------------------------------------


def randomize_(module: torch.nn.Module, seed: int, scale: float = 1.0, device=None) -> torch.nn.Module:
    """Fill every parameter deterministically: N(0, scale/fan_in) weights, small biases, unit norms.

    ComfyUI's ops skip PyTorch's init (weights start as ``torch.empty``), so this
    must touch every parameter. Order is the sorted parameter names, so the
    result depends only on names, shapes and the seed (and on ``device``, where
    the random numbers are drawn: the CPU by default; a GPU is much faster for
    full-size models but draws other numbers).
    """
    gen = torch.Generator(device=device or "cpu").manual_seed(seed)
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name in sorted(params):
            p = params[name]
            leaf = name.rsplit(".", 1)[-1]
            if p.dim() >= 2:
                fan_in = p[0].numel()
                values = torch.randn(p.shape, generator=gen, device=gen.device) * math.sqrt(scale / fan_in)
            elif leaf == "weight":  # norm scales
                values = 1.0 + 0.1 * torch.randn(p.shape, generator=gen, device=gen.device)
            else:  # biases, embeddings' 1-D extras
                values = 0.02 * torch.randn(p.shape, generator=gen, device=gen.device)
            p.copy_(values.to(p.dtype))
    return module


# --- UNets ---------------------------------------------------------------------------------------


def unet_config(arch: str, size: str = "micro") -> Tuple[type, dict]:
    """The supported_models class and unet_config of an architecture.

    ``size``: "micro" (few channels, real layout) or "full_size" (the real model).
    """
    if arch == "sd15":
        config = {
            "use_checkpoint": False,
            "image_size": 32,
            "out_channels": 4,
            "use_spatial_transformer": True,
            "legacy": False,
            "adm_in_channels": None,
            "in_channels": 4,
            "model_channels": 32 if size == "micro" else 320,
            "num_res_blocks": [2, 2, 2, 2],
            "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
            "channel_mult": [1, 2, 4, 4],
            "transformer_depth_middle": 1,
            "use_linear_in_transformer": False,
            "context_dim": 768,
            "num_heads": 8,
            "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
            "use_temporal_resblock": False,
            "use_temporal_attention": False,
        }
        return comfy.supported_models.SD15, config
    if arch == "sdxl":
        config = {
            "use_checkpoint": False,
            "image_size": 32,
            "out_channels": 4,
            "use_spatial_transformer": True,
            "legacy": False,
            "num_classes": "sequential",
            "adm_in_channels": 2816,
            "in_channels": 4,
            "model_channels": 32 if size == "micro" else 320,
            "num_res_blocks": [2, 2, 2],
            "transformer_depth": [0, 0, 2, 2, 10, 10],
            "channel_mult": [1, 2, 4],
            "transformer_depth_middle": 10,
            "use_linear_in_transformer": True,
            "context_dim": 2048,
            "num_head_channels": 64,
            "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
            "use_temporal_resblock": False,
            "use_temporal_attention": False,
        }
        return comfy.supported_models.SDXL, config
    raise ValueError(f"unknown architecture {arch!r}; known: {ARCHES}")


def build_unet(
    arch: str,
    seed: int = 0,
    size: str = "micro",
    device=None,
    dtype=torch.float32,
    weight_scale: float = 1.0,
    offload_device=None,
    init_device=None,
):
    """A ComfyUI ModelPatcher around a random-weight UNet of ``arch``.

    ``dtype`` other than float32 builds the layers in that dtype directly (a
    full-size SDXL never exists in float32) and tells the UNet to run in it.
    ``offload_device`` defaults to the CPU; the benchmarks pass the load device
    so ComfyUI's model management never moves the weights between timed runs.
    ``init_device``: where the layers are made and the random weights drawn
    (default: the CPU, bit-identical across processes; the benchmarks pass the
    GPU, where a full-size SDXL initialises in seconds instead of minutes).
    """
    cls, config = unet_config(arch, size)
    if dtype != torch.float32:
        config["dtype"] = dtype  # UNetModel(dtype=...): layers made in it, inputs cast to it
    model_config = cls(dict(config))
    # the class's unet_extra_config overwrote the heads rule with the real model's: keep ours
    model_config.unet_config.update({k: v for k, v in config.items() if k in ("num_heads", "num_head_channels", "dtype")})
    load_device = device or torch.device("cpu")
    init_device = torch.device(init_device or "cpu")
    model = model_config.get_model({}, "", device=init_device)
    model.diffusion_model.to(dtype=dtype)
    randomize_(model.diffusion_model, seed, scale=weight_scale, device=init_device)
    model.diffusion_model.to(load_device)
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device or torch.device("cpu"))


# --- text encoder --------------------------------------------------------------------------------


class TinyTextEncoder(torch.nn.Module):
    """A deterministic stand-in for CLIP with the real tokenizers' interface.

    Token ids are hashed into a small embedding table (so different prompts give
    different contexts), plus position embeddings, one LayerNorm and one Linear.
    Output per 77-token section: ``[1, 77, context_dim]``; pooled: the EOS-ish
    last position projected to ``pooled_dim`` (SDXL only).
    """

    TABLE = 2048

    def __init__(self, arch: str = "sd15", device="cpu", dtype=None, seed: int = 1, **kwargs):
        super().__init__()
        self.arch = arch
        self.context_dim = 768 if arch == "sd15" else 2048
        self.pooled_dim = 768 if arch == "sd15" else 1280
        self.embed = torch.nn.Embedding(self.TABLE, self.context_dim)
        self.position = torch.nn.Parameter(torch.zeros(77, self.context_dim))
        self.norm = torch.nn.LayerNorm(self.context_dim)
        self.proj = torch.nn.Linear(self.context_dim, self.context_dim)
        self.pool = torch.nn.Linear(self.context_dim, self.pooled_dim)
        randomize_(self, seed)
        self.dtypes = {torch.float32}
        self.to(device)

    # the ClipModel interface comfy.sd.CLIP calls
    def set_clip_options(self, options):
        pass

    def reset_clip_options(self):
        pass

    def load_sd(self, sd):
        return self.load_state_dict(sd, strict=False)

    def encode_token_weights(self, token_weight_pairs):
        sections = None
        for name in ("g", "l"):
            if isinstance(token_weight_pairs, dict) and name in token_weight_pairs:
                sections = token_weight_pairs[name]
                break
        if sections is None:
            sections = token_weight_pairs
        device = self.embed.weight.device
        outs = []
        for section in sections:
            weights = torch.tensor([float(t[1]) for t in section], device=device)
            if any(torch.is_tensor(t[0]) for t in section):
                # embedding vectors in the token list (textual inversion, identity tokens): used as the
                # token's embedding, zero-padded / cut to this encoder's width
                rows = [self._vector_row(t[0]) if torch.is_tensor(t[0]) else self.embed.weight[int(t[0]) % self.TABLE] for t in section]
                x = torch.stack(rows) + self.position[: len(section)]
            else:
                ids = torch.tensor([int(t[0]) % self.TABLE for t in section], device=device)
                x = self.embed(ids) + self.position[: ids.shape[0]]
            x = self.proj(self.norm(x)) * weights[:, None]
            outs.append(x)
        cond = torch.cat(outs, dim=0).unsqueeze(0)
        pooled = self.pool(cond[:, -1])
        return cond, pooled

    def _vector_row(self, vector: torch.Tensor) -> torch.Tensor:
        v = vector.reshape(-1).to(device=self.embed.weight.device, dtype=self.embed.weight.dtype)[: self.context_dim]
        return torch.nn.functional.pad(v, (0, self.context_dim - v.shape[0]))

    # where the pack looks up a word's token embedding (``cond_stage_model.clip_<encoder>.transformer
    # .get_input_embeddings().weight[ids]``, nodes/common/prompt_encoding.py): the hashed table seen as a
    # real vocabulary, so "Create identity tokens" can start from a word on the tiny models
    @property
    def clip_l(self):
        return _TokenTableView(self, 768)

    @property
    def clip_g(self):
        if self.arch == "sd15":
            raise AttributeError("clip_g")
        return _TokenTableView(self, 1280)


class _HashedRows:
    """Row ``i`` of a vocabulary-sized table = row ``i % TABLE`` of the tiny table, first ``width`` channels."""

    def __init__(self, weight: torch.Tensor, width: int):
        self.weight, self.width = weight, width

    @property
    def device(self):
        return self.weight.device

    def detach(self):
        return _HashedRows(self.weight.detach(), self.width)

    def __getitem__(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight[ids % self.weight.shape[0], : self.width]


class _TokenTableView:
    """``clip_l`` / ``clip_g`` of a :class:`TinyTextEncoder`: just ``.transformer.get_input_embeddings().weight``.

    For SD1.5 a word's vector is exactly the row the encoder embeds the word with, so tokens
    started from a word encode like the word (SDXL: the first 768 / 1280 of the 2048 channels).
    """

    def __init__(self, encoder: "TinyTextEncoder", width: int):
        self.transformer = self
        self._rows = _HashedRows(encoder.embed.weight, width)

    def get_input_embeddings(self):
        return self

    @property
    def weight(self):
        return self._rows


class _Target:
    def __init__(self, arch: str, seed: int):
        import comfy.sd1_clip
        import comfy.sdxl_clip

        self.params = {"arch": arch, "seed": seed}
        self.clip = TinyTextEncoder
        self.tokenizer = comfy.sd1_clip.SD1Tokenizer if arch == "sd15" else comfy.sdxl_clip.SDXLTokenizer


def build_clip(arch: str, seed: int = 1):
    """The host's own ``comfy.sd.CLIP`` around a :class:`TinyTextEncoder`."""
    return comfy.sd.CLIP(target=_Target(arch, seed))


# --- VAE ------------------------------------------------------------------------------------------


def taesd_state_dict(seed: int = 2) -> Dict[str, torch.Tensor]:
    import comfy.taesd.taesd as taesd

    module = taesd.TAESD()
    randomize_(module, seed)
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def build_vae(seed: int = 2):
    """The host's own ``comfy.sd.VAE`` around a random TAESD (4-channel latents, 8x)."""
    return comfy.sd.VAE(sd=taesd_state_dict(seed))


# --- a checkpoint the real loaders detect ---------------------------------------------------------


def detectable_sd15_unet_state_dict(seed: int = 3) -> Dict[str, torch.Tensor]:
    """A 320-channel single-level SD1.5 UNet (3 cross-attention layers) in ldm key layout.

    ComfyUI's detection matches SD1.5 on model_channels 320, context 768 and no
    linear projections; the depth is free, so one level keeps it small (~26 M params).
    """
    config = {
        "use_checkpoint": False,
        "image_size": 32,
        "out_channels": 4,
        "use_spatial_transformer": True,
        "legacy": False,
        "adm_in_channels": None,
        "in_channels": 4,
        "model_channels": 320,
        "num_res_blocks": [1],
        "transformer_depth": [1],
        "channel_mult": [1],
        "transformer_depth_middle": 1,
        "use_linear_in_transformer": False,
        "context_dim": 768,
        "num_heads": 8,
        "transformer_depth_output": [1, 1],
        "use_temporal_resblock": False,
        "use_temporal_attention": False,
    }
    model_config = comfy.supported_models.SD15(dict(config))
    model_config.unet_config.update({"num_heads": 8})
    model = model_config.get_model({}, "", device=torch.device("cpu"))
    randomize_(model.diffusion_model, seed)
    return {k: v.detach().to(torch.float16).contiguous() for k, v in model.diffusion_model.state_dict().items()}


def full_clip_l_state_dict(seed: int = 4) -> Dict[str, torch.Tensor]:
    """A random full-size CLIP-L text encoder (its config is fixed by ComfyUI), HF key layout."""
    import comfy.sd1_clip

    with torch.no_grad():  # the host initialises text_projection in place
        clip = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32)
    randomize_(clip.transformer, seed)
    sd = clip.transformer.state_dict()
    return {k: v.detach().to(torch.float16).contiguous() for k, v in sd.items() if "position_ids" not in k}


def write_detectable_sd15_files(models_dir: str, seed: int = 0) -> Dict[str, str]:
    """Write UNet / CLIP-L / TAESD files for ComfyUI's real loaders; returns the file names.

    Files go to ``unet/``, ``clip/`` and ``vae_approx/`` (folder names every host
    version searches). Skips files that already exist.
    """
    from safetensors.torch import save_file

    out = {
        "unet": os.path.join(models_dir, "unet", "tiny_sd15_unet.safetensors"),
        "clip": os.path.join(models_dir, "clip", "tiny_clip_l.safetensors"),
        "taesd_encoder": os.path.join(models_dir, "vae_approx", "taesd_encoder.safetensors"),
        "taesd_decoder": os.path.join(models_dir, "vae_approx", "taesd_decoder.safetensors"),
    }
    for path in out.values():
        os.makedirs(os.path.dirname(path), exist_ok=True)
    if not os.path.exists(out["unet"]):
        save_file(detectable_sd15_unet_state_dict(seed + 3), out["unet"] + ".part")
        os.replace(out["unet"] + ".part", out["unet"])
    if not os.path.exists(out["clip"]):
        save_file(full_clip_l_state_dict(seed + 4), out["clip"] + ".part")
        os.replace(out["clip"] + ".part", out["clip"])
    if not (os.path.exists(out["taesd_encoder"]) and os.path.exists(out["taesd_decoder"])):
        sd = taesd_state_dict(seed + 2)
        for part in ("encoder", "decoder"):
            prefix = f"taesd_{part}."
            tensors = {k[len(prefix):]: v.contiguous() for k, v in sd.items() if k.startswith(prefix)}
            path = out[f"taesd_{part}"]
            save_file(tensors, path + ".part")
            os.replace(path + ".part", path)
    return {k: os.path.basename(v) for k, v in out.items()}


# --- conditioning without a text encoder (in-process tests) ----------------------------------------


def random_conditioning(arch: str, seed: int, batch: int = 1, tokens: int = 77):
    """A CONDITIONING list like CLIPTextEncode's, from random tensors."""
    gen = torch.Generator().manual_seed(seed)
    dim = 768 if arch == "sd15" else 2048
    cond = torch.randn(batch, tokens, dim, generator=gen)
    extra = {}
    if arch == "sdxl":
        extra["pooled_output"] = torch.randn(batch, 1280, generator=gen)
    return [[cond, extra]]
