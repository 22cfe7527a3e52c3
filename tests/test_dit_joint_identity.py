"""The DiT path (nodes/dispatch/dit_dispatcher.py) and joint identity attention on the tiny Flux.

References are float64, written from the math: for every block, the image queries attend over
``[txt; img; id]`` with ``log w`` on the identity columns, the identity keys/values being the
block's text-side modulation + norm + qkv (+ key norm) of ``txt_in(tokens)``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from conftest import pack
from testkit import tiny_flux

pytestmark = pytest.mark.skipif(not tiny_flux.flux_available(), reason=tiny_flux.SKIP_REASON)

T_ID = 3


@pytest.fixture(scope="module")
def flux():
    return tiny_flux.build_flux(0)


def tokens(seed=5):
    IdentityTokens = pack("adapters.projectors.id_adapter").IdentityTokens
    gen = torch.Generator().manual_seed(seed)
    return IdentityTokens(cond=torch.randn(1, T_ID, tiny_flux.CONTEXT, generator=gen), uncond=torch.randn(1, T_ID, tiny_flux.CONTEXT, generator=gen))


def patched(flux, weight=1.0, apply_to="both", mask=None, ident=None):
    dispatcher = pack("nodes.dispatch.dispatcher")
    dit_dispatcher = pack("nodes.dispatch.dit_dispatcher")
    joint = pack("nodes.pva.dit_joint_identity")
    layout = pack("nodes.common.dit_layout")
    schedule = dispatcher.StageSchedule(weight=weight, apply_to=apply_to, mask=mask)
    stage = joint.DitJointIdentityStage(schedule, ident or tokens(), lambda t: layout.identity_hidden(flux, t))
    return dit_dispatcher.apply_dit_stage(flux, stage)


def recorder(records):
    dispatcher = pack("nodes.dispatch.dispatcher")
    dit_dispatcher = pack("nodes.dispatch.dit_dispatcher")

    class Recorder(dit_dispatcher.DitStage):
        label = "recorder"

        def forward(self, call, out, region):
            records.append({"key": call.block.key, "q": call.q, "k": call.k, "v": call.v, "out": out, "vec": call.vec, "m": call.text_tokens, "block": call.block})
            return out

    return Recorder(dispatcher.StageSchedule())


def run(model, batch_chunks=(0,), seed=0, size=8):
    """One diffusion-model call with the MODEL's options, as the sampler passes them."""
    x, t, c, y, g = tiny_flux.flux_inputs(seed, batch=len(batch_chunks), size=size)
    options = copy.copy(model.model_options.get("transformer_options", {}))
    options["cond_or_uncond"] = list(batch_chunks)
    options["wrappers"] = model.wrappers
    with torch.no_grad():
        return model.model.apply_model(x, t, c_crossattn=c, y=y, guidance=g, transformer_options=options)


def reference_image_attention(rec, ident_rows, weight):
    """float64: the image tokens' joint attention over [txt; img; id] with odds ``weight`` on id."""
    block = copy.deepcopy(rec["block"].module).double()
    hidden = ident_rows  # [B, T, C] float64 txt_in(tokens)
    vec = rec["vec"].double()
    if rec["key"][0] == "double_block":
        mod = block.txt_mod(vec)[0]
        x = block.txt_norm1(hidden) * (1 + mod.scale) + mod.shift
        qkv = block.txt_attn.qkv(x)
        key_norm = block.txt_attn.norm.key_norm
    else:
        mod = block.modulation(vec)[0]
        x = block.pre_norm(hidden) * (1 + mod.scale) + mod.shift
        qkv = block.linear1(x)[..., : 3 * tiny_flux.HIDDEN]
        key_norm = block.norm.key_norm
    b, t = qkv.shape[:2]
    heads, d = tiny_flux.HEADS, tiny_flux.HIDDEN // tiny_flux.HEADS
    k_id = qkv[..., tiny_flux.HIDDEN : 2 * tiny_flux.HIDDEN].view(b, t, heads, d).transpose(1, 2)
    v_id = qkv[..., 2 * tiny_flux.HIDDEN :].view(b, t, heads, d).transpose(1, 2)
    k_id = k_id * torch.rsqrt(k_id.pow(2).mean(-1, keepdim=True) + 1e-6) * key_norm.scale.double()  # RMS key norm
    q, k, v = (rec[n].double() for n in ("q", "k", "v"))
    q_img = q[:, :, rec["m"] :]
    logits_joint = q_img @ k.transpose(-1, -2) / math.sqrt(d)
    logits_id = q_img @ k_id.transpose(-1, -2) / math.sqrt(d) + math.log(weight)
    p = torch.softmax(torch.cat([logits_joint, logits_id], -1), -1)
    out = p @ torch.cat([v, v_id], 2)
    return out.transpose(1, 2).reshape(b, q_img.shape[2], heads * d)


def id_hidden(flux, ident, chunks):
    net = copy.deepcopy(flux.model.diffusion_model.txt_in).double()
    rows = [ident.cond if c == 0 else ident.uncond for c in chunks]
    return net(torch.cat(rows).double())


def test_weight_zero_is_the_unpatched_model_bit_for_bit(flux):
    base = run(flux, (0, 1))
    assert torch.equal(run(patched(flux, weight=0.0), (0, 1)), base)
    assert not torch.equal(run(patched(flux, weight=1.0), (0, 1)), base)


def test_upstream_model_is_not_mutated(flux):
    before = copy.copy(flux.model_options.get("transformer_options", {}))
    patched(flux)
    after = flux.model_options.get("transformer_options", {})
    assert after.keys() == before.keys() and "dit" not in after.get("patches_replace", {})
    assert not any(flux.wrappers.get("diffusion_model", {}).values())


@pytest.mark.parametrize("weight", [1.0, 2.5])
def test_matches_float64_reference_in_every_block(flux, weight):
    dit_dispatcher = pack("nodes.dispatch.dit_dispatcher")
    ident = tokens()
    before, after = [], []
    model = dit_dispatcher.apply_dit_stage(flux, recorder(before))
    model = patched(model, weight=weight, ident=ident)
    model = dit_dispatcher.apply_dit_stage(model, recorder(after))
    run(model, (0, 1))
    assert [r["key"] for r in after] == [("double_block", i) for i in range(tiny_flux.DEPTH)] + [("single_block", i) for i in range(tiny_flux.DEPTH_SINGLE)]
    hidden = id_hidden(flux, ident, (0, 1))
    for rec_before, rec in zip(before, after):
        m = rec["m"]
        expected = reference_image_attention(rec_before, hidden, weight)
        torch.testing.assert_close(rec["out"][:, m:].double(), expected, rtol=1e-4, atol=1e-5)
        assert torch.equal(rec["out"][:, :m], rec_before["out"][:, :m])  # text queries unpatched


def test_cond_only_leaves_uncond_rows_unpatched(flux):
    dit_dispatcher = pack("nodes.dispatch.dit_dispatcher")
    before, after = [], []
    model = dit_dispatcher.apply_dit_stage(flux, recorder(before))
    model = dit_dispatcher.apply_dit_stage(patched(model, apply_to="cond"), recorder(after))
    run(model, (0, 1))
    for b, a in zip(before, after):
        assert torch.equal(a["out"][1:], b["out"][1:])  # uncond row
        assert not torch.equal(a["out"][:1], b["out"][:1])


def test_mask_limits_the_identity_to_its_patches(flux):
    dit_dispatcher = pack("nodes.dispatch.dit_dispatcher")
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :32] = 1.0  # left half of the image: latent 8x8 -> 4x4 patches, columns 0-1
    before, full, after = [], [], []
    unmasked = dit_dispatcher.apply_dit_stage(patched(dit_dispatcher.apply_dit_stage(flux, recorder(before))), recorder(full))
    masked = dit_dispatcher.apply_dit_stage(patched(flux, mask=mask), recorder(after))
    run(unmasked, (0,))
    run(masked, (0,))
    inside = torch.tensor([c < 2 for r in range(4) for c in range(4)])
    # the first block's inputs are the same in both runs: inside = joint, outside = unpatched, exactly
    m = after[0]["m"]
    img_masked, img_full, img_base = after[0]["out"][0, m:], full[0]["out"][0, m:], before[0]["out"][0, m:]
    assert torch.equal(img_masked[~inside], img_base[~inside])
    torch.testing.assert_close(img_masked[inside], img_full[inside], rtol=0, atol=1e-6)


def test_foreign_block_replace_and_attention_override_keep_running(flux):
    calls = {"block": 0, "override": 0}
    m = flux.clone()

    def foreign_block(args, extra):
        calls["block"] += 1
        return extra["original_block"](args)

    m.set_model_patch_replace(foreign_block, "dit", "double_block", 0)

    def foreign_override(func, *args, **kwargs):
        calls["override"] += 1
        return func(*args, **kwargs)

    m.model_options["transformer_options"]["optimized_attention_override"] = foreign_override
    run(patched(m), (0,))
    assert calls["block"] == 1 and calls["override"] == tiny_flux.DEPTH + tiny_flux.DEPTH_SINGLE


def test_stacked_stages_run_in_order(flux):
    dit_dispatcher = pack("nodes.dispatch.dit_dispatcher")
    records = []
    model = patched(patched(flux, weight=2.0), weight=0.5)
    model = dit_dispatcher.apply_dit_stage(model, recorder(records))
    assert len(dit_dispatcher.installed_dit_dispatcher(model).stages) == 3
    out = run(model, (0,))
    assert torch.isfinite(out).all() and len(records) == tiny_flux.DEPTH + tiny_flux.DEPTH_SINGLE


def test_parallel_attention_node_on_flux(flux):
    from testkit.synthetic import synthetic_adapter, synthetic_identity

    nodes = pack("nodes.pva.parallel_attention_nodes")
    errors = pack("nodes.common.errors")
    adapter = synthetic_adapter([], "sd15", tiny_flux.CONTEXT, mechanism="joint")
    identity = synthetic_identity()
    node = nodes.ApplyParallelAttention()
    args = dict(weight=1.0, start_percent=0.0, end_percent=1.0, apply_to="both", mode="auto", projections="layer", references="fused")
    model, = node.apply(flux, adapter, identity, **args)
    assert not torch.equal(run(model, (0, 1)), run(flux, (0, 1)))
    zero, = node.apply(flux, adapter, identity, **{**args, "weight": 0.0})
    assert torch.equal(run(zero, (0, 1)), run(flux, (0, 1)))
    with pytest.raises(errors.IdentityAttentionError, match="projections"):
        node.apply(flux, adapter, identity, **{**args, "projections": "adapter"})
    with pytest.raises(errors.IdentityAttentionError, match="decoupled"):
        node.apply(flux, adapter, identity, **{**args, "mode": "decoupled"})
    wide = synthetic_adapter([], "sd15", 768, mechanism="joint")
    with pytest.raises(errors.IdentityAttentionError, match="64 wide"):
        node.apply(flux, wide, identity, **args)


def test_sampling_with_joint_identity_runs(flux):
    import comfy.sample

    model = patched(flux, weight=1.5, apply_to="cond")
    positive = tiny_flux.random_flux_conditioning(1)
    negative = tiny_flux.random_flux_conditioning(2)
    noise = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    latent = torch.zeros(1, 16, 8, 8)
    a = comfy.sample.sample(model, noise, 2, 2.0, "euler", "simple", positive, negative, latent, seed=0, disable_pbar=True)
    b = comfy.sample.sample(flux, noise, 2, 2.0, "euler", "simple", positive, negative, latent, seed=0, disable_pbar=True)
    assert torch.isfinite(a).all() and not torch.equal(a, b)

