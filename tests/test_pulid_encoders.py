"""PuLID's image side: EVA02-CLIP-L vision tower, facexlib's BiSeNet, the face-features image, both PuLID file layouts.

References are float64 and written here from the architectures' equations (EVA-CLIP ``eva_vit_model.py`` /
``rope.py``, facexlib ``bisenet.py`` / ``resnet.py``, PuLID ``pipeline_v1_1.py``), independent of the pack's modules.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import pack
from weight_fixtures import bisenet_layout, bisenet_state, eva_clip_layout, meta_state, pulid_comfyui_state, pulid_state, tiny_eva_state

eva = pack("adapters.faces.eva_clip_vision")
parsing = pack("adapters.faces.face_parsing")
face_image = pack("adapters.faces.pulid_face_image")
safe_load = pack("adapters.weights.safe_load")
formats = pack("adapters.formats.weight_formats")
identity_mod = pack("adapters.faces.identity")


# --- EVA02-CLIP ------------------------------------------------------------------------------------


def ln64(x, w, b, eps=1e-6):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def rope64(t, grid, pretrain=16):
    """EVA02 2D RoPE on [B, H, P, D]: channel pair (2i, 2i+1) of the first half turns by row * f_i, of the second
    half by column * f_i, f_i = 10000^(-2i/(D/2)), positions index / grid * pretrain."""
    B, H, P, D = t.shape
    half = D // 2
    out = t.clone()
    for p in range(P):
        pos = (p // grid / grid * pretrain, p % grid / grid * pretrain)
        for part in range(2):
            for i in range(half // 2):
                f = 10000.0 ** (-(2 * i) / half)
                a, c = part * half + 2 * i, part * half + 2 * i + 1
                ang = pos[part] * f
                x0, x1 = t[:, :, p, a], t[:, :, p, c]
                out[:, :, p, a] = x0 * math.cos(ang) - x1 * math.sin(ang)
                out[:, :, p, c] = x1 * math.cos(ang) + x0 * math.sin(ang)
    return out


def eva_reference(sd, pixels, heads):
    """EVA02-CLIP vision tower in float64 from its equations: (normalised CLS embedding, block inputs 1..5 of 6)."""
    w = {k[len("visual."):]: v.double() for k, v in sd.items() if k.startswith("visual.")}
    proj = w["patch_embed.proj.weight"]
    width, patch = proj.shape[0], proj.shape[-1]
    x = pixels.double()
    cols = F.unfold(x, kernel_size=patch, stride=patch)  # [B, 3*P*P, L]
    grid = int(round(cols.shape[-1] ** 0.5))
    x = cols.transpose(1, 2) @ proj.reshape(width, -1).T + w["patch_embed.proj.bias"]
    x = torch.cat([w["cls_token"].expand(x.shape[0], 1, width), x], 1) + w["pos_embed"]
    depth = 1 + max(int(k.split(".")[1]) for k in w if k.startswith("blocks."))
    B, N, C = x.shape
    d = C // heads
    taps = []
    for i in range(depth):
        if i in (1, 2, 3, 4, 5):  # round(6 * k / 6): PuLID's 4, 8, ..., 20 scaled to 6 blocks
            taps.append(x)
        p = f"blocks.{i}."
        a = ln64(x, w[p + "norm1.weight"], w[p + "norm1.bias"])
        q = a @ w[p + "attn.q_proj.weight"].T + w[p + "attn.q_bias"]
        k = a @ w[p + "attn.k_proj.weight"].T
        v = a @ w[p + "attn.v_proj.weight"].T + w[p + "attn.v_bias"]
        q, k, v = (t.reshape(B, N, heads, d).permute(0, 2, 1, 3) for t in (q, k, v))
        q = torch.cat([q[:, :, :1], rope64(q[:, :, 1:], grid)], 2)
        k = torch.cat([k[:, :, :1], rope64(k[:, :, 1:], grid)], 2)
        o = ((q @ k.transpose(-1, -2)) / math.sqrt(d)).softmax(-1) @ v
        o = ln64(o.permute(0, 2, 1, 3).reshape(B, N, C), w[p + "attn.inner_attn_ln.weight"], w[p + "attn.inner_attn_ln.bias"])
        x = x + o @ w[p + "attn.proj.weight"].T + w[p + "attn.proj.bias"]
        m = ln64(x, w[p + "norm2.weight"], w[p + "norm2.bias"])
        h1 = m @ w[p + "mlp.w1.weight"].T + w[p + "mlp.w1.bias"]
        h2 = m @ w[p + "mlp.w2.weight"].T + w[p + "mlp.w2.bias"]
        h = ln64(h1 * torch.sigmoid(h1) * h2, w[p + "mlp.ffn_ln.weight"], w[p + "mlp.ffn_ln.bias"])
        x = x + h @ w[p + "mlp.w3.weight"].T + w[p + "mlp.w3.bias"]
    cls = ln64(x, w["norm.weight"], w["norm.bias"])[:, 0] @ w["head.weight"].T + w["head.bias"]
    return cls / cls.norm(dim=-1, keepdim=True), torch.stack(taps, 1)


OPENAI_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073], dtype=torch.float64).view(1, 3, 1, 1)
OPENAI_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711], dtype=torch.float64).view(1, 3, 1, 1)


def test_pulid_taps_for_the_release_depth():
    assert eva.hidden_layer_taps(24) == (4, 8, 12, 16, 20)  # PuLID: 0 < idx <= 20 and idx % 4 == 0
    with pytest.raises(ValueError):
        eva.hidden_layer_taps(5)


def test_tiny_eva_matches_float64_reference():
    sd = tiny_eva_state(seed=3)
    model = eva.EvaVisionTransformer.from_state_dict(sd)
    assert model.config.heads == 2 and model.config.depth == 6 and model.config.tokens == 10
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 42, 42, generator=gen)
    with torch.no_grad():
        embeds, hidden = eva.pulid_eva_features(model, images)
    ref_embeds, ref_hidden = eva_reference(sd, (images.double() - OPENAI_MEAN) / OPENAI_STD, heads=2)
    assert embeds.shape == (2, 48) and hidden.shape == (2, 5, 10, 128)
    torch.testing.assert_close(embeds.double(), ref_embeds, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(hidden.double(), ref_hidden, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(embeds.norm(dim=-1), torch.ones(2))
    # the RoPE tables of the file are recomputed, not read: random values there change nothing
    assert not any("rope" in k for k in model.state_dict())


def test_eva_resize_is_torchvision_bicubic_without_antialias():
    """PuLID pins torchvision 0.15, whose tensor resize is bicubic without antialiasing."""
    tvf = pytest.importorskip("torchvision.transforms.functional")
    from torchvision.transforms import InterpolationMode

    images = torch.rand(1, 3, 84, 84, generator=torch.Generator().manual_seed(2))
    got = eva.normalize_for_eva(images, 42)
    expected = tvf.resize(images, 42, InterpolationMode.BICUBIC, antialias=False)
    expected = tvf.normalize(expected, list(OPENAI_MEAN.flatten().tolist()), list(OPENAI_STD.flatten().tolist()))
    torch.testing.assert_close(got, expected)


def test_release_key_layout_full_size():
    """The release's names and shapes (meta tensors, no memory) build the published architecture, every tensor used."""
    state = meta_state(eva_clip_layout())
    visual = eva.vision_keys(state)
    config = eva.config_from_state(visual)
    assert (config.image_size, config.patch_size, config.width, config.depth, config.heads, config.mlp_hidden, config.embed_dim) == (
        336, 14, 1024, 24, 16, 2730, 768
    )
    assert config.tokens == 577
    with torch.device("meta"):
        model = eva.EvaVisionTransformer(config)
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert own == {k: tuple(v.shape) for k, v in visual.items()}
    assert not any(k.startswith("text.") or k == "logit_scale" for k in visual)


def test_release_pt_and_safetensors_conversions_load_alike(tmp_path):
    """``.pt`` through torch.load(weights_only=True) and safetensors with or without ``visual.`` give one model."""
    from safetensors.torch import save_file

    sd = tiny_eva_state(seed=4)
    torch.save(sd, tmp_path / "EVA02_CLIP_L_336_psz14_s6B.pt")
    save_file({k: v.contiguous() for k, v in sd.items() if k.startswith("visual.")}, str(tmp_path / "kept.safetensors"))
    save_file({k[len("visual."):]: v.contiguous() for k, v in sd.items() if k.startswith("visual.")}, str(tmp_path / "stripped.safetensors"))
    images = torch.rand(1, 3, 42, 42, generator=torch.Generator().manual_seed(5))
    outs = []
    for name in ("EVA02_CLIP_L_336_psz14_s6B.pt", "kept.safetensors", "stripped.safetensors"):
        wf = safe_load.read_weight_file(str(tmp_path / name))
        with torch.no_grad():
            outs.append(eva.pulid_eva_features(eva.EvaVisionTransformer.from_state_dict(wf.tensors), images))
    for e, h in outs[1:]:
        assert torch.equal(e, outs[0][0]) and torch.equal(h, outs[0][1])


def test_eva_refuses_other_files():
    with pytest.raises(ValueError, match="EVA02-CLIP"):
        eva.EvaVisionTransformer.from_state_dict({"visual.proj": torch.zeros(2, 2)})
    sd = tiny_eva_state(seed=4)
    del sd["visual.blocks.2.mlp.ffn_ln.weight"]
    with pytest.raises(ValueError, match="missing 1"):
        eva.EvaVisionTransformer.from_state_dict(sd)


# --- BiSeNet ---------------------------------------------------------------------------------------


def bn64(x, w, p, eps=1e-5):
    shape = (1, -1, 1, 1)
    return (x - w[p + "running_mean"].view(shape)) / torch.sqrt(w[p + "running_var"].view(shape) + eps) * w[p + "weight"].view(shape) + w[p + "bias"].view(shape)


def cbr64(x, w, p, stride=1):
    k = w[p + "conv.weight"]
    return torch.relu(bn64(F.conv2d(x, k, stride=stride, padding=k.shape[-1] // 2), w, p + "bn."))


def gmean(x):
    return x.mean(dim=(2, 3), keepdim=True)


def bisenet_reference(sd, x):
    """facexlib BiSeNet's main output in float64 from its equations (eval-mode BatchNorm)."""
    w = {k: v.double() for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    h = torch.relu(bn64(F.conv2d(x, w["cp.resnet.conv1.weight"], stride=2, padding=3), w, "cp.resnet.bn1."))
    h = F.max_pool2d(h, 3, 2, 1)
    feats = []
    for n in range(1, 5):
        for j in range(2):
            p = f"cp.resnet.layer{n}.{j}."
            stride = 2 if (n > 1 and j == 0) else 1
            r = torch.relu(bn64(F.conv2d(h, w[p + "conv1.weight"], stride=stride, padding=1), w, p + "bn1."))
            r = bn64(F.conv2d(r, w[p + "conv2.weight"], padding=1), w, p + "bn2.")
            s = bn64(F.conv2d(h, w[p + "downsample.0.weight"], stride=stride), w, p + "downsample.1.") if p + "downsample.0.weight" in w else h
            h = torch.relu(s + r)
        feats.append(h)
    feat8, feat16, feat32 = feats[1:]

    def arm(f, p):
        f = cbr64(f, w, p + "conv.")
        return f * torch.sigmoid(bn64(F.conv2d(gmean(f), w[p + "conv_atten.weight"]), w, p + "bn_atten."))

    avg = cbr64(gmean(feat32), w, "cp.conv_avg.").expand(-1, -1, *feat32.shape[2:])
    up32 = cbr64(F.interpolate(arm(feat32, "cp.arm32.") + avg, feat16.shape[2:], mode="nearest"), w, "cp.conv_head32.")
    up16 = cbr64(F.interpolate(arm(feat16, "cp.arm16.") + up32, feat8.shape[2:], mode="nearest"), w, "cp.conv_head16.")
    f = cbr64(torch.cat([feat8, up16], 1), w, "ffm.convblk.")
    f = f + f * torch.sigmoid(F.conv2d(torch.relu(F.conv2d(gmean(f), w["ffm.conv1.weight"])), w["ffm.conv2.weight"]))
    out = F.conv2d(cbr64(f, w, "conv_out.conv."), w["conv_out.conv_out.weight"])
    return F.interpolate(out, x.shape[2:], mode="bilinear", align_corners=True)


def test_bisenet_matches_float64_reference():
    sd = bisenet_state(seed=1)
    model = parsing.BiSeNet.from_state_dict(sd)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model(x)
    expected = bisenet_reference(sd, x.double())
    assert got.shape == (1, 19, 64, 64)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_bisenet_file_layout_loads_weights_only(tmp_path):
    """facexlib's key layout, saved with torch.save, read through torch.load(weights_only=True); counters optional."""
    layout = bisenet_layout()
    sd = bisenet_state(seed=2)
    assert set(sd) == set(layout)
    torch.save(sd, tmp_path / "parsing_bisenet.pth")
    wf = safe_load.read_weight_file(str(tmp_path / "parsing_bisenet.pth"))
    model = parsing.BiSeNet.from_state_dict(wf.tensors)
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert own == {k: tuple(v) for k, v in layout.items()}
    parsing.BiSeNet.from_state_dict(bisenet_state(seed=2, with_counters=False))
    with pytest.raises(ValueError, match="BiSeNet"):
        parsing.BiSeNet.from_state_dict({"conv1.weight": torch.zeros(1)})


def test_pulid_whitening_rule():
    """PuLID's bg_label [0, 16, 18, 7, 8, 9, 14, 15] turn white; hair (17), skin, eyes... keep the grey face."""
    labels = torch.arange(19).view(1, 1, 19).expand(1, 2, 19)
    bg = parsing.background_mask(labels)
    assert bg[0, 0].nonzero().flatten().tolist() == [0, 7, 8, 9, 14, 15, 16, 18]
    faces = torch.rand(1, 3, 2, 19, generator=torch.Generator().manual_seed(0))
    out = face_image.face_features_image(faces, bg)
    gray = 0.299 * faces[:, 0] + 0.587 * faces[:, 1] + 0.114 * faces[:, 2]
    for c in range(3):
        torch.testing.assert_close(out[:, c], torch.where(bg, torch.ones_like(gray), gray))
    torch.testing.assert_close(face_image.face_features_image(faces, None)[:, 1], gray)


def test_parse_labels_normalise_like_pulid():
    """parse_labels = argmax of BiSeNet on ImageNet-normalised RGB."""
    sd = bisenet_state(seed=3)
    model = parsing.BiSeNet.from_state_dict(sd)
    faces = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        labels = parsing.parse_labels(model, faces)
    expected = bisenet_reference(sd, ((faces - mean) / std).double()).argmax(1)
    assert (labels == expected).float().mean() > 0.999


# --- alignment -------------------------------------------------------------------------------------


def test_align_512_is_cv2_warp_with_facexlib_template_and_grey_border():
    cv2 = pytest.importorskip("cv2")
    import numpy as np

    gen = torch.Generator().manual_seed(0)
    image = torch.rand(3, 120, 100, generator=gen)
    template = np.array([[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935], [201.26117, 371.41043], [313.08905, 371.15118]])
    # landmarks: the template under a known similarity (scale 0.3, 10 degrees, shifted so the crop corner is outside the photo) + noise
    a = math.radians(10.0)
    rot = 0.3 * np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    kps = template @ rot.T + np.array([-30.0, -40.0]) + np.random.default_rng(0).normal(0, 0.3, (5, 2))
    got = face_image.align_face_512(image, torch.from_numpy(kps).float())
    m = face_image.similarity_transform(torch.from_numpy(kps), torch.from_numpy(template)).numpy()
    bgr = (image.permute(1, 2, 0).numpy()[..., ::-1]).astype(np.float32).copy()
    ref = cv2.warpAffine(bgr, m, (512, 512), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=(135 / 255, 133 / 255, 132 / 255))
    ref = torch.from_numpy(ref[..., ::-1].copy()).permute(2, 0, 1)
    assert got.shape == (3, 512, 512)
    # cv2 quantises bilinear weights to 1/32: agreement to that precision
    assert (got - ref).abs().max() < 0.04
    assert (got - ref).abs().mean() < 2e-3
    torch.testing.assert_close(got[:, 0, 0], torch.tensor([132 / 255, 133 / 255, 135 / 255]))  # a corner outside the photo is grey


# --- PuLID files -----------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["v1", "v1.1"])
def test_both_pulid_layouts_load_to_the_same_adapter(version):
    """Official pulid_v1*.safetensors (id_adapter.*) and PuLID_ComfyUI's ip-adapter_pulid_sdxl_fp16 layout
    (image_proj.* + ip_adapter.N.to_k_ip/to_v_ip) give the same projector and layers."""
    official, _ = pulid_state(version, seed=7)
    comfy_layout = pulid_comfyui_state(official)
    assert not any(k.startswith("id_adapter") for k in comfy_layout)
    assert formats.detect_format(official) == formats.detect_format(comfy_layout) == "pulid"
    a, b = formats.convert(official), formats.convert(comfy_layout)
    assert type(a.projector) is type(b.projector)
    sa, sb = a.projector.state_dict(), b.projector.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.layers.keys() == b.layers.keys()
    assert all(torch.equal(a.layers[k][n], b.layers[k][n]) for k in a.layers for n in ("to_k", "to_v"))
    assert "PuLID_ComfyUI" in b.metadata["pulid_layout"] and "official" in a.metadata["pulid_layout"]


def test_pulid_tokens_from_eva_features():
    """The IDENTITY's EVA fields, shaped as this pack's EVA model makes them, feed the PuLID projector."""
    official, _ = pulid_state("v1", seed=8)
    adapter = formats.convert(official)
    sd = tiny_eva_state(seed=9, width=128, embed_dim=768)
    model = eva.EvaVisionTransformer.from_state_dict(sd)
    with torch.no_grad():
        embeds, hidden = eva.pulid_eva_features(model, torch.rand(1, 3, 42, 42, generator=torch.Generator().manual_seed(3)))
    # the fixture's PuLID encoder reads EVA width 32; take the first 32 channels of the tiny tower's 128
    face = identity_mod.FaceRecord(0, (64, 64), torch.zeros(4), torch.zeros(5, 2), 0.9, torch.randn(512), torch.zeros(112, 112, 3))
    ident = identity_mod.Identity(faces=(face,), eva_clip_embeds=embeds, eva_clip_hidden=hidden[..., :32])
    tokens = adapter.identity_tokens(ident)
    assert tokens.cond.shape[-1] == 2048 and torch.isfinite(tokens.cond).all()
