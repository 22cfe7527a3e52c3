"""A small CLIP text encoder of the real SD1.5 kind, built through the host's own classes.

``comfy.sd1_clip.SD1ClipModel`` with ``SDClipModel`` and a one-layer config of
the real width (768) and vocabulary: the host's real tokenizer, token
embedding table and textual-embedding path, with random weights. Used where a
test must show that vectors put into the token list reach the transformer
exactly like a word's embedding.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

import comfy.sd
import comfy.sd1_clip

from testkit.tiny_models import randomize_

CONFIG = {
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 128,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 12,
    "num_hidden_layers": 1,
    "pad_token_id": 1,
    "projection_dim": 768,
    "torch_dtype": "float32",
    "vocab_size": 49408,
}


class _Target:
    def __init__(self, config_path: str):
        self.clip = comfy.sd1_clip.SD1ClipModel
        self.tokenizer = comfy.sd1_clip.SD1Tokenizer
        self.params = {"clip_model": comfy.sd1_clip.SDClipModel, "textmodel_json_config": config_path}


def build_small_sd15_clip(tmp_dir: Path, seed: int = 0):
    path = Path(tmp_dir) / "small_clip_config.json"
    path.write_text(json.dumps(CONFIG))
    with torch.no_grad():  # ComfyUI builds models without autograd (it copies into parameters)
        clip = comfy.sd.CLIP(target=_Target(str(path)))
    randomize_(clip.cond_stage_model, seed)
    return clip
