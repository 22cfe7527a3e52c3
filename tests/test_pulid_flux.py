"""PuLID-Flux math: the cross-attention modules, their schedule over the Flux blocks, the file layout.

References are float64 and written here from the official flux-branch code's behaviour (``encoders_flux.py``
``PerceiverAttentionCA``: q, k each scaled by dim_head^-1/4, softmax over the id tokens; ``flux/model.py``: the
``ca_idx`` counter over double blocks every 2nd and single blocks every 4th, image tokens only), independent of
the pack's modules. Pure torch: runs on both hosts.
"""

from __future__ import annotations

import pytest
import torch

from conftest import pack
from weight_fixtures import prefixed, pulid_v11_layout, random_state

pulid_flux = pack("adapters.flux.pulid_flux")
projector_pulid = pack("adapters.projectors.projector_pulid")
weight_errors = pack("adapters.weights.weight_errors")


def ca_layout(dim, kv_dim, inner):
    """One ``pulid_ca.N`` module's keys and shapes (the release: dim 3072, kv_dim 2048, inner 2048)."""
    return {
        "norm1.weight": (kv_dim,), "norm1.bias": (kv_dim,), "norm2.weight": (dim,), "norm2.bias": (dim,),
        "to_q.weight": (inner, dim), "to_kv.weight": (2 * inner, kv_dim), "to_out.weight": (dim, inner),
    }


def tiny_pulid_flux_state(n_ca=4, dim=24, inner=32, seed=0, dtype=torch.float32):
    """A tiny PuLID-Flux file in the published key layout: IDFormer ``pulid_encoder.*`` + ``pulid_ca.0..n-1``."""
    encoder = pulid_v11_layout(dim=64, depth=5, heads=1, num_queries=8, output_dim=48, eva=32, hidden=32)
    state = prefixed("pulid_encoder.", random_state(encoder, seed=seed, dtype=dtype))
    for i in range(n_ca):
        state.update(prefixed(f"pulid_ca.{i}.", random_state(ca_layout(dim, 48, inner), seed=seed + 1 + i, dtype=dtype)))
    return state


def ln64(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def ca_reference(p, id_tokens, img, heads):
    """PerceiverAttentionCA.forward(x=id_tokens, latents=img) in float64, as the official code computes it."""
    p = {k: v.double() for k, v in p.items()}
    x = ln64(id_tokens.double(), p["norm1.weight"], p["norm1.bias"])
    lat = ln64(img.double(), p["norm2.weight"], p["norm2.bias"])
    b, n, _ = lat.shape
    q = lat @ p["to_q.weight"].T
    k, v = (x @ p["to_kv.weight"].T).chunk(2, dim=-1)
    split = lambda t: t.reshape(b, t.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    scale = 1 / (q.shape[-1] ** 0.25)
    w = torch.softmax((q * scale) @ (k * scale).transpose(-2, -1), dim=-1)
    out = (w @ v).permute(0, 2, 1, 3).reshape(b, n, -1)
    return out @ p["to_out.weight"].T


def official_schedule(n_double, n_single):
    """The ``ca_idx`` walk of flux/model.py: [(kind, block, module)] for every block that gets one."""
    out, idx = [], 0
    for i in range(n_double):
        if i % 2 == 0:
            out.append(("double", i, idx))
            idx += 1
    for i in range(n_single):
        if i % 4 == 0:
            out.append(("single", i, idx))
            idx += 1
    return out


@pytest.mark.parametrize("n_double,n_single", [(19, 38), (2, 4), (3, 5), (1, 1)])
def test_schedule_matches_official_walk(n_double, n_single):
    ours = [(k, i, pulid_flux.ca_index(k, i, n_double)) for k, n in (("double", n_double), ("single", n_single)) for i in range(n)]
    ours = [t for t in ours if t[2] is not None]
    assert ours == official_schedule(n_double, n_single)
    assert pulid_flux.ca_count(n_double, n_single) == len(ours)
    assert pulid_flux.ca_count(19, 38) == 20


@pytest.mark.parametrize("inner,dim_head,heads", [(32, 32, 1), (256, 128, 2)])
def test_cross_attention_matches_float64_reference(inner, dim_head, heads):
    torch.manual_seed(0)
    p = random_state(ca_layout(24, 48, inner), seed=3)
    ca = pulid_flux.PuLIDFluxCA(dim=24, kv_dim=48, inner=inner, dim_head=dim_head)
    ca.load_state_dict(p)
    ca = ca.double()
    id_tokens, img = torch.randn(2, 8, 48, dtype=torch.float64), torch.randn(2, 16, 24, dtype=torch.float64)
    expected = ca_reference(p, id_tokens, img, heads)
    torch.testing.assert_close(ca(id_tokens, img), expected, rtol=1e-10, atol=1e-10)
    got = pulid_flux.add_identity(ca, img, id_tokens, 0.7)
    torch.testing.assert_close(got, img + 0.7 * expected, rtol=1e-10, atol=1e-10)


def test_single_block_touches_image_tokens_only_and_weight_zero_is_identity():
    p = random_state(ca_layout(24, 48, 32), seed=5)
    ca = pulid_flux.PuLIDFluxCA(dim=24, kv_dim=48, inner=32, dim_head=32)
    ca.load_state_dict(p)
    ca = ca.double()
    torch.manual_seed(1)
    txt, img, ids = torch.randn(2, 5, 24).double(), torch.randn(2, 9, 24).double(), torch.randn(2, 8, 48).double()
    x = torch.cat([txt, img], dim=1)
    got = pulid_flux.add_identity_single(ca, x, 5, ids, 1.3)
    assert torch.equal(got[:, :5], txt)
    torch.testing.assert_close(got[:, 5:], img + 1.3 * ca_reference(p, ids, img, 1), rtol=1e-10, atol=1e-10)
    assert pulid_flux.add_identity_single(ca, x, 5, ids, 0.0) is x
    assert pulid_flux.add_identity(ca, img, ids, 0) is img


def test_file_loads_encoder_and_modules_in_published_layout():
    state = tiny_pulid_flux_state(n_ca=4)
    assert pulid_flux.is_pulid_flux(state)
    assert not pulid_flux.is_pulid_flux({k: v for k, v in state.items() if k.startswith("pulid_ca.")})
    model = pulid_flux.PuLIDFlux.from_state(state)
    assert len(model.ca) == 4 and model.image_dim == 24 and model.token_dim == 48
    # the encoder is PuLID v1.1's IDFormer run on the un-prefixed keys
    enc_state = {k[len("pulid_encoder."):]: v for k, v in state.items() if k.startswith("pulid_encoder.")}
    ref = projector_pulid.PuLIDIDFormer(**projector_pulid.PuLIDIDFormer.config_from_state(enc_state))
    ref.load_state_dict(enc_state)
    id_cond, hidden = torch.randn(1, 1280), torch.randn(1, 5, 7, 32)
    assert torch.equal(model.encoder.encode(id_cond, hidden), ref.encode(id_cond, hidden))
    assert model.encoder.encode(id_cond, hidden).shape == (1, 8, 48)
    for i, ca in enumerate(model.ca):
        assert torch.equal(ca.to_kv.weight, state[f"pulid_ca.{i}.to_kv.weight"])
    model.check_model(n_double=3, n_single=5, hidden_size=24)  # 2 + 2 modules
    with pytest.raises(weight_errors.WeightError, match="double"):
        model.check_model(n_double=19, n_single=38, hidden_size=24)
    with pytest.raises(weight_errors.WeightError, match="width"):
        model.check_model(n_double=3, n_single=5, hidden_size=3072)


def test_damaged_files_get_one_clear_error():
    state = tiny_pulid_flux_state(n_ca=3)
    gap = {k: v for k, v in state.items() if not k.startswith("pulid_ca.1.")}
    with pytest.raises(weight_errors.WeightError, match="numbered"):
        pulid_flux.PuLIDFlux.from_state(gap)
    missing = {k: v for k, v in state.items() if k != "pulid_ca.2.to_out.weight"}
    with pytest.raises(weight_errors.WeightError, match="to_out"):
        pulid_flux.PuLIDFlux.from_state(missing)
    with pytest.raises(weight_errors.WeightError, match="pulid_encoder"):
        pulid_flux.PuLIDFlux.from_state({k: v for k, v in state.items() if k.startswith("pulid_ca.")})


def test_release_layout_builds_at_full_size():
    """The published widths (3072 image, 2048 id tokens, 16 heads of 128) give exactly the release's keys and shapes."""
    with torch.device("meta"):
        ca = pulid_flux.PuLIDFluxCA()
    assert {k: tuple(v.shape) for k, v in ca.state_dict().items()} == ca_layout(3072, 2048, 2048)
    assert ca.heads == 16 and ca.dim_head == 128


# --- on the tiny Flux (newer host only) ------------------------------------------------------------


def _tiny_flux():
    from testkit import tiny_flux

    return tiny_flux


def _flux_skip():
    try:
        tf = _tiny_flux()
    except Exception as err:  # the legacy host's testkit may not import Flux helpers
        return True, f"no Flux test kit here: {err}"
    return not tf.flux_available(), tf.SKIP_REASON


_SKIP, _REASON = _flux_skip()
flux_only = pytest.mark.skipif(_SKIP, reason=_REASON)


def id_tokens(seed=7):
    gen = torch.Generator().manual_seed(seed)
    IdentityTokens = pack("adapters.projectors.id_adapter").IdentityTokens
    return IdentityTokens(cond=torch.randn(1, 8, 48, generator=gen), uncond=torch.randn(1, 8, 48, generator=gen))


def foreign_recorder(records):
    """A replace 'another pack' installed on every block: runs the block and records what it got and gave."""

    def replace(args, extra):
        seen = {k: v.clone() for k, v in args.items() if torch.is_tensor(v)}  # blocks may update their inputs in place
        out = extra["original_block"](args)
        records.append({"args": seen, "out": {k: v.clone() for k, v in out.items()}})
        return out

    return replace


def run_flux(model, chunks=(0, 1), seed=0):
    import copy

    tf = _tiny_flux()
    x, t, c, y, g = tf.flux_inputs(seed, batch=len(chunks), size=8)
    options = copy.copy(model.model_options.get("transformer_options", {}))
    options["cond_or_uncond"] = list(chunks)
    options["wrappers"] = model.wrappers
    with torch.no_grad():
        return model.model.apply_model(x, t, c_crossattn=c, y=y, guidance=g, transformer_options=options)


def pulid_on(flux, weight=1.0, apply_to="both", ident=None, foreign=None):
    patch = pack("nodes.flux.flux_identity_pulid_patch")
    dispatcher = pack("nodes.dispatch.dispatcher")
    tf = _tiny_flux()
    if foreign is not None:
        flux = flux.clone()
        for kind, n in (("double_block", tf.DEPTH), ("single_block", tf.DEPTH_SINGLE)):
            for i in range(n):
                flux.set_model_patch_replace(foreign, "dit", kind, i)
    model = pulid_flux.PuLIDFlux.from_state(tiny_pulid_flux_state(n_ca=2, dim=tf.HIDDEN))
    model.check_model(tf.DEPTH, tf.DEPTH_SINGLE, tf.HIDDEN)
    schedule = dispatcher.StageSchedule(weight=weight, apply_to=apply_to)
    return patch.apply_pulid_flux(flux, model, ident or id_tokens(), schedule), model


@pytest.fixture(scope="module")
def tiny_flux_model():
    return _tiny_flux().build_flux(0)


@flux_only
def test_flux_weight_zero_is_unpatched_bit_for_bit_and_upstream_untouched(tiny_flux_model):
    base = run_flux(tiny_flux_model)
    patched, _ = pulid_on(tiny_flux_model, weight=0.0)
    assert torch.equal(run_flux(patched), base)
    patched, _ = pulid_on(tiny_flux_model, weight=1.0)
    assert not torch.equal(run_flux(patched), base)
    assert "dit" not in tiny_flux_model.model_options.get("transformer_options", {}).get("patches_replace", {})


@flux_only
@pytest.mark.parametrize("apply_to", ["both", "cond", "uncond"])
def test_flux_blocks_get_the_official_residual_after_a_foreign_replace(tiny_flux_model, apply_to):
    """After double block 0 and single block 0 (the tiny Flux's schedule), the next block sees
    ``img + w * CA(id, img)`` (float64 reference) on the rows ``apply_to`` selects, the rest as the block gave it;
    the foreign replace runs on every block."""
    tf = _tiny_flux()
    records = []
    ident = id_tokens()
    weight = 0.8
    model, pulid = pulid_on(tiny_flux_model, weight=weight, apply_to=apply_to, ident=ident, foreign=foreign_recorder(records))
    run_flux(model, (0, 1))
    assert len(records) == tf.DEPTH + tf.DEPTH_SINGLE
    rows = {"both": [True, True], "cond": [True, False], "uncond": [False, True]}[apply_to]
    ids = torch.cat([ident.cond, ident.uncond]).double()
    p0 = {k: v for k, v in pulid.ca[0].state_dict().items()}
    p1 = {k: v for k, v in pulid.ca[1].state_dict().items()}
    # double block 0 -> double block 1's input
    img0 = records[0]["out"]["img"].double()
    got = records[1]["args"]["img"].double()
    txt_len = records[0]["out"]["txt"].shape[1]
    for r, on in enumerate(rows):
        expected = img0[r : r + 1] + weight * ca_reference(p0, ids[r : r + 1], img0[r : r + 1], 1) if on else img0[r : r + 1]
        if on:
            torch.testing.assert_close(got[r : r + 1], expected, rtol=1e-4, atol=1e-5)
        else:
            assert torch.equal(got[r : r + 1], expected)
    # single block 0 -> single block 1's input: text rows untouched
    x0 = records[tf.DEPTH]["out"]["img"].double()
    got = records[tf.DEPTH + 1]["args"]["img"].double()
    assert torch.equal(got[:, :txt_len], x0[:, :txt_len])
    for r, on in enumerate(rows):
        img = x0[r : r + 1, txt_len:]
        expected = img + weight * ca_reference(p1, ids[r : r + 1], img, 1) if on else img
        if on:
            torch.testing.assert_close(got[r : r + 1, txt_len:], expected, rtol=1e-4, atol=1e-5)
        else:
            assert torch.equal(got[r : r + 1, txt_len:], expected)


# --- the nodes ------------------------------------------------------------------------------------


def eva_identity(seed=11):
    """An IDENTITY with the ArcFace + EVA-CLIP features the tiny PuLID-Flux encoder reads (EVA width 32)."""
    identity_mod = pack("adapters.faces.identity")
    gen = torch.Generator().manual_seed(seed)
    face = identity_mod.FaceRecord(0, (64, 64), torch.zeros(4), torch.zeros(5, 2), 0.9, torch.randn(512, generator=gen), torch.zeros(112, 112, 3))
    return identity_mod.Identity(faces=(face,), eva_clip_embeds=torch.randn(1, 768, generator=gen), eva_clip_hidden=torch.randn(1, 5, 7, 32, generator=gen))


@flux_only
def test_nodes_load_detect_and_apply_on_flux(tiny_flux_model, tmp_path):
    from safetensors.torch import save_file
    from test_pulid_nodes import model_folders

    tf = _tiny_flux()
    nodes = pack("nodes.flux.flux_identity_pulid_nodes")
    errors = pack("nodes.common.errors")
    with model_folders(tmp_path, "pulid") as where:
        save_file(tiny_pulid_flux_state(n_ca=2, dim=tf.HIDDEN), str(where["pulid"] / "pulid_flux_tiny.safetensors"))
        save_file(tiny_pulid_flux_state(n_ca=2, dim=32), str(where["pulid"] / "pulid_flux_narrow.safetensors"))
        weights = nodes.LoadPuLIDFlux().load("pulid_flux_tiny.safetensors")[0]
        narrow = nodes.LoadPuLIDFlux().load("pulid_flux_narrow.safetensors")[0]
    assert weights.name == "pulid_flux_tiny.safetensors" and len(weights.model.ca) == 2
    apply = nodes.ApplyPuLIDFlux()
    ident = eva_identity()
    base = run_flux(tiny_flux_model)
    off = apply.apply(tiny_flux_model, weights, ident, 0.0, 0.0, 1.0, "both")[0]
    assert torch.equal(run_flux(off), base)
    on = apply.apply(tiny_flux_model, weights, ident, 1.0, 0.0, 1.0, "both")[0]
    assert not torch.equal(run_flux(on), base)
    # the tokens are the encoder's: face features for cond rows, all-zero inputs for uncond rows
    replace = on.model_options["transformer_options"]["patches_replace"]["dit"][("double_block", 0)]
    feats = ident.features(per_reference=False)
    id_cond = torch.cat([feats.arcface.float(), feats.eva_clip_embeds.float()], dim=-1)
    expected = weights.model.encoder.encode(id_cond, feats.eva_clip_hidden.float())
    torch.testing.assert_close(replace.tokens.cond, expected)
    torch.testing.assert_close(replace.tokens.uncond, weights.model.encoder.encode(torch.zeros_like(id_cond), torch.zeros_like(feats.eva_clip_hidden.float())))
    # a file for another width: one error naming the node and the input
    with pytest.raises(errors.IdentityAttentionError) as info:
        apply.apply(tiny_flux_model, narrow, ident, 1.0, 0.0, 1.0, "both")
    assert "Apply PuLID-Flux" in str(info.value) and "pulid_flux" in str(info.value)


@flux_only
def test_apply_refuses_a_unet_model_with_the_fix(tiny):
    nodes = pack("nodes.flux.flux_identity_pulid_nodes")
    errors = pack("nodes.common.errors")
    weights = nodes.PuLIDFluxWeights(pulid_flux.PuLIDFlux.from_state(tiny_pulid_flux_state(n_ca=2)), "x")
    with pytest.raises(errors.IdentityAttentionError) as info:
        nodes.ApplyPuLIDFlux().apply(tiny.unet("sd15"), weights, eva_identity(), 1.0, 0.0, 1.0, "both")
    assert "Flux.1" in str(info.value) and "SDXL" in str(info.value)


def test_unet_adapter_loader_names_flux_files_and_their_node():
    """'Load identity adapter' (UNet formats) detects PuLID-Flux and XLabs' Flux IP-Adapter from content and says which node reads them."""
    formats = pack("adapters.formats.weight_formats")
    with pytest.raises(weight_errors.WeightError) as info:
        formats.detect_format(tiny_pulid_flux_state(n_ca=2))
    assert "PuLID-Flux" in str(info.value) and "Load PuLID-Flux" in str(info.value)
    xlabs = {
        "double_blocks.0.processor.ip_adapter_double_stream_k_proj.weight": torch.zeros(8, 4),
        "double_blocks.0.processor.ip_adapter_double_stream_v_proj.weight": torch.zeros(8, 4),
        "ip_adapter_proj_model.proj.weight": torch.zeros(16, 4),
    }
    with pytest.raises(weight_errors.WeightError, match="XLabs"):
        formats.detect_format(xlabs)


@flux_only
def test_flux_window_outside_is_unpatched_bit_for_bit_inside_patched(tiny_flux_model):
    """start/end as sigmas: a step outside [sigma_end, sigma_start] gives the unpatched output exactly."""
    import copy

    patch = pack("nodes.flux.flux_identity_pulid_patch")
    dispatcher = pack("nodes.dispatch.dispatcher")
    tf = _tiny_flux()
    model = pulid_flux.PuLIDFlux.from_state(tiny_pulid_flux_state(n_ca=2, dim=tf.HIDDEN))

    def run_at(m, sigma):
        x, t, c, y, g = tf.flux_inputs(0, batch=2, size=8)
        options = copy.copy(m.model_options.get("transformer_options", {}))
        options.update(cond_or_uncond=[0, 1], sigmas=torch.tensor([sigma]), wrappers=m.wrappers)
        with torch.no_grad():
            return m.model.apply_model(x, t, c_crossattn=c, y=y, guidance=g, transformer_options=options)

    windowed = patch.apply_pulid_flux(tiny_flux_model, model, id_tokens(), dispatcher.StageSchedule(weight=1.0, sigma_start=0.5, sigma_end=0.2))
    assert torch.equal(run_at(windowed, 0.9), run_at(tiny_flux_model, 0.9))
    assert torch.equal(run_at(windowed, 0.1), run_at(tiny_flux_model, 0.1))
    assert not torch.equal(run_at(windowed, 0.3), run_at(tiny_flux_model, 0.3))
