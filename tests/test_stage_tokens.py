"""Per-stage K/V identity tokens: stage selection by sigma, K/V split, prompt encoding, files, sampling."""

from __future__ import annotations

import pytest
import torch

import comfy.sample
import comfy.samplers
from conftest import pack

st = pack("adapters.attention.stage_tokens")
pt = pack("adapters.attention.prompt_tokens")
host = pack("nodes.common.host")
dispatcher = pack("nodes.dispatch.dispatcher")
patch_mod = pack("nodes.stage_tokens.stage_token_patch")
nodes_mod = pack("nodes.stage_tokens.stage_token_nodes")
prompt_encoding = pack("nodes.common.prompt_encoding")
errors = pack("nodes.common.errors")


# --- stages ------------------------------------------------------------------------------------------


def test_stage_at_boundaries():
    sigmas = [8.0, 4.0, 2.0, 1.0]  # decreasing: stage 0 is the noisiest
    assert [st.stage_at(s, sigmas) for s in (14.6, 8.0, 7.99, 4.0, 3.0, 2.0, 1.5, 1.0, 0.99, 0.0)] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert st.parse_boundaries("0.2, 0.4,0.6 0.8", 5) == (0.2, 0.4, 0.6, 0.8)
    assert st.even_boundaries(5) == (0.2, 0.4, 0.6, 0.8)
    for bad in ("0.2, 0.4, 0.6", "0.4, 0.2, 0.6, 0.8", "0, 0.4, 0.6, 0.8", "a, b, c, d"):
        with pytest.raises(ValueError):
            st.parse_boundaries(bad, 5)


def test_swap_rows_exact_and_length_matching():
    gen = torch.Generator().manual_seed(0)
    ctx = torch.randn(4, 77, 8, generator=gen)  # chunks [uncond, cond], 2 rows each
    stage = torch.randn(1, 154, 8, generator=gen)
    out = st.swap_rows(ctx, stage, [0.0, 1.0], 2)
    assert out.shape == (4, 154, 8)
    assert torch.equal(out[:2], ctx[:2].repeat(1, 2, 1))  # uncond rows: the same keys, repeated
    assert torch.equal(out[2:], stage.expand(2, -1, -1))
    half = st.swap_rows(ctx, stage[:, :77], [0.0, 0.25], 2)
    torch.testing.assert_close(half[2:], ctx[2:] + 0.25 * (stage[:, :77] - ctx[2:]))
    # repeating every key/value the same number of times leaves attention unchanged
    q = torch.randn(1, 5, 8, generator=gen)
    a = torch.softmax(q @ ctx[:1].transpose(1, 2), -1) @ ctx[:1]
    b = torch.softmax(q @ out[:1].transpose(1, 2), -1) @ out[:1]
    torch.testing.assert_close(a, b)


def distinct_contexts(stages=5, L=77, D=768, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return st.StageContexts(keys=torch.randn(stages, L, D, generator=gen), values=torch.randn(stages, L, D, generator=gen), base="sd15")


def eo_at(sigma, chunks=(1, 0)):
    return {"sigmas": torch.tensor([sigma]), "cond_or_uncond": list(chunks), "block": ("input", 1), "block_index": 0}


def test_patch_picks_the_stage_pair_at_each_sigma():
    contexts = distinct_contexts()
    sigmas = [8.0, 4.0, 2.0, 1.0]
    patch = patch_mod.StageTokenPatch(dispatcher.StageSchedule(weight=1.0), contexts, sigmas, (0.2, 0.4, 0.6, 0.8))
    gen = torch.Generator().manual_seed(1)
    n = torch.randn(2, 16, 320, generator=gen)
    ctx = torch.randn(2, 77, 768, generator=gen)
    value = torch.randn(2, 77, 768, generator=gen)  # a previous patch may have made value != context
    for sigma, stage in ((9.0, 0), (8.0, 0), (5.0, 1), (3.9, 2), (1.5, 3), (0.03, 4)):
        n_out, k_ctx, v_ctx = patch(n, ctx, value, eo_at(sigma))
        assert n_out is n
        assert torch.equal(k_ctx[0], ctx[0]) and torch.equal(v_ctx[0], value[0])  # negative prompt untouched
        assert torch.equal(k_ctx[1], contexts.keys[stage]) and torch.equal(v_ctx[1], contexts.values[stage])
    off = patch_mod.StageTokenPatch(dispatcher.StageSchedule(weight=0.0), contexts, sigmas, (0.2, 0.4, 0.6, 0.8))
    out = off(n, ctx, value, eo_at(3.0))
    assert out[1] is ctx and out[2] is value
    window = patch_mod.StageTokenPatch(dispatcher.StageSchedule(weight=1.0, sigma_start=5.0, sigma_end=2.0), contexts, sigmas, (0.2, 0.4, 0.6, 0.8))
    assert window(n, ctx, value, eo_at(6.0))[1] is ctx
    assert not torch.equal(window(n, ctx, value, eo_at(3.0))[1], ctx)


def test_device_path_picks_the_same_pair_without_reading_sigma(monkeypatch):
    """On an accelerator the stage is chosen on the device (no host sync): same result as the float path."""
    contexts = distinct_contexts()
    sigmas = [8.0, 4.0, 2.0, 1.0]
    schedule = dispatcher.StageSchedule(weight=0.7, sigma_start=5.0, sigma_end=0.5)
    patch = patch_mod.StageTokenPatch(schedule, contexts, sigmas, (0.2, 0.4, 0.6, 0.8))
    gen = torch.Generator().manual_seed(2)
    n = torch.randn(2, 16, 320, generator=gen)
    ctx = torch.randn(2, 77, 768, generator=gen)
    value = torch.randn(2, 77, 768, generator=gen)
    for sigma in (9.0, 5.0, 4.0, 3.9, 1.5, 0.6, 0.2):
        eo = eo_at(sigma)
        expected = patch(n, ctx, value, eo)
        monkeypatch.setattr(dispatcher.StageSchedule, "window", lambda self, s, real=dispatcher.StageSchedule.window: torch.tensor([real(self, s)]))
        got = patch._on_device(n, ctx, value, eo, eo["sigmas"])
        monkeypatch.undo()
        assert torch.equal(got[1], expected[1]) and torch.equal(got[2], expected[2]), sigma


# --- tokens, files and prompts ----------------------------------------------------------------------------


def test_tokens_file_roundtrip_and_validation(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    tokens = st.make_tokens("sdxl", stages=5, vectors=2, seed=3, metadata={"init": "seed:3"})
    assert tokens.keys["l"].shape == (5, 2, 768) and tokens.values["g"].shape == (5, 2, 1280)
    tensors, meta = tokens.to_file_dict()
    assert meta["format"] == "identity_attention_tokens" and meta["count"] == "5" and meta["base"] == "sdxl"
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path), metadata=meta)
    with safe_open(str(path), framework="pt") as f:
        back = st.StageTokens.from_file_dict({k: f.get_tensor(k) for k in f.keys()}, f.metadata())
    for enc in ("l", "g"):
        assert torch.equal(back.keys[enc], tokens.keys[enc]) and torch.equal(back.values[enc], tokens.values[enc])
    with pytest.raises(ValueError, match="not an identity-token file"):
        st.StageTokens.from_file_dict(tensors, {"format": "something else"})
    with pytest.raises(ValueError, match="1280"):
        st.StageTokens(base="sdxl", keys={"g": torch.zeros(5, 1, 768)}, values={"g": torch.zeros(5, 1, 768)})


def test_save_and_load_nodes(tmp_path, monkeypatch):
    import folder_paths

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "identity_attention", ([str(tmp_path)], {".safetensors"}))
    tokens = st.make_tokens("sd15", seed=1)
    first = nodes_mod.SaveIdentityTokens().save(tokens, "ids/anna")["result"][0]
    second = nodes_mod.SaveIdentityTokens().save(tokens, "ids/anna")["result"][0]
    assert (first, second) == ("ids/anna_00001.safetensors", "ids/anna_00002.safetensors")
    loaded = nodes_mod.LoadIdentityTokens().load(first)[0]
    assert torch.equal(loaded.keys["l"], tokens.keys["l"]) and loaded.metadata["count"] == "5"
    with pytest.raises(errors.IdentityAttentionError, match="usable file name"):
        nodes_mod.SaveIdentityTokens().save(tokens, "../escape")
    (tmp_path / "foreign.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(errors.IdentityAttentionError, match="not a usable identity-token file"):
        nodes_mod.LoadIdentityTokens().load("foreign.safetensors")


def test_replace_word_keeps_sections_aligned():
    vec = torch.arange(6.0).reshape(2, 3)
    section = [(49406, 1.0, 0), (320, 1.0, 1), (99, 1.2, 2), (98, 1.2, 2), (2533, 1.0, 3), (49407, 1.0, 0)] + [(49407, 1.0, 0)] * 4
    out = pt.replace_word([section], [99, 98], vec)[0]
    assert len(out) == len(section)
    assert [t[0] for t in out[:2]] == [49406, 320]
    assert torch.equal(out[2][0], vec[0]) and torch.equal(out[3][0], vec[1]) and out[2][1] == 1.2
    assert [t[0] for t in out[4:]] == [2533] + [49407] * 5
    one = pt.replace_word([section], [99, 98], vec[:1])[0]
    assert len(one) == len(section) and [t[0] for t in one[3:]] == [2533] + [49407] * 6
    full = [(49406, 1.0, 0), (99, 1.0, 1), (49407, 1.0, 0)]
    with pytest.raises(ValueError, match="too long"):
        pt.replace_word([full], [99], torch.zeros(3, 3))
    with pytest.raises(ValueError, match="not in the prompt"):
        pt.replace_word([section], [7], vec)
    assert pt.last_prompt_token([section]) == 4


@pytest.fixture(scope="module")
def small_clip(tmp_path_factory):
    from real_clip import build_small_sd15_clip

    return build_small_sd15_clip(tmp_path_factory.mktemp("clip"))


@torch.inference_mode()  # as ComfyUI runs every node
def test_encode_node_uses_the_token_vectors_like_words(small_clip):
    clip = small_clip
    tokens = nodes_mod.CreateIdentityTokens().create("sd15", "word", "cat", 0, 5, 1, 0.0, clip=clip)[0]
    torch.testing.assert_close(tokens.keys["l"][3, 0], prompt_encoding.embedding_table(clip, "l")[2368].float())
    cond, contexts = nodes_mod.EncodePromptWithIdentityTokens().encode(clip, tokens, "a (photo:1.1) of V*, smiling", "V*", "person")
    as_word = clip.encode_from_tokens(clip.tokenize("a (photo:1.1) of cat , smiling"))
    plain = clip.encode_from_tokens(clip.tokenize("a (photo:1.1) of person , smiling"))
    assert contexts.keys.shape == contexts.values.shape == (5, 77, 768)
    for s in range(5):  # every stage's K and V prompt = the prompt with the init word, bit for bit
        torch.testing.assert_close(contexts.keys[s], as_word[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(contexts.values[s], as_word[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(cond[0][0], plain)
    # distinct vectors per stage and per K/V give distinct encodings, and only from the placeholder on
    table = prompt_encoding.embedding_table(clip, "l")
    tokens.values["l"][2, 0] = table[2533].float()  # "person"
    _, contexts = nodes_mod.EncodePromptWithIdentityTokens().encode(clip, tokens, "a photo of V*", "V*", "")
    person = clip.encode_from_tokens(clip.tokenize("a photo of person"))
    torch.testing.assert_close(contexts.values[2], person[0], rtol=0, atol=1e-6)
    assert not torch.allclose(contexts.keys[2], contexts.values[2])
    torch.testing.assert_close(contexts.keys[2, :4], contexts.values[2, :4])  # causal text encoder: before V* unchanged
    with pytest.raises(errors.IdentityAttentionError, match="placeholder"):
        nodes_mod.EncodePromptWithIdentityTokens().encode(clip, tokens, "a photo", "V*", "")
    xl = st.make_tokens("sdxl")
    with pytest.raises(errors.IdentityAttentionError, match="base is sdxl but the CLIP is sd15"):
        nodes_mod.CreateIdentityTokens().create("sdxl", "seed", "", 0, 5, 1, 0.0, clip=clip)
    assert xl.base == "sdxl"


@torch.inference_mode()
def test_word_init_on_the_tiny_clip_encodes_like_the_word_and_a_clip_without_a_table_says_what_to_do(monkeypatch):
    """The example workflows start tokens from a word on the test kit's tiny CLIP: its table view must be the encoder's own rows."""
    from testkit.tiny_models import build_clip

    clip = build_clip("sd15", seed=1)
    tokens = nodes_mod.CreateIdentityTokens().create("sd15", "word", "person", 0, 5, 1, 0.0, clip=clip)[0]
    _, contexts = nodes_mod.EncodePromptWithIdentityTokens().encode(clip, tokens, "a photo of V*, smiling", "V*", "")
    as_word = clip.encode_from_tokens(clip.tokenize("a photo of person , smiling"))
    for s in range(5):
        torch.testing.assert_close(contexts.keys[s], as_word[0], rtol=0, atol=0)
        torch.testing.assert_close(contexts.values[s], as_word[0], rtol=0, atol=0)
    monkeypatch.setattr(prompt_encoding, "embedding_table", lambda clip, encoder: None)
    with pytest.raises(errors.IdentityAttentionError, match="does not expose") as failure:
        nodes_mod.CreateIdentityTokens().create("sd15", "word", "person", 0, 5, 1, 0.0, clip=clip)
    assert failure.value.input_name == "init" and "set init to seed" in str(failure.value)


# --- sampling ------------------------------------------------------------------------------------------


def sample(model, steps=5, size=8, seed=0, cfg=5.0):
    from testkit.tiny_models import random_conditioning

    pos, neg = random_conditioning("sd15", 100), random_conditioning("sd15", 200)
    latent = torch.zeros(1, 4, size, size)
    noise = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(seed))
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", pos, neg, latent, seed=seed, disable_pbar=True)


def test_sampling_weight_zero_exact_and_stages_follow_timesteps(tiny):
    model = tiny.unet("sd15")
    contexts = distinct_contexts(seed=4)
    contexts = st.StageContexts(keys=contexts.keys * 0.5, values=contexts.values * 0.5, base="sd15")
    apply = nodes_mod.ApplyStageTokens().apply
    plain = sample(model)
    assert torch.equal(sample(apply(model, contexts, 0.0, 0.0, 1.0, "0.2, 0.4, 0.6, 0.8")[0]), plain)

    patched = apply(model, contexts, 1.0, 0.0, 1.0, "0.2, 0.4, 0.6, 0.8")[0]
    patch = patched.model_options["transformer_options"]["patches"]["attn2_patch"][-1]
    seen = []
    original = patch.stage_for
    patch.stage_for = lambda sigma: seen.append((sigma, original(sigma))) or original(sigma)
    got = sample(patched)
    del patch.stage_for
    ms = host.model_sampling(model)
    # independently: stage i while the timestep is in [999 (1 - p_i), 999 (1 - p_{i-1})), as in the paper's bands
    for sigma, stage in seen:
        t = float(ms.timestep(torch.tensor(sigma)))
        assert stage == sum(1 for p in (0.2, 0.4, 0.6, 0.8) if t < 999.0 * (1.0 - p) - 1e-3), (sigma, t, stage)
    assert {stage for _, stage in seen} == {0, 1, 2, 3, 4}

    def by_hand(n, context, value, eo):  # the K/V swap written directly from the paper
        sigma = float(eo["sigmas"][0])
        t = float(ms.timestep(torch.tensor(sigma)))
        i = sum(1 for p in (0.2, 0.4, 0.6, 0.8) if t < 999.0 * (1.0 - p) - 1e-3)
        rows = context.shape[0] // len(eo["cond_or_uncond"])
        ks, vs = [], []
        for j, code in enumerate(eo["cond_or_uncond"]):
            part = slice(j * rows, (j + 1) * rows)
            ks.append(contexts.keys[i : i + 1].expand(rows, -1, -1) if code == 0 else context[part])
            vs.append(contexts.values[i : i + 1].expand(rows, -1, -1) if code == 0 else value[part])
        return n, torch.cat(ks), torch.cat(vs)

    hand = model.clone()
    hand.set_model_attn2_patch(by_hand)
    torch.testing.assert_close(got, sample(hand), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(got, plain, atol=1e-3)

    with pytest.raises(errors.IdentityAttentionError, match="stage_boundaries"):
        apply(model, contexts, 1.0, 0.0, 1.0, "0.5")
