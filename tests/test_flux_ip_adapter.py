"""XLabs' Flux IP-Adapter: file layout, detection, and the residual on the tiny Flux against a float64 reference.

The reference is written here from x-flux's ``IPDoubleStreamBlockProcessor`` / ``ImageProjModel`` behaviour,
independent of the pack's modules: tokens = LayerNorm(Linear(embeds)) reshaped to [T, C]; the image queries
of double block i from the block's input (modulation = silu(vec) W + b split into shift/scale/gate,
LayerNorm without affine at eps 1e-6, qkv Linear, RMS query norm with its learned scale, no RoPE);
keys/values = Linear(tokens) with bias; ``img_out + w * softmax(q k^T / sqrt(D)) v`` after the block.
"""

from __future__ import annotations

import pytest
import torch

from conftest import pack
from test_pulid_flux import _tiny_flux, flux_only, foreign_recorder, run_flux

flux_ip = pack("adapters.flux.flux_ip_adapter")
weight_errors = pack("adapters.weights.weight_errors")
formats = pack("adapters.formats.weight_formats")


def xlabs_state(n_double=2, hidden=64, context=32, embed=24, tokens=4, seed=0, dtype=torch.float32):
    """A random file in the published key layout (tiny widths; the release: 19 blocks, 3072, 4096, 768, 4)."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *shape: (torch.randn(*shape, generator=gen) / max(1, shape[-1]) ** 0.5).to(dtype)  # noqa: E731
    state = {
        "ip_adapter_proj_model.proj.weight": r(tokens * context, embed), "ip_adapter_proj_model.proj.bias": r(tokens * context) * 0.1,
        "ip_adapter_proj_model.norm.weight": 1 + 0.1 * r(context), "ip_adapter_proj_model.norm.bias": 0.1 * r(context),
    }
    for i in range(n_double):
        for kv in ("k", "v"):
            state[f"double_blocks.{i}.processor.ip_adapter_double_stream_{kv}_proj.weight"] = r(hidden, context)
            state[f"double_blocks.{i}.processor.ip_adapter_double_stream_{kv}_proj.bias"] = 0.1 * r(hidden)
    return state


def tokens_reference(state, embeds):
    p = {k: v.double() for k, v in state.items() if k.startswith("ip_adapter_proj_model.")}
    context = p["ip_adapter_proj_model.norm.weight"].shape[0]
    x = (embeds.double() @ p["ip_adapter_proj_model.proj.weight"].T + p["ip_adapter_proj_model.proj.bias"]).reshape(embeds.shape[0], -1, context)
    x = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
    return x * p["ip_adapter_proj_model.norm.weight"] + p["ip_adapter_proj_model.norm.bias"]


def queries_reference(block, img, vec):
    """The double block's image queries [B, H, N, D] in float64, as x-flux computes img_q (no RoPE)."""
    sd = {k: v.double() for k, v in block.state_dict().items()}
    heads = block.num_heads
    mod = torch.nn.functional.silu(vec.double()) @ sd["img_mod.lin.weight"].T + sd["img_mod.lin.bias"]
    shift, scale = mod[:, None].chunk(6, dim=-1)[:2]
    x = img.double()
    x = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-6)
    x = (1 + scale) * x + shift
    qkv = x @ sd["img_attn.qkv.weight"].T + sd["img_attn.qkv.bias"]
    b, n, _ = qkv.shape
    q = qkv.reshape(b, n, 3, heads, -1)[:, :, 0].transpose(1, 2)
    return q * torch.rsqrt((q ** 2).mean(-1, keepdim=True) + 1e-6) * sd["img_attn.norm.query_norm.scale"]


def residual_reference(state, block_index, q, tokens):
    pre = f"double_blocks.{block_index}.processor.ip_adapter_double_stream_"
    k = tokens @ state[pre + "k_proj.weight"].double().T + state[pre + "k_proj.bias"].double()
    v = tokens @ state[pre + "v_proj.weight"].double().T + state[pre + "v_proj.bias"].double()
    b, h, n, d = q.shape
    k, v = (t.reshape(b, -1, h, d).transpose(1, 2) for t in (k, v))
    w = torch.softmax(q @ k.transpose(-2, -1) / d ** 0.5, dim=-1)
    return (w @ v).transpose(1, 2).reshape(b, n, h * d)


# --- file layout and detection (pure torch: both hosts) ------------------------------------------


def test_loads_the_published_layout_and_projects_tokens_like_the_reference():
    state = xlabs_state()
    assert flux_ip.is_xlabs_flux(state)
    model = flux_ip.XLabsFluxIPAdapter.from_state(state)
    assert len(model.blocks) == 2 and model.hidden == 64 and model.embed_dim == 24 and model.image_proj.num_tokens == 4
    embeds = torch.randn(2, 24, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(model.tokens(embeds).double(), tokens_reference(state, embeds), rtol=1e-5, atol=1e-6)
    with pytest.raises(weight_errors.WeightError, match="768|24"):
        model.tokens(torch.zeros(1, 7))
    with pytest.raises(weight_errors.WeightError, match="19 double blocks"):
        model.check_model(19, 64, 1)


def test_damaged_files_give_one_clear_error():
    state = xlabs_state(n_double=3)
    gap = {k: v for k, v in state.items() if not k.startswith("double_blocks.1.")}
    with pytest.raises(weight_errors.WeightError, match="numbered"):
        flux_ip.XLabsFluxIPAdapter.from_state(gap)
    half = {k: v for k, v in state.items() if k != "double_blocks.2.processor.ip_adapter_double_stream_v_proj.bias"}
    with pytest.raises(weight_errors.WeightError, match="incomplete"):
        flux_ip.XLabsFluxIPAdapter.from_state(half)
    with pytest.raises(weight_errors.WeightError, match="lacks"):
        flux_ip.XLabsFluxIPAdapter.from_state({k: v for k, v in state.items() if "norm.bias" not in k})
    with pytest.raises(weight_errors.WeightError, match="not XLabs"):
        flux_ip.XLabsFluxIPAdapter.from_state({"ip_adapter.1.to_k_ip.weight": torch.zeros(8, 4)})


def test_identity_adapter_loader_names_the_xlabs_nodes_and_refuses_instantx_with_the_reason():
    with pytest.raises(weight_errors.WeightError) as info:
        formats.detect_format(xlabs_state())
    assert "Load Flux IP-Adapter (XLabs)" in str(info.value)
    instantx = {  # InstantX/FLUX.1-dev-IP-Adapter's layout (tiny): an MLP projector on SigLIP's 1152 features
        "image_proj.proj.0.weight": torch.zeros(16, 1152), "image_proj.proj.2.weight": torch.zeros(32, 16),
        "image_proj.norm.weight": torch.zeros(8), "ip_adapter.0.to_k_ip.weight": torch.zeros(8, 8),
        "ip_adapter.0.to_v_ip.weight": torch.zeros(8, 8),
    }
    for load in (formats.detect_format, flux_ip.XLabsFluxIPAdapter.from_state):  # 'Load identity adapter' and the XLabs loader
        with pytest.raises(weight_errors.WeightError) as info:
            load(instantx)
        assert "InstantX" in str(info.value) and "Load Flux IP-Adapter (InstantX)" in str(info.value)


# --- on the tiny Flux (newer host only) ----------------------------------------------------------


def prompt_tokens(model, seed=5):
    gen = torch.Generator().manual_seed(seed)
    IdentityTokens = pack("adapters.projectors.id_adapter").IdentityTokens
    return IdentityTokens(cond=model.tokens(torch.randn(1, model.embed_dim, generator=gen)),
                          uncond=model.tokens(torch.randn(1, model.embed_dim, generator=gen)))


@pytest.fixture(scope="module")
def tiny_flux_model():
    return _tiny_flux().build_flux(0)


def adapter_on(flux, state, weight, apply_to="both", foreign=None):
    patch = pack("nodes.flux.flux_ip_adapter_patch")
    dispatcher = pack("nodes.dispatch.dispatcher")
    tf = _tiny_flux()
    if foreign is not None:
        flux = flux.clone()
        for kind, n in (("double_block", tf.DEPTH), ("single_block", tf.DEPTH_SINGLE)):
            for i in range(n):
                flux.set_model_patch_replace(foreign, "dit", kind, i)
    model = flux_ip.XLabsFluxIPAdapter.from_state(state)
    tokens = prompt_tokens(model)
    return patch.apply_flux_ip_adapter(flux, model, tokens, dispatcher.StageSchedule(weight=weight, apply_to=apply_to)), tokens


@flux_only
@pytest.mark.parametrize("apply_to", ["both", "cond", "uncond"])
def test_double_blocks_get_the_official_residual_after_a_foreign_replace(tiny_flux_model, apply_to):
    """After each double block the next block sees ``img + w * attn(q(img_in), K, V)`` (float64 reference) on the rows
    ``apply_to`` selects (cond: the image's tokens, uncond: the negative's), the rest exactly as the block gave it."""
    tf = _tiny_flux()
    state = xlabs_state(n_double=tf.DEPTH, hidden=tf.HIDDEN)
    records, weight = [], 0.7
    model, tokens = adapter_on(tiny_flux_model, state, weight, apply_to, foreign_recorder(records))
    run_flux(model, (0, 1))
    assert len(records) == tf.DEPTH + tf.DEPTH_SINGLE  # the foreign replace ran on every block
    rows = {"both": [True, True], "cond": [True, False], "uncond": [False, True]}[apply_to]
    toks = torch.cat([tokens.cond, tokens.uncond]).double()
    net = tiny_flux_model.model.diffusion_model
    for i in range(tf.DEPTH):
        args, out = records[i]["args"], records[i]["out"]["img"].double()
        q = queries_reference(net.double_blocks[i], args["img"], args["vec"])
        got = records[i + 1]["args"]["img"].double()
        if i + 1 == tf.DEPTH:  # the first single block's input is [txt; img]
            got = got[:, records[i]["out"]["txt"].shape[1]:]
        for r, on in enumerate(rows):
            if on:
                expected = out[r:r + 1] + weight * residual_reference(state, i, q[r:r + 1], toks[r:r + 1])
                torch.testing.assert_close(got[r:r + 1], expected, rtol=1e-4, atol=1e-5)
            else:
                assert torch.equal(got[r:r + 1], out[r:r + 1])


@flux_only
def test_weight_zero_is_the_unpatched_flux_bit_for_bit_and_upstream_untouched(tiny_flux_model):
    tf = _tiny_flux()
    state = xlabs_state(n_double=tf.DEPTH, hidden=tf.HIDDEN)
    base = run_flux(tiny_flux_model)
    off, _ = adapter_on(tiny_flux_model, state, 0.0)
    assert torch.equal(run_flux(off), base)
    on, _ = adapter_on(tiny_flux_model, state, 1.0)
    assert not torch.equal(run_flux(on), base)
    assert "dit" not in tiny_flux_model.model_options.get("transformer_options", {}).get("patches_replace", {})


@flux_only
def test_nodes_load_detect_encode_and_apply(tiny_flux_model, tmp_path):
    from safetensors.torch import save_file
    from test_pulid_nodes import model_folders
    from testkit.clip_vision import build_clip_vision

    tf = _tiny_flux()
    nodes = pack("nodes.flux.flux_ip_adapter_nodes")
    errors = pack("nodes.common.errors")
    vision = build_clip_vision("vit-h", seed=0)  # image embeds of 1024
    with model_folders(tmp_path, "ipadapter") as where:
        save_file(xlabs_state(n_double=tf.DEPTH, hidden=tf.HIDDEN, embed=1024), str(where["ipadapter"] / "ip_adapter.safetensors"))
        save_file(xlabs_state(n_double=tf.DEPTH + 1, hidden=tf.HIDDEN, embed=1024), str(where["ipadapter"] / "deeper.safetensors"))
        weights = nodes.LoadFluxIPAdapter().load("ip_adapter.safetensors")[0]
        deeper = nodes.LoadFluxIPAdapter().load("deeper.safetensors")[0]
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(1))
    apply = nodes.ApplyFluxIPAdapter()
    base = run_flux(tiny_flux_model)
    assert torch.equal(run_flux(apply.apply(tiny_flux_model, weights, vision, image, 0.0, 0.0, 1.0, "both")[0]), base)
    on = apply.apply(tiny_flux_model, weights, vision, image, 1.0, 0.0, 1.0, "both")[0]
    assert not torch.equal(run_flux(on), base)
    replace = on.model_options["transformer_options"]["patches_replace"]["dit"][("double_block", 0)]
    cond = vision.encode_image(image)["image_embeds"].float()
    black = vision.encode_image(torch.zeros_like(image))["image_embeds"].float()
    torch.testing.assert_close(replace.tokens.cond, weights.model.tokens(cond))
    torch.testing.assert_close(replace.tokens.uncond, weights.model.tokens(black))  # the official negative: a black image
    with pytest.raises(errors.IdentityAttentionError) as info:
        apply.apply(tiny_flux_model, deeper, vision, image, 1.0, 0.0, 1.0, "both")
    assert "Apply Flux IP-Adapter (XLabs)" in str(info.value) and "flux_ip_adapter" in str(info.value)


@flux_only
def test_apply_refuses_a_unet_model_with_the_fix(tiny):
    nodes = pack("nodes.flux.flux_ip_adapter_nodes")
    errors = pack("nodes.common.errors")
    weights = nodes.FluxIPAdapterWeights(flux_ip.XLabsFluxIPAdapter.from_state(xlabs_state()), "x")
    with pytest.raises(errors.IdentityAttentionError) as info:
        nodes.ApplyFluxIPAdapter().apply(tiny.unet("sd15"), weights, None, torch.zeros(1, 8, 8, 3), 1.0, 0.0, 1.0, "both")
    assert "Flux.1" in str(info.value) and "SDXL" in str(info.value)
