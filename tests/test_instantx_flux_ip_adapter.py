"""InstantX's Flux IP-Adapter: file layout, detection, the SigLIP pooling head, projection and per-block attention
against float64 references written here from the official code's behaviour (``infer_flux_ipa_siglip.py``:
``MLPProjModel``, ``IPAFluxAttnProcessor2_0``; transformers' ``SiglipMultiheadAttentionPoolingHead``):

- pooled = first row of ``h + fc2(gelu_tanh(fc1(LN(h))))``, ``h = out_proj(softmax(q k^T / sqrt(d)) v)`` with
  ``q = probe Wq + bq``, ``k = x Wk + bk``, ``v = x Wv + bv`` (``in_proj`` split in three), 16 heads;
- tokens = LayerNorm(W2 gelu(W0 pooled + b0) + b2) reshaped to ``[T, C]``;
- per block: ``softmax(q rms(K)^T / sqrt(D)) V``, ``K = tokens Wk``, ``V = tokens Wv`` (no bias), rms over the head dim
  (eps 1e-5, no weight).
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import pack

ix = pack("adapters.flux.instantx_flux_ip_adapter")
weight_errors = pack("adapters.weights.weight_errors")
formats = pack("adapters.formats.weight_formats")


def instantx_state(n_blocks=3, hidden=64, context=32, embed=24, tokens=4, seed=0, dtype=torch.float32):
    """A random file in the published key layout (tiny widths; the release: 57 blocks, 3072, 4096, 1152, 128 tokens)."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *shape: (torch.randn(*shape, generator=gen) / max(1, shape[-1]) ** 0.5).to(dtype)  # noqa: E731
    state = {
        "image_proj.proj.0.weight": r(2 * embed, embed), "image_proj.proj.0.bias": 0.1 * r(2 * embed),
        "image_proj.proj.2.weight": r(tokens * context, 2 * embed), "image_proj.proj.2.bias": 0.1 * r(tokens * context),
        "image_proj.norm.weight": 1 + 0.1 * r(context), "image_proj.norm.bias": 0.1 * r(context),
    }
    for j in range(n_blocks):
        state[f"ip_adapter.{j}.to_k_ip.weight"] = r(hidden, context)
        state[f"ip_adapter.{j}.to_v_ip.weight"] = r(hidden, context)
    return state


def siglip_head_state(width=32, inner=48, seed=3, prefix="vision_model.head."):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=gen) / max(1, shape[-1]) ** 0.5  # noqa: E731
    names = {"probe": (1, 1, width), "attention.in_proj_weight": (3 * width, width), "attention.in_proj_bias": (3 * width,),
             "attention.out_proj.weight": (width, width), "attention.out_proj.bias": (width,),
             "layernorm.weight": (width,), "layernorm.bias": (width,), "mlp.fc1.weight": (inner, width),
             "mlp.fc1.bias": (inner,), "mlp.fc2.weight": (width, inner), "mlp.fc2.bias": (width,)}
    return {prefix + k: r(*shape) + (1.0 if k == "layernorm.weight" else 0.0) for k, shape in names.items()}


def pooled_reference(head, x, heads):
    """transformers' SigLIP attention-pooling head, float64."""
    p = {k.split("head.", 1)[1]: v.double() for k, v in head.items()}
    x = x.double()
    b, n, c = x.shape
    d = c // heads
    wq, wk, wv = p["attention.in_proj_weight"].chunk(3)
    bq, bk, bv = p["attention.in_proj_bias"].chunk(3)
    q = (p["probe"].expand(b, 1, c) @ wq.T + bq).view(b, 1, heads, d).transpose(1, 2)
    k = (x @ wk.T + bk).view(b, n, heads, d).transpose(1, 2)
    v = (x @ wv.T + bv).view(b, n, heads, d).transpose(1, 2)
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1) @ v
    h = a.transpose(1, 2).reshape(b, 1, c) @ p["attention.out_proj.weight"].T + p["attention.out_proj.bias"]
    ln = torch.nn.functional.layer_norm(h, (c,), p["layernorm.weight"], p["layernorm.bias"], eps=1e-6)
    mid = ln @ p["mlp.fc1.weight"].T + p["mlp.fc1.bias"]
    mid = 0.5 * mid * (1 + torch.tanh(math.sqrt(2 / math.pi) * (mid + 0.044715 * mid ** 3)))
    return (h + mid @ p["mlp.fc2.weight"].T + p["mlp.fc2.bias"])[:, 0]


def tokens_reference(state, pooled):
    p = {k: v.double() for k, v in state.items()}
    context = p["image_proj.norm.weight"].shape[0]
    h = pooled.double() @ p["image_proj.proj.0.weight"].T + p["image_proj.proj.0.bias"]
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    h = (h @ p["image_proj.proj.2.weight"].T + p["image_proj.proj.2.bias"]).view(pooled.shape[0], -1, context)
    return torch.nn.functional.layer_norm(h, (context,), p["image_proj.norm.weight"], p["image_proj.norm.bias"], eps=1e-5)


def residual_reference(state, j, q, toks):
    """``q`` ``[B, H, L, D]`` pre-RoPE queries; -> ``[B, L, H*D]``."""
    b, h, n, d = q.shape
    k = (toks.double() @ state[f"ip_adapter.{j}.to_k_ip.weight"].double().T).view(b, -1, h, d).transpose(1, 2)
    v = (toks.double() @ state[f"ip_adapter.{j}.to_v_ip.weight"].double().T).view(b, -1, h, d).transpose(1, 2)
    k = k / torch.sqrt(k.pow(2).mean(-1, keepdim=True) + 1e-5)
    a = torch.softmax(q.double() @ k.transpose(-1, -2) / math.sqrt(d), dim=-1) @ v
    return a.transpose(1, 2).reshape(b, n, h * d)


def test_pooling_head_projection_and_block_attention_match_float64_references():
    gen = torch.Generator().manual_seed(7)
    head_state = siglip_head_state(width=24, inner=40)
    head = ix.SiglipPoolingHead.from_state(head_state, heads=4)
    state = instantx_state(embed=24)
    model = ix.InstantXFluxIPAdapter.from_state(state, head)
    assert (model.embed_dim, model.hidden, len(model.blocks), model.image_proj.num_tokens) == (24, 64, 3, 4)
    hidden = torch.randn(2, 9, 24, generator=gen)
    with torch.no_grad():
        pooled = model.pooled(hidden)
        torch.testing.assert_close(pooled.double(), pooled_reference(head_state, hidden, 4), rtol=1e-4, atol=1e-5)
        toks = model.tokens(pooled)
        torch.testing.assert_close(toks.double(), tokens_reference(state, pooled), rtol=1e-4, atol=1e-5)
        q = torch.randn(2, 4, 5, 16, generator=gen)
        got = ix.image_prompt_attention(model.blocks[2], q, toks)
    torch.testing.assert_close(got.double(), residual_reference(state, 2, q, toks), rtol=1e-4, atol=1e-5)
    assert ix.SiglipPoolingHead.from_state(siglip_head_state(prefix="head."), heads=4) is not None  # bare SigLIP key layout


def test_detection_and_bad_files():
    state = instantx_state()
    assert ix.is_instantx_flux(state)
    unet_like = {k.replace("ip_adapter.0.", "ip_adapter.1."): v for k, v in state.items()}  # UNet IP-Adapters start at 1
    assert not ix.is_instantx_flux(unet_like)
    with pytest.raises(weight_errors.WeightError, match="InstantX"):
        formats.detect_format(state)  # 'Load identity adapter' points to the InstantX nodes
    with pytest.raises(weight_errors.WeightError, match="lacks"):
        ix.InstantXFluxIPAdapter.from_state({k: v for k, v in state.items() if "norm.bias" not in k})
    with pytest.raises(weight_errors.WeightError, match="numbered"):
        ix.InstantXFluxIPAdapter.from_state({k: v for k, v in state.items() if not k.startswith("ip_adapter.1.")})
    with pytest.raises(weight_errors.WeightError, match="pooling head"):
        ix.SiglipPoolingHead.from_state({"vision_model.post_layernorm.weight": torch.ones(4)})
    model = ix.InstantXFluxIPAdapter.from_state(state)
    with pytest.raises(weight_errors.WeightError, match="19 \\+ 38"):
        model.check_model(2, 2, 64, 4)
    model.check_model(1, 2, 64, 4)
    assert model.block_index("single_block", 1, 1) == 2


# --- on the tiny Flux (newer host only) ----------------------------------------------------------
# The reference block forwards are written from the weights (float64): Flux's double block (modulation =
# Linear(silu(vec)) split into shift/scale/gate, LayerNorm without affine at 1e-6, qkv, RMS QK-norm with its
# scale, RoPE, joint SDPA over [txt; img], proj, gated MLP) and single block (linear1 -> qkv | mlp, linear2 of
# [attn; gelu_tanh(mlp)]), with InstantX's residual added to the attention output before the projection.

from test_pulid_flux import _tiny_flux, flux_only, foreign_recorder, run_flux  # noqa: E402


def _f(x):
    return x.double()


def _modulate(p, name, vec, n):
    out = torch.nn.functional.silu(_f(vec)) @ _f(p[name + ".weight"]).T + _f(p[name + ".bias"])
    return [c[:, None, :] for c in out.chunk(n, dim=-1)]


def _ln(x):
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), eps=1e-6)


def _rms(x, scale):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * _f(scale)


def _rope(x, pe):
    x_ = x.reshape(*x.shape[:-1], -1, 1, 2)
    pe = _f(pe)
    return (pe[..., 0] * x_[..., 0] + pe[..., 1] * x_[..., 1]).reshape(*x.shape)


def _heads(qkv, h):
    b, n = qkv.shape[:2]
    return qkv.view(b, n, 3, h, -1).permute(2, 0, 3, 1, 4)


def _sdpa(q, k, v):
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v
    return a.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def double_reference(block, args, ip):
    """``ip(q_img_pre_rope) -> [B, N, C]`` (already weighted) or None."""
    p, h = block.state_dict(), block.num_heads
    img, txt, vec, pe = _f(args["img"]), _f(args["txt"]), args["vec"], args["pe"]
    im1s, im1c, im1g, im2s, im2c, im2g = _modulate(p, "img_mod.lin", vec, 6)
    tx1s, tx1c, tx1g, tx2s, tx2c, tx2g = _modulate(p, "txt_mod.lin", vec, 6)
    iq, ik, iv = _heads((_ln(img) * (1 + im1c) + im1s) @ _f(p["img_attn.qkv.weight"]).T + _f(p["img_attn.qkv.bias"]), h)
    tq, tk, tv = _heads((_ln(txt) * (1 + tx1c) + tx1s) @ _f(p["txt_attn.qkv.weight"]).T + _f(p["txt_attn.qkv.bias"]), h)
    iq, ik = _rms(iq, p["img_attn.norm.query_norm.scale"]), _rms(ik, p["img_attn.norm.key_norm.scale"])
    tq, tk = _rms(tq, p["txt_attn.norm.query_norm.scale"]), _rms(tk, p["txt_attn.norm.key_norm.scale"])
    attn = _sdpa(_rope(torch.cat([tq, iq], 2), pe), _rope(torch.cat([tk, ik], 2), pe), torch.cat([tv, iv], 2))
    m = txt.shape[1]
    t_attn, i_attn = attn[:, :m], attn[:, m:]
    if ip is not None:
        i_attn = i_attn + ip(iq)

    def mlp(x, pre):
        hid = x @ _f(p[pre + ".0.weight"]).T + _f(p[pre + ".0.bias"])
        return torch.nn.functional.gelu(hid, approximate="tanh") @ _f(p[pre + ".2.weight"]).T + _f(p[pre + ".2.bias"])

    img = img + im1g * (i_attn @ _f(p["img_attn.proj.weight"]).T + _f(p["img_attn.proj.bias"]))
    img = img + im2g * mlp(_ln(img) * (1 + im2c) + im2s, "img_mlp")
    txt = txt + tx1g * (t_attn @ _f(p["txt_attn.proj.weight"]).T + _f(p["txt_attn.proj.bias"]))
    txt = txt + tx2g * mlp(_ln(txt) * (1 + tx2c) + tx2s, "txt_mlp")
    return img, txt


def single_reference(block, args, ip):
    p, h, c = block.state_dict(), block.num_heads, block.hidden_size
    x, vec, pe = _f(args["img"]), args["vec"], args["pe"]
    shift, scale, gate = _modulate(p, "modulation.lin", vec, 3)
    lin1 = (_ln(x) * (1 + scale) + shift) @ _f(p["linear1.weight"]).T + _f(p["linear1.bias"])
    q, k, v = _heads(lin1[..., :3 * c].contiguous(), h)
    q, k = _rms(q, p["norm.query_norm.scale"]), _rms(k, p["norm.key_norm.scale"])
    attn = _sdpa(_rope(q, pe), _rope(k, pe), v)
    if ip is not None:
        attn = attn + ip(q)
    mlp = torch.nn.functional.gelu(lin1[..., 3 * c:], approximate="tanh")
    return x + gate * (torch.cat([attn, mlp], -1) @ _f(p["linear2.weight"]).T + _f(p["linear2.bias"]))


@pytest.fixture(scope="module")
def tiny_flux_model():
    return _tiny_flux().build_flux(0)


def prompt_tokens(model, seed=5):
    gen = torch.Generator().manual_seed(seed)
    IdentityTokens = pack("adapters.projectors.id_adapter").IdentityTokens
    return IdentityTokens(cond=model.tokens(torch.randn(1, model.embed_dim, generator=gen)),
                          uncond=model.tokens(torch.randn(1, model.embed_dim, generator=gen)))


def flux_state():
    tf = _tiny_flux()
    return instantx_state(n_blocks=tf.DEPTH + tf.DEPTH_SINGLE, hidden=tf.HIDDEN, context=48, embed=24, tokens=6)


def adapter_on(flux, state, weight, apply_to="both", foreign=None):
    stage = pack("nodes.flux.instantx_flux_ip_adapter_stage")
    dispatcher = pack("nodes.dispatch.dispatcher")
    tf = _tiny_flux()
    if foreign is not None:
        flux = flux.clone()
        for kind, n in (("double_block", tf.DEPTH), ("single_block", tf.DEPTH_SINGLE)):
            for i in range(n):
                flux.set_model_patch_replace(foreign, "dit", kind, i)
    model = ix.InstantXFluxIPAdapter.from_state(state)
    with torch.no_grad():
        tokens = prompt_tokens(model)
    return stage.apply_instantx_flux_ip_adapter(flux, model, tokens, dispatcher.StageSchedule(weight=weight, apply_to=apply_to)), tokens


@flux_only
@pytest.mark.parametrize("apply_to", ["both", "cond", "uncond"])
def test_every_block_gets_the_official_residual_before_its_projection(tiny_flux_model, apply_to):
    """Each double block's image attention and each single block's joint attention get ``w * attn(q_pre_rope, rms(K), V)``
    before the output projection (float64 reference blocks) on the rows ``apply_to`` selects; other rows are the plain
    block's; a foreign replace installed before still runs on every block."""
    tf = _tiny_flux()
    state = flux_state()
    records, weight = [], 0.8
    model, tokens = adapter_on(tiny_flux_model, state, weight, apply_to, foreign_recorder(records))
    run_flux(model, (0, 1))
    assert len(records) == tf.DEPTH + tf.DEPTH_SINGLE
    rows = {"both": [True, True], "cond": [True, False], "uncond": [False, True]}[apply_to]
    toks = torch.cat([tokens.cond, tokens.uncond]).double()
    net = tiny_flux_model.model.diffusion_model
    for j, rec in enumerate(records):
        double = j < tf.DEPTH
        block = net.double_blocks[j] if double else net.single_blocks[j - tf.DEPTH]
        for r, on in enumerate(rows):
            args = {k: v[r:r + 1] for k, v in rec["args"].items() if k != "pe"}
            args["pe"] = rec["args"]["pe"][r:r + 1] if rec["args"]["pe"].shape[0] > 1 else rec["args"]["pe"]
            ip = (lambda q, r=r, j=j: weight * residual_reference(state, j, q, toks[r:r + 1])) if on else None
            with torch.no_grad():
                if double:
                    img, txt = double_reference(block, args, ip)
                    got_img, got_txt = rec["out"]["img"][r:r + 1].double(), rec["out"]["txt"][r:r + 1].double()
                    torch.testing.assert_close(got_txt, txt, rtol=1e-4, atol=1e-5)
                    plain, _ = double_reference(block, args, None)
                else:
                    img = single_reference(block, args, ip)
                    got_img = rec["out"].get("img", next(iter(rec["out"].values())))[r:r + 1].double()
                    plain = single_reference(block, args, None)
            torch.testing.assert_close(got_img, img, rtol=1e-4, atol=1e-5)
            if on:
                assert (img - plain).abs().max() > 1e-3  # the residual is there to see, not lost in the tolerance


@flux_only
def test_weight_zero_is_the_unpatched_flux_bit_for_bit_and_upstream_untouched(tiny_flux_model):
    state = flux_state()
    base = run_flux(tiny_flux_model)
    off, _ = adapter_on(tiny_flux_model, state, 0.0)
    assert torch.equal(run_flux(off), base)
    on, _ = adapter_on(tiny_flux_model, state, 1.0)
    assert not torch.equal(run_flux(on), base)
    assert torch.equal(run_flux(tiny_flux_model), base)
    assert "dit" not in tiny_flux_model.model_options.get("transformer_options", {}).get("patches_replace", {})


@flux_only
def test_nodes_load_the_nested_bin_layout_and_the_siglip_head_encode_and_apply(tiny_flux_model, tmp_path):
    from safetensors.torch import save_file
    from test_pulid_nodes import model_folders
    from testkit.clip_vision import build_clip_vision

    tf = _tiny_flux()
    nodes = pack("nodes.flux.instantx_flux_ip_adapter_nodes")
    errors = pack("nodes.common.errors")
    vision = build_clip_vision("siglip", seed=0)  # the host's own SigLIP tower: [B, 144, 1152] post-LayerNorm states
    state = instantx_state(n_blocks=tf.DEPTH + tf.DEPTH_SINGLE, hidden=tf.HIDDEN, context=48, embed=1152, tokens=6)
    nested = {"image_proj": {k[len("image_proj."):]: v for k, v in state.items() if k.startswith("image_proj.")},
              "ip_adapter": {k[len("ip_adapter."):]: v for k, v in state.items() if k.startswith("ip_adapter.")}}
    head_state = siglip_head_state(width=1152, inner=64)
    with model_folders(tmp_path, "ipadapter", "clip_vision") as where:
        torch.save(nested, str(where["ipadapter"] / "ip-adapter.pt"))  # the release's .bin: {"image_proj": ..., "ip_adapter": ...}
        save_file({**head_state, "vision_model.post_layernorm.weight": torch.ones(1152)},
                  str(where["clip_vision"] / "sigclip_vision_patch14_384.safetensors"))
        save_file({"vision_model.post_layernorm.weight": torch.ones(1152)}, str(where["clip_vision"] / "headless.safetensors"))
        weights = nodes.LoadInstantXFluxIPAdapter().load("ip-adapter.pt", "sigclip_vision_patch14_384.safetensors")[0]
        with pytest.raises(errors.IdentityAttentionError) as info:
            nodes.LoadInstantXFluxIPAdapter().load("ip-adapter.pt", "headless.safetensors")
        assert "siglip_file" in str(info.value) and "head" in str(info.value)
    image = torch.rand(2, 64, 48, 3, generator=torch.Generator().manual_seed(1))
    apply = nodes.ApplyInstantXFluxIPAdapter()
    base = run_flux(tiny_flux_model)
    assert torch.equal(run_flux(apply.apply(tiny_flux_model, weights, vision, image, 0.0, 0.0, 1.0, "both")[0]), base)
    on = apply.apply(tiny_flux_model, weights, vision, image, 1.0, 0.0, 1.0, "both")[0]
    assert not torch.equal(run_flux(on), base)
    assert torch.equal(run_flux(tiny_flux_model), base)  # upstream MODEL unchanged
    stage = pack("nodes.dispatch.dit_dispatcher").installed_dit_dispatcher(on).stages[-1]
    with torch.no_grad():
        hidden = vision.encode_image(image, crop=False)["last_hidden_state"].float()
        black = vision.encode_image(torch.zeros_like(image[:1]), crop=False)["last_hidden_state"].float()
        cond = pooled_reference(head_state, hidden, 16).mean(dim=0, keepdim=True)  # the two images averaged
        torch.testing.assert_close(stage.tokens.cond.double(), tokens_reference(state, cond), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(stage.tokens.uncond.double(), tokens_reference(state, pooled_reference(head_state, black, 16)),
                                   rtol=1e-4, atol=1e-5)  # the negative: a black image
    with pytest.raises(errors.IdentityAttentionError) as info:  # a CLIP (not SigLIP) vision model: 1024-wide states
        apply.apply(tiny_flux_model, weights, build_clip_vision("vit-l", seed=0), image, 1.0, 0.0, 1.0, "both")
    assert "clip_vision" in str(info.value) and "SigLIP" in str(info.value)
    deeper = nodes.InstantXFluxIPAdapterWeights(ix.InstantXFluxIPAdapter.from_state(instantx_state(n_blocks=5, hidden=tf.HIDDEN)), "x")
    with pytest.raises(errors.IdentityAttentionError) as info:
        apply.apply(tiny_flux_model, deeper, vision, image, 1.0, 0.0, 1.0, "both")
    assert "Apply Flux IP-Adapter (InstantX)" in str(info.value) and "flux_ip_adapter" in str(info.value)


@flux_only
def test_apply_refuses_a_unet_model_with_the_fix(tiny):
    nodes = pack("nodes.flux.instantx_flux_ip_adapter_nodes")
    errors = pack("nodes.common.errors")
    weights = nodes.InstantXFluxIPAdapterWeights(ix.InstantXFluxIPAdapter.from_state(instantx_state()), "x")
    with pytest.raises(errors.IdentityAttentionError) as info:
        nodes.ApplyInstantXFluxIPAdapter().apply(tiny.unet("sd15"), weights, None, torch.zeros(1, 8, 8, 3), 1.0, 0.0, 1.0, "both")
    assert "Flux.1" in str(info.value) and "SDXL" in str(info.value)
