"""Identity-token projectors: parameter names/shapes of the released checkpoints, and
each projector against a float64 reference formula written here.

The layouts come from ``weight_fixtures`` (written from the official code);
full-size layouts are checked on the meta device (no memory), the numerics on
small configurations of the same modules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import pytest
import torch

import weight_fixtures as wf
from conftest import pack

projectors = pack("adapters.projectors.projectors")
identity_mod = pack("adapters.faces.identity")
errors = pack("adapters.weights.weight_errors")

Features = identity_mod.IdentityFeatures


@dataclass(frozen=True)
class EvaFeatures(Features):
    """IdentityFeatures plus the EVA02-CLIP fields PuLID reads."""

    eva_clip_embeds: Optional[torch.Tensor] = None
    eva_clip_hidden: Optional[torch.Tensor] = None


# --- float64 reference formulas --------------------------------------------------------------------


def ln(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def lin(x, w, b=None):
    y = x @ w.T
    return y if b is None else y + b


def leaky(x):
    return torch.where(x > 0, x, 0.01 * x)


def mlp7(s, p, x):
    """Linear-LN-LeakyReLU-Linear-LN-LeakyReLU-Linear (PuLID)."""
    h = leaky(ln(lin(x, s[f"{p}.0.weight"], s[f"{p}.0.bias"]), s[f"{p}.1.weight"], s[f"{p}.1.bias"]))
    h = leaky(ln(lin(h, s[f"{p}.3.weight"], s[f"{p}.3.bias"]), s[f"{p}.4.weight"], s[f"{p}.4.bias"]))
    return lin(h, s[f"{p}.6.weight"], s[f"{p}.6.bias"])


def attention(q, k, v, heads):
    """q [B,Q,H*d], k/v [B,M,H*d] -> [B,Q,H*d], softmax(q k^T / sqrt(d)) v per head."""
    b, nq, width = q.shape
    d = width // heads
    qh = q.reshape(b, nq, heads, d).permute(0, 2, 1, 3)
    kh = k.reshape(b, k.shape[1], heads, d).permute(0, 2, 1, 3)
    vh = v.reshape(b, v.shape[1], heads, d).permute(0, 2, 1, 3)
    w = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1)
    return (w @ vh).permute(0, 2, 1, 3).reshape(b, nq, width)


def perceiver_ref(s, p, x, latents, depth, heads):
    for i in range(depth):
        a = f"{p}layers.{i}.0."
        xn = ln(x, s[a + "norm1.weight"], s[a + "norm1.bias"])
        ln_lat = ln(latents, s[a + "norm2.weight"], s[a + "norm2.bias"])
        q = lin(ln_lat, s[a + "to_q.weight"])
        kv = lin(torch.cat([xn, ln_lat], 1), s[a + "to_kv.weight"])
        half = kv.shape[-1] // 2
        latents = lin(attention(q, kv[..., :half], kv[..., half:], heads), s[a + "to_out.weight"]) + latents
        f = f"{p}layers.{i}.1."
        h = ln(latents, s[f + "0.weight"], s[f + "0.bias"])
        latents = lin(gelu(lin(h, s[f + "1.weight"])), s[f + "3.weight"]) + latents
    return latents


def resampler_ref(s, x, depth, heads):
    if x.dim() == 2:
        x = x[:, None]
    x = lin(x, s["proj_in.weight"], s["proj_in.bias"])
    lat = perceiver_ref(s, "", x, s["latents"].expand(x.shape[0], -1, -1), depth, heads)
    return ln(lin(lat, s["proj_out.weight"], s["proj_out.bias"]), s["norm_out.weight"], s["norm_out.bias"])


def to64(state):
    return {k: v.double() for k, v in state.items()}


def build(name, state, **config_kw):
    cls = projectors.PROJECTORS[name]
    config = cls.config_from_state(state, **config_kw)
    return projectors.build_projector(name, config, state, dtype=torch.float64)


def features(n=2, clip_tokens=7, clip_dim=24, embed_dim=32, face_tokens=None, seed=0, cls=Features, **extra):
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randn(n, 512, generator=gen, dtype=torch.float64) * 20
    return cls(
        arcface=raw,
        arcface_normed=raw / raw.norm(dim=-1, keepdim=True),
        clip_embeds=torch.randn(n, embed_dim, generator=gen, dtype=torch.float64),
        clip_hidden=torch.randn(n, clip_tokens, clip_dim, generator=gen, dtype=torch.float64),
        clip_hidden_uncond=torch.randn(1, clip_tokens, clip_dim, generator=gen, dtype=torch.float64) * 0.1,
        clip_embeds_uncond=torch.randn(1, embed_dim, generator=gen, dtype=torch.float64),
        face_tokens=None if face_tokens is None else torch.randn(n, *face_tokens, generator=gen, dtype=torch.float64),
        **extra,
    )


def close(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


# --- released layouts (full size, meta tensors) ---------------------------------------------------

RELEASED = [
    # (what, projector class, layout, config kwargs, (tokens, dim))
    ("ip-adapter_sd15", "ImageProjection", wf.image_proj_layout(1024, 4, 768), {}, (4, 768)),
    ("ip-adapter_sdxl_vit-h", "ImageProjection", wf.image_proj_layout(1024, 4, 2048), {}, (4, 2048)),
    ("ip-adapter_sdxl (bigG)", "ImageProjection", wf.image_proj_layout(1280, 4, 2048), {}, (4, 2048)),
    ("ip-adapter-plus(-face)_sd15", "PerceiverResampler", wf.resampler_layout(768, 4, 12, 16, 1280, 768), {"input_kind": "clip_hidden"}, (16, 768)),
    ("ip-adapter-plus(-face)_sdxl_vit-h", "PerceiverResampler", wf.resampler_layout(1280, 4, 20, 16, 1280, 2048), {"input_kind": "clip_hidden"}, (16, 2048)),
    ("InstantID ip-adapter", "PerceiverResampler", wf.resampler_layout(1280, 4, 20, 16, 512, 2048), {"input_kind": "arcface"}, (16, 2048)),
    ("FACT Face_Prj_Resampler", "PerceiverResampler", wf.resampler_layout(1024, 4, 12, 16, 512, 768), {"input_kind": "face_tokens"}, (16, 768)),
    ("ip-adapter-full-face_sd15", "FullFaceProjection", wf.full_face_layout(1280, 768), {}, (257, 768)),
    ("ip-adapter-faceid_sd15", "FaceIDProjection", wf.faceid_layout(4, 768), {}, (4, 768)),
    ("ip-adapter-faceid_sdxl", "FaceIDProjection", wf.faceid_layout(4, 2048), {}, (4, 2048)),
    ("ip-adapter-faceid-portrait_sd15", "FaceIDProjection", wf.faceid_layout(16, 768), {}, (16, 768)),
    ("ip-adapter-faceid-plusv2_sd15", "FaceIDPlusProjection", wf.faceid_plus_layout(4, 768), {}, (4, 768)),
    ("ip-adapter-faceid-plusv2_sdxl", "FaceIDPlusProjection", wf.faceid_plus_layout(4, 2048), {}, (4, 2048)),
    ("PVA transform_network", "PVATransformNetwork", wf.pva_transform_layout(), {}, (10, 1024)),
    ("PuLID v1 IDEncoder", "PuLIDIDEncoder", wf.pulid_v1_layout(), {}, (10, 2048)),
    ("PuLID v1.1 IDFormer", "PuLIDIDFormer", wf.pulid_v11_layout(), {}, (32, 2048)),
]


@pytest.mark.parametrize("what,name,layout,kw,tokens", RELEASED, ids=[r[0] for r in RELEASED])
def test_parameter_names_and_shapes_match_released_checkpoints(what, name, layout, kw, tokens):
    cls = projectors.PROJECTORS[name]
    config = cls.config_from_state(wf.meta_state(layout), **kw)
    with torch.device("meta"):
        module = cls(**config)
    got = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    assert got == layout
    assert (module.num_tokens, module.token_dim) == tokens


def test_config_recovers_release_hyperparameters():
    cfg = projectors.PROJECTORS["PerceiverResampler"].config_from_state(wf.meta_state(wf.resampler_layout(1280, 4, 20, 16, 512, 2048)), "arcface")
    assert cfg == dict(dim=1280, depth=4, heads=20, num_queries=16, embedding_dim=512, output_dim=2048, ff_mult=4.0, input_kind="arcface")
    cfg = projectors.PROJECTORS["FaceIDPlusProjection"].config_from_state(wf.meta_state(wf.faceid_plus_layout(4, 2048)), shortcut=True)
    assert (cfg["heads"], cfg["depth"], cfg["clip_dim"], cfg["num_tokens"]) == (32, 4, 1280, 4)


# --- numerics against the references --------------------------------------------------------------


def test_image_projection():
    s = to64(wf.random_state(wf.image_proj_layout(32, 4, 16), seed=1))
    p = build("ImageProjection", s)
    f = features()
    ref = ln(lin(f.clip_embeds, s["proj.weight"], s["proj.bias"]).reshape(2, 4, 16), s["norm.weight"], s["norm.bias"])
    cond, uncond = p(f)
    close(cond, ref)
    # IP-Adapter's negative is image_proj(zeros), not the blank image's embeds
    close(uncond, ln(s["proj.bias"].reshape(1, 4, 16), s["norm.weight"], s["norm.bias"]))
    assert p.input_kind == "clip_embeds"


@pytest.mark.parametrize(
    "kind,x_shape",
    [("clip_hidden", (7, 24)), ("arcface", (512,)), ("face_tokens", (9, 20))],
    ids=["plus-on-clip-hidden", "instantid-on-raw-arcface", "fact-on-face-tokens"],
)
def test_perceiver_resampler(kind, x_shape):
    emb = x_shape[-1]
    s = to64(wf.random_state(wf.resampler_layout(64, 2, 2, 5, emb, 48, ff_mult=2), seed=2))
    p = build("PerceiverResampler", s, input_kind=kind)
    f = features(face_tokens=(9, 20) if kind == "face_tokens" else None)
    x = getattr(f, kind)
    close(p.project(f), resampler_ref(s, x, depth=2, heads=2))
    if kind == "arcface":  # InstantID reads the raw embedding, not the normalised one
        assert not torch.allclose(p.project(f), resampler_ref(s, f.arcface_normed, depth=2, heads=2))
    # negative: InstantID/FACT feed zeros, plus feeds the blank image's CLIP states
    neg = p(f)[1]
    x_neg = f.clip_hidden_uncond if kind == "clip_hidden" else torch.zeros_like(x[:1])
    close(neg, resampler_ref(s, x_neg, depth=2, heads=2))


def test_full_face_projection():
    s = to64(wf.random_state(wf.full_face_layout(24, 16), seed=3))
    p = build("FullFaceProjection", s)
    f = features()
    h = lin(gelu(lin(f.clip_hidden, s["proj.0.weight"], s["proj.0.bias"])), s["proj.2.weight"], s["proj.2.bias"])
    close(p.project(f), ln(h, s["proj.3.weight"], s["proj.3.bias"]))


def test_faceid_projection_reads_normed_embedding():
    s = to64(wf.random_state(wf.faceid_layout(4, 16), seed=4))
    p = build("FaceIDProjection", s)
    f = features()
    h = lin(gelu(lin(f.arcface_normed, s["proj.0.weight"], s["proj.0.bias"])), s["proj.2.weight"], s["proj.2.bias"])
    close(p.project(f), ln(h.reshape(2, 4, 16), s["norm.weight"], s["norm.bias"]))
    assert p.input_kind == "arcface_normed"
    h0 = lin(gelu(s["proj.0.bias"]), s["proj.2.weight"], s["proj.2.bias"])
    close(p(f)[1], ln(h0.reshape(1, 4, 16), s["norm.weight"], s["norm.bias"]))


@pytest.mark.parametrize("shortcut,s_scale", [(True, 1.0), (True, 0.7), (False, 1.0)], ids=["plusv2", "plusv2-s0.7", "plus-v1"])
def test_faceid_plus_projection(shortcut, s_scale):
    s = to64(wf.random_state(wf.faceid_plus_layout(4, 64, clip_dim=24, depth=2), seed=5))
    cls = projectors.PROJECTORS["FaceIDPlusProjection"]
    config = dict(cls.config_from_state(s, shortcut=shortcut), s_scale=s_scale)
    p = projectors.build_projector("FaceIDPlusProjection", config, s, dtype=torch.float64)
    f = features()
    h = lin(gelu(lin(f.arcface_normed, s["proj.0.weight"], s["proj.0.bias"])), s["proj.2.weight"], s["proj.2.bias"])
    q = ln(h.reshape(2, 4, 64), s["norm.weight"], s["norm.bias"])
    r = {k[len("perceiver_resampler.") :]: v for k, v in s.items() if k.startswith("perceiver_resampler.")}
    x = lin(f.clip_hidden, r["proj_in.weight"], r["proj_in.bias"])
    out = ln(lin(perceiver_ref(r, "", x, q, depth=2, heads=1), r["proj_out.weight"], r["proj_out.bias"]), r["norm_out.weight"], r["norm_out.bias"])
    close(p.project(f), q + s_scale * out if shortcut else out)


def test_pva_transform_network_all_references_in_one_sequence():
    s = to64(wf.random_state(wf.pva_transform_layout(in_dim=16, out_dim=32, q=3, layers=2, ff=48), seed=6))
    s["q_tokens"] = s["q_tokens"] * 20
    s["pos_enc"] = s["pos_enc"] * 20
    p = build("PVATransformNetwork", s)
    gen = torch.Generator().manual_seed(7)
    raw = torch.randn(3, 16, generator=gen, dtype=torch.float64)
    f = Features(arcface=raw, arcface_normed=raw / raw.norm(dim=-1, keepdim=True))

    x = torch.cat([raw, s["q_tokens"]], 0)[None]  # [1, R+Q, in]
    x = lin(x, s["0.weight"], s["0.bias"])
    for i in range(2):
        a = f"1.layers.{i}."
        w, b = s[a + "self_attn.in_proj_weight"], s[a + "self_attn.in_proj_bias"]
        q, k, v = lin(x, w[:32], b[:32]), lin(x, w[32:64], b[32:64]), lin(x, w[64:], b[64:])
        sa = lin(attention(q, k, v, heads=8), s[a + "self_attn.out_proj.weight"], s[a + "self_attn.out_proj.bias"])
        x = ln(x + sa, s[a + "norm1.weight"], s[a + "norm1.bias"])  # post-norm
        ff = lin(torch.relu(lin(x, s[a + "linear1.weight"], s[a + "linear1.bias"])), s[a + "linear2.weight"], s[a + "linear2.bias"])
        x = ln(x + ff, s[a + "norm2.weight"], s[a + "norm2.bias"])
    x = ln(x, s["1.norm.weight"], s["1.norm.bias"])
    ref = x[:, -3:] + s["pos_enc"]
    close(p.project(f), ref)
    assert p.project(f).shape == (1, 3, 32)  # one token set for all references


def _eva_features(n=2, eva=24, tokens=5, seed=8):
    gen = torch.Generator().manual_seed(seed)
    f = features(n=n, seed=seed)
    return EvaFeatures(
        arcface=f.arcface, arcface_normed=f.arcface_normed,
        eva_clip_embeds=torch.randn(n, 768, generator=gen, dtype=torch.float64),
        eva_clip_hidden=torch.randn(n, 5, tokens, eva, generator=gen, dtype=torch.float64),
    )


def test_pulid_v1_id_encoder():
    s = to64(wf.random_state(wf.pulid_v1_layout(width=1280, context_dim=16, num_token=5, eva=24, hidden=20), seed=9))
    p = build("PuLIDIDEncoder", s)
    f = _eva_features()
    id_cond = torch.cat([f.arcface, f.eva_clip_embeds], -1)  # raw antelopev2 embedding, as PuLID's pipeline
    tokens = mlp7(s, "body", id_cond).reshape(2, 5, 16)
    per_layer = [mlp7(s, f"mapping_{i}", f.eva_clip_hidden[:, i, :1]) + mlp7(s, f"mapping_patch_{i}", f.eva_clip_hidden[:, i, 1:]).mean(1, keepdim=True) for i in range(5)]
    close(p.project(f), torch.cat([tokens, *per_layer], 1))
    cond, uncond = p(f)
    zeros = torch.zeros(1, 1280, dtype=torch.float64)
    z_layers = [mlp7(s, f"mapping_{i}", torch.zeros(1, 1, 24, dtype=torch.float64)) + mlp7(s, f"mapping_patch_{i}", torch.zeros(1, 4, 24, dtype=torch.float64)).mean(1, keepdim=True) for i in range(5)]
    close(uncond, torch.cat([mlp7(s, "body", zeros).reshape(1, 5, 16), *z_layers], 1))


def test_pulid_v11_id_former():
    s = to64(wf.random_state(wf.pulid_v11_layout(dim=64, depth=10, heads=1, num_id_token=5, num_queries=6, output_dim=16, eva=24, hidden=20), seed=10))
    p = build("PuLIDIDFormer", s)
    f = _eva_features()
    ids = mlp7(s, "id_embedding_mapping", torch.cat([f.arcface, f.eva_clip_embeds], -1)).reshape(2, 5, 64)
    lat = torch.cat([s["latents"].expand(2, -1, -1), ids], 1)
    for i in range(5):
        ctx = torch.cat([ids, mlp7(s, f"mapping_{i}", f.eva_clip_hidden[:, i])], 1)
        sub = {k.replace(f"layers.{2 * i + j}.", f"layers.{j}."): v for j in range(2) for k, v in s.items() if k.startswith(f"layers.{2 * i + j}.")}
        lat = perceiver_ref(sub, "", ctx, lat, depth=2, heads=1)
    close(p.project(f), lat[:, :6] @ s["proj_out"])


def test_pulid_without_eva_features_says_what_is_missing():
    s = wf.random_state(wf.pulid_v1_layout(context_dim=16, eva=24, hidden=20), seed=11)
    p = build("PuLIDIDEncoder", s)
    with pytest.raises(errors.ProjectorInputError, match="EVA02-CLIP"):
        p(features())


def test_missing_clip_features_named():
    s = wf.random_state(wf.resampler_layout(64, 1, 1, 4, 24, 32), seed=12)
    p = build("PerceiverResampler", s, input_kind="clip_hidden")
    f = Features(arcface=torch.ones(1, 512), arcface_normed=torch.ones(1, 512))
    with pytest.raises(errors.ProjectorInputError, match="CLIP_VISION"):
        p(f)


def test_projector_keeps_file_dtype_and_identity_tokens_run():
    """A half-precision file stays half precision; IdAdapter.identity_tokens feeds it (fused references)."""
    id_adapter = pack("adapters.projectors.id_adapter")
    s = {k: v.half() for k, v in wf.random_state(wf.faceid_layout(4, 16), seed=13).items()}
    cls = projectors.PROJECTORS["FaceIDProjection"]
    p = projectors.build_projector("FaceIDProjection", cls.config_from_state(s), s)
    assert next(p.parameters()).dtype == torch.float16
    from testkit.synthetic import synthetic_identity

    adapter = id_adapter.IdAdapter(format="faceid", base="sd15", context_dim=16, projector=p)
    identity = synthetic_identity(references=3, seed=1, clip=False)
    tokens = adapter.identity_tokens(identity)
    assert tokens.cond.shape == (1, 4, 16) and tokens.uncond.shape == (1, 4, 16)
    per_ref = adapter.identity_tokens(identity, per_reference=True)
    assert per_ref.cond.shape == (1, 12, 16)
    expected = p.project(Features(arcface=identity.embeddings.half(), arcface_normed=identity.normed_embeddings.half())).float().reshape(1, 12, 16)
    torch.testing.assert_close(per_ref.cond, expected)


def test_build_projector_rejects_wrong_shapes():
    s = wf.random_state(wf.faceid_layout(4, 16), seed=14)
    config = projectors.PROJECTORS["FaceIDProjection"].config_from_state(s)
    config["num_tokens"] = 8
    with pytest.raises(errors.WeightError, match="do not fit"):
        projectors.build_projector("FaceIDProjection", config, s)
