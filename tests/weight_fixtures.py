"""Synthetic state dicts with the key names and shapes of the released checkpoints.

Written from the official code (read, not copied): tencent-ailab/IP-Adapter
(ip_adapter/resampler.py, ip_adapter.py, ip_adapter_faceid.py,
attention_processor_faceid.py), instantX-research/InstantID
(pipeline_stable_diffusion_xl_instantid.py), ToTheBeginning/PuLID
(pulid/encoders.py, encoders_transformer.py, pipeline_v1_1.py),
AtlantixJJ/PVA-CelebAHQ-IDI (lib/pva.py), modelscope/facechain
(face_adapter/face_adapter_v1.py, face_attention_processor_v1.py).

Nothing here imports the pack: layouts are ``{name: shape}`` dicts built from
those sources, and :func:`random_state` fills them deterministically. The
layer tables are built the way diffusers orders ``unet.attn_processors``
(down blocks, up blocks, then the middle block; attn1 before attn2), with
hidden sizes from ``block_out_channels`` as the official ``set_ip_adapter``
code computes them; ``scale`` divides the channels (10 gives the tiny test
models' 32/64/128).
"""

from __future__ import annotations

import math
from typing import Dict, List, Tuple

import torch

Shape = Tuple[int, ...]
Layout = Dict[str, Shape]

BLOCK_OUT = {"sd15": [320, 640, 1280, 1280], "sd2": [320, 640, 1280, 1280], "sdxl": [320, 640, 1280]}
CONTEXT = {"sd15": 768, "sd2": 1024, "sdxl": 2048}


def diffusers_attention_blocks(base: str) -> List[Tuple[str, int, str]]:
    """``(diffusers transformer-block path, hidden size, ComfyUI-style key string)`` in attn_processors order."""
    boc = BLOCK_OUT[base]
    out = []
    if base in ("sd15", "sd2"):
        downs = [(b, a, 1) for b in range(3) for a in range(2)]
        ups = [(b, a, 1) for b in range(1, 4) for a in range(3)]
        mid_depth = 1
    else:
        downs = [(b, a, 2 if b == 1 else 10) for b in (1, 2) for a in range(2)]
        ups = [(b, a, 10 if b == 0 else 2) for b in (0, 1) for a in range(3)]
        mid_depth = 10
    for b, a, depth in downs:
        for t in range(depth):
            out.append((f"down_blocks.{b}.attentions.{a}.transformer_blocks.{t}", boc[b], ("input", 3 * b + a + 1, t)))
    for b, a, depth in ups:
        for t in range(depth):
            out.append((f"up_blocks.{b}.attentions.{a}.transformer_blocks.{t}", list(reversed(boc))[b], ("output", 3 * b + a, t)))
    for t in range(mid_depth):
        out.append((f"mid_block.attentions.0.transformer_blocks.{t}", boc[-1], ("middle", 0, t)))
    return out


def ip_layer_layout(base: str, scale: int = 1, k: str = "to_k_ip.weight", v: str = "to_v_ip.weight", prefix: str = "ip_adapter", lora_rank: int = 0) -> Tuple[Layout, Dict[str, tuple]]:
    """``ip_adapter.{2k+1}.to_k_ip.weight [C, ctx]`` ... and ``{tensor name: ComfyUI key}``.

    ``lora_rank``: FaceID's LoRAIPAttnProcessor / LoRAAttnProcessor params on every processor (attn1 even, attn2 odd).
    """
    ctx = CONTEXT[base]
    layout: Layout = {}
    where = {}
    for k_index, (_, hidden, key) in enumerate(diffusers_attention_blocks(base)):
        c = hidden // scale
        attn2 = 2 * k_index + 1
        layout[f"{prefix}.{attn2}.{k}"] = (c, ctx)
        layout[f"{prefix}.{attn2}.{v}"] = (c, ctx)
        where[f"{prefix}.{attn2}.{k}"] = key
        if lora_rank:
            for index, kv_in in ((attn2 - 1, c), (attn2, ctx)):
                for name, fan_in in (("to_q_lora", c), ("to_k_lora", kv_in), ("to_v_lora", kv_in), ("to_out_lora", c)):
                    layout[f"{prefix}.{index}.{name}.down.weight"] = (lora_rank, fan_in)
                    layout[f"{prefix}.{index}.{name}.up.weight"] = (c, lora_rank)
    return layout, where


def resampler_layout(dim, depth, heads, num_queries, embedding_dim, output_dim, ff_mult=4, dim_head=64, latents=True) -> Layout:
    inner, ff = heads * dim_head, int(dim * ff_mult)
    layout: Layout = {}
    if latents:
        layout["latents"] = (1, num_queries, dim)
    layout.update({"proj_in.weight": (dim, embedding_dim), "proj_in.bias": (dim,), "proj_out.weight": (output_dim, dim), "proj_out.bias": (output_dim,), "norm_out.weight": (output_dim,), "norm_out.bias": (output_dim,)})
    for i in range(depth):
        p = f"layers.{i}."
        layout.update({
            p + "0.norm1.weight": (dim,), p + "0.norm1.bias": (dim,), p + "0.norm2.weight": (dim,), p + "0.norm2.bias": (dim,),
            p + "0.to_q.weight": (inner, dim), p + "0.to_kv.weight": (2 * inner, dim), p + "0.to_out.weight": (dim, inner),
            p + "1.0.weight": (dim,), p + "1.0.bias": (dim,), p + "1.1.weight": (ff, dim), p + "1.3.weight": (dim, ff),
        })
    return layout


def image_proj_layout(embed_dim, tokens, token_dim) -> Layout:
    return {"proj.weight": (tokens * token_dim, embed_dim), "proj.bias": (tokens * token_dim,), "norm.weight": (token_dim,), "norm.bias": (token_dim,)}


def full_face_layout(hidden, token_dim) -> Layout:
    return {"proj.0.weight": (hidden, hidden), "proj.0.bias": (hidden,), "proj.2.weight": (token_dim, hidden), "proj.2.bias": (token_dim,), "proj.3.weight": (token_dim,), "proj.3.bias": (token_dim,)}


def faceid_layout(tokens, token_dim, id_dim=512) -> Layout:
    return {
        "proj.0.weight": (2 * id_dim, id_dim), "proj.0.bias": (2 * id_dim,), "proj.2.weight": (tokens * token_dim, 2 * id_dim),
        "proj.2.bias": (tokens * token_dim,), "norm.weight": (token_dim,), "norm.bias": (token_dim,),
    }


def faceid_plus_layout(tokens, token_dim, clip_dim=1280, depth=4, ff_mult=4) -> Layout:
    layout = faceid_layout(tokens, token_dim)
    inner = resampler_layout(token_dim, depth, token_dim // 64, tokens, clip_dim, token_dim, ff_mult=ff_mult, latents=False)
    layout.update({f"perceiver_resampler.{k}": v for k, v in inner.items()})
    return layout


def pva_transform_layout(in_dim=512, out_dim=1024, q=10, layers=4, ff=2048) -> Layout:
    layout: Layout = {"0.weight": (out_dim, in_dim), "0.bias": (out_dim,), "q_tokens": (q, in_dim), "pos_enc": (q, out_dim), "1.norm.weight": (out_dim,), "1.norm.bias": (out_dim,)}
    for i in range(layers):
        p = f"1.layers.{i}."
        layout.update({
            p + "self_attn.in_proj_weight": (3 * out_dim, out_dim), p + "self_attn.in_proj_bias": (3 * out_dim,),
            p + "self_attn.out_proj.weight": (out_dim, out_dim), p + "self_attn.out_proj.bias": (out_dim,),
            p + "linear1.weight": (ff, out_dim), p + "linear1.bias": (ff,), p + "linear2.weight": (out_dim, ff), p + "linear2.bias": (out_dim,),
            p + "norm1.weight": (out_dim,), p + "norm1.bias": (out_dim,), p + "norm2.weight": (out_dim,), p + "norm2.bias": (out_dim,),
        })
    return layout


def _mlp_layout(prefix, width_in, h1, h2, width_out) -> Layout:
    return {
        f"{prefix}.0.weight": (h1, width_in), f"{prefix}.0.bias": (h1,), f"{prefix}.1.weight": (h1,), f"{prefix}.1.bias": (h1,),
        f"{prefix}.3.weight": (h2, h1), f"{prefix}.3.bias": (h2,), f"{prefix}.4.weight": (h2,), f"{prefix}.4.bias": (h2,),
        f"{prefix}.6.weight": (width_out, h2), f"{prefix}.6.bias": (width_out,),
    }


def pulid_v1_layout(width=1280, context_dim=2048, num_token=5, eva=1024, hidden=1024) -> Layout:
    """PuLID v1 IDEncoder; the release has eva = hidden = 1024 (smaller values only for fast numeric tests)."""
    h1, h2 = min(context_dim * num_token // 4, 1024), min(context_dim * num_token // 2, 1024)
    layout = _mlp_layout("body", width, h1, h2, context_dim * num_token)
    for i in range(5):
        layout.update(_mlp_layout(f"mapping_{i}", eva, hidden, hidden, context_dim))
        layout.update(_mlp_layout(f"mapping_patch_{i}", eva, hidden, hidden, context_dim))
    return layout


def pulid_v11_layout(dim=1024, depth=10, heads=16, num_id_token=5, num_queries=32, output_dim=2048, id_width=1280, eva=1024, hidden=1024) -> Layout:
    """PuLID v1.1 IDFormer; the release has the defaults."""
    layout = {"latents": (1, num_queries, dim), "proj_out": (dim, output_dim)}
    layout.update({k: v for k, v in resampler_layout(dim, depth, heads, num_queries, 1, 1).items() if k.startswith("layers.")})
    for i in range(5):
        layout.update(_mlp_layout(f"mapping_{i}", eva, hidden, hidden, dim))
    layout.update(_mlp_layout("id_embedding_mapping", id_width, hidden, hidden, dim * num_id_token))
    return layout


def fact_processor_layout(c: int, ctx: int = 768, moved_norm: bool = True) -> Layout:
    layout = {
        "linear.weight": (c, ctx), "linear.bias": (c,), "attn.to_q.weight": (c, c), "attn.to_k.weight": (c, c), "attn.to_v.weight": (c, c),
        "attn.to_out.0.weight": (c, c), "attn.to_out.0.bias": (c,), "ff.net.0.proj.weight": (8 * c, c), "ff.net.0.proj.bias": (8 * c,),
        "ff.net.2.weight": (c, 4 * c), "ff.net.2.bias": (c,), "norm1.weight": (c,), "norm1.bias": (c,), "norm2.weight": (c,), "norm2.bias": (c,),
        "alpha_attn": (), "alpha_dense": (),
    }
    if moved_norm:
        layout.update({"ln.weight": (c,), "ln.bias": (c,)})
    return layout


def random_state(layout: Layout, seed: int = 0, dtype=torch.float32) -> Dict[str, torch.Tensor]:
    """Deterministic values: matrices N(0, 1/fan_in), LayerNorm scales 1 + N(0, 0.1), the rest N(0, 0.05); learned tokens N(0, 0.05)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(layout):
        shape = layout[name]
        if len(shape) >= 2 and name not in ("latents", "q_tokens", "pos_enc") and not name.endswith("latents"):
            value = torch.randn(shape, generator=gen) / math.sqrt(shape[-1])
        elif len(shape) == 1 and name.endswith("weight"):  # every 1-D "weight" in these layouts is a LayerNorm scale
            value = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            value = 0.05 * torch.randn(shape, generator=gen) if len(shape) else torch.tensor(0.3 + 0.1 * torch.randn((), generator=gen).item())
        out[name] = value.to(dtype)
    return out


def prefixed(prefix: str, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {f"{prefix}{k}": v for k, v in state.items()}


def meta_state(layout: Layout) -> Dict[str, torch.Tensor]:
    """Shape-only tensors (no memory) for layout checks at full size."""
    return {k: torch.empty(v, device="meta") for k, v in layout.items()}


# --- whole files (real key names; projector internals small, outward widths real) ----------------


def ip_family_state(fmt: str, base: str, scale: int = 10, seed: int = 0, dtype=torch.float32, lora_rank: int = 0):
    """A checkpoint of ``fmt`` ("ip_adapter", "ip_adapter_plus", "ip_adapter_full_face", "faceid",
    "faceid_plus", "instantid") for ``base``; returns ``(state, {to_k tensor name: ComfyUI key})``."""
    ctx = CONTEXT[base]
    layers, where = ip_layer_layout(base, scale=scale, lora_rank=lora_rank)
    proj = {
        "ip_adapter": lambda: image_proj_layout(1280 if base == "sdxl" else 1024, 4, ctx),
        "ip_adapter_plus": lambda: resampler_layout(64, 1, 1, 16, 1280, ctx),
        "ip_adapter_full_face": lambda: full_face_layout(1280, ctx),
        "faceid": lambda: faceid_layout(4, ctx),
        "faceid_plus": lambda: faceid_plus_layout(4, ctx, clip_dim=1280, depth=1, ff_mult=1),
        "instantid": lambda: resampler_layout(64, 1, 1, 16, 512, ctx),
    }[fmt]()
    state = random_state(layers, seed=seed, dtype=dtype)
    state.update(prefixed("image_proj.", random_state(proj, seed=seed + 1, dtype=dtype)))
    return state, where


def pulid_state(version: str = "v1.1", seed: int = 0, scale: int = 10, dtype=torch.float32):
    layers, where = ip_layer_layout("sdxl", scale=scale, k="id_to_k.weight", v="id_to_v.weight", prefix="id_adapter_attn_layers")
    if version == "v1.1":
        encoder = pulid_v11_layout(dim=64, depth=5, heads=1, num_queries=8, output_dim=2048, eva=32, hidden=32)
    else:
        encoder = pulid_v1_layout(context_dim=2048, num_token=1, eva=32, hidden=32)  # 1 body token keeps it small
    state = random_state(layers, seed=seed, dtype=dtype)
    state.update(prefixed("id_adapter.", random_state(encoder, seed=seed + 1, dtype=dtype)))
    return state, where


def fact_state(scale: int = 10, seed: int = 0, moved_norm: bool = True, dtype=torch.float32):
    """FACT: ``<unet path>.attn2.processor.<name>`` for the 16 SD1.5 layers + ``local_fac_prj.*``."""
    state = {}
    where = {}
    for i, (path, hidden, key) in enumerate(diffusers_attention_blocks("sd15")):
        proc = random_state(fact_processor_layout(hidden // scale, 768, moved_norm), seed=seed + i, dtype=dtype)
        state.update(prefixed(f"{path}.attn2.processor.", proc))
        where[f"{path}.attn2.processor.linear.weight"] = key
    state.update(prefixed("local_fac_prj.", random_state(resampler_layout(64, 1, 1, 16, 512, 768), seed=seed + 99, dtype=dtype)))
    return state, where


def pva_checkpoint(scale: int = 10, seed: int = 0, with_transform: bool = True, dtype=torch.float32):
    """PVA's FPIP.bin as saved: ``{"unet": {...attn2.to_visual_q/k/v.weight}, "transform_network": {...}, "modifier_vec": [1024]}``."""
    unet, where = {}, {}
    gen = torch.Generator().manual_seed(seed)
    for path, hidden, key in diffusers_attention_blocks("sd2"):
        c = hidden // scale
        unet[f"{path}.attn2.to_visual_q.weight"] = (torch.randn(c, c, generator=gen) / math.sqrt(c)).to(dtype)
        unet[f"{path}.attn2.to_visual_k.weight"] = (torch.randn(c, 1024, generator=gen) / 32).to(dtype)
        unet[f"{path}.attn2.to_visual_v.weight"] = (torch.randn(c, 1024, generator=gen) / 32).to(dtype)
        where[f"{path}.attn2.to_visual_q.weight"] = key
    ckpt = {"unet": unet, "modifier_vec": torch.randn(1024, generator=gen).to(dtype)}
    if with_transform:
        ckpt["transform_network"] = random_state(pva_transform_layout(512, 1024, 10, 1, 64), seed=seed + 1, dtype=dtype)
    return ckpt, where


def transface_state_dict(depth=12, dim=512, patch=9, seed=0, heads=True):
    """Random weights under the names and shapes of ms1mv2_model_TransFace_S.pt (TransFace-S, FACT's face encoder).

    ``heads=False`` leaves out the global-embedding head and SE weighting (75 MB of zeros that the
    patch tokens never read); ``depth`` 1-2 makes a small file that loads through the real node.
    """
    gen = torch.Generator().manual_seed(seed)
    grid = 112 // patch
    n = grid * grid

    def rnd(*shape, scale=None):
        fan_in = shape[-1] if len(shape) > 1 else 1
        return torch.randn(*shape, generator=gen) * (scale if scale is not None else 1.0 / math.sqrt(fan_in))

    sd = {
        "patch_embed.proj.weight": rnd(dim, 3, patch, patch, scale=1.0 / math.sqrt(3 * patch * patch)),
        "patch_embed.proj.bias": rnd(dim, scale=0.02),
        "pos_embed": rnd(1, n, dim, scale=0.02),
        "mask_token": rnd(1, 1, dim, scale=0.02),
        "norm.weight": 1.0 + rnd(dim, scale=0.1),
        "norm.bias": rnd(dim, scale=0.02),
    }
    for i in range(depth):
        p = f"blocks.{i}."
        sd.update(
            {
                p + "norm1.weight": 1.0 + rnd(dim, scale=0.1),
                p + "norm1.bias": rnd(dim, scale=0.02),
                p + "attn.qkv.weight": rnd(3 * dim, dim),
                p + "attn.proj.weight": rnd(dim, dim),
                p + "attn.proj.bias": rnd(dim, scale=0.02),
                p + "norm2.weight": 1.0 + rnd(dim, scale=0.1),
                p + "norm2.bias": rnd(dim, scale=0.02),
                p + "mlp.fc1.weight": rnd(4 * dim, dim),
                p + "mlp.fc1.bias": rnd(4 * dim, scale=0.02),
                p + "mlp.fc2.weight": rnd(dim, 4 * dim),
                p + "mlp.fc2.bias": rnd(dim, scale=0.02),
            }
        )
    if heads:  # the global-embedding head and SE weighting: in the file, unused for patch tokens
        half = torch.float16
        sd.update(
            {
                "feature.0.weight": torch.zeros(dim, dim * n, dtype=half),
                "feature.1.weight": torch.ones(dim),
                "feature.1.bias": torch.zeros(dim),
                "feature.1.running_mean": torch.zeros(dim),
                "feature.1.running_var": torch.ones(dim),
                "feature.1.num_batches_tracked": torch.tensor(0),
                "feature.2.weight": torch.zeros(512, dim),
                "feature.3.weight": torch.ones(512),
                "feature.3.bias": torch.zeros(512),
                "feature.3.running_mean": torch.zeros(512),
                "feature.3.running_var": torch.ones(512),
                "feature.3.num_batches_tracked": torch.tensor(0),
                "senet.0.weight": torch.zeros(n, dim * n, dtype=half),
                "senet.2.weight": torch.zeros(n, n),
            }
        )
    return sd


def flatten_nested(obj, prefix=""):
    out = {}
    for k, v in obj.items():
        if isinstance(v, dict):
            out.update(flatten_nested(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def nested_ip(state):
    """The ``.bin`` layout of IP-Adapter files: ``{"image_proj": {...}, "ip_adapter": {...}}``."""
    out = {"image_proj": {}, "ip_adapter": {}}
    for k, v in state.items():
        group, _, rest = k.partition(".")
        out[group][rest] = v
    return out


# --- PuLID's image-side models: EVA02-CLIP-L-14-336 and facexlib's BiSeNet --------------------------


def eva_clip_layout(width=1024, depth=24, patch=14, image_size=336, mlp_hidden=2730, embed_dim=768, prefix="visual.", text=True, rope=True) -> Layout:
    """``EVA02_CLIP_L_336_psz14_s6B.pt`` (BAAI EVA-CLIP, ``eva_vit_model.py`` with subln + naiveswiglu + rope, qkv_bias):
    ``visual.*`` vision tower (the defaults are the release's sizes), a few ``text.*`` stand-ins and ``logit_scale``.
    ``rope``: the RoPE tables the model registers as buffers (``visual.rope.freqs_*`` and each block's
    ``attn.rope.freqs_*``, the same module)."""
    grid = image_size // patch
    head_dim = 64 if width >= 64 else width
    p = prefix
    layout = {
        p + "cls_token": (1, 1, width), p + "pos_embed": (1, grid * grid + 1, width),
        p + "patch_embed.proj.weight": (width, 3, patch, patch), p + "patch_embed.proj.bias": (width,),
        p + "norm.weight": (width,), p + "norm.bias": (width,), p + "head.weight": (embed_dim, width), p + "head.bias": (embed_dim,),
    }
    if rope:
        layout.update({p + "rope.freqs_cos": (grid * grid, head_dim), p + "rope.freqs_sin": (grid * grid, head_dim)})
    for i in range(depth):
        b = f"{p}blocks.{i}."
        layout.update({
            b + "norm1.weight": (width,), b + "norm1.bias": (width,), b + "norm2.weight": (width,), b + "norm2.bias": (width,),
            b + "attn.q_bias": (width,), b + "attn.v_bias": (width,),
            b + "attn.q_proj.weight": (width, width), b + "attn.k_proj.weight": (width, width), b + "attn.v_proj.weight": (width, width),
            b + "attn.inner_attn_ln.weight": (width,), b + "attn.inner_attn_ln.bias": (width,),
            b + "attn.proj.weight": (width, width), b + "attn.proj.bias": (width,),
            b + "mlp.w1.weight": (mlp_hidden, width), b + "mlp.w1.bias": (mlp_hidden,), b + "mlp.w2.weight": (mlp_hidden, width), b + "mlp.w2.bias": (mlp_hidden,),
            b + "mlp.ffn_ln.weight": (mlp_hidden,), b + "mlp.ffn_ln.bias": (mlp_hidden,), b + "mlp.w3.weight": (width, mlp_hidden), b + "mlp.w3.bias": (width,),
        })
        if rope:
            layout.update({b + "attn.rope.freqs_cos": (grid * grid, head_dim), b + "attn.rope.freqs_sin": (grid * grid, head_dim)})
    if text:
        layout.update({"text.positional_embedding": (77, 8), "text.token_embedding.weight": (16, 8), "text.ln_final.weight": (8,), "text.text_projection": (8, embed_dim), "logit_scale": ()})
    return layout


def tiny_eva_state(seed=0, width=128, depth=6, patch=14, image_size=42, mlp_hidden=96, embed_dim=48, prefix="visual.", text=True, dtype=torch.float32):
    """A tiny EVA02-CLIP (2 heads of 64, 3x3 patches, 6 blocks: PuLID's five taps at blocks 1..5) under the release's names."""
    return random_state(eva_clip_layout(width, depth, patch, image_size, mlp_hidden, embed_dim, prefix, text), seed=seed, dtype=dtype)


def _conv_bn(prefix: str, cin: int, cout: int, k: int) -> Layout:
    return {
        prefix + "conv.weight": (cout, cin, k, k), prefix + "bn.weight": (cout,), prefix + "bn.bias": (cout,),
        prefix + "bn.running_mean": (cout,), prefix + "bn.running_var": (cout,), prefix + "bn.num_batches_tracked": (),
    }


def _bn(prefix: str, c: int) -> Layout:
    return {prefix + "weight": (c,), prefix + "bias": (c,), prefix + "running_mean": (c,), prefix + "running_var": (c,), prefix + "num_batches_tracked": ()}


def bisenet_layout(classes=19) -> Layout:
    """facexlib ``parsing_bisenet.pth`` (``facexlib/parsing/bisenet.py`` + ``resnet.py``: BiSeNet(num_class=19))."""
    layout: Layout = {"cp.resnet.conv1.weight": (64, 3, 7, 7)}
    layout.update(_bn("cp.resnet.bn1.", 64))
    cin = 64
    for n, cout in enumerate((64, 128, 256, 512), start=1):
        for j in range(2):
            b = f"cp.resnet.layer{n}.{j}."
            first_in = cin if j == 0 else cout
            layout[b + "conv1.weight"] = (cout, first_in, 3, 3)
            layout.update(_bn(b + "bn1.", cout))
            layout[b + "conv2.weight"] = (cout, cout, 3, 3)
            layout.update(_bn(b + "bn2.", cout))
            if j == 0 and (first_in != cout or n > 1):
                layout[b + "downsample.0.weight"] = (cout, first_in, 1, 1)
                layout.update(_bn(b + "downsample.1.", cout))
        cin = cout
    for name, c_in in (("arm16", 256), ("arm32", 512)):
        layout.update(_conv_bn(f"cp.{name}.conv.", c_in, 128, 3))
        layout[f"cp.{name}.conv_atten.weight"] = (128, 128, 1, 1)
        layout.update(_bn(f"cp.{name}.bn_atten.", 128))
    layout.update(_conv_bn("cp.conv_head32.", 128, 128, 3))
    layout.update(_conv_bn("cp.conv_head16.", 128, 128, 3))
    layout.update(_conv_bn("cp.conv_avg.", 512, 128, 1))
    layout.update(_conv_bn("ffm.convblk.", 256, 256, 1))
    layout.update({"ffm.conv1.weight": (64, 256, 1, 1), "ffm.conv2.weight": (256, 64, 1, 1)})
    for name, cin_, mid in (("conv_out", 256, 256), ("conv_out16", 128, 64), ("conv_out32", 128, 64)):
        layout.update(_conv_bn(f"{name}.conv.", cin_, mid, 3))
        layout[f"{name}.conv_out.weight"] = (classes, mid, 1, 1)
    return layout


def bisenet_state(seed=0, with_counters=True, dtype=torch.float32) -> Dict[str, torch.Tensor]:
    """Random BiSeNet weights: convs N(0, 2/fan_in) (He, so activations stay O(1)), BN scale ~1, running_var > 0."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in sorted(bisenet_layout().items()):
        if name.endswith("num_batches_tracked"):
            if with_counters:
                out[name] = torch.tensor(1000, dtype=torch.int64)
            continue
        if len(shape) == 4:
            fan_in = shape[1] * shape[2] * shape[3]
            value = torch.randn(shape, generator=gen) * math.sqrt(2.0 / fan_in)
        elif name.endswith("running_var"):
            value = 0.5 + torch.rand(shape, generator=gen)
        elif name.endswith("weight"):
            value = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            value = 0.1 * torch.randn(shape, generator=gen)
        out[name] = value.to(dtype)
    return out


def pulid_comfyui_state(official: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The same PuLID weights in PuLID_ComfyUI's ``ip-adapter_pulid_sdxl_fp16.safetensors`` names:
    ``id_adapter.X`` -> ``image_proj.X``, ``id_adapter_attn_layers.N.id_to_k.weight`` -> ``ip_adapter.N.to_k_ip.weight``."""
    out = {}
    for key, value in official.items():
        if key.startswith("id_adapter."):
            out["image_proj." + key[len("id_adapter."):]] = value
        elif key.startswith("id_adapter_attn_layers."):
            out[key.replace("id_adapter_attn_layers.", "ip_adapter.").replace(".id_to_k.", ".to_k_ip.").replace(".id_to_v.", ".to_v_ip.")] = value
    return out
