"""InstantID's IdentityNet (keypoints hint + ControlNet attending to the identity tokens), and
FaceID-PlusV2's face-structure weight on the adapter loader.

References written here from the published code's behaviour:
- the keypoints picture: InstantID's ``draw_kps`` (limbs to the nose as cv2 ellipse polygons of
  half-width 4, the canvas times 0.6, then radius-10 circles), redrawn step by step below, plus
  pixel checks that need no cv2 (colours at the points, 60 % colour on a limb, black elsewhere);
- the ControlNet context: the InstantID resampler in float64 (``resampler_ref`` of
  test_projectors) on the raw ArcFace embedding (positive) and on zeros or ``noise * U[0, 1)``
  (negative), checked in the conditioning and in what the ControlNet's forward receives while
  sampling;
- FaceID-PlusV2: ``q + s_scale * resampler(q, clip)`` in float64 with s_scale != 1.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import comfy.controlnet
import comfy.sample
import folder_paths
import weight_fixtures as wf
from conftest import pack
from test_projectors import gelu, lin, ln, perceiver_ref, resampler_ref
from testkit.synthetic import synthetic_identity
from testkit.tiny_controlnet import build_tiny_controlnet, write_tiny_controlnet
from testkit.tiny_models import random_conditioning

cv2 = pytest.importorskip("cv2")

fk = pack("adapters.faces.face_keypoints")
identity_net = pack("adapters.projectors.identity_net")
formats = pack("adapters.formats.weight_formats")
nodes = pack("nodes.identity.instantid_nodes")
weights_nodes = pack("nodes.identity.weights_nodes")
errors = pack("nodes.common.errors")

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255)]
RESAMPLER = dict(depth=1, heads=1)  # wf.ip_family_state("instantid"): resampler_layout(64, 1, 1, 16, 512, 2048)


# --------------------------------------------------------------------------------------------- keypoints


def official_draw(kps, width, height):
    """InstantID's draw_kps, step by step (pipeline_stable_diffusion_xl_instantid.py)."""
    kps = np.array(kps, dtype=np.float64)
    out = np.zeros([height, width, 3])
    for a, b in [[0, 2], [1, 2], [3, 2], [4, 2]]:
        xs, ys = kps[[a, b], 0], kps[[a, b], 1]
        length = ((xs[0] - xs[1]) ** 2 + (ys[0] - ys[1]) ** 2) ** 0.5
        angle = math.degrees(math.atan2(ys[0] - ys[1], xs[0] - xs[1]))
        polygon = cv2.ellipse2Poly((int(np.mean(xs)), int(np.mean(ys))), (int(length / 2), 4), int(angle), 0, 360, 1)
        out = cv2.fillConvexPoly(out.copy(), polygon, COLOURS[a])
    out = (out * 0.6).astype(np.uint8)
    for i, (x, y) in enumerate(kps):
        out = cv2.circle(out.copy(), (int(x), int(y)), 10, COLOURS[i], -1)
    return out


def draw_node(identity, **kw):
    args = dict(reference=0, width=0, height=0, placement="reference", x=0.5, y=0.4, face_height=0.4)
    args.update(kw)
    return nodes.FaceKeypointsImage().draw(identity, **args)[0]


def as_uint8(image):
    assert image.dtype == torch.float32 and image.dim() == 4 and image.shape[0] == 1 and image.shape[-1] == 3
    return (image[0] * 255.0).round().to(torch.uint8).numpy()


@pytest.mark.parametrize("kps", [
    [[80.0, 100.0], [140.0, 100.0], [110.0, 130.0], [88.0, 160.0], [132.0, 160.0]],  # frontal
    [[60.3, 90.7], [118.9, 112.2], [77.5, 141.1], [70.2, 170.6], [113.8, 186.4]],  # turned and tilted, fractional
])
def test_keypoints_match_instantid_drawing(kps):
    got = fk.draw_face_keypoints(np.array(kps), 256, 224)
    ref = official_draw(kps, 256, 224)
    assert got.dtype == np.uint8 and got.shape == (224, 256, 3)
    np.testing.assert_array_equal(got, ref)
    # without cv2: each point a disc of its colour (radius 10), limbs at 60 %, black away from the face
    k = np.array(kps)
    for (x, y), colour in zip(k, COLOURS):
        for dx, dy in ((0, 0), (7, 0), (0, -7), (-5, 5)):
            assert tuple(got[int(y) + dy, int(x) + dx]) == colour
    for a in (0, 1, 3, 4):  # a limb point between the discs: 0.6 x the colour of its first point, truncated
        t = 0.5
        x, y = k[a] * (1 - t) + k[2] * t
        if min(math.hypot(x - px, y - py) for px, py in k) > 12:
            assert tuple(got[int(round(y)), int(round(x))]) == tuple(int(c * 0.6) for c in COLOURS[a])
    assert got[5, 5].tolist() == [0, 0, 0] and got[-3, -3].tolist() == [0, 0, 0]


def test_keypoint_node_draws_the_reference_at_its_size():
    who = synthetic_identity(clip=False)  # a 256 x 256 photo, landmarks of a frontal face
    face = who.faces[0]
    got = as_uint8(draw_node(who))
    np.testing.assert_array_equal(got, official_draw(face.landmarks.double().numpy(), 256, 256))


def test_keypoint_node_fits_the_reference_into_another_size():
    who = synthetic_identity(clip=False)
    lm = who.faces[0].landmarks.double().numpy()
    # 512 x 384 canvas from a 256 x 256 photo: scale min(2, 1.5) = 1.5, centred: x + (512 - 384) / 2
    expected = lm * 1.5 + np.array([64.0, 0.0])
    got = as_uint8(draw_node(who, width=512, height=384))
    np.testing.assert_array_equal(got, official_draw(expected, 512, 384))
    # only the width: the photo's aspect (square)
    assert draw_node(who, width=320).shape == (1, 320, 320, 3)


def test_keypoint_node_custom_placement():
    who = synthetic_identity(clip=False)
    face = who.faces[0]
    lm, box = face.landmarks.double().numpy(), face.bbox.double().numpy()  # box 120 x 140 around (100, 120)
    w, h, x, y, fh = 640, 480, 0.3, 0.6, 0.5
    centre = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])
    expected = (lm - centre) * (fh * h / (box[3] - box[1])) + np.array([x * w, y * h])
    got = as_uint8(draw_node(who, width=w, height=h, placement="custom", x=x, y=y, face_height=fh))
    np.testing.assert_array_equal(got, official_draw(expected, w, h))
    ys, xs = np.nonzero(got.sum(-1))
    assert abs(ys.mean() - y * h) < 0.1 * h and abs(xs.mean() - x * w) < 0.1 * w  # the face is where it was put


def test_keypoint_node_picks_a_reference_and_says_when_there_is_none():
    who = synthetic_identity(references=2, clip=False)
    np.testing.assert_array_equal(as_uint8(draw_node(who, reference=1)), official_draw(who.faces[1].landmarks.double().numpy(), 256, 256))
    with pytest.raises(errors.IdentityAttentionError, match=r"Face keypoints image \(InstantID\): input 'reference':.*2 reference.*Fix: use 0 to 1"):
        draw_node(who, reference=2)


# --------------------------------------------------------------------------------------------- IdentityNet


@pytest.fixture(scope="module")
def instantid():
    """(adapter, float64 state of its resampler): a tiny InstantID file in the released key layout, converted."""
    state, _ = wf.ip_family_state("instantid", "sdxl", scale=10, seed=3)
    adapter = formats.convert(state, {}, source="ip-adapter.bin")
    assert adapter.format == "instantid"
    proj = {k[len("image_proj."):]: v.double() for k, v in state.items() if k.startswith("image_proj.")}
    return adapter, proj


@pytest.fixture(scope="module")
def control_net(tmp_path_factory):
    """The tiny SDXL ControlNet file, loaded by the host's own ControlNet loader."""
    path = write_tiny_controlnet(str(tmp_path_factory.mktemp("controlnet") / "instantid_tiny.safetensors"))
    return comfy.controlnet.load_controlnet(path)


def expected_tokens(proj, identity, noise=0.0, seed=0):
    """float64 cond / uncond: the resampler on the fused raw ArcFace embedding / on the negative embedding."""
    raw = torch.stack([f.embedding.double() for f in identity.faces]).mean(0, keepdim=True)
    negative = torch.zeros(1, 512, dtype=torch.float64)
    if noise > 0:
        negative = noise * torch.rand(1, 512, generator=torch.Generator().manual_seed(seed)).double()
    return resampler_ref(proj, raw, **RESAMPLER), resampler_ref(proj, negative, **RESAMPLER)


def apply(control_net, adapter, identity, pos, neg, hint=None, strength=0.8, start=0.0, end=1.0, noise=0.0, seed=0):
    hint = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(1)) if hint is None else hint
    return nodes.ApplyInstantIDIdentityNet().apply(pos, neg, control_net, adapter, identity, hint, strength, start, end, noise, seed)


def close(got, ref):
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-5)


def test_conditioning_carries_tokens_hint_and_schedule(instantid, control_net):
    adapter, proj = instantid
    who = synthetic_identity(references=2, clip=False)
    pos, neg = random_conditioning("sdxl", 100), random_conditioning("sdxl", 200)
    hint = torch.rand(1, 48, 40, 3, generator=torch.Generator().manual_seed(5))
    new_pos, new_neg = apply(control_net, adapter, who, pos, neg, hint=hint, strength=0.65, start=0.1, end=0.7)
    cond, uncond = expected_tokens(proj, who)
    (p_emb, p), (n_emb, n) = new_pos[0], new_neg[0]
    assert p_emb is pos[0][0] and n_emb is neg[0][0]  # the text conditioning is untouched
    assert "cross_attn_controlnet" not in pos[0][1] and "control" not in pos[0][1]  # inputs not mutated
    assert p["cross_attn_controlnet"].shape == (1, 16, 2048)
    close(p["cross_attn_controlnet"], cond)
    close(n["cross_attn_controlnet"], uncond)
    assert not torch.allclose(p["cross_attn_controlnet"], n["cross_attn_controlnet"])
    assert p["control"] is n["control"] and p["control"] is not control_net  # one copy, shared, like Apply ControlNet
    c_net = p["control"]
    assert c_net.strength == 0.65 and tuple(c_net.timestep_percent_range) == (0.1, 0.7)
    assert torch.equal(c_net.cond_hint_original, hint.movedim(-1, 1))
    assert p["control_apply_to_uncond"] is False and p["pooled_output"] is pos[0][1]["pooled_output"]


def test_chains_after_another_controlnet(instantid, control_net):
    adapter, _ = instantid
    who = synthetic_identity(clip=False)
    pos, neg = random_conditioning("sdxl", 100), random_conditioning("sdxl", 200)
    first_pos, first_neg = apply(control_net, adapter, who, pos, neg)
    second_pos, _ = apply(control_net, adapter, who, first_pos, first_neg, strength=0.3)
    assert second_pos[0][1]["control"].previous_controlnet is first_pos[0][1]["control"]


def test_negative_noise_is_seeded_and_deterministic(instantid, control_net):
    adapter, proj = instantid
    who = synthetic_identity(clip=False)
    pos, neg = random_conditioning("sdxl", 100), random_conditioning("sdxl", 200)
    _, neg_a = apply(control_net, adapter, who, pos, neg, noise=0.35, seed=7)
    _, neg_b = apply(control_net, adapter, who, pos, neg, noise=0.35, seed=7)
    _, neg_c = apply(control_net, adapter, who, pos, neg, noise=0.35, seed=8)
    _, neg_0 = apply(control_net, adapter, who, pos, neg, noise=0.0, seed=7)
    _, uncond = expected_tokens(proj, who, noise=0.35, seed=7)
    close(neg_a[0][1]["cross_attn_controlnet"], uncond)
    assert torch.equal(neg_a[0][1]["cross_attn_controlnet"], neg_b[0][1]["cross_attn_controlnet"])
    assert not torch.allclose(neg_a[0][1]["cross_attn_controlnet"], neg_c[0][1]["cross_attn_controlnet"])
    close(neg_0[0][1]["cross_attn_controlnet"], expected_tokens(proj, who)[1])  # 0 = zeros, the official negative
    # the negative embedding itself: noise * U[0, 1) from the seed
    emb = identity_net.negative_embedding(torch.zeros(1, 512), 0.35, 7)
    assert torch.equal(emb, 0.35 * torch.rand(1, 512, generator=torch.Generator().manual_seed(7)))
    assert emb.min() >= 0 and emb.max() < 0.35


def test_strength_zero_returns_the_prompts_unchanged(instantid, control_net):
    adapter, _ = instantid
    pos, neg = random_conditioning("sdxl", 100), random_conditioning("sdxl", 200)
    out = apply(control_net, adapter, synthetic_identity(clip=False), pos, neg, strength=0.0)
    assert out[0] is pos and out[1] is neg


def _pooled_rows(y, pooled):
    return torch.isclose(y[:, : pooled.shape[-1]], pooled.to(y), rtol=1e-5, atol=1e-5).all(dim=-1)


def test_controlnet_attends_to_the_identity_tokens_while_sampling(instantid, control_net, tiny):
    """Hook the ControlNet's forward: every call's context is the identity tokens (cond rows) or the uncond tokens."""
    adapter, proj = instantid
    who = synthetic_identity(clip=False)
    pos, neg = random_conditioning("sdxl", 100), random_conditioning("sdxl", 200)
    new_pos, new_neg = apply(control_net, adapter, who, pos, neg, strength=1.0)
    cond, uncond = expected_tokens(proj, who)
    seen = []
    hook = control_net.control_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((kwargs["context"].detach().clone(), kwargs["y"].detach().clone())), with_kwargs=True)
    try:
        model = tiny.unet("sdxl")
        noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        latent = torch.zeros(1, 4, 8, 8)
        with_cn = comfy.sample.sample(model, noise, 2, 4.0, "euler", "normal", new_pos, new_neg, latent, seed=0, disable_pbar=True)
    finally:
        hook.remove()
    assert seen, "the ControlNet never ran"
    rows = {"cond": 0, "uncond": 0}
    for context, y in seen:
        assert context.shape[1:] == (16, 2048)  # the identity tokens, not the 77 text tokens
        is_pos, is_neg = _pooled_rows(y, pos[0][1]["pooled_output"]), _pooled_rows(y, neg[0][1]["pooled_output"])
        assert bool((is_pos ^ is_neg).all()), "every batch row is the positive or the negative prompt"
        for i in range(context.shape[0]):
            close(context[i : i + 1], cond if is_pos[i] else uncond)
            rows["cond" if is_pos[i] else "uncond"] += 1
    assert rows["cond"] and rows["uncond"]
    plain = comfy.sample.sample(tiny.unet("sdxl"), noise, 2, 4.0, "euler", "normal", pos, neg, latent, seed=0, disable_pbar=True)
    assert not torch.allclose(with_cn, plain)  # the ControlNet changes the picture


def test_refuses_adapters_that_are_not_instantid(control_net):
    state, _ = wf.ip_family_state("ip_adapter_plus", "sdxl", scale=10, seed=4)
    plus = formats.convert(state, {}, source="ip-adapter-plus_sdxl.safetensors")
    pos, neg = random_conditioning("sdxl", 100), random_conditioning("sdxl", 200)
    with pytest.raises(errors.IdentityAttentionError, match=r"input 'id_adapter': this is a ip_adapter_plus adapter.*InstantID.*Fix: load InstantID's ip-adapter.bin"):
        apply(control_net, plus, synthetic_identity(), pos, neg)


def test_refuses_a_controlnet_of_another_width(instantid):
    adapter, _ = instantid
    sd15 = comfy.controlnet.ControlNet(build_tiny_controlnet("sd15"))  # an SD1.5 ControlNet: 768-wide context
    pos, neg = random_conditioning("sdxl", 100), random_conditioning("sdxl", 200)
    with pytest.raises(errors.IdentityAttentionError, match=r"input 'control_net': this ControlNet attends to 768-wide context but InstantID's tokens are 2048 wide"):
        apply(sd15, adapter, synthetic_identity(clip=False), pos, neg)


# --------------------------------------------------------------------------------------------- FaceID-PlusV2 s_scale


@pytest.fixture()
def ipadapter_folder(tmp_path, monkeypatch):
    for name in weights_nodes.ADAPTER_FOLDERS:
        (tmp_path / name).mkdir()
        monkeypatch.setitem(folder_paths.folder_names_and_paths, name, ([str(tmp_path / name)], {".safetensors", ".bin"}))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {}, raising=False)
    weights_nodes._ADAPTERS.clear()
    return tmp_path / "ipadapter"


def plusv2_reference(s, identity, s_scale, tokens=4, width=768):
    """FaceID-PlusV2's projector in float64: q = LN(MLP(normed ArcFace)); tokens = q + s_scale * resampler(q, CLIP)."""
    e = torch.nn.functional.normalize(torch.stack([f.embedding.double() for f in identity.faces]), dim=-1).mean(0, keepdim=True)
    h = lin(gelu(lin(e, s["proj.0.weight"], s["proj.0.bias"])), s["proj.2.weight"], s["proj.2.bias"])
    q = ln(h.reshape(1, tokens, width), s["norm.weight"], s["norm.bias"])
    r = {k[len("perceiver_resampler."):]: v for k, v in s.items() if k.startswith("perceiver_resampler.")}
    x = lin(identity.clip_hidden.double().mean(0, keepdim=True), r["proj_in.weight"], r["proj_in.bias"])
    depth = len({k.split(".")[1] for k in r if k.startswith("layers.")})
    out = lin(perceiver_ref(r, "", x, q, depth=depth, heads=r["layers.0.0.to_q.weight"].shape[0] // 64), r["proj_out.weight"], r["proj_out.bias"])
    return q + s_scale * ln(out, r["norm_out.weight"], r["norm_out.bias"])


def test_faceid_v2_structure_on_the_loader(ipadapter_folder, tiny):
    state, _ = wf.ip_family_state("faceid_plus", "sd15", seed=1)
    save_file(state, str(ipadapter_folder / "my_plusv2.safetensors"))
    node = weights_nodes.LoadIdentityAdapter()
    model = tiny.unet("sd15")
    published, _ = node.load("ipadapter/my_plusv2.safetensors", model)
    strong, info = node.load("ipadapter/my_plusv2.safetensors", model, faceid_v2_structure=2.5)
    again, _ = node.load("ipadapter/my_plusv2.safetensors", model)
    assert published.projector.s_scale == 1.0 and again is published  # the cached adapter keeps the published weight
    assert strong is not published and strong.projector.s_scale == 2.5 and "face structure: 2.5" in info
    for a, b in zip(strong.projector.parameters(), published.projector.parameters()):
        assert a.data_ptr() == b.data_ptr()  # the tensors are shared, not copied
    who = synthetic_identity(references=2, clip_hidden_dim=state["image_proj.perceiver_resampler.proj_in.weight"].shape[1])
    s = {k[len("image_proj."):]: v.double() for k, v in state.items() if k.startswith("image_proj.")}
    for adapter, s_scale in ((strong, 2.5), (published, 1.0)):
        tokens = adapter.identity_tokens(who)
        close(tokens.cond, plusv2_reference(s, who, s_scale))
    zero, _ = node.load("ipadapter/my_plusv2.safetensors", model, faceid_v2_structure=0.0)
    close(zero.identity_tokens(who).cond, plusv2_reference(s, who, 0.0))  # 0: the ArcFace queries alone


def test_faceid_v2_structure_is_ignored_by_other_adapters(ipadapter_folder, tiny):
    state, _ = wf.ip_family_state("ip_adapter_plus", "sd15", seed=2)
    save_file(state, str(ipadapter_folder / "plus.safetensors"))
    adapter, info = weights_nodes.LoadIdentityAdapter().load("ipadapter/plus.safetensors", tiny.unet("sd15"), faceid_v2_structure=2.0)
    assert adapter is weights_nodes.LoadIdentityAdapter().load("ipadapter/plus.safetensors", tiny.unet("sd15"))[0]
    assert "faceid_v2_structure: ignored" in info
