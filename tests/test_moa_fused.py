"""MoA's fused sampling-loop forms against the unfused formula, in float64 (issue #22 item 4).

The formula, written here from the paper and the spec (/work/shared/specs/mechanisms.md §3):
``R = softmax(router(X) / T)``, ``O = R0 * prior + R1 * personalized``; the training-free router
``R1 = sigmoid(10 (m - 1/2) / T)`` with ``m = a / max(max a, 0.2)`` (a: the identity share). The
fused forms must give the same numbers; R1 = 0 must give the prior bit for bit; the router must
read the share the identity stage already computed (no second attention) and the recorder must
cost one launch per layer.
"""

from __future__ import annotations

import math

import torch

from conftest import pack
from layer_harness import SD15_KEY, adapter_for, close, layer_inputs, run_layer
from testkit.synthetic import synthetic_identity

from benchmarks.cost_ledger import OpCounter, sdpa_host_attention

routing = pack("adapters.attention.attention_routing")
moa_nodes = pack("nodes.moa.mixture_of_attention_nodes")
pva_nodes = pack("nodes.pva.parallel_attention_nodes")


def r1_formula64(share: torch.Tensor, temperature: float) -> torch.Tensor:
    """The identity-attention router's R1 per row, float64, written out (no clamp, no fusion)."""
    out = torch.empty_like(share, dtype=torch.float64)
    for b in range(share.shape[0]):
        a = share[b, :, 0].double()
        m = a / max(float(a.max()), 0.2)
        out[b, :, 0] = 1 / (1 + torch.exp(-10 * (m - 0.5) / temperature))
    return out


def test_identity_share_r1_equals_the_formula():
    gen = torch.Generator().manual_seed(0)
    share = torch.rand(4, 37, 1, generator=gen, dtype=torch.float64)
    share[1] *= 0.1  # a weak map (peak below the floor): not stretched
    share[2] = 0.3  # flat
    share[3] = 0.0  # no identity on this row (PVA's negative rows)
    for temperature in (0.5, 1.0, 2.0):
        floor, offset = routing.identity_share_constants(temperature, dtype=torch.float64)
        fused = routing.identity_share_r1(share, floor, offset, temperature)
        torch.testing.assert_close(fused, r1_formula64(share, temperature), rtol=1e-12, atol=1e-12)
        _, plain = routing.route_from_identity_share(share, temperature)  # the unfused form (float32 inside)
        torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)
    # half precision in: float32 logits out, as the unfused router computes them
    half = routing.identity_share_r1(share.half(), *routing.identity_share_constants(0.8), 0.8)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half.double(), r1_formula64(share.half(), 0.8), rtol=1e-5, atol=1e-5)


def test_learned_router_r1_equals_the_two_expert_softmax():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 9, 24, generator=gen, dtype=torch.float64)
    w = {
        "router.0.weight": torch.randn(6, 24, generator=gen, dtype=torch.float64),
        "router.0.bias": torch.randn(6, generator=gen, dtype=torch.float64),
        "router.2.weight": torch.randn(2, 6, generator=gen, dtype=torch.float64),
        "router.2.bias": torch.randn(2, generator=gen, dtype=torch.float64),
    }
    h = x @ w["router.0.weight"].T + w["router.0.bias"]
    logits = 0.5 * h * (1 + torch.erf(h / math.sqrt(2))) @ w["router.2.weight"].T + w["router.2.bias"]
    for temperature in (0.7, 1.0, 3.0):
        expected = (logits / temperature).softmax(-1)[..., 1:]
        fused = routing.learned_router_r1(x, *routing.learned_router_r1_weights(w, temperature))
        torch.testing.assert_close(fused, expected, rtol=1e-12, atol=1e-12)


def test_routed_mix_equals_r0_prior_plus_r1_personalized():
    gen = torch.Generator().manual_seed(2)
    prior, personalized = torch.randn(2, 2, 16, 8, generator=gen, dtype=torch.float64)
    r1 = torch.rand(2, 16, 1, generator=gen, dtype=torch.float64)
    r1[0, :4] = 0.0
    r1[1, :4] = 1.0
    fused = routing.routed_mix(prior, personalized, r1)
    torch.testing.assert_close(fused, (1 - r1) * prior + r1 * personalized, rtol=1e-12, atol=1e-12)
    assert torch.equal(fused[0, :4], prior[0, :4])  # R1 = 0: the prior bit for bit
    assert torch.equal(routing.routed_mix(prior, prior.clone(), r1), prior)  # unchanged rows stay the prior exactly
    p32 = prior.float()
    assert torch.equal(routing.routed_mix(p32, personalized.float(), torch.zeros(2, 16, 1)), p32)


def test_recorder_adds_once_per_layer_for_both_halves():
    rec = routing.RouterRecorder(max_side=8)
    gen = torch.Generator().manual_seed(3)
    maps = [torch.rand(4, 16, generator=gen) for _ in range(3)]
    rec.record(5.0, [1, 0], (4, 4), maps[0])  # first layer of the step: the sum is made
    counter = OpCounter()
    with counter:
        rec.record(5.0, [1, 0], (4, 4), maps[1])
    assert counter.step.launches == 1, dict(counter.step.ops)
    rec.record(5.0, [0], (4, 4), maps[2][:2])  # a call with the positive rows alone (another layout)
    snap = rec.snapshot()
    grid = (4, 4)
    uncond = (maps[0][:2] + maps[1][:2]) / 2
    cond = (maps[0][2:] + maps[1][2:] + maps[2][:2]) / 3
    torch.testing.assert_close(snap.maps[0][(grid, 1)], uncond.reshape(2, 4, 4))
    torch.testing.assert_close(snap.maps[0][(grid, 0)], cond.reshape(2, 4, 4))


def _pva_joint(model, adapter, identity):
    """PVA joint with its own visual query, the node's default negative (no identity: positive rows only)."""
    node = pva_nodes.ApplyParallelAttention()
    return node.apply(model, adapter, identity, 1.5, 0.0, 1.0, "both", "joint", "adapter", "fused")[0]


def _counted(model, inputs) -> OpCounter:
    """Launches of one layer call, the host's attention counted as one SDPA (as on a GPU, as the ledger does)."""
    counter = OpCounter()
    with sdpa_host_attention(), counter:
        run_layer(model, inputs)
    return counter


def _attention_calls(counter: OpCounter) -> int:
    return sum(n for op, n in counter.step.ops.items() if "scaled_dot_product" in op)


def test_identity_router_reads_the_share_of_the_positive_rows_call(tiny):
    """PVA's single joint call ran over the whole batch, the identity on the positive rows only: MoA reads
    its share, no second joint attention; its prior (the text attention, which that call does not leave)
    is one SDPA call."""
    model = tiny.unet("sd15")
    adapter, identity = adapter_for(model, num_tokens=4, visual_q=True), synthetic_identity(1, seed=5, clip=False)
    personalized = _pva_joint(model, adapter, identity)
    routed = moa_nodes.ApplyMixtureOfAttention().apply(personalized, "identity_attention", 1.0, 0.0, 1.0, "both", 0.8, True)[0]
    inputs = layer_inputs(routed, SD15_KEY)
    run_layer(routed, inputs)  # first use: constants and the recorder's sums are made
    alone, both = _counted(personalized, inputs), _counted(routed, inputs)
    assert _attention_calls(alone) == 1 and _attention_calls(both) == 2  # + the prior's text attention only
    assert both.step.ops["linear"] == alone.step.ops["linear"]  # the visual query is not projected again
    extra = both.step.ops - alone.step.ops
    assert both.step.launches - alone.step.launches == 8, dict(extra)  # mean, text attention, 4 router, lerp, record
    assert (both.step.syncs, both.step.h2d) == (alone.step.syncs, alone.step.h2d)  # the sigma: read by the warm-up call
    # and it is the same routing as the share recomputed on the whole batch (the unfused path)
    stage = pack("nodes.dispatch.dispatcher").installed_dispatcher(routed).stages[0]
    call = pack("nodes.dispatch.dispatcher").AttentionCall(inputs.q, inputs.k, inputs.v, dict(inputs.extra_options), SD15_KEY)
    recomputed = stage.identity_share(call)  # no scratch on this call: its own joint "share" pass
    negative = [not k for k in [code == 0 for code in inputs.codes] for _ in range(inputs.rows)]
    assert not recomputed[negative].any()  # the negative rows: no share (their identity columns are -inf)
    reused_call = pack("nodes.dispatch.dispatcher").AttentionCall(inputs.q, inputs.k, inputs.v, dict(inputs.extra_options), SD15_KEY)
    keep = [code == 0 for code in reused_call.chunks]
    stage._joint_call(reused_call, "fused", keep=keep)  # what forward_first_rows does: the whole batch
    counter = OpCounter()
    with counter:
        reused = stage.identity_share(reused_call)
    assert dict(counter.step.ops) == {"mean": 1}, dict(counter.step.ops)  # read, not recomputed; 0 on the negative rows already
    close(reused, recomputed)
    assert not reused[negative].any()
    # forward on the positive rows alone (after another stage): their share, zeros put in the negative rows
    chunk_call = pack("nodes.dispatch.dispatcher").AttentionCall(inputs.q, inputs.k, inputs.v, dict(inputs.extra_options), SD15_KEY)
    stage._joint_call(chunk_call.select_chunks(keep), "identity")
    stage.identity_share(chunk_call)  # first use: the zero rows are made (then kept)
    counter = OpCounter()
    with counter:
        reused = stage.identity_share(chunk_call)
    assert dict(counter.step.ops) == {"mean": 1, "cat": 1}, dict(counter.step.ops)
    close(reused, recomputed)
    assert not reused[negative].any()


def test_learned_router_costs_four_launches_at_a_layer(tiny):
    """Linear, GELU, linear to the logits' difference, sigmoid; then the mix (one lerp) and the recorder (one add);
    plus the prior, the text attention (one SDPA: PVA's single call over the whole batch does not leave it)."""
    from test_mixture_of_attention import router_adapter

    model = tiny.unet("sd15")
    adapter, identity = adapter_for(model, num_tokens=4, visual_q=True), synthetic_identity(1, seed=6, clip=False)
    personalized = _pva_joint(model, adapter, identity)
    routed = moa_nodes.ApplyMixtureOfAttention().apply(personalized, "learned", 1.0, 0.0, 1.0, "both", 0.7, True, router_weights=router_adapter(model))[0]
    inputs = layer_inputs(routed, SD15_KEY)
    run_layer(routed, inputs)  # first use: the folded weights and the recorder's sums are made
    alone, both = _counted(personalized, inputs), _counted(routed, inputs)
    extra = both.step.ops - alone.step.ops
    assert both.step.launches - alone.step.launches == 7, dict(extra)
    assert (extra["gelu"], extra["sigmoid"], extra["lerp"], extra["add_"]) == (1, 1, 1, 1), dict(extra)
    assert _attention_calls(both) - _attention_calls(alone) == 1, dict(extra)
    assert "softmax" not in extra and "_softmax" not in extra  # the two-expert softmax is the sigmoid
