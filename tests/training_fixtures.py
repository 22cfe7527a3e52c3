"""Helpers shared by the training tests: tiny models made the way ComfyUI makes them, adapters, snapshots.

ComfyUI loads weights inside ``torch.inference_mode()``; :func:`inference_models` builds the tiny
models there too, so the tests meet the same inference tensors a real prompt does.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from conftest import pack


def inference_models(arch: str = "sd15", seed: int = 0, in_channels: int = 4):
    """``(MODEL, CLIP, VAE)`` of the test kit, built under inference mode (weights are inference tensors)."""
    import comfy.model_patcher
    from testkit import tiny_models

    with torch.inference_mode():
        if in_channels == 4:
            model = tiny_models.build_unet(arch, seed=seed)
        else:
            cls, config = tiny_models.unet_config(arch)
            model_config = cls(dict(config, in_channels=in_channels))
            model_config.unet_config.update({k: v for k, v in config.items() if k in ("num_heads", "num_head_channels")})
            base = model_config.get_model({}, "", device=torch.device("cpu"))
            tiny_models.randomize_(base.diffusion_model, seed)
            model = comfy.model_patcher.ModelPatcher(base, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
        clip = tiny_models.build_clip(arch, seed=seed + 1)
        vae = tiny_models.build_vae(seed=seed + 2)
    return model, clip, vae


def tiny_pva_adapter(model, seed: int = 0, with_layers: bool = True, tokens: int = 4):
    """A PVA-format ID_ADAPTER for ``model``: a small identity transformer (+ random visual projections)."""
    from testkit import synthetic, tiny_models

    host = pack("nodes.common.host")
    IdAdapter = pack("adapters.projectors.id_adapter").IdAdapter
    PVA = pack("adapters.projectors.projector_pva").PVATransformNetwork
    layers = host.cross_attention_layers(model)
    ctx = layers[0].context_dim
    base = host.base_model_of(model)
    with torch.inference_mode(False):
        projector = PVA(in_dim=512, out_dim=ctx, num_q_token=tokens, num_layer=1, heads=8, ff_dim=64)
        tiny_models.randomize_(projector, seed)
        projector.eval().requires_grad_(False)
        per_layer = synthetic.synthetic_adapter(layers, base, ctx, num_tokens=tokens, seed=seed, visual_q=True).layers if with_layers else {}
    return IdAdapter(format="pva", base=base, context_dim=ctx, projector=projector, layers=per_layer, mechanism="joint", metadata={"source": "tiny test PVA"})


def identity(references: int = 2, seed: int = 0):
    from testkit import synthetic

    return synthetic.synthetic_identity(references, seed=seed, clip=False)


def photos(count: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Smooth random 'photos' ``[count, size, size, 3]`` (low-frequency, so the tiny VAE gives varied latents)."""
    gen = torch.Generator().manual_seed(seed)
    small = torch.rand(count, 3, 8, 8, generator=gen)
    return torch.nn.functional.interpolate(small, size=(size, size), mode="bilinear", align_corners=False).permute(0, 2, 3, 1).contiguous()


def snapshot(*modules) -> Dict[str, torch.Tensor]:
    """Every parameter and buffer of ``modules``, cloned (works on inference tensors)."""
    out = {}
    with torch.inference_mode():
        for i, m in enumerate(modules):
            for name, t in m.state_dict(keep_vars=True).items():
                out[f"{i}.{name}"] = t.detach().clone()
    return out


def assert_same(before: Dict[str, torch.Tensor], after: Dict[str, torch.Tensor]) -> None:
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"changed: {changed[:5]}"


def all_inference(module) -> bool:
    return all(p.is_inference() for p in module.parameters())


def fixed_batch(model, vae, seed: int = 123, size: int = 64, rows: int = 2):
    """``(x0, sigma, eps)`` for a fixed evaluation batch of one photo."""
    pers = pack("nodes.training.personalization")
    with torch.inference_mode():
        x0 = pers.encode_latents(vae, model, photos(1, size, seed=seed)).expand(rows, -1, -1, -1).clone()
    gen = torch.Generator().manual_seed(seed)
    sigma = torch.tensor([1.5, 6.0])[:rows]
    eps = torch.randn(x0.shape, generator=gen)
    return x0, sigma, eps


@torch.no_grad()
def x0_prediction(model, x0, sigma, eps, context, y: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The MODEL's (with all its patches) denoised prediction, as its sampler computes it."""
    import comfy.model_management

    with torch.inference_mode():
        comfy.model_management.load_models_gpu([model])
        x = x0 + sigma.reshape(-1, 1, 1, 1) * eps
        options = dict(model.model_options.get("transformer_options", {}))
        options["cond_or_uncond"] = [0]
        kw = {"y": y} if y is not None else {}
        return model.model.apply_model(x, sigma, c_crossattn=context.expand(x.shape[0], -1, -1), transformer_options=options, **kw).float()
