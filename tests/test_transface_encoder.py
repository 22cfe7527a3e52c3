"""TransFace encoder: the released key layout loads; patch tokens match a float64 reference ViT."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import pack
from testkit.synthetic import synthetic_identity
from weight_fixtures import transface_state_dict

tf = pack("adapters.faces.transface_encoder")
crop_mask = pack("adapters.faces.face_crop_mask")
encoder_nodes = pack("nodes.identity.face_encoder_nodes")
errors = pack("nodes.common.errors")


def reference_tokens(sd, images, heads=8):
    """TransFace's forward_features up to the final LayerNorm, float64, from the tensors themselves."""
    w = {k: v.double() for k, v in sd.items()}
    proj = w["patch_embed.proj.weight"]
    dim, patch = proj.shape[0], proj.shape[-1]
    x = images.double()
    cols = torch.nn.functional.unfold(x, kernel_size=patch, stride=patch)  # [R, 3*P*P, L] in (c, kh, kw) order
    x = cols.transpose(1, 2) @ proj.reshape(dim, -1).T + w["patch_embed.proj.bias"] + w["pos_embed"]

    def ln(t, p):
        mu = t.mean(-1, keepdim=True)
        var = ((t - mu) ** 2).mean(-1, keepdim=True)
        return (t - mu) / torch.sqrt(var + 1e-5) * w[p + ".weight"] + w[p + ".bias"]

    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    R, L, _ = x.shape
    d = dim // heads
    for i in range(depth):
        p = f"blocks.{i}."
        qkv = ln(x, p + "norm1") @ w[p + "attn.qkv.weight"].T
        q, k, v = qkv.reshape(R, L, 3, heads, d).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) * d**-0.5, dim=-1)
        o = (a @ v).transpose(1, 2).reshape(R, L, dim)
        x = x + o @ w[p + "attn.proj.weight"].T + w[p + "attn.proj.bias"]
        hidden = (ln(x, p + "norm2") @ w[p + "mlp.fc1.weight"].T + w[p + "mlp.fc1.bias"]).clamp(0.0, 6.0)  # ReLU6
        x = x + hidden @ w[p + "mlp.fc2.weight"].T + w[p + "mlp.fc2.bias"]
    return ln(x, "norm")


def test_released_layout_loads_through_weights_only_and_matches_reference(tmp_path):
    sd = transface_state_dict(depth=12)
    path = tmp_path / "ms1mv2_model_TransFace_S.pt"
    torch.save(sd, path)
    encoder = encoder_nodes.load_face_encoder(str(path))
    model = encoder.model
    assert (model.dim, model.depth, model.patch, model.heads, model.num_tokens) == (512, 12, 9, 8, 144)
    crops = torch.rand(2, 112, 112, 3, generator=torch.Generator().manual_seed(1))
    images = tf.preprocess(crops)
    torch.testing.assert_close(images, (crops.permute(0, 3, 1, 2) - 0.5) / 0.5)
    with torch.no_grad():
        got = model.double()(images.double())
    assert got.shape == (2, 144, 512)
    torch.testing.assert_close(got, reference_tokens(sd, images), rtol=1e-9, atol=1e-9)


def test_prefixes_and_bad_files(tmp_path):
    sd = transface_state_dict(depth=2, heads=False)
    wrapped = {"module." + k: v for k, v in sd.items()}
    model = tf.TransFaceEncoder.from_state_dict(wrapped)
    assert model.depth == 2
    broken = dict(sd)
    del broken["blocks.1.mlp.fc2.bias"]
    with pytest.raises(ValueError, match="blocks.1.mlp.fc2.bias"):
        tf.TransFaceEncoder.from_state_dict(broken)
    with pytest.raises(ValueError, match="not a TransFace"):
        tf.TransFaceEncoder.from_state_dict({"proj.weight": torch.zeros(3, 3)})
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(errors.IdentityAttentionError, match="could not read garbage.pt"):
        encoder_nodes.load_face_encoder(str(garbage))
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"to_k_ip.weight": torch.zeros(4, 4)}, str(other))
    with pytest.raises(errors.IdentityAttentionError, match="TransFace-S"):
        encoder_nodes.load_face_encoder(str(other))


def test_encode_node_fills_face_tokens_and_head_mask(tmp_path):
    sd = transface_state_dict(depth=2, heads=False, seed=3)
    encoder = encoder_nodes.FaceEncoder(tf.TransFaceEncoder.from_state_dict(sd), "tiny.pt")
    identity = synthetic_identity(2, seed=5, clip=False)
    out, preview = encoder_nodes.EncodeFaceTokens().encode(encoder, identity)
    assert out.face_tokens.shape == (2, 144, 512) and identity.face_tokens is None
    crops = torch.stack([f.crop for f in identity.faces])
    with torch.no_grad():
        torch.testing.assert_close(out.face_tokens, encoder.model(tf.preprocess(crops)), rtol=1e-5, atol=1e-5)
    assert preview.shape == (2, 112, 112, 3)
    torch.testing.assert_close(preview, crops)

    # a head mask that keeps only the left half of every source photo blacks out that part of the crops
    mask = torch.zeros(2, 256, 256)
    mask[:, :, :110] = 1.0
    masked, preview = encoder_nodes.EncodeFaceTokens().encode(encoder, identity, mask)
    assert not torch.allclose(masked.face_tokens, out.face_tokens)
    assert preview[:, :, :20].abs().sum() > 0 and preview[:, :, -20:].abs().sum() == 0
    with pytest.raises(errors.IdentityAttentionError, match="same size"):
        encoder_nodes.EncodeFaceTokens().encode(encoder, identity, torch.ones(2, 64, 64))


def test_warp_to_crop_inverts_a_known_similarity():
    angle, scale, shift = math.radians(20.0), 1.7, torch.tensor([30.0, -12.0], dtype=torch.float64)
    rot = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]], dtype=torch.float64)
    template = crop_mask.ARCFACE_TEMPLATE_112
    landmarks = template @ (scale * rot).T + shift  # where the template points sit in the source photo
    m = crop_mask.similarity_transform(landmarks, template)
    torch.testing.assert_close(m[:, :2], (rot.T / scale), rtol=1e-9, atol=1e-9)
    # an image whose pixels hold their own coordinates: the crop must hold the mapped-back coordinates
    h, w = 300, 320
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    warped = crop_mask.warp_to_crop(torch.stack([xs, ys]), landmarks)
    cy, cx = torch.meshgrid(torch.arange(112, dtype=torch.float64), torch.arange(112, dtype=torch.float64), indexing="ij")
    src = torch.stack([cx, cy], dim=-1) @ (scale * rot).T + shift
    inside = (src[..., 0] >= 0) & (src[..., 0] <= w - 1) & (src[..., 1] >= 0) & (src[..., 1] <= h - 1)
    torch.testing.assert_close(warped.permute(1, 2, 0).double()[inside], src[inside], rtol=0, atol=2e-3)
