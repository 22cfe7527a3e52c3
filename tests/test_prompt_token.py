"""The learned prompt token: same conditioning as ComfyUI's own textual-inversion path, and differentiable."""

from __future__ import annotations

import pytest
import torch

from conftest import pack
from training_fixtures import all_inference, inference_models

pt = pack("nodes.dispatch.prompt_token")
du = pack("nodes.dispatch.differentiable_unet")


@pytest.fixture(scope="module")
def clip_l():
    """ComfyUI's real SD1.5 text encoder (CLIP-L architecture), random weights, built under inference mode."""
    import comfy.sd
    import comfy.sd1_clip
    from testkit import tiny_models

    class Target:
        clip = comfy.sd1_clip.SD1ClipModel
        tokenizer = comfy.sd1_clip.SD1Tokenizer
        params = {}

    with torch.inference_mode():
        clip = comfy.sd.CLIP(target=Target())
        tiny_models.randomize_(clip.cond_stage_model, 4)
    return clip


def test_placeholder_equals_comfyuis_textual_inversion_and_has_gradients(clip_l):
    text = "photo of a <new1> person"
    token = pt.find_prompt_token(clip_l, text)
    assert [(t.encoder, t.width) for t in token.tables] == [("l", 768)]
    gen = torch.Generator().manual_seed(0)
    vec = 0.02 * torch.randn(768, generator=gen)
    with torch.inference_mode():
        ours = pt.encode_prompt(clip_l, text, {"l": vec})[0][0]
        # ComfyUI's own path: a tensor in place of the marker's token id (how embedding:<name> files enter)
        tokens = clip_l.tokenize(pt.with_marker(text, pt.PLACEHOLDER, token.marker))
        marker_id = token.tables[0].token_id
        tokens = {k: [[(vec.clone(), *p[1:]) if not torch.is_tensor(p[0]) and int(p[0]) == marker_id else p for p in sec] for sec in secs] for k, secs in tokens.items()}
        theirs = clip_l.encode_from_tokens(tokens)
        plain = clip_l.encode_from_tokens(clip_l.tokenize("photo of a person"))
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours[:, :5], plain[:, :5])

    # gradients reach the vector through the frozen, inference-mode text encoder
    v = torch.nn.Parameter(vec.clone())
    with torch.inference_mode():
        clone = du.differentiable_text_encoder(pt.token_clip(clip_l, token, lambda e: v))
        prompt = clone.tokenize(pt.with_marker(text, pt.PLACEHOLDER, token.marker))
        with torch.inference_mode(False), torch.enable_grad(), du.TrainingModels([clone.patcher], weight_roots=[clone.cond_stage_model]):
            cond, _ = pt.encode_tokens(clone, prompt)
            cond.pow(2).sum().backward()
    assert v.grad is not None and torch.isfinite(v.grad).all() and v.grad.abs().sum() > 0
    assert all_inference(clip_l.cond_stage_model)
    assert type(clip_l.cond_stage_model.clip_l.transformer.text_model.embeddings.token_embedding).__name__ != "PlaceholderEmbedding"


def test_out_of_place_clip_layer_equals_the_hosts(clip_l):
    layer = clip_l.cond_stage_model.clip_l.transformer.text_model.encoder.layers[3]
    import comfy.ldm.modules.attention as attention

    x = torch.randn(2, 77, 768, generator=torch.Generator().manual_seed(2))
    fn = attention.optimized_attention_for_device(x.device, mask=False, small_input=True)
    with torch.inference_mode():
        expected = layer(x.clone(), None, fn)
        ours = du.TrainingCLIPLayer(layer)(x.clone(), None, fn)
    assert torch.equal(ours, expected)


def test_test_kit_text_encoder_and_a_prompt_without_the_placeholder():
    _, clip, _ = inference_models("sd15", seed=0)
    token = pt.find_prompt_token(clip, "a <new1> person, sks style")  # the prompt uses the first marker: another is chosen
    assert token.marker != "sks" and token.tables
    with pytest.raises(Exception, match="<new1>"):
        pt.find_prompt_token(clip, "a person")
    with torch.inference_mode():  # as in a prompt
        cond = pt.encode_prompt(clip, "a <new1> person", {token.tables[0].encoder: torch.ones(token.tables[0].width)})
    assert cond[0][0].shape == (1, 77, 768)


def test_embedding_file_uses_comfyuis_keys():
    tensors = pt.embedding_file_tensors({"l": torch.zeros(768), "g": torch.ones(1280)})
    assert tensors["clip_l"].shape == (1, 768) and tensors["clip_g"].shape == (1, 1280)
