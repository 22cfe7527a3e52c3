"""The attention dispatcher in-process on the tiny SD1.5 / SDXL models (real ComfyUI classes)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import comfy.sample
from conftest import pack
from testkit import contribution

dispatcher = pack("nodes.dispatch.dispatcher")
host = pack("nodes.common.host")
stage_inputs = pack("nodes.dispatch.stage_inputs")

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


# --- one attn2 call driven by hand --------------------------------------------------------------


def fake_call(batch_per_chunk=2, chunks=(1, 0), tokens=16, heads=2, dim_head=8, latent_hw=(4, 4), sigma=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    b = batch_per_chunk * len(chunks)
    q = torch.randn(b, tokens, heads * dim_head, generator=gen)
    k = torch.randn(b, 77, heads * dim_head, generator=gen)
    v = torch.randn(b, 77, heads * dim_head, generator=gen)
    eo = {
        "n_heads": heads,
        "dim_head": dim_head,
        "block": ("input", 1),
        "block_index": 0,
        "cond_or_uncond": list(chunks),
        "original_shape": [b, 4, *latent_hw],
        "sigmas": torch.tensor([sigma]),
    }
    return q, k, v, eo


def run_dispatcher(stages, q, k, v, eo, fallbacks=None):
    d = dispatcher.AttentionDispatcher(tuple(stages), fallbacks or {}, {})
    return d(q, k, v, eo)


def test_no_active_stage_returns_host_attention_exactly():
    q, k, v, eo = fake_call()
    expected = host.host_attention(q, k, v, eo["n_heads"], eo)
    got = run_dispatcher([Dummy(dispatcher.StageSchedule(weight=0.0))], q, k, v, eo)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("apply_to", ["cond", "uncond"])
def test_apply_to_selects_chunks(apply_to):
    q, k, v, eo = fake_call(chunks=(1, 0))
    base = host.host_attention(q, k, v, eo["n_heads"], eo)
    got = run_dispatcher([Dummy(dispatcher.StageSchedule(weight=0.7, apply_to=apply_to))], q, k, v, eo)
    rows = slice(2, 4) if apply_to == "cond" else slice(0, 2)  # uncond chunk first
    other = slice(0, 2) if apply_to == "cond" else slice(2, 4)
    torch.testing.assert_close(got[rows], base[rows] + 0.7 * torch.tanh(q[rows]))
    assert torch.equal(got[other], base[other])


def test_apply_to_cond_with_a_cond_only_batch():
    q, k, v, eo = fake_call(chunks=(0,))
    base = host.host_attention(q, k, v, eo["n_heads"], eo)
    got = run_dispatcher([Dummy(dispatcher.StageSchedule(weight=0.7, apply_to="uncond"))], q, k, v, eo)
    assert torch.equal(got, base)


@pytest.mark.parametrize("sigma,active", [(5.0, False), (2.0, True), (0.5, True), (0.1, False)])
def test_sigma_window(sigma, active):
    q, k, v, eo = fake_call(sigma=sigma)
    base = host.host_attention(q, k, v, eo["n_heads"], eo)
    stage = Dummy(dispatcher.StageSchedule(weight=0.7, sigma_start=2.0, sigma_end=0.5))
    got = run_dispatcher([stage], q, k, v, eo)
    if active:
        torch.testing.assert_close(got, base + 0.7 * torch.tanh(q))
    else:
        assert torch.equal(got, base)


def test_mask_resized_to_layer_grid():
    # a 4x4 layer grid on a 4x4 latent; the mask (32x32 pixels) covers the left half
    q, k, v, eo = fake_call(tokens=16, latent_hw=(4, 4))
    mask = torch.zeros(1, 32, 32)
    mask[:, :, :16] = 1.0
    base = host.host_attention(q, k, v, eo["n_heads"], eo)
    got = run_dispatcher([Dummy(dispatcher.StageSchedule(weight=0.7, mask=mask))], q, k, v, eo)
    left = torch.tensor([i % 4 < 2 for i in range(16)])
    torch.testing.assert_close(got[:, left], base[:, left] + 0.7 * torch.tanh(q[:, left]))
    assert torch.equal(got[:, ~left], base[:, ~left])


def test_mask_per_image_and_wrong_batch():
    q, k, v, eo = fake_call(batch_per_chunk=2, tokens=4, latent_hw=(4, 4))  # 2x2 grid (second level)
    masks = torch.stack([torch.ones(8, 8), torch.zeros(8, 8)])  # image 1 patched, image 2 not
    base = host.host_attention(q, k, v, eo["n_heads"], eo)
    got = run_dispatcher([Dummy(dispatcher.StageSchedule(weight=0.7, mask=masks))], q, k, v, eo)
    for chunk in range(2):
        r0, r1 = chunk * 2, chunk * 2 + 1
        torch.testing.assert_close(got[r0], base[r0] + 0.7 * torch.tanh(q[r0]))
        assert torch.equal(got[r1], base[r1])
    three = torch.ones(3, 8, 8)
    with pytest.raises(pack("nodes.common.errors").IdentityAttentionError, match="mask has 3 frames"):
        run_dispatcher([Dummy(dispatcher.StageSchedule(weight=0.7, mask=three))], q, k, v, eo)


def test_fallback_computes_the_base():
    q, k, v, eo = fake_call()
    foreign = lambda q, k, v, eo: host.host_attention(q, k, v, eo["n_heads"], eo) * 0.25  # noqa: E731
    got = run_dispatcher([Dummy(dispatcher.StageSchedule(weight=0.7))], q, k, v, eo, {("input", 1, 0): foreign})
    torch.testing.assert_close(got, foreign(q, k, v, eo) + 0.7 * torch.tanh(q))
    # and with no active stage the foreign patch alone runs
    got0 = run_dispatcher([Dummy(dispatcher.StageSchedule(weight=0.0))], q, k, v, eo, {("input", 1, 0): foreign})
    assert torch.equal(got0, foreign(q, k, v, eo))


def test_schedule_from_percents(tiny):
    model = tiny.unet("sd15")
    s = stage_inputs.build_schedule(model, 0.5, 0.0, 1.0)
    assert s.sigma_start == math.inf and s.sigma_end == 0.0
    s = stage_inputs.build_schedule(model, 0.5, 0.2, 0.8)
    ms = host.model_sampling(model)
    assert s.sigma_start == pytest.approx(float(ms.percent_to_sigma(0.2)))
    assert s.sigma_end == pytest.approx(float(ms.percent_to_sigma(0.8)))
    assert s.sigma_start > s.sigma_end
    with pytest.raises(pack("nodes.common.errors").IdentityAttentionError, match="start_percent"):
        stage_inputs.build_schedule(model, 0.5, 0.8, 0.2)


def test_hidden_state_stash_is_last_and_exact(tiny):
    model = tiny.unet("sd15")
    seen = {}

    class NeedsHidden(dispatcher.AttentionStage):
        label = "needs hidden"
        needs_hidden_states = True

        def forward(self, call, out, region):
            seen[call.layer] = call.hidden_states().shape
            return out

    plain = sample(model, "sd15")
    patched = dispatcher.apply_attention_stage(model, NeedsHidden(dispatcher.StageSchedule()))
    patches = patched.model_options["transformer_options"]["patches"]["attn2_patch"]
    assert getattr(patches[-1], "identity_attention_stash", False)
    assert torch.equal(sample(patched, "sd15"), plain)
    assert len(seen) == 16
    assert seen[("input", 1, 0)][-1] == 32  # the layer's channels (micro SD1.5: 32 at level 1)


@pytest.mark.parametrize("inside", [True, False])
def test_window_decided_on_the_device_selects_exactly(monkeypatch, inside):
    """On a GPU the sigma window is a device tensor and torch.where picks the output (no host sync)."""
    q, k, v, eo = fake_call(sigma=1.0)
    base = host.host_attention(q, k, v, eo["n_heads"], eo)
    schedule = dispatcher.StageSchedule(weight=0.7, sigma_start=2.0, sigma_end=0.5)
    monkeypatch.setattr(dispatcher.StageSchedule, "window", lambda self, sigmas: torch.tensor([inside]))
    got = run_dispatcher([Dummy(schedule)], q, k, v, eo)
    if inside:
        assert torch.equal(got, base + 0.7 * torch.tanh(q))
    else:
        assert torch.equal(got, base)


def test_window_on_cpu_is_a_python_decision():
    s = dispatcher.StageSchedule(sigma_start=2.0, sigma_end=0.5)
    assert s.window(torch.tensor([1.0])) is True
    assert s.window(torch.tensor([3.0])) is False
    assert dispatcher.StageSchedule().window(torch.tensor([3.0])) is True
    meta = s.window(torch.empty(1, device="meta"))
    assert torch.is_tensor(meta) and meta.dtype == torch.bool


step_sigma_mod = pack("nodes.common.step_sigma")
sampling_scope = pack("nodes.common.sampling_scope")


class SigmaSeen(dispatcher.AttentionStage):
    """Adds tanh(q) * weight and records the sigma the step wrapper published to the layer."""

    label = "sigma seen"

    def __init__(self, schedule, seen):
        super().__init__(schedule)
        self.seen = seen

    def forward(self, call, out, region):
        self.seen.append(step_sigma_mod.step_sigma(call.extra_options))
        return dispatcher.blend_in_region(out, contribution("add_tanh_q", self.schedule.weight, call.q, out), region)


def test_step_sigma_read_once_per_step_windows_exact_and_foreign_wrapper_chained(tiny):
    """The wrapper publishes one float per model call to every layer; a foreign wrapper still runs;
    the upstream MODEL keeps its own wrapper; the window decided from it gives the per-layer result bit for bit."""
    model = tiny.unet("sd15")
    calls = []

    def foreign(apply_model, args):
        calls.append(float(args["timestep"][0]))
        return apply_model(args["input"], args["timestep"], **args["c"])

    base = model.clone()
    base.set_model_unet_function_wrapper(foreign)
    sigmas = base.model.model_sampling.sigmas
    window = dict(sigma_start=float(sigmas[-1]) * 0.9, sigma_end=float(sigmas[0]))  # excludes the first steps
    seen = []
    patched = dispatcher.apply_attention_stage(base, SigmaSeen(dispatcher.StageSchedule(weight=0.5, **window), seen))
    wrapper = patched.model_options["model_function_wrapper"]
    assert base.model_options["model_function_wrapper"] is foreign  # upstream untouched
    assert isinstance(wrapper, step_sigma_mod.StepSigmaWrapper) and wrapper.inner is foreign
    again = dispatcher.apply_attention_stage(patched, Dummy(dispatcher.StageSchedule(weight=0.0)))
    assert again.model_options["model_function_wrapper"] is wrapper  # installed once, not stacked

    got = sample(patched, "sd15", steps=4)
    assert len(calls) == 4  # the foreign wrapper ran on every step
    active = [s for s in calls if window["sigma_end"] <= s <= window["sigma_start"]]
    assert 0 < len(active) < len(calls)  # the window really cuts
    assert seen == [s for s in active for _ in range(16)]  # one published float per step, every layer

    # the same stage deciding per layer (no step wrapper: a foreign wrapper replaced ours) gives the same bits
    fallback = patched.clone()
    fallback.set_model_unet_function_wrapper(foreign)
    seen.clear()
    assert torch.equal(sample(fallback, "sd15", steps=4), got)
    assert seen == [None] * (16 * len(active))


def test_sampling_cache_made_once_and_released_when_sampling_ends():
    scope = sampling_scope.SamplingScope()
    made = []
    make = lambda: made.append(1) or torch.ones(2)  # noqa: E731
    schedule = torch.tensor([3.0, 2.0, 1.0, 0.0])
    for sigma in (3.0, 2.0):
        scope.begin_call(schedule)
        first = scope.cache.get_or_make(("k", 1), make)
        assert scope.cache.get_or_make(("k", 1), make) is first
        scope.end_call(sigma)
    assert len(made) == 1 and len(scope.cache) == 1  # reused across steps of one sampling
    scope.begin_call(schedule)
    scope.end_call(None)  # no stage read the sigma: nothing decided
    assert len(scope.cache) == 1
    scope.begin_call(schedule)
    scope.end_call(1.0)  # the last non-zero sigma: sampling over
    assert len(scope.cache) == 0
    # a new schedule object is a new sampling
    scope.begin_call(schedule)
    scope.cache.get_or_make(("k", 1), make)
    scope.begin_call(torch.tensor([3.0, 1.5, 0.0]))
    assert len(scope.cache) == 0
    # the early-2024 host publishes no schedule: a higher sigma starts a new sampling
    legacy = sampling_scope.SamplingScope()
    for sigma in (3.0, 2.0):
        legacy.begin_call()
        legacy.cache.get_or_make(("k", 2), make)
        legacy.end_call(sigma)
    assert len(legacy.cache) == 1
    legacy.begin_call()
    legacy.end_call(3.0)
    assert len(legacy.cache) == 0
    assert sampling_scope.get_or_make(None, ("x",), lambda: 7) == 7  # no scope: made each time
