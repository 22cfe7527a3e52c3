"""Every node input that can be wrong, through a real ComfyUI's /prompt: one clear error each.

:data:`BAD` is the table: one row per wrong input (a shape, dtype, batch count,
mask size, NaN / inf, empty batch, huge token count, wrong base model, missing
CLIP-vision features or face tokens, wrong adapter format, a photo without a
face...). Each row starts from a prompt that works and breaks one input. The
prompt must fail with exactly ONE execution error whose message (what
ComfyUI shows in its UI, ``PromptFailed.exception_message()``) names the node
(display name), the input, and says what to do (``Fix:``). The server must
keep answering after each row, and a clean prompt after the whole table must
equal the same prompt run before it, bit for bit.

:data:`ACCEPTED` lists unusual inputs that are valid by design (a mask of
another size or aspect ratio is resized to every layer, bool / float16 masks,
RGBA or grayscale photos...): they must run.

Wrong values come from the test kit (``IdentityAttentionTestKit_Tensor``: any
shape / dtype / fill as IMAGE, MASK and LATENT; ``..._DamagedIdentity``) or from
ComfyUI's own nodes; inputs whose ranges ComfyUI itself validates (weights,
percents, choice lists) never reach the nodes and are not in the table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Tuple

import pytest
import torch

import toy_faces as toy
import weight_fixtures as wf
from conftest import pack
from harness import mechanism_graphs as mg
from harness.reliability import latent_of
from harness.server import PromptFailed

pytestmark = pytest.mark.host

C = mg.Config
ENCODER_FILE = "reliability_transface.pt"
TOKENS_NAN_FILE = "reliability_tokens_nan.safetensors"
TOKENS_FOREIGN_FILE = "reliability_tokens_foreign.safetensors"
ENCODER_DAMAGED_FILE = "reliability_transface_damaged.pt"
ADAPTER_TRUNCATED = "reliability_truncated.safetensors"
ADAPTER_FOREIGN = "reliability_lora_like.safetensors"
ADAPTER_NAN = "reliability_nan.safetensors"
ADAPTER_CODE = "reliability_runs_code.bin"
SENTINEL = "reliability_pwned.txt"

PVA = "Apply parallel visual attention"
KV = "Apply KV-mixed attention"
MOA = "Apply mixture-of-attention"
CA2 = "Apply CA² gate"
STFG = "Apply STFG guidance"
FACT = "Apply face adapter (gated self-attention)"
NESTED = "Apply nested attention"
STAGE = "Apply per-stage identity tokens"
ENCODE = "Encode identity"
SIMILARITY = "Identity similarity"
FACE_TOKENS = "Encode face tokens (TransFace)"
LOAD_ENCODER = "Load face encoder (TransFace)"
LOAD_ADAPTER = "Load identity adapter"
LOAD_TOKENS = "Load identity tokens"
CREATE_TOKENS = "Create identity tokens (per-stage K/V)"
PROMPT_TOKENS = "Encode prompt with identity tokens"
ROUTER = "Show router maps"
CA2_SCORES = "Inspect CA² scores"
STFG_BOUNDARY = "Inspect STFG boundary"


# --- editing a working prompt into a broken one ------------------------------------------------------


def tensor(prompt: dict, name: str, shape: str, dtype: str = "float32", fill: str = "half", seed: int = 0) -> str:
    """Add a test-kit tensor node; link its outputs with ``[name, 0]`` IMAGE, ``1`` MASK, ``2`` LATENT."""
    prompt[name] = {"class_type": "IdentityAttentionTestKit_Tensor", "inputs": {"shape": shape, "dtype": dtype, "fill": fill, "seed": seed}}
    return name


def set_inputs(prompt: dict, node: str, **inputs) -> None:
    assert node in prompt, f"no node {node!r} in the prompt"
    prompt[node]["inputs"].update(inputs)


def linked_number(node: str, input_name: str, value: str, output: int = 0):
    """Link a test-kit number (output 0 FLOAT, 1 INT) into ``node``'s ``input_name``: ComfyUI checks no range on it."""

    def edit(prompt: dict) -> None:
        prompt[f"number_{input_name}"] = {"class_type": "IdentityAttentionTestKit_Number", "inputs": {"value": value}}
        set_inputs(prompt, node, **{input_name: [f"number_{input_name}", output]})

    return edit


def latent_batch(prompt: dict, n: int) -> None:
    """Sample ``n`` images (an empty latent, or an inpainting one from a photo batch of n)."""
    if prompt["latent"]["class_type"] == "EmptyLatentImage":
        set_inputs(prompt, "latent", batch_size=n)
    else:
        set_inputs(prompt, "photo", batch_size=n)


def mask_into(node: str, shape: str, dtype: str = "float32", fill: str = "half", batch: int = 1):
    def edit(p):
        tensor(p, "bad", shape, dtype, fill)
        set_inputs(p, node, mask=["bad", 1])
        if batch != 1:
            latent_batch(p, batch)

    return edit


def adapter_from(arch: str, node: str = "adapter", **extra):
    """The synthetic adapter is made for the other architecture's tiny model."""

    def edit(p):
        p["other_models"] = {"class_type": "IdentityAttentionTestKit_TinyModels", "inputs": {"arch": arch, "seed": 0}}
        set_inputs(p, node, model=["other_models", 0], **extra)

    return edit


def fact_adapter_into(node: str, input_name: str):
    def edit(p):
        p["fact"] = {"class_type": "IdentityAttentionTestKit_SyntheticFactAdapter", "inputs": {"model": ["models", 0], "seed": 1, "alpha": 0.5}}
        set_inputs(p, node, **{input_name: ["fact", 0]})

    return edit


def damaged_identity(node: str, damage: str, input_name: str = "identity", source: str = "identity", **identity_inputs):
    def edit(p):
        if identity_inputs:
            set_inputs(p, source, **identity_inputs)
        p["damaged"] = {"class_type": "IdentityAttentionTestKit_DamagedIdentity", "inputs": {"identity": [source, 0], "damage": damage}}
        set_inputs(p, node, **{input_name: ["damaged", 0]})

    return edit


def chain(*edits):
    def edit(p):
        for e in edits:
            e(p)

    return edit


# --- graphs for the nodes outside the mechanism prompts ---------------------------------------------


def encode_graph(images_shape: str = "1,96,96,3", dtype: str = "float32", fill: str = "half", file: Optional[str] = None) -> dict:
    """Photos -> Load face analysis (toy pack) -> Encode identity -> Report."""
    p = {
        "face_analysis": {"class_type": "IdentityAttentionLoadFaceAnalysis", "inputs": {"pack": "toypack", "provider": "CPU", "det_size": 640}},
        "encode": {
            "class_type": "IdentityAttentionEncodeIdentity",
            "inputs": {
                "face_analysis": ["face_analysis", 0], "images": ["photos", 0], "face": "largest", "face_index": 0, "retry_smaller_sizes": True,
                "flip_augment": False, "mask_grow": 1.2, "mask_feather": 0.25,
            },
        },
        "report": {"class_type": "IdentityAttentionTestKit_Report", "inputs": {"label": "encode", "identity": ["encode", 0]}},
    }
    if file is not None:
        p["photos"] = {"class_type": "LoadImage", "inputs": {"image": file}}
    else:
        tensor(p, "photos", images_shape, dtype, fill)
    return p


def similarity_graph(images_shape: str, fill: str = "half", dtype: str = "float32") -> dict:
    p = encode_graph(file="reliability_face.png")
    tensor(p, "generated", images_shape, dtype, fill)
    p["similarity"] = {
        "class_type": "IdentityAttentionIdentitySimilarity",
        "inputs": {"images": ["generated", 0], "identity": ["encode", 0], "face_analysis": ["face_analysis", 0], "face": "largest"},
    }
    p["save"] = {"class_type": "SaveImage", "inputs": {"images": ["similarity", 2], "filename_prefix": "reliability_similarity"}}
    del p["report"]
    return p


def face_tokens_graph(encoder: str = ENCODER_FILE) -> dict:
    p, _ = mg.mechanism_prompt(C("sd15", "face_adapter", seed=3))
    p["encoder"] = {"class_type": "IdentityAttentionLoadFaceEncoder", "inputs": {"encoder_name": encoder}}
    p["tokens_of_face"] = {"class_type": "IdentityAttentionEncodeFaceTokens", "inputs": {"face_encoder": ["encoder", 0], "identity": ["face_identity", 0]}}
    set_inputs(p, "face_identity", with_face_tokens=False)
    set_inputs(p, "face_adapter", identity=["tokens_of_face", 0])
    return p


def tokens_file_graph(name: str) -> dict:
    p, _ = mg.mechanism_prompt(C("sd15", "stage_tokens", seed=3))
    p["tokens"] = {"class_type": "IdentityAttentionLoadIdentityTokens", "inputs": {"tokens_name": name}}
    return p


def inspect_graph(mechanism: str, inspect: str, **inputs) -> dict:
    p, _ = mg.mechanism_prompt(C("sd15", mechanism, seed=3))
    p["inspect"] = {"class_type": inspect, "inputs": dict(inputs)}
    p["inspect_save"] = {"class_type": "SaveImage", "inputs": {"images": ["inspect", 0 if inspect != "IdentityAttentionInspectSTFGBoundary" else 1], "filename_prefix": "reliability_inspect"}}
    return p


# --- the table ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    id: str
    node: str  # the display name the message must name
    input: str  # the input the message must name
    build: Callable[[], dict] = field(repr=False)


def mech(config: C, edit) -> Callable[[], dict]:
    def build():
        prompt, _ = mg.mechanism_prompt(config)
        edit(prompt)
        return prompt

    return build


def graph(make, *args, **kwargs) -> Callable[[], dict]:
    return lambda: make(*args, **kwargs)


def edited(make, edit) -> Callable[[], dict]:
    def build():
        p = make()
        edit(p)
        return p

    return build


SD15 = dict(arch="sd15", seed=3)
BAD = (
    # --- masks: shapes, values, empty, batch counts that match neither 1 nor the latent batch
    Row("mask-is-an-image", PVA, "mask", mech(C(mechanism="pva_joint", **SD15), mask_into("pva_joint", "1,32,32,3"))),
    Row("mask-nan", PVA, "mask", mech(C(mechanism="pva_decoupled", **SD15), mask_into("pva_decoupled", "1,32,32", fill="nan"))),
    Row("mask-one-inf", KV, "mask", mech(C(mechanism="kv_mixed", **SD15), mask_into("kv_mixed", "1,32,32", fill="inf"))),
    Row("mask-empty-batch", NESTED, "mask", mech(C(mechanism="nested", **SD15), mask_into("nested", "0,32,32"))),
    Row("mask-1d", FACT, "mask", mech(C(mechanism="face_adapter", **SD15), mask_into("face_adapter", "32"))),
    Row("mask-batch-3-latent-2-pva", PVA, "mask", mech(C(mechanism="pva_joint", **SD15), mask_into("pva_joint", "3,32,32", batch=2))),
    Row("mask-batch-3-latent-2-fact", FACT, "mask", mech(C(mechanism="face_adapter", **SD15), mask_into("face_adapter", "3,32,32", batch=2))),
    Row("mask-batch-3-latent-2-nested", NESTED, "mask", mech(C(mechanism="nested", **SD15), mask_into("nested", "3,32,32", batch=2))),
    Row("mask-batch-3-latent-2-moa", MOA, "mask", mech(C(mechanism="moa", **SD15), chain(mask_into("moa", "3,32,32", batch=2), lambda p: set_inputs(p, "moa", router="mask")))),
    Row("mask-batch-3-latent-2-ca2", CA2, "mask", mech(C(mechanism="ca2", **SD15), mask_into("ca2", "3,32,32", batch=2))),
    Row("mask-batch-3-latent-2-stfg", STFG, "mask", mech(C(mechanism="stfg", **SD15), mask_into("stfg", "3,32,32", batch=2))),
    Row("ca2-mask-nan", CA2, "mask", mech(C(mechanism="ca2", **SD15), mask_into("ca2", "1,32,32", fill="one_nan"))),
    Row("stfg-mask-empty", STFG, "mask", mech(C(mechanism="stfg", **SD15), mask_into("stfg", "0,32,32"))),
    Row("moa-mask-nan", MOA, "mask", mech(C(mechanism="moa", **SD15), mask_into("moa", "1,32,32", fill="nan"))),
    # --- images: NaN / inf, empty batches, shapes, a photo without a face
    Row("photo-without-face", ENCODE, "images", graph(encode_graph, "1,96,96,3", fill="zeros")),
    Row("photo-nan", ENCODE, "images", graph(encode_graph, "1,96,96,3", fill="one_nan")),
    Row("photo-inf", ENCODE, "images", graph(encode_graph, "2,96,96,3", fill="inf")),
    Row("photo-empty-batch", ENCODE, "images", graph(encode_graph, "0,96,96,3")),
    Row("photo-5d", ENCODE, "images", graph(encode_graph, "1,1,96,96,3")),
    Row("photo-zero-height", ENCODE, "images", graph(encode_graph, "1,0,96,3")),
    Row("photo-of-int64", ENCODE, "images", graph(encode_graph, "1,96,96,3", dtype="int64")),
    Row("similarity-nan", SIMILARITY, "images", graph(similarity_graph, "1,96,96,3", fill="nan")),
    Row("similarity-empty-batch", SIMILARITY, "images", graph(similarity_graph, "0,96,96,3")),
    Row("ca2-image-nan", CA2, "image", mech(C(mechanism="ca2", **SD15), lambda p: (tensor(p, "bad", "1,32,32,3", fill="one_nan"), set_inputs(p, "ca2", image=["bad", 0])))),
    Row("ca2-image-empty-batch", CA2, "image", mech(C(mechanism="ca2", **SD15), lambda p: (tensor(p, "bad", "0,32,32,3"), set_inputs(p, "ca2", image=["bad", 0])))),
    Row("ca2-image-int64", CA2, "image", mech(C(mechanism="ca2", **SD15), lambda p: (tensor(p, "bad", "1,32,32,3", dtype="int64"), set_inputs(p, "ca2", image=["bad", 0])))),
    Row("ca2-image-rgba", CA2, "image", mech(C(mechanism="ca2", **SD15), lambda p: (tensor(p, "bad", "1,32,32,4"), set_inputs(p, "ca2", image=["bad", 0])))),
    Row("ca2-image-of-mask-shape", CA2, "image", mech(C(mechanism="ca2", **SD15), lambda p: (tensor(p, "bad", "1,32,32"), set_inputs(p, "ca2", image=["bad", 0])))),
    Row("ca2-image-batch-3-latent-2", CA2, "image", mech(C(mechanism="ca2", **SD15), lambda p: (tensor(p, "bad", "3,32,32,3"), set_inputs(p, "ca2", image=["bad", 0]), latent_batch(p, 2)))),
    Row("ca2-no-visual-condition", CA2, "clip_vision_output", mech(C(mechanism="ca2", **SD15), lambda p: p["ca2"]["inputs"].pop("clip_vision"))),
    Row("photo-1x1", ENCODE, "images", graph(encode_graph, "1,1,1,3")),
    Row("photo-1x96", ENCODE, "images", graph(encode_graph, "1,1,96,3")),
    Row("similarity-1x1", SIMILARITY, "images", graph(similarity_graph, "1,1,1,3")),
    Row("ca2-image-1x1", CA2, "image", mech(C(mechanism="ca2", **SD15), lambda p: (tensor(p, "bad", "1,1,1,3"), set_inputs(p, "ca2", image=["bad", 0])))),
    Row("ca2-image-7x7", CA2, "image", mech(C(mechanism="ca2", **SD15), lambda p: (tensor(p, "bad", "1,7,7,3"), set_inputs(p, "ca2", image=["bad", 0])))),
    Row("kv-mask-empty-batch", KV, "mask", mech(C(mechanism="kv_mixed", **SD15), mask_into("kv_mixed", "0,32,32"))),
    Row("fact-mask-empty-batch", FACT, "mask", mech(C(mechanism="face_adapter", **SD15), mask_into("face_adapter", "0,16,16"))),
    Row("ca2-mask-empty-batch", CA2, "mask", mech(C(mechanism="ca2", **SD15), mask_into("ca2", "0,32,32"))),
    Row("kv-mask-batch-3-latent-2", KV, "mask", mech(C(mechanism="kv_mixed", **SD15), mask_into("kv_mixed", "3,32,32", batch=2))),
    # --- numbers through links (ComfyUI checks neither NaN nor ranges on linked values)
    Row("pva-weight-nan-linked", PVA, "weight", mech(C(mechanism="pva_joint", **SD15), linked_number("pva_joint", "weight", "nan"))),
    Row("pva-weight-inf-linked", PVA, "weight", mech(C(mechanism="pva_decoupled", **SD15), linked_number("pva_decoupled", "weight", "inf"))),
    Row("kv-weight-minus-inf-linked", KV, "weight", mech(C(mechanism="kv_mixed", **SD15), linked_number("kv_mixed", "weight", "-inf"))),
    Row("nested-weight-1e30-linked", NESTED, "weight", mech(C(mechanism="nested", **SD15), linked_number("nested", "weight", "1e30"))),
    Row("fact-start-percent-1.5-linked", FACT, "start_percent", mech(C(mechanism="face_adapter", **SD15), linked_number("face_adapter", "start_percent", "1.5"))),
    Row("moa-end-percent-nan-linked", MOA, "end_percent", mech(C(mechanism="moa", **SD15), linked_number("moa", "end_percent", "nan"))),
    Row("ca2-sharpness-nan-linked", CA2, "sharpness", mech(C(mechanism="ca2", **SD15), linked_number("ca2", "sharpness", "nan"))),
    Row("stfg-strength-inf-linked", STFG, "strength", mech(C(mechanism="stfg", **SD15), linked_number("stfg", "strength", "inf"))),
    Row("stfg-band-minus-1-linked", STFG, "band", mech(C(mechanism="stfg", **SD15), linked_number("stfg", "band", "-1"))),
    Row("nested-token-index-minus-5-linked", NESTED, "token_index", mech(C(mechanism="nested", **SD15), linked_number("nested", "token_index", "-5", output=1))),
    Row("nested-token-index-huge-linked", NESTED, "token_index", mech(C(mechanism="nested", **SD15), linked_number("nested", "token_index", "inf", output=1))),
    # --- latents
    Row("stfg-original-nan", STFG, "original_latent", mech(C(mechanism="stfg", **SD15), lambda p: (tensor(p, "bad", "1,4,4,4", fill="one_nan"), set_inputs(p, "stfg", original_latent=["bad", 2])))),
    Row("stfg-original-empty-batch", STFG, "original_latent", mech(C(mechanism="stfg", **SD15), lambda p: (tensor(p, "bad", "0,4,4,4"), set_inputs(p, "stfg", original_latent=["bad", 2])))),
    Row("stfg-original-16-channels", STFG, "original_latent", mech(C(mechanism="stfg", **SD15), lambda p: (tensor(p, "bad", "1,16,4,4"), set_inputs(p, "stfg", original_latent=["bad", 2])))),
    Row("stfg-original-3d", STFG, "original_latent", mech(C(mechanism="stfg", **SD15), lambda p: (tensor(p, "bad", "4,4,4"), set_inputs(p, "stfg", original_latent=["bad", 2])))),
    Row("stfg-original-other-size", STFG, "original_latent", mech(C(mechanism="stfg", **SD15), lambda p: (tensor(p, "bad", "1,4,8,8"), set_inputs(p, "stfg", original_latent=["bad", 2])))),
    Row("stfg-original-batch-3-latent-2", STFG, "original_latent", mech(C(mechanism="stfg", **SD15), lambda p: (tensor(p, "bad", "3,4,4,4"), set_inputs(p, "stfg", original_latent=["bad", 2]), latent_batch(p, 2)))),
    Row("ca2-scores-latent-3d", CA2_SCORES, "samples", edited(graph(inspect_graph, "ca2", "IdentityAttentionInspectCA2Scores", model=["ca2", 0], samples=["bad", 2], layers="mean of all layers"), lambda p: tensor(p, "bad", "4,4,4"))),
    Row("stfg-boundary-latent-nan", STFG_BOUNDARY, "samples", edited(graph(inspect_graph, "stfg", "IdentityAttentionInspectSTFGBoundary", model=["stfg", 0], samples=["bad", 2]), lambda p: tensor(p, "bad", "1,4,4,4", fill="nan"))),
    Row("router-maps-latent-3d", ROUTER, "latent", edited(graph(inspect_graph, "moa", "IdentityAttentionInspectRouter", model=["moa", 0], latent=["bad", 2], half="cond", routing_node=0), lambda p: tensor(p, "bad", "4,4,4"))),
    # --- wrong base model: SDXL weights on SD1.5 and SD1.5 weights on SDXL
    Row("pva-sdxl-adapter-on-sd15", PVA, "id_adapter", mech(C(mechanism="pva_joint", **SD15), adapter_from("sdxl"))),
    Row("pva-sd15-adapter-on-sdxl", PVA, "id_adapter", mech(C("sdxl", "pva_decoupled", seed=3), adapter_from("sd15"))),
    Row("kv-sdxl-value-adapter-on-sd15", KV, "value_adapter", mech(C(mechanism="kv_mixed", **SD15), adapter_from("sdxl", "value_adapter"))),
    Row("nested-sdxl-adapter-on-sd15", NESTED, "adapter", mech(C(mechanism="nested", **SD15), adapter_from("sdxl"))),
    Row("ca2-sdxl-adapter-on-sd15", CA2, "id_adapter", mech(C(mechanism="ca2", **SD15), adapter_from("sdxl", "image_adapter"))),
    Row("fact-sdxl-adapter-on-sd15", FACT, "adapter", mech(C(mechanism="face_adapter", **SD15), adapter_from("sdxl", "fact_adapter"))),
    Row("loaded-sdxl-file-on-sd15", LOAD_ADAPTER, "model", mech(C(mechanism="loaded_adapter", **SD15), lambda p: set_inputs(p, "loaded", adapter=f"ipadapter/{mg.LOADED_ADAPTER_FILE['sdxl']}"))),
    Row("stage-tokens-sdxl-with-sd15-clip", CREATE_TOKENS, "base", mech(C(mechanism="stage_tokens", **SD15), lambda p: set_inputs(p, "tokens", base="sdxl"))),
    Row("stage-contexts-sd15-on-sdxl", STAGE, "stage_contexts", mech(C("sdxl", "stage_tokens", seed=3), lambda p: (
        p.update({"other_models": {"class_type": "IdentityAttentionTestKit_TinyModels", "inputs": {"arch": "sd15", "seed": 0}}}),
        set_inputs(p, "tokens", base="sd15", clip=["other_models", 1]), set_inputs(p, "token_prompt", clip=["other_models", 1])))),
    # --- missing features, wrong adapter formats
    Row("pva-clip-adapter-identity-without-clip", PVA, "identity", mech(C(mechanism="pva_decoupled", **SD15), lambda p: set_inputs(p, "adapter", projector_input="clip_embeds"))),
    Row("kv-clip-value-adapter-without-clip", KV, "value_identity", mech(C(mechanism="kv_mixed", **SD15), lambda p: set_inputs(p, "value_adapter", projector_input="clip_embeds"))),
    Row("nested-clip-adapter-without-clip", NESTED, "identity", mech(C(mechanism="nested", **SD15), lambda p: set_inputs(p, "adapter", projector_input="clip_embeds"))),
    Row("fact-identity-without-face-tokens", FACT, "identity", mech(C(mechanism="face_adapter", **SD15), lambda p: set_inputs(p, "face_identity", with_face_tokens=False))),
    Row("fact-given-an-ip-adapter", FACT, "adapter", mech(C(mechanism="face_adapter", **SD15), lambda p: (
        p.update({"ip": {"class_type": "IdentityAttentionTestKit_SyntheticAdapter", "inputs": {"model": ["models", 0], "num_tokens": 4, "seed": 1, "visual_q": False}}}),
        set_inputs(p, "face_adapter", adapter=["ip", 0])))),
    Row("pva-given-a-fact-adapter", PVA, "id_adapter", mech(C(mechanism="pva_joint", **SD15), fact_adapter_into("pva_joint", "id_adapter"))),
    Row("kv-given-a-fact-adapter", KV, "key_adapter", mech(C(mechanism="kv_mixed", **SD15), fact_adapter_into("kv_mixed", "key_adapter"))),
    Row("nested-given-a-fact-adapter", NESTED, "adapter", mech(C(mechanism="nested", **SD15), fact_adapter_into("nested", "adapter"))),
    Row("ca2-given-a-face-adapter", CA2, "id_adapter", mech(C(mechanism="ca2", **SD15), lambda p: set_inputs(p, "image_adapter", projector_input="arcface_normed"))),
    Row("moa-learned-router-given-an-ip-adapter", MOA, "router_weights", mech(C(mechanism="moa", **SD15), lambda p: set_inputs(p, "moa", router="learned", router_weights=["adapter", 0]))),
    Row("moa-learned-router-without-weights", MOA, "router_weights", mech(C(mechanism="moa", **SD15), lambda p: set_inputs(p, "moa", router="learned"))),
    Row("moa-without-identity-attention", MOA, "model", mech(C(mechanism="moa", **SD15), lambda p: set_inputs(p, "moa", model=["models", 0]))),
    # --- damaged identities (another encoder, a wrong CLIP vision model)
    Row("pva-nan-embedding", PVA, "identity", mech(C(mechanism="pva_joint", **SD15), damaged_identity("pva_joint", "nan_embedding"))),
    Row("nested-nan-embedding", NESTED, "identity", mech(C(mechanism="nested", **SD15), damaged_identity("nested", "nan_embedding"))),
    Row("pva-clip-embeds-of-another-width", PVA, "identity", mech(C(mechanism="pva_decoupled", **SD15), chain(
        lambda p: set_inputs(p, "adapter", projector_input="clip_embeds"), damaged_identity("pva_decoupled", "clip_embeds_width_1280", with_clip=True)))),
    Row("pva-clip-embeds-inf", PVA, "identity", mech(C(mechanism="pva_decoupled", **SD15), chain(
        lambda p: set_inputs(p, "adapter", projector_input="clip_embeds"), damaged_identity("pva_decoupled", "inf_clip_embeds", with_clip=True)))),
    Row("fact-face-tokens-of-another-width", FACT, "adapter", mech(C(mechanism="face_adapter", **SD15), damaged_identity("face_adapter", "face_tokens_width_768", source="face_identity"))),
    Row("fact-empty-face-tokens", FACT, "identity", mech(C(mechanism="face_adapter", **SD15), damaged_identity("face_adapter", "empty_face_tokens", source="face_identity"))),
    # --- token counts
    Row("kv-token-counts-differ", KV, "token_mismatch", mech(C(mechanism="kv_mixed", **SD15), lambda p: set_inputs(p, "kv_mixed", token_mismatch="error"))),
    Row("nested-token-index-past-the-prompt", NESTED, "token_index", mech(C(mechanism="nested", **SD15), lambda p: set_inputs(p, "nested", token_index=600))),
    Row("stage-tokens-too-many-vectors", PROMPT_TOKENS, "text", mech(C(mechanism="stage_tokens", **SD15), lambda p: (
        set_inputs(p, "tokens", vectors=8), set_inputs(p, "token_prompt", text=" ".join(["V*"] * 40) + " person")))),
    Row("stage-boundaries-not-numbers", STAGE, "stage_boundaries", mech(C(mechanism="stage_tokens", **SD15), lambda p: set_inputs(p, "stage_tokens", stage_boundaries="early, late"))),
    Row("stage-prompt-without-placeholder", PROMPT_TOKENS, "text", mech(C(mechanism="stage_tokens", **SD15), lambda p: set_inputs(p, "token_prompt", text="a photo of a person"))),
    Row("create-tokens-empty-word", CREATE_TOKENS, "init_word", mech(C(mechanism="stage_tokens", **SD15), lambda p: set_inputs(p, "tokens", init="word", init_word="  "))),
    # --- files
    Row("adapter-file-truncated", LOAD_ADAPTER, "adapter", mech(C(mechanism="loaded_adapter", **SD15), lambda p: set_inputs(p, "loaded", adapter=f"ipadapter/{ADAPTER_TRUNCATED}"))),
    Row("adapter-file-not-an-adapter", LOAD_ADAPTER, "adapter", mech(C(mechanism="loaded_adapter", **SD15), lambda p: set_inputs(p, "loaded", adapter=f"ipadapter/{ADAPTER_FOREIGN}"))),
    Row("adapter-file-nan-weights", LOAD_ADAPTER, "adapter", mech(C(mechanism="loaded_adapter", **SD15), lambda p: set_inputs(p, "loaded", adapter=f"ipadapter/{ADAPTER_NAN}"))),
    Row("tokens-file-nan", LOAD_TOKENS, "tokens_name", graph(tokens_file_graph, TOKENS_NAN_FILE)),
    Row("tokens-file-foreign", LOAD_TOKENS, "tokens_name", graph(tokens_file_graph, TOKENS_FOREIGN_FILE)),
    Row("face-encoder-file-damaged", LOAD_ENCODER, "encoder_name", graph(face_tokens_graph, ENCODER_DAMAGED_FILE)),
    Row("face-tokens-head-mask-of-another-size", FACE_TOKENS, "head_mask", edited(graph(face_tokens_graph), lambda p: (
        tensor(p, "bad", "1,40,40"), set_inputs(p, "tokens_of_face", head_mask=["bad", 1])))),
    # --- inspect nodes without what they show
    Row("router-maps-of-a-model-without-moa", ROUTER, "model", graph(inspect_graph, "pva_joint", "IdentityAttentionInspectRouter", model=["pva_joint", 0], latent=["sampler", 0], half="cond", routing_node=0)),
    Row("ca2-scores-of-a-model-without-ca2", CA2_SCORES, "model", graph(inspect_graph, "stfg", "IdentityAttentionInspectCA2Scores", model=["stfg", 0], samples=["sampler", 0], layers="mean of all layers")),
    Row("stfg-boundary-of-a-model-without-stfg", STFG_BOUNDARY, "model", graph(inspect_graph, "ca2", "IdentityAttentionInspectSTFGBoundary", model=["ca2", 0], samples=["sampler", 0])),
)

ACCEPTED = (
    ("mask-of-another-size-and-aspect", mech(C(mechanism="pva_joint", **SD15), mask_into("pva_joint", "1,7,5"))),
    ("mask-2d", mech(C(mechanism="nested", **SD15), mask_into("nested", "24,40"))),
    ("mask-bool", mech(C(mechanism="face_adapter", **SD15), mask_into("face_adapter", "1,32,32", dtype="bool", fill="ones"))),
    ("mask-float16-per-image", mech(C(mechanism="kv_mixed", **SD15), mask_into("kv_mixed", "2,16,16", dtype="float16", batch=2))),
    ("ca2-mask-of-another-size", mech(C(mechanism="ca2", **SD15), mask_into("ca2", "1,9,13"))),
    ("stfg-mask-bool", mech(C(mechanism="stfg", **SD15), mask_into("stfg", "1,32,32", dtype="bool", fill="ones"))),
    ("stfg-original-float16", mech(C(mechanism="stfg", **SD15), lambda p: (tensor(p, "bad", "1,4,4,4", dtype="float16"), set_inputs(p, "stfg", original_latent=["bad", 2])))),
    ("photo-rgba", graph(encode_graph, file="reliability_face_rgba.png")),
    ("photo-uint8", edited(graph(encode_graph, file="reliability_face.png"), lambda p: (
        tensor(p, "bad", "1,96,96,3", dtype="uint8", fill="zeros"), p.update({"uint8_check": {"class_type": "IdentityAttentionIdentitySimilarity", "inputs": {
            "images": ["bad", 0], "identity": ["encode", 0], "face_analysis": ["face_analysis", 0], "face": "largest"}}}),
        p.update({"uint8_save": {"class_type": "SaveImage", "inputs": {"images": ["uint8_check", 2], "filename_prefix": "reliability_uint8"}}})))),
    ("ca2-image-uint8", mech(C(mechanism="ca2", **SD15), lambda p: (tensor(p, "bad", "1,32,32,3", dtype="uint8", fill="ones"), set_inputs(p, "ca2", image=["bad", 0])))),
    ("ca2-image-float16", mech(C(mechanism="ca2", **SD15), lambda p: (tensor(p, "bad", "1,48,40,3", dtype="float16"), set_inputs(p, "ca2", image=["bad", 0])))),
    ("pva-huge-token-count", mech(C(mechanism="pva_decoupled", **SD15), lambda p: (set_inputs(p, "identity", references=8), set_inputs(p, "adapter", num_tokens=64)))),
)


# --- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(instance):
    """The toy face pack, photos, a tiny TransFace file and broken token / encoder files in the instance."""
    from PIL import Image
    from safetensors.torch import save_file

    from test_transface_encoder import transface_state_dict

    toy.copy_pack(toy.toy_pack(), instance.models / "insightface" / "models" / "toypack")
    img = toy.blank(480, 640)
    toy.plant(img, 256, 192, 32, toy.astronaut_face())
    Image.fromarray(img).save(instance.input / "reliability_face.png")
    Image.fromarray(img).convert("RGBA").save(instance.input / "reliability_face_rgba.png")
    mg.write_loaded_adapter_files(instance.models)
    folder = instance.models / "identity_attention"
    if not (folder / ENCODER_FILE).exists():
        torch.save(transface_state_dict(depth=2, heads=False, seed=7), folder / ENCODER_FILE)
    (folder / ENCODER_DAMAGED_FILE).write_bytes((folder / ENCODER_FILE).read_bytes()[:5000])
    tensors, metadata = pack("adapters.attention.stage_tokens").make_tokens("sd15", seed=3).to_file_dict()
    save_file({k: torch.full_like(v, float("nan")) if k.endswith(".keys") else v for k, v in tensors.items()}, str(folder / TOKENS_NAN_FILE), metadata=metadata)
    save_file({"something.else": torch.zeros(3)}, str(folder / TOKENS_FOREIGN_FILE))
    adapters = instance.models / "ipadapter"
    good = (adapters / mg.LOADED_ADAPTER_FILE["sd15"]).read_bytes()
    (adapters / ADAPTER_TRUNCATED).write_bytes(good[: len(good) // 2])
    save_file({f"lora_unet_down_blocks_0.lora_{i}.weight": torch.zeros(4, 4) for i in range(3)}, str(adapters / ADAPTER_FOREIGN))
    state, _ = wf.ip_family_state("faceid", "sd15", seed=6)
    state[next(k for k in state if k.endswith("to_k_ip.weight"))][0, 0] = float("nan")
    save_file(state, str(adapters / ADAPTER_NAN))
    torch.save({"ip_adapter.1.to_k_ip.weight": torch.zeros(2, 2), "payload": RunsCode(instance.root / SENTINEL)}, str(adapters / ADAPTER_CODE))
    return folder


class RunsCode:
    """Unpickling this writes a sentinel file (it never may)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').write('pwned')",))


@pytest.fixture(scope="module")
def clean_before(server, files):
    """A prompt with every mechanism, run before the table: what it must still give after it.

    Afterwards the server's history is cleared: the rows that link a NaN number fail while running, and
    ComfyUI keeps the failed inputs in /history as bare ``NaN`` (Python's json), which the 0.3.75 page
    cannot parse when a later page test opens it (the host's behaviour, not the pack's)."""
    prompt, _ = mg.mechanism_prompt(C("sd15", mg.ALL, seed=21), tag="clean_before_")
    yield latent_of(server, server.run(prompt))
    server.post("/history", {"clear": True})


def _still_answers(server):
    assert server.get("/object_info/KSampler", timeout=10)
    assert server.proc.poll() is None


@pytest.mark.parametrize("row", BAD, ids=[r.id for r in BAD])
def test_bad_input_raises_one_clear_error(server, files, clean_before, row):
    with pytest.raises(PromptFailed) as failed:
        server.run(row.build(), timeout=120)
    errors = [data for kind, data in failed.value.messages or [] if kind == "execution_error"]
    assert len(errors) == 1, f"expected one execution error, got {failed.value}"
    message = failed.value.exception_message()
    assert errors[0]["exception_type"].endswith("IdentityAttentionError"), f"{errors[0]['exception_type']}: {message}"
    assert row.node in message, f"the message does not name the node {row.node!r}: {message}"
    assert f"input '{row.input}'" in message, f"the message does not name the input {row.input!r}: {message}"
    assert "Fix:" in message, message
    _still_answers(server)


@pytest.mark.parametrize("name,build", ACCEPTED, ids=[a[0] for a in ACCEPTED])
def test_unusual_but_valid_input_runs(server, files, clean_before, name, build):
    entry = server.run(build(), timeout=120)
    for kind in ("latents", "images"):
        for path in server.output_files(entry, kind):
            assert path.exists()


def test_adapter_file_that_would_run_code_is_refused_and_never_runs(server, instance, files, clean_before):
    prompt, _ = mg.mechanism_prompt(C(mechanism="loaded_adapter", **SD15))
    set_inputs(prompt, "loaded", adapter=f"ipadapter/{ADAPTER_CODE}")
    with pytest.raises(PromptFailed) as failed:
        server.run(prompt)
    message = failed.value.exception_message()
    assert message.startswith(f"{LOAD_ADAPTER}: input 'adapter':") and "could run code" in message and "Fix:" in message
    assert not (instance.root / SENTINEL).exists()
    _still_answers(server)


def test_a_clean_prompt_after_the_table_equals_its_reference(server, files, clean_before):
    prompt, _ = mg.mechanism_prompt(C("sd15", mg.ALL, seed=21), tag="clean_after_")
    assert torch.equal(latent_of(server, server.run(prompt)), clean_before)
