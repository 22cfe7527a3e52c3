"""CA² gate math (adapters/attention/ca2_gate.py) against float64 references of Eq. 3-6 written here."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import pack

ca2 = pack("adapters.attention.ca2_gate")
core = pack("adapters.attention.attention_core")
mass_mod = pack("adapters.attention.text_attention_mass")
sampling_scope = pack("nodes.common.sampling_scope")

F64 = torch.float64


def softmax_heads(q, k, heads):
    """Reference per-head softmax(Q K^T / sqrt(d)): [B, H, N, M], float64, written out."""
    b, n, hd = q.shape
    d = hd // heads
    qh = q.reshape(b, n, heads, d).permute(0, 2, 1, 3)
    kh = k.reshape(b, k.shape[1], heads, d).permute(0, 2, 1, 3)
    logits = qh @ kh.transpose(-1, -2) / math.sqrt(d)
    e = torch.exp(logits - logits.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def apply_probs(p, v, heads):
    b, m, hd = v.shape
    vh = v.reshape(b, m, heads, hd // heads).permute(0, 2, 1, 3)
    out = p @ vh  # [B, H, N, d]
    return out.permute(0, 2, 1, 3).reshape(b, p.shape[2], hd)


def eq5_6(q, k_txt, v_txt, k_vis, v_vis, heads, score, mask, weight=1.0):
    """Z = softmax(QKt^T/sqrt d) Vt + weight * (A_vis ⊙ (1 - Score ⊙ M)) V_vis, row scaling of A_vis as Eq. 5."""
    f_txt = apply_probs(softmax_heads(q, k_txt, heads), v_txt, heads)
    a_vis = softmax_heads(q, k_vis, heads)
    row_scale = (1.0 - score * mask[..., 0])[:, None, :, None]  # [B, 1, N, 1]
    return f_txt + weight * apply_probs(a_vis * row_scale, v_vis, heads)


def random_case(seed=0, b=2, n=24, heads=4, d=8, m=77, t=6):
    gen = torch.Generator().manual_seed(seed)
    hd = heads * d
    r = lambda *s: torch.randn(*s, generator=gen, dtype=F64)
    q, kt, vt, kv, vv = r(b, n, hd), r(b, m, hd), r(b, m, hd), r(b, t, hd), r(b, t, hd)
    score = torch.rand(b, n, generator=gen, dtype=F64)
    mask = (torch.rand(b, n, 1, generator=gen, dtype=F64) > 0.5).to(F64)
    return q, kt, vt, kv, vv, heads, score, mask


def ca2_output(q, kt, vt, kv, vv, heads, score, mask, weight=1.0):
    text = core.reference_attention(q, kt, vt, heads)
    gate = ca2.visual_gate(score, mask)
    return ca2.gated_visual_attention(text, q, kv, vv, heads, gate, weight, core.reference_attention)


@pytest.mark.parametrize("weight", [1.0, 0.6])
def test_equals_float64_reference_of_eq5_6(weight):
    q, kt, vt, kv, vv, heads, score, mask = random_case(1)
    soft = torch.rand(mask.shape, generator=torch.Generator().manual_seed(5), dtype=F64)  # feathered mask
    for m in (mask, soft):
        got = ca2_output(q, kt, vt, kv, vv, heads, score, m, weight)
        torch.testing.assert_close(got, eq5_6(q, kt, vt, kv, vv, heads, score, m, weight), rtol=1e-12, atol=1e-12)


def test_mask_zero_is_plain_decoupled_attention():
    q, kt, vt, kv, vv, heads, score, _ = random_case(2)
    zero = torch.zeros(q.shape[0], q.shape[1], 1, dtype=F64)
    decoupled = apply_probs(softmax_heads(q, kt, heads), vt, heads) + 0.7 * apply_probs(softmax_heads(q, kv, heads), vv, heads)
    torch.testing.assert_close(ca2_output(q, kt, vt, kv, vv, heads, score, zero, 0.7), decoupled, rtol=1e-12, atol=1e-12)
    # and without any mask given (None = no suppression anywhere)
    text = core.reference_attention(q, kt, vt, heads)
    got = ca2.gated_visual_attention(text, q, kv, vv, heads, ca2.visual_gate(score, None), 0.7, core.reference_attention)
    torch.testing.assert_close(got, decoupled, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_score_one_inside_mask_removes_visual_term_exactly_there_only(dtype):
    q, kt, vt, kv, vv, heads, _, mask = (x.to(dtype) if torch.is_tensor(x) else x for x in random_case(3))
    ones = torch.ones(q.shape[0], q.shape[1], dtype=dtype)
    text = core.reference_attention(q, kt, vt, heads)
    got = ca2_output(q, kt, vt, kv, vv, heads, ones, mask)
    inside = mask[..., 0] == 1
    assert inside.any() and (~inside).any()
    assert torch.equal(got[inside], text[inside])  # bit for bit: the visual term is gone
    visual = core.reference_attention(q, kv, vv, heads)
    torch.testing.assert_close(got[~inside], (text + visual)[~inside])
    assert (got[~inside] - text[~inside]).abs().amax() > 1e-3  # ...and present everywhere else


def test_native_score_predictor_equals_reference_mlp():
    gen = torch.Generator().manual_seed(4)
    b, n, c, ct, hidden = 2, 10, 16, 12, 20
    z = torch.randn(b, n, c, generator=gen, dtype=F64)
    context = torch.randn(b, 77, ct, generator=gen, dtype=F64)
    weights = {
        "score.0.weight": torch.randn(hidden, c + ct, generator=gen, dtype=F64) * 0.3,
        "score.0.bias": torch.randn(hidden, generator=gen, dtype=F64) * 0.1,
        "score.2.weight": torch.randn(2, hidden, generator=gen, dtype=F64) * 0.3,
        "score.2.bias": torch.randn(2, generator=gen, dtype=F64) * 0.1,
    }
    pooled = context.sum(dim=1, keepdim=True) / 77.0
    torch.testing.assert_close(ca2.pooled_text_token(context), pooled)
    x = torch.cat([z, pooled.expand(b, n, ct)], dim=-1)  # Concat(Z, f_txt^s), Eq. 3
    h = x @ weights["score.0.weight"].t() + weights["score.0.bias"]
    h = 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))  # exact GELU
    logits = h @ weights["score.2.weight"].t() + weights["score.2.bias"]
    expected = torch.exp(logits[..., 0]) / torch.exp(logits).sum(dim=-1)  # 2-way softmax, text channel
    got = ca2.native_score(z, pooled, weights)
    torch.testing.assert_close(got, expected.float(), rtol=1e-6, atol=1e-7)
    assert got.shape == (b, n) and float(got.min()) >= 0 and float(got.max()) <= 1
    # a one-logit head is the sigmoid
    one = dict(weights, **{"score.2.weight": weights["score.2.weight"][:1], "score.2.bias": weights["score.2.bias"][:1]})
    torch.testing.assert_close(ca2.native_score(z, pooled, one), torch.sigmoid(logits[..., 0]).float(), rtol=1e-6, atol=1e-7)
    ca2.check_native_score(weights, c, ct)
    with pytest.raises(ValueError, match="score.0.weight"):
        ca2.check_native_score(weights, c + 1, ct)
    with pytest.raises(ValueError, match="missing"):
        ca2.check_native_score({"score.0.weight": weights["score.0.weight"]}, c, ct)


@pytest.mark.parametrize("tokens", [77, 154])
def test_text_attention_score_is_normalised_content_mass(tokens):
    gen = torch.Generator().manual_seed(6)
    b, n, heads, d = 2, 30, 4, 8
    q = torch.randn(b, n, heads * d, generator=gen, dtype=F64)
    k = torch.randn(b, tokens, heads * d, generator=gen, dtype=F64)
    k[:, 0] += 2.0  # a start token that draws attention, as CLIP's does
    p = softmax_heads(q, k, heads)  # [B, H, N, M]
    starts = list(range(0, tokens, 77))
    content = torch.ones(tokens, dtype=F64)
    content[starts] = 0
    mass = (p * content).sum(dim=-1).mean(dim=1)  # [B, N]
    torch.testing.assert_close(mass_mod.content_attention_mass(q, k, heads), mass.float(), rtol=1e-6, atol=1e-7)
    # the default, fixed scale: the mass itself, comparable across steps
    torch.testing.assert_close(ca2.text_attention_score(q, k, heads), mass.float(), rtol=1e-5, atol=1e-6)
    lo, hi = mass.min(dim=1, keepdim=True).values, mass.max(dim=1, keepdim=True).values
    assert (hi - lo > 0.05).all()
    expected = (mass - lo) / (hi - lo)
    got = ca2.text_attention_score(q, k, heads, "per_step")
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-6)
    assert torch.equal(got.amax(dim=1), torch.ones(b)) and torch.equal(got.amin(dim=1), torch.zeros(b))
    # a nearly flat map (spread below 0.05) is not stretched to full range
    flat = torch.full((1, 5), 0.7, dtype=F64) + torch.tensor([[0.0, 0.01, 0.02, 0.005, 0.0]], dtype=F64)
    torch.testing.assert_close(mass_mod.minmax_per_image(flat), (flat - 0.7) / 0.05)
    torch.testing.assert_close(ca2.sharpen(got, 2.0), got.pow(2))
    assert ca2.sharpen(got, 1.0) is got


@pytest.mark.parametrize("tokens", [1, 5, 76, 77, 78, 154, 231, 300])
def test_content_indicator_marks_clip_start_tokens_without_host_copies(tokens):
    """The indicator is built on the device (no Python-list index: a blocking host-to-device
    copy in every layer on a GPU) and reused: same positions as the written-out start list."""
    starts = list(range(0, tokens, 77)) if tokens >= 77 and tokens % 77 == 0 else [0]
    expected = torch.ones(tokens, dtype=F64)
    expected[starts] = 0
    cache = sampling_scope.SamplingCache()
    got = mass_mod.content_indicator(tokens, dtype=F64, cache=cache)
    assert got.dtype == F64 and torch.equal(got, expected)
    assert mass_mod.content_indicator(tokens, dtype=F64, cache=cache) is got  # once per sampling: no launches after the first call
    cache.release()  # the sampling ended: the next one builds it again
    again = mass_mod.content_indicator(tokens, dtype=F64, cache=cache)
    assert again is not got and torch.equal(again, expected)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        mass_mod.content_indicator(tokens, dtype=torch.float32)
    names = {e.name for e in prof.events()}
    assert not names & {"aten::index_put_", "aten::index_put", "aten::lift_fresh", "aten::_to_copy_from_list"}, names
