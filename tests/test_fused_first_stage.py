"""The first stage of a call may fold the text attention into its own call (``forward_first``).

The dispatcher offers it only where nothing else could have produced the text attention (no
other stage before, no foreign patch in the slot, every row, a decided window); each mechanism
that takes it (PVA joint, CA² training-free, STFG's map) must give what its ``forward`` gives
after the text attention, checked here against float64 formulas and against the other path.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from conftest import pack
from layer_harness import (
    SD15_KEY,
    adapter_for,
    assert_same_sampling,
    attention64,
    close,
    heads_of,
    layer_inputs,
    logits64,
    merge,
    rows_of,
    run_layer,
    tokens_mask,
    unpatched,
)
from testkit import ForeignReplace
from testkit.synthetic import synthetic_identity

dispatcher = pack("nodes.dispatch.dispatcher")
mass_mod = pack("adapters.attention.text_attention_mass")
pva_nodes = pack("nodes.pva.parallel_attention_nodes")
stfg_stage = pack("nodes.stfg.stfg_attention_stage")
sampling_scope = pack("nodes.common.sampling_scope")


class PassThrough(dispatcher.AttentionStage):
    """A stage before the one under test: the text attention is then computed first."""

    label = "pass-through (test)"

    def forward(self, call, out, region):
        return out


class Recording(dispatcher.AttentionStage):
    """Says which path the dispatcher took: forward_first returns 2·text, forward out + 1."""

    label = "recording (test)"

    def __init__(self, schedule, log):
        super().__init__(schedule)
        self.log = log

    def forward_first(self, call):
        self.log.append("first")
        return 2.0 * call.attention(call.q, call.k, call.v)

    def forward(self, call, out, region):
        self.log.append("forward")
        return out + 1.0


class RecordingOnChunks(Recording):
    """Recording, offered forward_first on the chunks it applies to (as PVA joint is)."""

    forward_first_on_chunks = True


def pva(model, adapter, identity, weight=0.7, mask=None, negative="zero identity"):
    node = pva_nodes.ApplyParallelAttention()
    return node.apply(model, adapter, identity, weight, 0.0, 1.0, "both", "joint", "adapter", "fused", mask=mask, negative_identity=negative)[0]


def test_dispatcher_offers_forward_first_only_to_the_first_stage_with_nothing_underneath(tiny):
    model = tiny.unet("sd15")
    inputs = layer_inputs(model, SD15_KEY)
    text = unpatched(inputs)

    def run(m):
        log = []
        patched = dispatcher.apply_attention_stage(m, Recording(dispatcher.StageSchedule(), log))
        return run_layer(patched, inputs), log

    out, log = run(model)
    assert log == ["first"] and torch.equal(out, 2.0 * text)
    # another stage acted first: the text attention exists, forward builds on it
    out, log = run(dispatcher.apply_attention_stage(model, PassThrough(dispatcher.StageSchedule())))
    assert log == ["forward"] and torch.equal(out, text + 1.0)
    # a foreign patch computes the text attention: forward on its result
    out, log = run(ForeignReplace().apply(model, 0.5, False)[0])
    assert log == ["forward"]
    close(out, 0.5 * attention64(inputs.q, inputs.k, inputs.v, inputs.info.heads) + 1.0)
    # only some rows (cond): forward on those rows, the others keep the text attention
    log = []
    patched = dispatcher.apply_attention_stage(model, Recording(dispatcher.StageSchedule(apply_to="cond"), log))
    out = run_layer(patched, inputs)
    assert log == ["forward"]
    cond = torch.tensor([inputs.chunk_of_row(r) == 0 for r in range(out.shape[0])])
    assert torch.equal(out[cond], text[cond] + 1.0) and torch.equal(out[~cond], text[~cond])
    # a stage that opts in gets the single call on its rows; the others keep the batch's text attention
    log = []
    patched = dispatcher.apply_attention_stage(model, RecordingOnChunks(dispatcher.StageSchedule(apply_to="cond"), log))
    out = run_layer(patched, inputs)
    assert log == ["first"]
    close(out[cond], 2.0 * attention64(inputs.q, inputs.k, inputs.v, inputs.info.heads)[cond])
    assert torch.equal(out[~cond], text[~cond])
    # ... but not where another stage acted first or a foreign patch holds the slot
    log = []
    stacked = dispatcher.apply_attention_stage(dispatcher.apply_attention_stage(model, PassThrough(dispatcher.StageSchedule())), RecordingOnChunks(dispatcher.StageSchedule(apply_to="cond"), log))
    run_layer(stacked, inputs)
    assert log == ["forward"]
    log = []
    run_layer(dispatcher.apply_attention_stage(ForeignReplace().apply(model, 0.5, False)[0], RecordingOnChunks(dispatcher.StageSchedule(apply_to="cond"), log)), inputs)
    assert log == ["forward"]


def joint64(inputs, adapter, identity, weight):
    """PVA's single softmax over [s q k_text ; s q_id k_id + log w], values [v_text ; v_id] (float64)."""
    w = adapter.layers[inputs.info.key]
    tokens = adapter.identity_tokens(identity)
    t = rows_of(inputs, {0: tokens.cond, 1: tokens.uncond})
    k_id, v_id = t @ w["to_k"].double().T, t @ w["to_v"].double().T
    q_id = inputs.hidden.double() @ w["to_q"].double().T
    heads = inputs.info.heads
    logits = torch.cat([logits64(inputs.q, inputs.k, heads), logits64(q_id, k_id, heads) + math.log(weight)], dim=-1)
    values = torch.cat([heads_of(inputs.v, heads), heads_of(v_id, heads)], dim=2)
    return merge(logits.softmax(-1) @ values)


def test_joint_single_call_and_after_another_stage_both_equal_pva(tiny, monkeypatch):
    model = tiny.unet("sd15")
    adapter, identity = adapter_for(model, num_tokens=4, visual_q=True), synthetic_identity(1, seed=3, clip=False)
    inputs = layer_inputs(model, SD15_KEY)
    expected = joint64(inputs, adapter, identity, 0.7)
    first = run_layer(pva(model, adapter, identity), inputs)
    after = run_layer(pva(dispatcher.apply_attention_stage(model, PassThrough(dispatcher.StageSchedule())), adapter, identity), inputs)
    close(first, expected)
    close(after, expected)
    # PVA's sampling (the node's default): ONE call over the whole batch, the identity on the positive
    # rows only; the negative rows get the text attention (float rounding aside), the host's attention never runs
    calls, host_calls = [], []
    default = pva(model, adapter, identity, negative="none (PVA)")
    stage = default.model_options["transformer_options"][dispatcher.PACK_KEY].stages[-1]
    original = stage.forward_first_rows
    stage.forward_first_rows = lambda call, keep: calls.append((list(call.chunks), list(keep))) or original(call, keep)
    monkeypatch.setattr(dispatcher, "host_attention", lambda *a, **k: host_calls.append(1) or pytest.fail("host attention ran"))
    try:
        got = run_layer(default, inputs)
    finally:
        del stage.forward_first_rows
        monkeypatch.undo()
    assert calls == [(list(inputs.codes), [c == 0 for c in inputs.codes])] and host_calls == []
    cond = torch.tensor([inputs.chunk_of_row(r) == 0 for r in range(got.shape[0])])
    close(got[cond], expected[cond])
    close(got[~cond], attention64(inputs.q, inputs.k, inputs.v, inputs.info.heads)[~cond], tol=1e-6)
    # in float64 the negative rows are the text-only formula to rounding of float64
    hidden64 = inputs.hidden.double()
    options64 = dict(inputs.extra_options, **{dispatcher.HIDDEN_STATES_KEY: hidden64})
    inputs64 = dataclasses.replace(inputs, q=inputs.q.double(), k=inputs.k.double(), v=inputs.v.double(), hidden=hidden64, extra_options=options64)
    got64 = run_layer(default, inputs64)
    assert got64.dtype == torch.float64
    torch.testing.assert_close(got64[~cond], attention64(inputs.q, inputs.k, inputs.v, inputs.info.heads)[~cond], rtol=1e-12, atol=1e-12)
    close(got64[cond], expected[cond])
    # with a mask the stage keeps the text attention outside it (no single call there)
    mask = torch.zeros(1, 4, 4)
    mask[:, :2] = 1.0
    masked = run_layer(pva(model, adapter, identity, mask=mask), inputs)
    region = tokens_mask(mask[0], 4)
    close(masked, region * expected + (1 - region) * attention64(inputs.q, inputs.k, inputs.v, inputs.info.heads))


@pytest.mark.parametrize("negative", ["none (PVA)", "zero identity"])
def test_joint_single_call_buffers_within_a_sampling_give_the_pad_and_cat_bits(tiny, negative):
    """Inside a sampling (no autograd), the fused call's [text ; identity] keys and values are one
    copy of the text rows into buffers kept for the sampling: bit for bit the pad-and-cat operands'
    result, with the text K/V of each call (never a previous call's), released with the sampling."""
    model = tiny.unet("sd15")
    adapter, identity = adapter_for(model, num_tokens=4, visual_q=True), synthetic_identity(1, seed=3, clip=False)
    patched = pva(model, adapter, identity, negative=negative)
    inputs = layer_inputs(model, SD15_KEY)
    other = dataclasses.replace(inputs, k=inputs.k.flip(0) * 0.5 + 0.25, v=inputs.v.flip(0) - 0.5)  # another prompt's text
    cache = sampling_scope.SamplingCache()
    slot = patched.model_options["transformer_options"]["patches_replace"]["attn2"][inputs.info.key]
    options = dict(inputs.extra_options, **{sampling_scope.SAMPLING_CACHE_KEY: cache})
    with torch.inference_mode():
        first = slot(inputs.q, inputs.k, inputs.v, dict(options))
        made = len(cache)
        second = slot(other.q, other.k, other.v, dict(options))
        again = slot(inputs.q, inputs.k, inputs.v, dict(options))
    assert made > 0 and len(cache) == made  # made on the first call, reused after
    assert torch.equal(first, run_layer(patched, inputs))  # run_layer: no sampling scope, pad and cat
    assert torch.equal(second, run_layer(patched, other))
    assert torch.equal(again, first)
    if negative == "zero identity":  # every row takes the single call
        close(first, joint64(inputs, adapter, identity, 0.7))
    cache.release()
    assert len(cache) == 0


@pytest.mark.parametrize("tokens,dim_head", [(77, 8), (154, 40), (77, 4)])
def test_text_attention_with_mass_equals_float64(tokens, dim_head):
    gen = torch.Generator().manual_seed(11)
    b, n, heads = 2, 20, 3
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k, v = r(b, n, heads * dim_head), r(b, tokens, heads * dim_head), r(b, tokens, heads * dim_head)
    k[:, 0] += 2.0
    probs = logits64(q, k, heads).softmax(-1)  # [B, H, N, M]
    content = torch.ones(tokens, dtype=torch.float64)
    content[list(range(0, tokens, 77))] = 0
    text, mass = mass_mod.text_attention_with_mass(q, k, v, heads)
    torch.testing.assert_close(text, merge(probs @ heads_of(v, heads)), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(mass, (probs * content).sum(-1).mean(1).float(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(mass, mass_mod.content_attention_mass(q, k, heads), rtol=1e-6, atol=1e-7)
    # the host's fp32 rule for fp16/bf16 models: computed in float32, returned in the input dtype
    half, half_mass = mass_mod.text_attention_with_mass(q.bfloat16(), k.bfloat16(), v.bfloat16(), heads, upcast=True)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.double(), text, rtol=0.05, atol=0.05)


def test_stfg_map_is_the_same_whether_it_shares_the_text_call_or_observes(tiny):
    """apply_to both (single fused call as first stage) records the cond rows' map the observer records."""
    from test_stfg_sampling import edit_mask, inpaint, original_latent

    model = tiny.unet("sd15")
    z0, mask = original_latent(), edit_mask()
    plain = inpaint(model, "sd15", z0, mask, steps=2)
    maps = {}
    for apply_to in ("both", "cond"):
        stage = stfg_stage.STFGAttentionStage(dispatcher.StageSchedule(apply_to=apply_to))
        hooked = dispatcher.apply_attention_stage(model, stage)
        taken = []
        hooked.set_model_sampler_post_cfg_function(lambda args, stage=stage, taken=taken: (taken.append(stage.take()), args["denoised"])[1])
        result = inpaint(hooked, "sd15", z0, mask, steps=2)
        assert len(taken) == 2 and all(t is not None for t in taken)
        maps[apply_to] = taken
        if apply_to == "cond":
            assert torch.equal(result, plain)  # the observer changes nothing
        else:
            assert_same_sampling(result, plain)  # the fused call's text attention: the same up to rounding
    for (sigma_a, a), (sigma_b, b) in zip(maps["both"], maps["cond"]):
        assert sigma_a == sigma_b
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
