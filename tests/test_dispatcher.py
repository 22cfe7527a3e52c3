"""The attention dispatcher in-process on the tiny SD1.5 / SDXL models (real ComfyUI classes)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import comfy.sample
from conftest import pack
from testkit import contribution

dispatcher = pack("nodes.dispatcher")
host = pack("nodes.host")
stage_inputs = pack("nodes.stage_inputs")

EXPECTED_LAYERS = {"sd15": 16, "sdxl": 70}


class Dummy(dispatcher.AttentionStage):
    """out -> contribution(kind, weight, q, out), blended by the mask region."""

    label = "dummy"

    def __init__(self, schedule, kind="add_tanh_q"):
        super().__init__(schedule)
        self.kind = kind

    def forward(self, call, out, region):
        return dispatcher.blend_in_region(out, contribution(self.kind, self.schedule.weight, call.q, out), region)


class Counting(dispatcher.AttentionStage):
    label = "counting"

    def __init__(self, schedule, seen):
        super().__init__(schedule)
        self.seen = seen

    def forward(self, call, out, region):
        self.seen.append(call.layer)
        return out


def sample(model, arch, steps=3, size=16, seed=0, cfg=5.0):
    from testkit.tiny_models import random_conditioning

    pos = random_conditioning(arch, 100)
    neg = random_conditioning(arch, 200)
    latent = torch.zeros(1, 4, size, size)
    noise = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(seed))
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", pos, neg, latent, seed=seed, disable_pbar=True)


def by_hand(model, ops):
    """A plain attn2 replace computing the contributions in order (no dispatcher)."""
    m = model.clone()
    for info in host.cross_attention_layers(m):

        def replace(q, k, v, eo, ops=ops):
            out = host.host_attention(q, k, v, eo["n_heads"], eo)
            for kind, w in ops:
                out = contribution(kind, w, q, out)
            return out

        m.set_model_attn2_replace(replace, *info.key)
    return m


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_layer_table_and_call_count(tiny, arch):
    model = tiny.unet(arch)
    layers = host.cross_attention_layers(model)
    assert len(layers) == EXPECTED_LAYERS[arch]
    assert ("middle", 0, 0) in {info.key for info in layers}
    seen = []
    patched = dispatcher.apply_attention_stage(model, Counting(dispatcher.StageSchedule(), seen))
    sample(patched, arch, steps=1, cfg=1.0)
    # one model call (cfg 1 skips uncond): every cross-attention layer exactly once
    assert sorted(seen) == sorted(info.key for info in layers)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_weight_zero_is_bit_identical(tiny, arch):
    model = tiny.unet(arch)
    plain = sample(model, arch)
    patched = dispatcher.apply_attention_stage(model, Dummy(dispatcher.StageSchedule(weight=0.0)))
    assert torch.equal(sample(patched, arch), plain)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_stacking_equals_contributions_by_hand(tiny, arch):
    model = tiny.unet(arch)
    a = dispatcher.apply_attention_stage(model, Dummy(dispatcher.StageSchedule(weight=0.5), "add_tanh_q"))
    ab = dispatcher.apply_attention_stage(a, Dummy(dispatcher.StageSchedule(weight=0.3), "scale_out"))
    expected = sample(by_hand(model, [("add_tanh_q", 0.5), ("scale_out", 0.3)]), arch)
    got = sample(ab, arch)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # the order matters and is kept
    reversed_order = sample(by_hand(model, [("scale_out", 0.3), ("add_tanh_q", 0.5)]), arch)
    assert not torch.allclose(got, reversed_order, rtol=1e-4, atol=1e-4)


def test_upstream_model_untouched(tiny):
    model = tiny.unet("sd15")
    first = dispatcher.apply_attention_stage(model, Dummy(dispatcher.StageSchedule(weight=0.5)))
    before_model = copy.deepcopy(model.model_options)
    before_first = copy.deepcopy(first.model_options)
    second = dispatcher.apply_attention_stage(first, Dummy(dispatcher.StageSchedule(weight=0.2), "scale_out"))
    assert model.model_options == before_model == {"transformer_options": {}}
    assert first.model_options["transformer_options"]["patches_replace"] == before_first["transformer_options"]["patches_replace"]
    assert len(dispatcher.installed_dispatcher(first).stages) == 1
    assert len(dispatcher.installed_dispatcher(second).stages) == 2
    assert second.model is model.model  # weights shared, never copied


@pytest.mark.parametrize("block_wide", [False, True])
def test_foreign_replace_still_runs(tiny, block_wide):
    model = tiny.unet("sd15")
    calls = {"n": 0}

    def foreign(q, k, v, eo):
        calls["n"] += 1
        return host.host_attention(q, k, v, eo["n_heads"], eo) * 0.5

    with_foreign = model.clone()
    for info in host.cross_attention_layers(with_foreign):
        key = info.key[:2] if block_wide else info.key
        with_foreign.set_model_attn2_replace(foreign, *key)
    ours = dispatcher.apply_attention_stage(with_foreign, Dummy(dispatcher.StageSchedule(weight=0.5)))
    got = sample(ours, "sd15")
    assert calls["n"] > 0

    def foreign_then_add(q, k, v, eo):
        return contribution("add_tanh_q", 0.5, q, foreign(q, k, v, eo))

    expected_model = with_foreign.clone()
    for info in host.cross_attention_layers(expected_model):
        expected_model.set_model_attn2_replace(foreign_then_add, *info.key)
    torch.testing.assert_close(got, sample(expected_model, "sd15"), rtol=1e-5, atol=1e-5)
