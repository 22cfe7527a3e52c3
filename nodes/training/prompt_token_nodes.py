"""Node: Identity prompt (a prompt whose <new1> is the learned word of a personalized identity)."""

from __future__ import annotations

from ...adapters.projectors.id_adapter import IdAdapter
from ..common.errors import IdentityAttentionError
from ..dispatch.prompt_token import DEFAULT_TEMPLATE, PLACEHOLDER, encode_prompt
from .pva_training import stored_vectors
from ..dispatch.stage_inputs import CATEGORY


class IdentityPrompt:
    NODE_ID = "IdentityAttentionIdentityPrompt"
    DISPLAY_NAME = "Identity prompt"
    CATEGORY = f"{CATEGORY}/encode"
    DESCRIPTION = (
        f"Encodes a prompt in which {PLACEHOLDER} is the word learned for a person by 'Personalize identity' (PVA prompts "
        f"'{DEFAULT_TEMPLATE}'). Use it as the positive prompt with the personalized adapter."
    )
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("The encoded prompt: connect it to the sampler's positive input.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip": ("CLIP", {"tooltip": "The text encoder of the checkpoint the identity was personalized on."}),
                "id_adapter": ("ID_ADAPTER", {"tooltip": "The personalized adapter from 'Personalize identity' (or its saved file): it carries the learned word."}),
                "text": ("STRING", {"default": DEFAULT_TEMPLATE, "multiline": True, "tooltip": f"The prompt; write {PLACEHOLDER} where the person goes, e.g. 'a painting of a {PLACEHOLDER} person in a garden'."}),
            }
        }

    def encode(self, clip, id_adapter, text):
        node = self.DISPLAY_NAME
        if not isinstance(id_adapter, IdAdapter):
            raise IdentityAttentionError(f"expected an ID_ADAPTER, got {type(id_adapter).__name__}", node=node, input_name="id_adapter", fix="connect the output of 'Personalize identity' or 'Load identity adapter'")
        vectors = stored_vectors(id_adapter)
        if not vectors:
            raise IdentityAttentionError(
                "this adapter carries no learned word", node=node, input_name="id_adapter",
                fix="personalize it with a token learning rate above 0, or use CLIPTextEncode without <new1>",
            )
        return (encode_prompt(clip, text, vectors, PLACEHOLDER, node),)


NODES = [IdentityPrompt]
