"""Mixture-of-attention routing: routers against float64 formulas, stacking, recording and the inspect node."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from conftest import pack
from layer_harness import (
    SD15_KEY,
    adapter_for,
    attention64,
    close,
    heads_of,
    layer_inputs,
    logits64,
    merge,
    rows_of,
    run_layer,
    sample,
    tokens_mask,
    unpatched,
)
from testkit import ForeignReplace
from testkit.synthetic import synthetic_identity

routing = pack("adapters.attention.attention_routing")
id_adapter_mod = pack("adapters.projectors.id_adapter")
dispatcher = pack("nodes.dispatch.dispatcher")
host = pack("nodes.common.host")
errors = pack("nodes.common.errors")
moa_nodes = pack("nodes.moa.mixture_of_attention_nodes")
pva_nodes = pack("nodes.pva.parallel_attention_nodes")

MOA = moa_nodes.ApplyMixtureOfAttention()
INSPECT = moa_nodes.InspectRouter()


def moa(model, router="mask", weight=1.0, temperature=1.0, mask=None, router_weights=None, apply_to="both", record=True):
    return MOA.apply(model, router, weight, 0.0, 1.0, apply_to, temperature, record, mask=mask, router_weights=router_weights)[0]


def pva(model, adapter, identity, weight=1.0, mode="decoupled", negative="none (PVA)"):
    node = pva_nodes.ApplyParallelAttention()
    return node.apply(model, adapter, identity, weight, 0.0, 1.0, "both", mode, "adapter", "fused", negative_identity=negative)[0]


def decoupled64(inputs, adapter, identity, weight, text=None):
    """Text attention (or ``text``) + weight * identity attention, float64."""
    H = inputs.info.heads
    tokens = adapter.identity_tokens(identity)
    t = rows_of(inputs, {0: tokens.cond, 1: tokens.uncond})
    w = adapter.layers[inputs.info.key]
    base = attention64(inputs.q, inputs.k, inputs.v, H) if text is None else text
    return base + weight * attention64(inputs.q, t @ w["to_k"].double().T, t @ w["to_v"].double().T, H)


def gelu64(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def router_adapter(model, hidden=16, seed=0):
    """Native-format router weights (router.0 / router.2 per layer) for every cross-attention layer."""
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for info in host.cross_attention_layers(model):
        layers[info.key] = {
            "router.0.weight": torch.randn(hidden, info.inner_dim, generator=gen) / math.sqrt(info.inner_dim),
            "router.0.bias": torch.randn(hidden, generator=gen) * 0.1,
            "router.2.weight": torch.randn(2, hidden, generator=gen),
            "router.2.bias": torch.randn(2, generator=gen) * 0.1,
        }
    return id_adapter_mod.IdAdapter(format="native", base=host.base_model_of(model), context_dim=host.context_dim_of(model), layers=layers, mechanism="mixture_of_attention")


# --- routers alone ---------------------------------------------------------------------------------


def test_learned_router_formula():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 10, 32, generator=gen, dtype=torch.float64)
    w = {
        "router.0.weight": torch.randn(8, 32, generator=gen, dtype=torch.float64),
        "router.0.bias": torch.randn(8, generator=gen, dtype=torch.float64),
        "router.2.weight": torch.randn(2, 8, generator=gen, dtype=torch.float64),
        "router.2.bias": torch.randn(2, generator=gen, dtype=torch.float64),
    }
    r0, r1 = routing.route_from_logits(routing.learned_router_logits(x, w), temperature=0.5)
    logits = gelu64(x @ w["router.0.weight"].T + w["router.0.bias"]) @ w["router.2.weight"].T + w["router.2.bias"]
    e = torch.exp(logits / 0.5)
    torch.testing.assert_close(r1, (e[..., 1] / e.sum(-1)).unsqueeze(-1))
    torch.testing.assert_close(r0 + r1, torch.ones_like(r0))


def test_identity_share_router_formula():
    share = torch.tensor([[0.1, 0.3, 0.2, 0.5], [0.0, 0.0, 0.4, 0.2]], dtype=torch.float64).unsqueeze(-1)
    r0, r1 = routing.route_from_identity_share(share, temperature=0.5)
    for b in range(2):
        a = share[b, :, 0]
        m = a / max(float(a.max()), 0.2)  # scaled by the peak share, never by less than 0.2
        torch.testing.assert_close(r1[b, :, 0], 1 / (1 + torch.exp(-10 * (m - 0.5) / 0.5)), rtol=1e-6, atol=1e-6)  # float32 inside
    torch.testing.assert_close(r0, 1 - r1)


def test_recorder_steps_grids_halves_and_bounds():
    rec = routing.RouterRecorder(max_steps=4, max_side=4)
    ones, halves = torch.ones(4, 16), torch.full((4, 16), 0.5)
    rec.record(10.0, [1, 0], (4, 4), ones)  # two layers at one grid in one step
    rec.record(10.0, [1, 0], (4, 4), halves)
    rec.record(10.0, [1, 0], (8, 8), torch.ones(4, 64))  # larger than max_side: area-downsampled
    snap = rec.snapshot()
    assert snap.steps == (10.0,)
    assert torch.equal(snap.maps[0][((4, 4), 0)], torch.full((2, 4, 4), 0.75))
    assert snap.maps[0][((8, 8), 1)].shape == (2, 4, 4)
    for sigma in (9.0, 8.0, 7.0, 6.0, 5.0):
        rec.record(sigma, [0], (4, 4), torch.zeros(2, 16))
    steps = rec.snapshot().steps
    assert len(steps) <= 4 and steps[0] == 10.0 and steps[-1] == 5.0  # thinned, whole run still spanned
    rec.record(14.0, [0], (4, 4), torch.zeros(2, 16))  # sigma went up: a new run
    assert rec.snapshot().steps == (14.0,)


# --- the stage through the dispatcher, one layer ----------------------------------------------------------


def test_mask_router_formula_and_cond_uncond(tiny):
    model = tiny.unet("sd15")
    adapter, identity = adapter_for(model), synthetic_identity(1, seed=2, clip=False)
    mask = torch.rand(1, 4, 4, generator=torch.Generator().manual_seed(3))
    routed = moa(pva(model, adapter, identity, weight=1.2), router="mask", mask=mask, weight=0.8)
    inputs = layer_inputs(routed, SD15_KEY, codes=(1, 0), rows=2)
    text = attention64(inputs.q, inputs.k, inputs.v, inputs.info.heads)
    personalized = decoupled64(inputs, adapter, identity, 1.2)
    r1 = tokens_mask(mask[0], 4)
    mixed = (1 - r1) * text + r1 * personalized
    close(run_layer(routed, inputs), personalized + 0.8 * (mixed - personalized))


def test_router_zero_is_exactly_the_prior(tiny):
    model = tiny.unet("sd15")
    personalized = pva(model, adapter_for(model), synthetic_identity(1, clip=False), weight=1.0)
    routed = moa(personalized, router="mask", mask=torch.zeros(1, 4, 4))
    inputs = layer_inputs(routed, SD15_KEY)
    assert not torch.equal(run_layer(personalized, inputs), unpatched(inputs))
    assert torch.equal(run_layer(routed, inputs), unpatched(inputs))


def test_learned_router_formula_at_a_layer(tiny):
    model = tiny.unet("sd15")
    adapter, identity = adapter_for(model), synthetic_identity(1, seed=4, clip=False)
    weights = router_adapter(model)
    routed = moa(pva(model, adapter, identity, weight=0.9), router="learned", router_weights=weights, temperature=0.7, weight=0.6)
    assert dispatcher.installed_dispatcher(routed).stages[-1].needs_hidden_states
    inputs = layer_inputs(routed, SD15_KEY)
    w = {k: v.double() for k, v in weights.layers[SD15_KEY].items()}
    logits = gelu64(inputs.hidden.double() @ w["router.0.weight"].T + w["router.0.bias"]) @ w["router.2.weight"].T + w["router.2.bias"]
    r = (logits / 0.7).softmax(-1)
    text = attention64(inputs.q, inputs.k, inputs.v, inputs.info.heads)
    personalized = decoupled64(inputs, adapter, identity, 0.9)
    mixed = r[..., :1] * text + r[..., 1:] * personalized
    close(run_layer(routed, inputs), personalized + 0.6 * (mixed - personalized))


def test_identity_attention_router_formula(tiny):
    """PVA joint with its own visual query, then the router built from its identity attention share."""
    model = tiny.unet("sd15")
    adapter, identity = adapter_for(model, num_tokens=4, visual_q=True), synthetic_identity(1, seed=5, clip=False)
    mask = torch.ones(1, 4, 4)
    mask[:, 0, :] = 0.0
    routed = moa(pva(model, adapter, identity, weight=1.5, mode="joint", negative="zero identity"), router="identity_attention", temperature=0.8, mask=mask)
    inputs = layer_inputs(routed, SD15_KEY)
    H = inputs.info.heads
    tokens = adapter.identity_tokens(identity)
    t = rows_of(inputs, {0: tokens.cond, 1: tokens.uncond})
    w = adapter.layers[SD15_KEY]
    k_id, v_id = t @ w["to_k"].double().T, t @ w["to_v"].double().T
    q_id = inputs.hidden.double() @ w["to_q"].double().T
    probs = torch.cat([logits64(inputs.q, inputs.k, H), logits64(q_id, k_id, H) + math.log(1.5)], -1).softmax(-1)
    joint = merge(probs @ torch.cat([heads_of(inputs.v, H), heads_of(v_id, H)], 2))
    share = probs[..., inputs.k.shape[1] :].sum(-1).mean(1)  # [B, N]: identity mass, mean over heads
    m = share / share.amax(1, keepdim=True).clamp_min(0.2)
    r1 = torch.sigmoid(10 * (m - 0.5) / 0.8).unsqueeze(-1) * tokens_mask(mask[0], 4)
    text = attention64(inputs.q, inputs.k, inputs.v, H)
    close(run_layer(routed, inputs), (1 - r1) * text + r1 * joint)
    # PVA's default (no identity on the negative): the negative rows route nothing, they stay the text attention
    routed = moa(pva(model, adapter, identity, weight=1.5, mode="joint"), router="identity_attention", temperature=0.8, mask=mask)
    got = run_layer(routed, inputs)
    cond = torch.tensor([inputs.chunk_of_row(r) == 0 for r in range(got.shape[0])])
    close(got[cond], ((1 - r1) * text + r1 * joint)[cond])
    close(got[~cond], text[~cond])


# --- stacking with another pack's patch, in either order ------------------------------------------------


def test_stacking_orders_with_a_foreign_patch(tiny):
    model = tiny.unet("sd15")
    before = copy.deepcopy(model.model_options)
    adapter, identity = adapter_for(model), synthetic_identity(1, seed=6, clip=False)
    mask = torch.rand(1, 4, 4, generator=torch.Generator().manual_seed(7))
    foreign = lambda m: ForeignReplace().apply(m, 0.5, False)[0]  # noqa: E731  (text attention x 0.5)
    routed = lambda m: moa(m, router="mask", mask=mask)  # noqa: E731
    personal = lambda m: pva(m, adapter, identity, weight=0.7)  # noqa: E731

    inputs = layer_inputs(model, SD15_KEY)
    text = 0.5 * attention64(inputs.q, inputs.k, inputs.v, inputs.info.heads)  # the foreign patch's output
    personalized = decoupled64(inputs, adapter, identity, 0.7, text=text)
    r1 = tokens_mask(mask[0], 4)

    # foreign, PVA, MoA  ==  PVA, foreign, MoA: the foreign patch computes the text attention under both stages
    expected = (1 - r1) * text + r1 * personalized
    close(run_layer(routed(personal(foreign(model))), inputs), expected)
    close(run_layer(routed(foreign(personal(model))), inputs), expected)
    # foreign, MoA, PVA: nothing personalized yet when routing (personalized == prior), PVA adds on top
    close(run_layer(personal(routed(foreign(model))), inputs), decoupled64(inputs, adapter, identity, 0.7, text=text))
    # PVA, MoA, foreign: the foreign patch applied last replaces the slot, as in plain ComfyUI
    close(run_layer(foreign(routed(personal(model))), inputs), text)
    assert model.model_options == before


# --- input checks -------------------------------------------------------------------------------------


def test_errors(tiny):
    model = tiny.unet("sd15")
    personalized = pva(model, adapter_for(model), synthetic_identity(1, clip=False))
    cases = [
        (lambda: moa(model, router="identity_attention"), "'model'"),
        (lambda: moa(personalized, router="mask"), "'mask'"),
        (lambda: moa(personalized, router="learned"), "'router_weights'"),
        (lambda: moa(personalized, weight=1.5, mask=torch.ones(1, 4, 4)), "'weight'"),
        (lambda: moa(personalized, router="learned", router_weights=router_adapter(tiny.unet("sdxl"))), "'router_weights'"),
    ]
    for fn, name in cases:
        with pytest.raises(errors.IdentityAttentionError) as info:
            fn()
        assert name in str(info.value) and "Apply mixture-of-attention" in str(info.value) and "Fix:" in str(info.value)
    with pytest.raises(errors.IdentityAttentionError) as info:
        INSPECT.show(model, {"samples": torch.zeros(1, 4, 8, 8)}, "cond", 0)
    assert "Show router maps" in str(info.value)


# --- sampling in-process and the inspect node ------------------------------------------------------------


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_sampling_records_maps_for_the_inspect_node(tiny, arch):
    model = tiny.unet(arch)
    adapter, identity = adapter_for(model, num_tokens=4, visual_q=True), synthetic_identity(1, seed=8, clip=False)
    personalized = pva(model, adapter, identity, weight=1.0, mode="joint")
    routed = moa(personalized, router="identity_attention", temperature=0.5)
    latent = sample(routed, arch, steps=3, size=8)
    assert torch.isfinite(latent).all()
    stage = dispatcher.installed_dispatcher(routed).stages[-1]
    snap = stage.recorder.snapshot()
    assert len(snap.steps) == 3 and snap.steps[0] > snap.steps[-1]
    maps, sheet = INSPECT.show(routed, {"samples": latent}, "cond", 0)
    grids = snap.grids()
    assert maps.shape == (len(grids), 64, 64, 3) and sheet.shape[-1] == 3 and sheet.shape[0] == 1
    assert float(maps.min()) >= 0.0 and float(maps.max()) <= 1.0 and float(maps.std()) > 0.0
    uncond_maps, _ = INSPECT.show(routed, {"samples": latent}, "uncond", 1)
    assert uncond_maps.shape == maps.shape
    # a second sampling run replaces the record (sigma goes back up)
    sample(routed, arch, steps=2, size=8, seed=1)
    assert len(stage.recorder.snapshot().steps) == 2


# --- through a real server -------------------------------------------------------------------------------


@pytest.mark.host
def test_host_pva_moa_and_router_maps(server):
    prompt = {
        "1": {"class_type": "IdentityAttentionTestKit_TinyModels", "inputs": {"arch": "sd15", "seed": 0}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a portrait photo"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry"}},
        "4": {"class_type": "IdentityAttentionTestKit_SyntheticIdentity", "inputs": {"references": 1, "seed": 1, "with_clip": False, "with_face_tokens": False}},
        "5": {"class_type": "IdentityAttentionTestKit_SyntheticAdapter", "inputs": {"model": ["1", 0], "num_tokens": 4, "seed": 2, "visual_q": True}},
        "6": {
            "class_type": "IdentityAttentionApplyParallelAttention",
            "inputs": {"model": ["1", 0], "id_adapter": ["5", 0], "identity": ["4", 0], "weight": 1.0, "start_percent": 0.0, "end_percent": 1.0,
                       "apply_to": "both", "mode": "joint", "projections": "adapter", "references": "fused"},
        },
        "7": {
            "class_type": "IdentityAttentionApplyMixtureOfAttention",
            "inputs": {"model": ["6", 0], "router": "identity_attention", "weight": 1.0, "start_percent": 0.0, "end_percent": 1.0,
                       "apply_to": "both", "temperature": 1.0, "record_maps": True},
        },
        "8": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "9": {
            "class_type": "KSampler",
            "inputs": {"model": ["7", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["8", 0], "seed": 1, "steps": 2, "cfg": 4.0,
                       "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0},
        },
        "10": {"class_type": "IdentityAttentionInspectRouter", "inputs": {"model": ["7", 0], "latent": ["9", 0], "half": "cond", "routing_node": 0}},
        "11": {"class_type": "SaveImage", "inputs": {"images": ["10", 0], "filename_prefix": "router_maps"}},
        "12": {"class_type": "SaveImage", "inputs": {"images": ["10", 1], "filename_prefix": "router_steps"}},
    }
    info = server.object_info()
    assert info["IdentityAttentionInspectRouter"]["category"] == "identity_attention/inspect"
    assert info["IdentityAttentionApplyMixtureOfAttention"]["category"] == "identity_attention/attention"
    entry = server.run(prompt)
    maps = [p for p in server.output_files(entry) if p.exists() and p.name.startswith("router_maps")]
    steps = [p for p in server.output_files(entry) if p.exists() and p.name.startswith("router_steps")]
    assert len(maps) == 4 and len(steps) == 1  # tiny SD1.5 at 64 px: grids 8x8, 4x4, 2x2, 1x1
    entry = server.run(prompt)  # runs again (the maps change with every sampling)
    assert [p for p in server.output_files(entry) if p.exists() and p.name.startswith("router_maps")]


def test_two_people_with_masks_and_the_identity_router(tiny):
    """Two decoupled identity nodes with left/right masks, then routing by their attention shares."""
    model = tiny.unet("sd15")
    left, right = torch.zeros(1, 4, 4), torch.zeros(1, 4, 4)
    left[..., :2], right[..., 2:] = 1.0, 1.0
    people = [(adapter_for(model, seed=20), synthetic_identity(1, seed=21, clip=False), left, 0.9), (adapter_for(model, seed=22), synthetic_identity(1, seed=23, clip=False), right, 1.1)]
    m = model
    for adapter, identity, mask, weight in people:
        m = pva_nodes.ApplyParallelAttention().apply(m, adapter, identity, weight, 0.0, 1.0, "both", "decoupled", "adapter", "fused", mask=mask)[0]
    routed = moa(m, router="identity_attention", temperature=0.6)
    inputs = layer_inputs(routed, SD15_KEY)
    H, M = inputs.info.heads, inputs.k.shape[1]
    text = attention64(inputs.q, inputs.k, inputs.v, H)
    personalized, share = text, 0
    for adapter, identity, mask, weight in people:
        tokens = adapter.identity_tokens(identity)
        t = rows_of(inputs, {0: tokens.cond, 1: tokens.uncond})
        w = adapter.layers[SD15_KEY]
        k_id, v_id = t @ w["to_k"].double().T, t @ w["to_v"].double().T
        region = tokens_mask(mask[0], 4)
        personalized = personalized + weight * region * attention64(inputs.q, k_id, v_id, H)
        mass = torch.cat([logits64(inputs.q, inputs.k, H), logits64(inputs.q, k_id, H)], -1).softmax(-1)[..., M:].sum(-1).mean(1)
        share = share + mass.unsqueeze(-1) * region  # each person's share only inside their own mask
    share = share.clamp(0, 1)
    m_norm = share / share.amax(1, keepdim=True).clamp_min(0.2)
    r1 = torch.sigmoid(10 * (m_norm - 0.5) / 0.6)
    close(run_layer(routed, inputs), (1 - r1) * text + r1 * personalized)
